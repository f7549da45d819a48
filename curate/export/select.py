"""What an export exports: a prune run's kept set, the state after one of its stages, or the
whole pool; and the sample rows behind it, in the canonical order (source shard, then row)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from ..errors import CurateError, UsageError
from ..selection import kept_uids, stages_of

SAMPLE_COLUMNS = ("s.url, s.caption, s.width, s.height, s.sha256, s.image_bytes, s.members, "
                  "sp.path AS sample_shard_path, s.key AS sample_key, s.row_idx AS sample_row, s.img_width, "
                  "s.img_height")
# Where each sample's image is: its own shard for a webdataset sample, the attached image shard
# for a DataComp metadata sample (NULL without an image); `sample_shard` is the sample's own.
LOCATION_COLUMNS = ("uid, s.img_shard_id AS shard_id, s.img_row AS row_idx, s.img_key AS key, s.source, s.image_ext, "
                    "s.tar_offset, s.tar_end, s.shard_id AS sample_shard, "
                    "sh.path AS shard_path, sh.format AS shard_format, sh.bytes AS shard_bytes, sh.mtime AS shard_mtime, "
                    # shards whose member names and types ingest checked (docs/ingest.md, "Unsafe members")
                    "coalesce(json_extract_string(sh.extra, '$.members_checked') = '1', false) AS shard_checked")


@dataclass
class Selection:
    run_id: int | None          # the prune run (None: the whole pool)
    stage_idx: int | None
    stage: str | None           # the stage's id in its recipe
    uids: pl.DataFrame          # one column `uid`
    recipe: dict | None = None  # the prune run's resolved parameters

    def describe(self) -> str:
        if self.run_id is None:
            return "the whole pool"
        return f"run {self.run_id} after stage {self.stage_idx}:{self.stage}"

    def as_dict(self) -> dict:
        return {"prune_run": self.run_id, "stage_idx": self.stage_idx, "stage": self.stage}


def query_with(manifest, tables: dict, sql: str, params=None) -> pl.DataFrame:
    """Run `sql` on a cursor of the manifest that sees `tables` (name -> Arrow/polars) under
    their names. A cursor, because DuckDB refuses `register` on a connection holding an
    unfinished result (what `Manifest.scalar`'s fetchone leaves)."""
    cur = manifest.con.cursor()
    try:
        for name, t in tables.items():
            cur.register(name, t.to_arrow() if isinstance(t, pl.DataFrame) else t)
        rel = cur.sql(sql, params=params) if params is not None else cur.sql(sql)
        return pl.from_arrow(rel.to_arrow_table())
    finally:
        cur.close()


def resolve_selection(manifest, run: int | None, stage: str | None, all_samples: bool) -> Selection:
    if all_samples:
        if run is not None or stage is not None:
            raise UsageError("--all exports the whole pool; leave out --run and --stage")
        uids = manifest.frame("SELECT uid FROM samples WHERE status = 'ok'")
        return Selection(None, None, None, uids)
    run_id, idx, uids = kept_uids(manifest, run, stage)
    sid = dict(stages_of(manifest, run_id)).get(idx)
    # fetchall, not Manifest.scalar: a half-fetched result blocks the connection's next query (DuckDB 2).
    rows = manifest.execute("SELECT params FROM runs WHERE run_id = ?", [run_id]).fetchall()
    params = rows[0][0] if rows else None
    return Selection(run_id, idx, sid, uids, json.loads(params) if params else None)


def selected_samples(manifest, sel: Selection, *, metadata: bool = True) -> pl.DataFrame:
    """The selection's sample rows with where their image is (`shard_id`, `row_idx`, `key`,
    `shard_path`, ... of the image's tar; NULL for a sample without an image), ordered by the
    image's place (those without at the end, in their own shard's order); without `metadata`,
    only where each image lives."""
    cols = LOCATION_COLUMNS + (", " + SAMPLE_COLUMNS if metadata else "")
    order = "ORDER BY s.img_shard_id NULLS LAST, s.img_row, s.shard_id, s.row_idx"
    if sel.run_id is None:  # the whole pool: no need to join the uid list back
        sql = (f"SELECT {cols} FROM samples s LEFT JOIN shards sh ON sh.shard_id = s.img_shard_id "
               f"LEFT JOIN shards sp ON sp.shard_id = s.shard_id WHERE s.status = 'ok' {order}")
    else:
        sql = (f"SELECT {cols} FROM _export_uids u JOIN samples s USING (uid) "
               f"LEFT JOIN shards sh ON sh.shard_id = s.img_shard_id LEFT JOIN shards sp ON sp.shard_id = s.shard_id "
               f"{order}")
    frame = query_with(manifest, {"_export_uids": sel.uids.select("uid")}, sql)
    if frame.height != sel.uids.height:
        raise CurateError(f"{sel.uids.height - frame.height:,} selected uids of {sel.describe()} are no longer in "
                          "`samples` (was the workspace re-ingested with --replace?); re-run the prune")
    if frame["uid"].n_unique() != frame.height:  # `samples.uid` is unique by ingest's contract
        raise CurateError("the selection holds repeated uids; the manifest is inconsistent")
    return frame


def scores_wide(manifest, sel: Selection) -> pl.DataFrame:
    """`uid` + one `score__<scorer>` column per scorer in `scores`, for the selected uids."""
    long = query_with(manifest, {"_export_uids": sel.uids.select("uid")},
                      "SELECT sc.scorer, sc.uid, sc.score FROM scores sc JOIN _export_uids u USING (uid)")
    out = sel.uids.select("uid")
    for scorer in sorted(long["scorer"].unique().to_list()) if long.height else []:
        col = (long.filter(pl.col("scorer") == scorer).select("uid", pl.col("score").alias(f"score__{scorer}"))
               .unique("uid", keep="first"))
        out = out.join(col, on="uid", how="left")
    return out


def decisions_of(manifest, sel: Selection) -> pl.DataFrame:
    """Every decision the selection's run took on the selected uids, up to the selected stage."""
    if sel.run_id is None:
        return pl.DataFrame(schema={"uid": pl.Utf8, "stage_idx": pl.Int32, "stage": pl.Utf8, "keep": pl.Boolean,
                                    "reason": pl.Utf8, "value": pl.Float64, "threshold": pl.Float64,
                                    "ref_uid": pl.Utf8, "detail": pl.Utf8})
    return query_with(manifest, {"_export_uids": sel.uids.select("uid")},
                      "SELECT d.uid, d.stage_idx, d.stage, d.keep, d.reason, d.value, d.threshold, d.ref_uid, d.detail "
                      "FROM decisions d JOIN _export_uids u USING (uid) WHERE d.run_id = ? AND d.stage_idx <= ? "
                      "ORDER BY d.uid, d.stage_idx", [sel.run_id, sel.stage_idx])
