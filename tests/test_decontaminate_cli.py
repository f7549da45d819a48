"""Decontamination end to end: copies of pool images placed in an 'evaluation' folder are embedded
with the pool's model (`curate embed-images`) and exactly those samples are dropped, each decision
naming the evaluation file it matched."""

from __future__ import annotations

import tarfile

import duckdb
import numpy as np
import torch
from PIL import Image

from conftest import run_cli, run_json


def test_embed_images_and_decontaminate(tmp_path):
    import open_clip

    from curate.models.specs import ensure_configs_registered

    ensure_configs_registered()
    torch.manual_seed(1)
    ckpt = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("curate-tiny-vit").state_dict(), ckpt)
    spec = f"curate-tiny-vit@{ckpt},name=tiny"
    pool, ws, evald = tmp_path / "pool", tmp_path / "ws", tmp_path / "eval"
    run_cli("synth", pool, "--layout", "wds", "--n", "150", "--seed", "4", "--no-defects")
    run_json("ingest", pool, "-w", ws)
    run_json("score", "-w", ws, "--model", spec, "--device", "cpu", "--workers", "0")

    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    rows = con.execute("SELECT s.uid, sh.path, s.key, s.image_ext FROM samples s JOIN shards sh USING (shard_id) "
                       "ORDER BY s.uid LIMIT 4").fetchall()
    con.close()
    evald.mkdir()
    for uid, path, key, ext in rows:
        with tarfile.open(path) as tf:
            (evald / f"{uid}.{ext}").write_bytes(tf.extractfile(f"{key}.{ext}").read())
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype("uint8")).save(evald / f"other{i}.png")
    (evald / "broken.jpg").write_bytes(b"not an image")

    out = run_json("embed-images", evald, "--model", spec, "--out", tmp_path / "eval.npy", "--device", "cpu")
    assert out["images"] == 8 and out["embedded"] == 7 and out["undecodable"] == 1
    files = (tmp_path / "eval.files.txt").read_text().splitlines()
    assert len(files) == 7 and np.load(tmp_path / "eval.npy").shape == (7, out["dim"])

    res = run_json("prune", "-w", ws, "-p", "decontaminate", "--set", f"decontaminate.eval_embeddings={tmp_path / 'eval.npy'}",
                   "--set", "decontaminate.scorer=tiny", "--set", "decontaminate.threshold=0.9999")
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    dropped = con.execute("SELECT uid, detail, value FROM decisions WHERE run_id = ? AND stage = 'decontaminate' "
                          "AND NOT keep", [res["run_id"]]).fetchall()
    con.close()
    assert {u for u, _, _ in dropped} == {r[0] for r in rows}
    for uid, detail, value in dropped:
        row = int(detail.split("eval_row=")[1].split()[0].rstrip(","))
        assert files[row].split("/")[-1].startswith(uid) and value >= 0.9999
