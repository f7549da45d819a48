"""The DataComp metadata layout: a flat folder of `<stem>.parquet` + `<stem>.npz` pairs, row i
of the npz = row i of the parquet.

Embeddings are computed in row chunks and streamed into the npz (memory stays flat whatever
the shard size). Scores are cos(img, txt) of the fp32 unit vectors *before* fp16 rounding, as
a real scorer computes them; recomputing from the stored fp16 arrays agrees to ~1e-3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from .embed import Scorer, Semantics, TextContent
from .plan import IK, RESERVOIR, Reservoir, ShardPlan, hex_ids, rng_for
from .writers import write_npz, write_parquet

CHUNK = 4096
_TAG_IMG, _TAG_SHA, _TAG_FACE, _TAG_NEAR = 0x49, 0x48, 0x46, 0x4E

PARQUET_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("sha256", pa.string()),
    ("clip_b32_similarity_score", pa.float64()), ("clip_l14_similarity_score", pa.float64()),
    ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
])


def _face_bboxes(r: np.random.Generator, m: int) -> pa.Array:
    """Mostly empty; ~7% of rows hold 1-3 boxes [x0, y0, x1, y1] in relative coordinates."""
    n_faces = np.where(r.random(m) < 0.07, r.integers(1, 4, m), 0)
    total = int(n_faces.sum())
    x0 = r.uniform(0.0, 0.8, total)
    y0 = r.uniform(0.0, 0.8, total)
    side = r.uniform(0.05, 0.2, total)
    boxes = np.stack([x0, y0, np.minimum(x0 + side, 1.0), np.minimum(y0 + side * 1.2, 1.0)], axis=1).ravel()
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * total + 1, 4, dtype=np.int32)), pa.array(boxes))
    outer_off = np.concatenate([[0], np.cumsum(n_faces)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer_off), inner)


def write_shard(plan: ShardPlan, out: Path, *, seed: int, digits: int, scorers: dict[str, Scorer],
                sem: Semantics, compressed: bool, reservoir: Reservoir | None,
                advance: Callable[[int], None]) -> Reservoir:
    stem = f"{plan.shard:0{digits}d}"
    m = plan.m
    cap = plan.captions
    tc = TextContent(cap.cap_concept, cap.cap_colour, cap.cap_bg, cap.lang_idx, cap.junk_idx, cap.text_hash())
    s_lat = sem.image_latent(plan.cluster, rng_for(seed, _TAG_IMG, plan.shard, 0))
    weak = plan.img_kind == IK["small"]
    sha = hex_ids(rng_for(seed, _TAG_SHA, plan.shard), m, nbytes=32)
    dup_rows = np.flatnonzero(plan.dup_src > 0)
    for j in dup_rows[plan.img_kind[dup_rows] == IK["exact_dup"]]:
        src, oi = int(plan.dup_src[j]), int(plan.dup_idx[j])
        sha[j] = sha[oi] if src == 1 else reservoir.payload["sha256"][oi]
    need_local = set(plan.dup_idx[plan.dup_src == 1].tolist())
    res_rows = np.flatnonzero(plan.img_kind == IK["ok"])[:RESERVOIR]
    keep_idx = np.array(sorted(need_local | set(res_rows.tolist())), dtype=np.int64)
    scores = {name: np.zeros(m, np.float64) for name in scorers}
    kept: dict[str, dict[int, np.ndarray]] = {name: {} for name in scorers}

    def image_chunks(name: str, sc: Scorer) -> Iterator[np.ndarray]:
        tag = 1 if name == "b32" else 2
        for c0 in range(0, m, CHUNK):
            c1 = min(m, c0 + CHUNK)
            noise = sc.image_noise(rng_for(seed, _TAG_IMG, plan.shard, tag, c0 // CHUNK), c1 - c0)
            img = sc.image(s_lat[c0:c1], noise, weak[c0:c1])
            for j in keep_idx[(keep_idx >= c0) & (keep_idx < c1)]:   # originals are never duplicates
                kept[name][int(j)] = img[j - c0].copy()
            for j in dup_rows[(dup_rows >= c0) & (dup_rows < c1)]:
                src, oi = int(plan.dup_src[j]), int(plan.dup_idx[j])
                orig = kept[name][oi] if src == 1 else reservoir.payload[name][oi]
                if plan.img_kind[j] == IK["exact_dup"]:
                    img[j - c0] = orig
                else:   # near duplicate: the original nudged by this row's noise, renormalised
                    v = orig + plan.near_eps[j] * noise[j - c0] / max(1e-6, float(np.linalg.norm(noise[j - c0])))
                    img[j - c0] = v / np.linalg.norm(v)
            txt = sc.text(tc.take(slice(c0, c1)))
            scores[name][c0:c1] = np.einsum("ij,ij->i", img, txt)
            if name == "l14" or len(scorers) == 1:
                advance(c1 - c0)
            yield img.astype(np.float16)

    def text_chunks(sc: Scorer) -> Iterator[np.ndarray]:
        for c0 in range(0, m, CHUNK):
            yield sc.text(tc.take(slice(c0, min(m, c0 + CHUNK)))).astype(np.float16)

    members = []
    for name, sc in scorers.items():
        members.append((f"{name}_img", (m, sc.dim), np.float16, image_chunks(name, sc)))
        members.append((f"{name}_txt", (m, sc.dim), np.float16, text_chunks(sc)))
    write_npz(out / f"{stem}.npz", members, compressed=compressed)

    table = pa.table({
        "uid": plan.uid, "url": plan.url, "text": cap.text,
        "original_width": plan.orig_w.astype(np.int64), "original_height": plan.orig_h.astype(np.int64),
        "sha256": sha,
        "clip_b32_similarity_score": scores.get("b32", np.full(m, np.nan)),
        "clip_l14_similarity_score": scores.get("l14", np.full(m, np.nan)),
        "face_bboxes": _face_bboxes(rng_for(seed, _TAG_FACE, plan.shard), m),
    }, schema=PARQUET_SCHEMA)
    write_parquet(out / f"{stem}.parquet", table)

    def payload(idx):
        p = {name: np.stack([kept[name][int(j)] for j in idx]) if len(idx) else np.zeros((0, sc.dim), np.float32)
             for name, sc in scorers.items()}
        p["sha256"] = [sha[int(j)] for j in idx]
        return p
    return plan.reservoir(payload)
