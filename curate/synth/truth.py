"""`OUT/_truth.parquet`: what every generated record really is. No pipeline stage reads it;
tests and benchmarks compare decisions against it (docs/synth.md, "Ground truth")."""

from __future__ import annotations

import pyarrow as pa

from . import vocab as V
from .plan import ShardPlan

TRUTH_NAME = "_truth.parquet"

TRUTH_SCHEMA = pa.schema([
    ("uid", pa.string()),            # the record's uid (with --no-uid it is not in the source files)
    ("key", pa.string()),            # tar key (wds); null for datacomp
    ("shard", pa.string()),          # file the record is in: 00000.tar / 0000000000.parquet
    ("row", pa.int64()),             # row in the shard's table (wds: the NNNNN.parquet sidecar)
    ("concept", pa.string()),        # what the image shows
    ("colour", pa.string()),
    ("background", pa.string()),
    ("cluster", pa.int32()),         # latent concept cluster (concept, colour, background)
    ("caption_kind", pa.string()),   # clean | mismatched | non_english:<lang> | junk:<kind>
    ("image_kind", pa.string()),     # ok | small | wide | exact_dup | near_dup:<kind> | corrupt | ...
    ("ext", pa.string()),            # image member extension (wds); null when no image member
    ("dup_of", pa.string()),         # uid of the original, for exact/near duplicates
    ("dup_of_shard", pa.string()),
    ("dup_of_key", pa.string()),
    ("matched", pa.bool_()),         # the caption truly describes the image (any language)
    ("lang", pa.string()),           # caption language (en, de, ...); null for language-less junk
    ("clean", pa.bool_()),           # no defect at all: caption clean and image ok
])

_NO_MEMBER = {"missing_image", "failed_download"}


def truth_table(plan: ShardPlan) -> pa.Table:
    ik = plan.image_kind_names()
    ext = [None if (plan.layout != "wds" or k in _NO_MEMBER) else str(e) for k, e in zip(ik, plan.ext.tolist())]
    matched = plan.matched
    clean = (plan.cap_kind == 0) & (plan.img_kind == 0)
    cols = {
        "uid": plan.uid,
        "key": plan.key,
        "shard": [plan.shard_name] * plan.m,
        "row": list(range(plan.m)),
        "concept": [V.CONCEPTS[c] for c in plan.concept.tolist()],
        "colour": [V.COLOURS[c] for c in plan.colour.tolist()],
        "background": [V.BACKGROUNDS[c] for c in plan.bg.tolist()],
        "cluster": plan.cluster.tolist(),
        "caption_kind": plan.captions.kind,
        "image_kind": ik,
        "ext": ext,
        "dup_of": plan.dup_of,
        "dup_of_shard": plan.dup_of_shard,
        "dup_of_key": plan.dup_of_key,
        "matched": matched.tolist(),
        "lang": plan.captions.lang,
        "clean": clean.tolist(),
    }
    return pa.table(cols, schema=TRUTH_SCHEMA)
