"""The webdataset layout, as img2dataset writes it: per shard `NNNNN.tar` (members KEY.jpg,
KEY.txt, KEY.json), `NNNNN_stats.json` and `NNNNN.parquet` (one row per URL, failed ones too)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from . import render as R
from . import vocab as V
from .plan import IK, NEAR_KINDS, RESERVOIR, Reservoir, ShardPlan, rng_for
from .writers import TarShard, write_json, write_parquet

# Appended to a caption whose .txt member is then written in cp1252 (invalid UTF-8): a classic
# mojibake source (curly quotes, an em dash and an accented letter from a Windows tool).
BAD_UTF8_SUFFIX = " \u2014 \u201cCaf\u00e9\u201d collection"
_TAG_ROW, _TAG_PAYLOAD, _TAG_DL = 0x52, 0x50, 0x44


def sidecar_schema(no_uid: bool) -> pa.Schema:
    fields = [] if no_uid else [("uid", pa.string())]
    fields += [("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
               ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
               ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string())]
    return pa.schema(fields)


def write_shard(plan: ShardPlan, out: Path, *, seed: int, digits: int, no_uid: bool,
                reservoir: Reservoir | None, advance: Callable[[int], None]) -> tuple[dict, Reservoir]:
    """Render and write one shard; returns (stats, reservoir for the next shard)."""
    name = f"{plan.shard:0{digits}d}"
    needed_local = set(plan.dup_idx[plan.dup_src == 1].tolist())
    res_idx = set(np.flatnonzero(plan.img_kind == IK["ok"])[:RESERVOIR].tolist())
    kept: dict[int, tuple[bytes, str]] = {}
    rows: dict[str, list] = {f.name: [] for f in sidecar_schema(no_uid)}
    status_counts: Counter[str] = Counter()
    successes = failed = 0
    tar = TarShard(out / f"{name}.tar")
    ok = False
    try:
        for i in range(plan.m):
            gidx = plan.start + i
            kind = int(plan.img_kind[i])
            caption = plan.captions.text[i]
            if kind == IK["bad_utf8"]:
                caption = caption + BAD_UTF8_SUFFIX
            meta_row = {"uid": plan.uid[i], "url": plan.url[i], "caption": caption, "key": plan.key[i]}
            if kind == IK["failed_download"]:
                err = V.DOWNLOAD_ERRORS[int(rng_for(seed, _TAG_DL, gidx).integers(len(V.DOWNLOAD_ERRORS)))]
                meta_row.update(status="failed_to_download", error_message=err, width=None, height=None,
                                original_width=None, original_height=None, sha256=None)
                status_counts[err] += 1
                failed += 1
                _append(rows, meta_row)
                advance(1)
                continue
            data, ext = _payload(plan, i, kind, seed, gidx, kept, reservoir)
            if i in needed_local or i in res_idx:
                kept[i] = (data, ext)
            dims_known = kind not in (IK["corrupt"], IK["non_image"])
            meta_row.update(
                status="success", error_message=None,
                width=int(plan.w[i]) if dims_known else None, height=int(plan.h[i]) if dims_known else None,
                original_width=int(plan.orig_w[i]) if dims_known else None,
                original_height=int(plan.orig_h[i]) if dims_known else None,
                sha256=hashlib.sha256(data).hexdigest())
            status_counts["success"] += 1
            successes += 1
            _append(rows, meta_row)
            js = {"url": meta_row["url"], "caption": caption}
            if not no_uid:
                js["uid"] = plan.uid[i]
            for k in ("key", "status", "error_message", "width", "height", "original_width", "original_height",
                      "sha256"):
                js[k] = meta_row[k]
            members = {"json": json.dumps(js, indent=4).encode("utf-8")}
            if kind != IK["missing_image"]:
                members[ext] = data
            if kind == IK["bad_utf8"]:
                members["txt"] = caption.encode("cp1252", errors="replace")
            elif kind != IK["missing_caption"]:
                members["txt"] = caption.encode("utf-8")
            for suffix in sorted(members):   # the member order webdataset's TarWriter uses
                tar.add(f"{plan.key[i]}.{suffix}", members[suffix])
            advance(1)
        ok = True
    finally:
        tar.close(ok)
    write_parquet(out / f"{name}.parquet", pa.table(rows, schema=sidecar_schema(no_uid)))
    status_dict = dict(sorted(status_counts.items(), key=lambda kv: (-kv[1], kv[0])))
    stats = {"count": plan.m, "successes": successes, "failed_to_download": failed, "failed_to_resize": 0,
             "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": status_dict}
    write_json(out / f"{name}_stats.json", stats)
    new_res = plan.reservoir(lambda idx: [(*kept[int(j)], int(plan.quality[j])) for j in idx])
    return stats, new_res


def _append(rows: dict[str, list], meta_row: dict) -> None:
    for k in rows:
        rows[k].append(meta_row[k])


def _source(plan: ShardPlan, i: int, kept: dict, reservoir: Reservoir | None) -> tuple[bytes, str]:
    src, oi = int(plan.dup_src[i]), int(plan.dup_idx[i])
    if src == 1:
        return kept[oi]
    data, ext, _q = reservoir.payload[oi]
    return data, ext


def _payload(plan: ShardPlan, i: int, kind: int, seed: int, gidx: int, kept: dict,
             reservoir: Reservoir | None) -> tuple[bytes, str]:
    if kind == IK["exact_dup"]:
        return _source(plan, i, kept, reservoir)
    if kind == IK["near_dup"]:
        data, _ = _source(plan, i, kept, reservoir)
        nk = NEAR_KINDS[int(plan.near_kind[i])]
        return R.near_duplicate(data, nk, quality=int(plan.quality[i]), new_size=(int(plan.w[i]), int(plan.h[i])),
                                crop_box=plan.crop_box.get(i)), "jpg"
    r = rng_for(seed, _TAG_PAYLOAD, gidx)
    if kind == IK["corrupt"]:
        return R.corrupt_payload(r), "jpg"
    if kind == IK["non_image"]:
        return R.non_image_payload(r), "jpg"
    ext = str(plan.ext[i])
    img = R.render(concept=int(plan.concept[i]), colour=int(plan.colour[i]), bg=int(plan.bg[i]),
                   texture=int(plan.texture[i]), w=int(plan.w[i]), h=int(plan.h[i]), seed=(seed, _TAG_ROW, gidx))
    progressive = bool(plan.progressive[i]) and kind != IK["truncated"]
    data = R.encode(img, ext, quality=int(plan.quality[i]), progressive=progressive)
    if kind == IK["truncated"]:
        data = R.truncate_jpeg(data, r)
    return data, ext
