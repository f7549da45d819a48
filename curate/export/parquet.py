"""Parquet export: one row per selected sample, in canonical order (source shard, then row).

Columns: `uid, url, caption, width, height, sha256, shard` (source path)`, key, row_idx,
source, image_ext, image_bytes, image_shard, image_key, img_width, img_height` (where the image
is and its stored size: for a webdataset sample its own shard and key; for a DataComp metadata
sample the attached image's, NULL without one), one `score__<scorer>` column per scorer in the `scores`
table, and `cluster` / `cluster_stage`. The parquet's key-value metadata `curate.export`
holds the selection, the prune run's resolved parameters (its recipe), the export parameters
and the curate version.

Clusters: stages that cluster (semdedup, dbp, ssp) write `cluster=<id>` into their decisions'
`detail`; the cluster of a sample is the one recorded by the latest such stage at or before
the selected stage. A new clustering stage needs nothing here beyond writing that token.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from .. import __version__
from ..errors import UsageError
from ..workspace import atomic_path
from .select import Selection, decisions_of, scores_wide, selected_samples

METADATA_KEY = b"curate.export"
CLUSTER_RE = r"(?:^|[\s,;])cluster=(-?\d+)"


def clusters_of(decisions: pl.DataFrame) -> pl.DataFrame:
    """(uid, cluster, cluster_stage) from the latest stage whose detail records `cluster=N`."""
    if decisions.height == 0:
        return pl.DataFrame(schema={"uid": pl.Utf8, "cluster": pl.Int64, "cluster_stage": pl.Utf8})
    found = (decisions.select("uid", "stage_idx", "stage",
                              pl.col("detail").str.extract(CLUSTER_RE, 1).cast(pl.Int64).alias("cluster"))
             .filter(pl.col("cluster").is_not_null()))
    return (found.sort("stage_idx").group_by("uid").agg(pl.col("cluster").last(), pl.col("stage").last()
                                                        .alias("cluster_stage")))


def export_parquet(manifest, sel: Selection, out: Path, *, params: dict, overwrite: bool = False,
                   dry_run: bool = False) -> dict:
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; the parquet export is one file (e.g. kept.parquet)")
    if out.exists() and not overwrite and not dry_run:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    samples = selected_samples(manifest, sel)
    if samples.height == 0:
        raise UsageError(f"the selection ({sel.describe()}) is empty; nothing to export")
    scores = scores_wide(manifest, sel)
    score_cols = [c for c in scores.columns if c.startswith("score__")]
    summary = {"format": "parquet", "out": str(out), **sel.as_dict(), "samples": samples.height,
               "scores": [c[len("score__"):] for c in score_cols]}
    if dry_run:
        return summary
    clusters = clusters_of(decisions_of(manifest, sel))
    frame = (samples.sort("sample_shard", "sample_row")
             .select("uid", "url", "caption", "width", "height", "sha256", pl.col("sample_shard_path").alias("shard"),
                     pl.col("sample_key").alias("key"), pl.col("sample_row").alias("row_idx"), "source", "image_ext",
                     "image_bytes", pl.col("shard_path").alias("image_shard"), pl.col("key").alias("image_key"),
                     "img_width", "img_height")
             .join(scores, on="uid", how="left", maintain_order="left")
             .join(clusters, on="uid", how="left", maintain_order="left"))
    table = frame.to_arrow()
    meta = {"selection": sel.as_dict(), "recipe": (sel.recipe or {}).get("recipe"), "prune_params": sel.recipe,
            "export": params, "curate_version": __version__, "samples": samples.height,
            "cluster_source": "decisions.detail 'cluster=N' of the latest clustering stage"}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           METADATA_KEY: json.dumps(meta, default=str, sort_keys=True).encode()})
    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    summary["bytes"] = out.stat().st_size
    summary["with_cluster"] = int(frame["cluster"].is_not_null().sum())
    return summary


def read_export_metadata(path: str | Path) -> dict:
    """The `curate.export` key-value metadata of a parquet export."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[METADATA_KEY]) if METADATA_KEY in md else {}
