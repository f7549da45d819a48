"""Image embeddings of a folder of images (an evaluation set), with the same model and the same
preprocessing `curate score` uses, for the `decontaminate` stage.

Output: `OUT.npy` (float32, L2-normalised, one row per decodable image, sorted by path) and
`OUT.files.txt` (the image path of each row, so a decision's `eval_row=<i>` names a file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import console
from ..errors import UsageError
from ..workspace import atomic_path, atomic_save_npy

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def embed_folder(folder: Path, out: Path, spec, *, device: str = "auto", batch_size: int = 64,
                 cache_dir=None) -> dict:
    from ..models.loader import load_models
    from .device import resolve_device
    from .infer import MultiScorer

    files = list_images(folder)
    (model,) = load_models([spec], resolve_device(device), cache_dir=cache_dir)
    scorer = MultiScorer([model])
    collate = scorer.collator()
    rows: list[np.ndarray] = []
    kept: list[str] = []
    failed: list[tuple[str, str]] = []
    with console.progress() as bar:
        task = bar.add_task("embed images", total=len(files))
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            batch = collate([(str(p), p.read_bytes(), "") for p in chunk])
            out_ = scorer.score(batch)[model.name]
            ok = batch.ok
            rows.append(out_.img[ok].astype(np.float32))
            kept.extend(str(p) for p, good in zip(chunk, ok) if good)
            failed.extend((str(p), r) for p, r in zip(chunk, batch.reasons) if r is not None)
            bar.advance(task, len(chunk))
    emb = np.concatenate(rows) if rows else np.zeros((0, model.embed_dim), np.float32)
    if emb.shape[0] == 0:
        raise UsageError(f"none of the {len(files)} images in {folder} could be decoded")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = out if out.suffix == ".npy" else out.with_suffix(".npy")
    atomic_save_npy(out, emb)
    listing = out.with_suffix(".files.txt")
    with atomic_path(listing) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in kept))
    return {"images": len(files), "embedded": int(emb.shape[0]), "undecodable": len(failed),
            "failures": [{"path": p, "reason": r} for p, r in failed[:20]], "model": spec.canonical,
            "scorer_name": spec.name, "dim": int(emb.shape[1]), "out": str(out), "files": str(listing)}
