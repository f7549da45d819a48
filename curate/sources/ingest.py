"""Ingest: register a pool's shards and samples in the manifest, one shard per transaction.

A shard is skipped when the same path with the same size and mtime, or the same content
(SHA-256 fingerprint) under another path, was already ingested, so re-ingesting adds
nothing. Each shard commits in one transaction: a crash loses at most the shard in flight,
and a rerun picks it up. Per-record problems go to `sample_issues` (rejected or warning);
a shard that cannot be read at all is recorded as failed with its error and the rest goes on.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .. import console
from ..embeddings import EmbeddingRef, register
from ..errors import UsageError, is_disk_full, is_interrupt
from ..uids import UID_SPACE, wds_uid
from .detect import ShardUnit, expand_sources
from .wds import ReadLimits

BATCH_ROWS = 65536

SAMPLE_SCHEMA = {
    "uid": pl.Utf8, "shard_id": pl.Int64, "key": pl.Utf8, "row_idx": pl.Int64, "url": pl.Utf8,
    "caption": pl.Utf8, "width": pl.Int32, "height": pl.Int32, "sha256": pl.Utf8, "source": pl.Utf8,
    "image_ext": pl.Utf8, "image_bytes": pl.Int64, "members": pl.Utf8, "tar_offset": pl.Int64,
    "tar_end": pl.Int64, "status": pl.Utf8, "img_shard_id": pl.Int64, "img_key": pl.Utf8, "img_row": pl.Int64,
    "img_width": pl.Int32, "img_height": pl.Int32, "img_sha256": pl.Utf8,
}
# Columns that say where a sample's image is and what it is (docs/workspace.md, "samples").
IMAGE_COLUMNS = ("image_ext", "image_bytes", "members", "tar_offset", "tar_end", "img_shard_id", "img_key",
                 "img_row", "img_width", "img_height", "img_sha256")
NO_IMAGE = [pl.lit(None, SAMPLE_SCHEMA[c]).alias(c) for c in IMAGE_COLUMNS]
ISSUE_SCHEMA = {"run_id": pl.Int64, "shard_id": pl.Int64, "key": pl.Utf8, "uid": pl.Utf8,
                "reason": pl.Utf8, "action": pl.Utf8, "detail": pl.Utf8}


@dataclass
class IngestSummary:
    shards_seen: int = 0
    shards_ingested: int = 0
    shards_skipped: int = 0
    shards_failed: int = 0
    shards_damaged: int = 0
    samples_added: int = 0
    samples_attached: int = 0  # pending URL-table samples that a downloaded shard now holds
    images_attached: int = 0   # DataComp metadata samples that an image shard now gives an image
    images_mismatched: int = 0  # images not attached: their sha256 differs from the metadata's
    rejected: int = 0
    warnings: int = 0
    bad_embeddings: int = 0  # DataComp samples with an unusable embedding (`bad_embedding`, unscored)
    bad_scores: int = 0      # DataComp score values that were not finite numbers (`bad_score` warnings)
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_shards: list[tuple[str, str]] = field(default_factory=list)  # files of a folder left out, and why

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("failures", "skipped", "not_shards")}
        d["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        d["files_skipped"] = [{"path": p, "why": w} for p, w in self.not_shards]
        return d


def _issues_frame(rows: list[tuple], run_id: int, shard_id: int) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema=ISSUE_SCHEMA)
    key, uid, reason, action, detail = zip(*rows)
    return pl.DataFrame({"run_id": [run_id] * len(rows), "shard_id": [shard_id] * len(rows), "key": key,
                         "uid": uid, "reason": reason, "action": action, "detail": detail}, schema=ISSUE_SCHEMA)


class Ingester:
    def __init__(self, ws, manifest, run_id: int, *, replace: bool = False, limits: ReadLimits | None = None):
        self.ws, self.m, self.run_id, self.replace = ws, manifest, run_id, replace
        self.limits = limits or ReadLimits()
        self.summary = IngestSummary()

    # ---- shard bookkeeping ---------------------------------------------------------------
    def _precheck(self, unit: ShardUnit) -> tuple[bool, os.stat_result]:
        """False when the shard is already in, unchanged. Clears failed or replaced earlier attempts."""
        path = str(unit.path.resolve())
        st = unit.path.stat()
        size = st.st_size + (unit.npz.stat().st_size if unit.npz else 0)
        prev = self.m.find_shard(path=path)
        if prev is not None:
            shard_id, pbytes, pmtime, _fp, pstatus = prev
            unchanged = pbytes == size and pmtime is not None and abs(pmtime - st.st_mtime) < 1e-6
            if pstatus in ("ok", "damaged") and unchanged:
                self.summary.skipped.append((path, "already ingested"))
                return False, st
            if pstatus in ("ok", "damaged") and not self.replace:
                raise _ShardError("changed since it was ingested (size or mtime differ); rerun with --replace")
            self._forget_shard(shard_id)
        return True, st

    def _forget_shard(self, shard_id: int) -> None:
        with self.m.transaction():
            uids = "SELECT uid FROM samples WHERE shard_id = ?"
            self.m.execute(f"DELETE FROM scores WHERE uid IN ({uids}) AND scorer LIKE 'datacomp-%'", [shard_id])
            # Metadata samples this (image) shard gave an image keep their metadata, without the
            # image and without what `curate score` computed from it.
            detached = "SELECT uid FROM samples WHERE img_shard_id = $1 AND shard_id <> $1"
            self.m.execute(f"DELETE FROM scores WHERE uid IN ({detached}) AND scorer NOT LIKE 'datacomp-%'",
                           [shard_id])
            self.m.execute("UPDATE samples SET " + ", ".join(f"{c} = NULL" for c in IMAGE_COLUMNS) +
                           " WHERE img_shard_id = $1 AND shard_id <> $1", [shard_id])
            # Samples of this (metadata) shard holding another shard's image go back to being that
            # image shard's samples: the metadata's next ingest takes them over again, image kept.
            self.m.execute(
                "UPDATE samples SET shard_id = img_shard_id, key = img_key, row_idx = img_row, source = 'wds', "
                "sha256 = coalesce(img_sha256, sha256) WHERE shard_id = $1 AND img_shard_id IS NOT NULL "
                "AND img_shard_id <> $1", [shard_id])
            for table in ("samples", "sample_issues", "embeddings", "shards"):
                self.m.execute(f"DELETE FROM {table} WHERE shard_id = ?", [shard_id])

    def _skip_same_content(self, unit: ShardUnit, fingerprint: str) -> bool:
        """True (and noted) when a shard with these bytes is already in under another path."""
        row = self.m.find_shard(fingerprint=fingerprint)
        if row is None:
            return False
        self.summary.skipped.append((str(unit.path), f"same content as {row[1]}"))
        self.summary.shards_skipped += 1
        return True

    def _insert_shard_row(self, shard_id, unit, nbytes, mtime, fingerprint, status, error, extra) -> None:
        self.m.execute(
            "INSERT INTO shards (shard_id, path, format, n_samples, n_rejected, bytes, mtime, fingerprint, status, "
            "error, run_id, ingested_at, extra) VALUES (?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, now(), ?)",
            [shard_id, str(unit.path.resolve()), unit.format, nbytes, mtime, fingerprint, status, error,
             self.run_id, json.dumps(extra or {}, default=str)])

    def _finish_shard_row(self, shard_id: int) -> None:
        self.m.execute(
            "UPDATE shards SET n_samples = (SELECT count(*) FROM samples WHERE shard_id = $1), "
            "n_rejected = (SELECT count(*) FROM sample_issues WHERE shard_id = $1 AND action = 'rejected') "
            "WHERE shard_id = $1", [shard_id])

    def _record_failure(self, unit: ShardUnit, error: str, st: os.stat_result | None) -> None:
        self.summary.shards_failed += 1
        self.summary.failures.append((str(unit.path), error))
        with self.m.transaction():
            shard_id = self.m.next_shard_id()
            self._insert_shard_row(shard_id, unit, st.st_size if st else None, st.st_mtime if st else None,
                                   None, "failed", error[:2000], None)
        console.warn(f"{unit.path}: {error}")

    # ---- sample insertion (shared by every format) -------------------------------------
    def _add_samples(self, shard_id: int, df: pl.DataFrame, issues: list[tuple]) -> pl.DataFrame:
        """Insert `df` (SAMPLE_SCHEMA columns) after uid checks; returns the rows inserted.

        Problems are appended to `issues`."""
        if df.height == 0:
            return df
        # Repeats inside this batch: the first stays.
        first = df.select(pl.col("uid").is_first_distinct()).to_series()
        if not first.all():
            dups = df.filter(~first)
            firsts = df.filter(first).select("uid", pl.col("key").alias("first_key"))
            dups = dups.join(firsts, on="uid", how="left")
            issues.extend(zip(dups["key"].to_list(), dups["uid"].to_list(), ["duplicate_uid"] * dups.height,
                              ["rejected"] * dups.height,
                              [f"same uid as key {k} in this shard" for k in dups["first_key"].to_list()]))
            self.summary.rejected += dups.height
            df = df.filter(first)
        # Against what the workspace already holds.
        self.m.con.register("_batch_uids", df.select("uid").to_arrow())
        try:
            existing = self.m.frame(
                "SELECT s.uid, s.status, s.source, s.shard_id, s.key, s.img_shard_id, s.img_key, s.sha256, "
                "s.img_sha256, sh.path, ih.path AS img_path FROM samples s JOIN _batch_uids b USING (uid) "
                "LEFT JOIN shards sh ON sh.shard_id = s.shard_id LEFT JOIN shards ih ON ih.shard_id = s.img_shard_id")
        finally:
            self.m.con.unregister("_batch_uids")
        adopted = df.clear()
        if existing.height:
            source = df["source"][0]
            if source == "wds":
                df = self._attach_images(df, existing, issues)
            elif source == "datacomp":
                df, adopted = self._adopt_images(shard_id, df, existing, issues)
            taken = existing.join(df.select("uid"), on="uid", how="semi")
            if taken.height:
                # an image for a sample that has one: name the image it has
                has_img = (pl.col("source") != pl.col("_src")) & pl.col("img_path").is_not_null()
                dups = df.select("uid", "key", pl.col("source").alias("_src")).join(
                    taken.select("uid", "source", "path", "key", "img_path", "img_key"), on="uid", how="inner",
                    suffix="_prev").select(
                    "uid", "key", pl.when(has_img).then(pl.col("img_path")).otherwise(pl.col("path")).alias("p"),
                    pl.when(has_img).then(pl.col("img_key")).otherwise(pl.col("key_prev")).alias("k"),
                    pl.when(has_img).then(pl.lit("an image for this uid was already attached from "))
                    .otherwise(pl.lit("uid already ingested from ")).alias("what"))
                issues.extend(zip(dups["key"].to_list(), dups["uid"].to_list(), ["duplicate_uid"] * dups.height,
                                  ["rejected"] * dups.height,
                                  [f"{w}{p} key {k}" for w, p, k in
                                   zip(dups["what"].to_list(), dups["p"].to_list(), dups["k"].to_list())]))
                self.summary.rejected += dups.height
                df = df.join(taken.select("uid"), on="uid", how="anti")
        self.m.insert_arrow("samples", df.select(list(SAMPLE_SCHEMA)).to_arrow())
        self.summary.samples_added += df.height
        return pl.concat([df, adopted]) if adopted.height else df

    def _with_frame(self, name: str, frame, sql: str, params=None) -> list[tuple]:
        """Run `sql` with `frame` (polars or Arrow) registered as `name`; its rows (RETURNING, SELECT)."""
        self.m.con.register(name, frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame)
        try:
            return self.m.execute(sql, params).fetchall()
        finally:
            self.m.con.unregister(name)

    @staticmethod
    def _sha_mismatch(meta_sha: str, img_sha: str) -> pl.Expr:
        """True where the metadata's sha256 and the downloaded image's (img2dataset's json) are both
        known and differ: the URL served other bytes than when the metadata was made."""
        return (pl.col(meta_sha).is_not_null() & pl.col(img_sha).is_not_null()
                & (pl.col(meta_sha).str.to_lowercase() != pl.col(img_sha).str.to_lowercase()))

    def _mismatch_issues(self, frame: pl.DataFrame, issues: list[tuple]) -> None:
        """`sha256_mismatch` (rejected: the image record is not attached), one per image, named by
        the image's key in its shard; the metadata sample stays, without an image."""
        issues.extend(zip(frame["img_key"].to_list(), frame["uid"].to_list(), ["sha256_mismatch"] * frame.height,
                          ["rejected"] * frame.height,
                          [f"image sha256 {i[:16]}... differs from the metadata's {m[:16]}...; not attached"
                           for i, m in zip(frame["img_sha256"].to_list(), frame["meta_sha256"].to_list())]))
        self.summary.images_mismatched += frame.height

    def _attach_images(self, df: pl.DataFrame, existing: pl.DataFrame, issues: list[tuple]) -> pl.DataFrame:
        """A webdataset shard's records whose uid the workspace already holds: URL-table rows not
        downloaded yet (or whose download failed) move into the shard; DataComp metadata samples
        without an image get this one attached (shard_id/row_idx stay the metadata's: its npz
        embeddings are row-aligned) unless the sha256s differ. Returns the records still to insert."""
        pending = existing.filter(pl.col("status").is_in(["pending", "failed"]))
        if pending.height:
            att = df.join(pending.select("uid"), on="uid", how="semi")
            self._with_frame("_attach", att,
                "UPDATE samples SET shard_id = a.shard_id, key = a.key, row_idx = a.row_idx, "
                "url = coalesce(a.url, samples.url), caption = coalesce(samples.caption, a.caption), "
                "width = a.width, height = a.height, sha256 = a.sha256, status = 'ok', "
                + ", ".join(f"{c} = a.{c}" for c in IMAGE_COLUMNS) +
                " FROM _attach a WHERE samples.uid = a.uid AND samples.status IN ('pending', 'failed')")
            self.summary.samples_attached += att.height
            df = df.join(pending.select("uid"), on="uid", how="anti")
        meta = existing.filter((pl.col("source") == "datacomp") & pl.col("img_shard_id").is_null()
                               & (pl.col("status") == "ok"))
        if meta.height:
            cand = df.join(meta.select("uid", pl.col("sha256").alias("meta_sha256")), on="uid", how="inner")
            bad = cand.filter(self._sha_mismatch("meta_sha256", "img_sha256"))
            if bad.height:
                self._mismatch_issues(bad, issues)
            att = cand.join(bad.select("uid"), on="uid", how="anti")
            if att.height:
                self._with_frame("_attach", att,
                    "UPDATE samples SET " + ", ".join(f"{c} = a.{c}" for c in IMAGE_COLUMNS) +
                    " FROM _attach a WHERE samples.uid = a.uid AND samples.img_shard_id IS NULL")
            self.summary.images_attached += att.height
            df = df.join(meta.select("uid"), on="uid", how="anti")
        return df

    def _adopt_images(self, shard_id: int, df: pl.DataFrame, existing: pl.DataFrame,
                      issues: list[tuple]) -> tuple[pl.DataFrame, pl.DataFrame]:
        """DataComp metadata rows whose uid an image shard ingested earlier holds (shards first):
        that sample becomes the metadata's (its shard_id, row_idx, caption, url, original size and
        sha256) and keeps its image; where the sha256s differ it keeps none (`sha256_mismatch`),
        and the scores computed from that image go. Returns (rows still to insert, rows adopted)."""
        own = existing.filter((pl.col("source") == "wds") & (pl.col("shard_id") == pl.col("img_shard_id")))
        if not own.height:
            return df, df.clear()
        cand = (df.drop(IMAGE_COLUMNS).join(own.select("uid", "img_key", "img_sha256", "img_shard_id"), on="uid",
                                            how="inner")
                .with_columns(self._sha_mismatch("sha256", "img_sha256").alias("_bad")))
        bad = cand.filter("_bad")
        if bad.height:
            # recorded on the image's shard, as when the metadata came first
            for (img_shard,), part in bad.group_by(["img_shard_id"], maintain_order=True):
                found: list[tuple] = []
                self._mismatch_issues(part.with_columns(pl.col("sha256").alias("meta_sha256")), found)
                self._add_issues(int(img_shard), found)
            self._with_frame("_detach", bad.select("uid"),
                "DELETE FROM scores WHERE uid IN (SELECT uid FROM _detach) AND scorer NOT LIKE 'datacomp-%'")
        cols = ("shard_id", "key", "row_idx", "url", "caption", "width", "height", "source")
        detach = ", ".join(f"{c} = CASE WHEN a._bad THEN NULL ELSE samples.{c} END" for c in IMAGE_COLUMNS)
        self._with_frame("_adopt", cand,
            "UPDATE samples SET " + ", ".join(f"{c} = a.{c}" for c in cols) +
            ", sha256 = a.sha256, " + detach +
            " FROM _adopt a WHERE samples.uid = a.uid AND samples.source = 'wds'")
        self.summary.images_attached += cand.height - bad.height
        for img_shard in cand["img_shard_id"].unique().to_list():  # as if the metadata had come first
            self._finish_shard_row(int(img_shard))
        adopted = df.join(own.select("uid"), on="uid", how="semi")
        return df.join(own.select("uid"), on="uid", how="anti"), adopted

    def _add_issues(self, shard_id: int, issues: list[tuple]) -> None:
        if issues:
            self.m.insert_arrow("sample_issues", _issues_frame(issues, self.run_id, shard_id).to_arrow())

    # ---- formats -------------------------------------------------------------------------
    def ingest_wds(self, unit: ShardUnit, st: os.stat_result) -> None:
        from .wds import read_download_status, read_wds_shard

        try:
            shard = read_wds_shard(unit.path, self.limits)
        except (tarfile.TarError, OSError) as exc:
            raise _ShardError(str(exc)) from None
        if shard.records == [] and shard.error and not shard.issues:
            raise _ShardError(shard.error)
        if self._skip_same_content(unit, shard.fingerprint):
            return
        recs = shard.records
        # Records rejected for want of a json uid are still named by the uid they would have had.
        issues = [(k, u if u is not None or k is None else wds_uid(shard.fingerprint, k), r, a, d)
                  for k, u, r, a, d in shard.issues]
        for rec in recs:
            if rec.uid is None:
                rec.uid = wds_uid(shard.fingerprint, rec.key)
        failed_dl = read_download_status(unit.path)
        with self.m.transaction():
            shard_id = self.m.next_shard_id()
            status = "damaged" if shard.error else "ok"
            # members_checked: every record's members are regular files with safe names, so export
            # may copy their byte ranges without parsing them again
            extra = {"members_checked": 1, **({"img2dataset_stats": shard.stats} if shard.stats else {})}
            self._insert_shard_row(shard_id, unit, shard.nbytes, st.st_mtime, shard.fingerprint, status,
                                   shard.error, extra)
            df = pl.DataFrame({
                "uid": [r.uid for r in recs], "shard_id": [shard_id] * len(recs), "key": [r.key for r in recs],
                "row_idx": list(range(len(recs))), "url": [r.url for r in recs],
                "caption": [r.caption for r in recs], "width": [r.width for r in recs],
                "height": [r.height for r in recs], "sha256": [r.sha256 for r in recs],
                "source": ["wds"] * len(recs), "image_ext": [r.image_ext for r in recs],
                "image_bytes": [r.image_bytes for r in recs], "members": [",".join(r.members) for r in recs],
                "tar_offset": [r.tar_offset for r in recs], "tar_end": [r.tar_end for r in recs],
                "status": ["ok"] * len(recs), "img_shard_id": [shard_id] * len(recs), "img_key": [r.key for r in recs],
                "img_row": list(range(len(recs))), "img_width": [r.img_width for r in recs],
                "img_height": [r.img_height for r in recs], "img_sha256": [r.given_sha256 for r in recs],
            }, schema=SAMPLE_SCHEMA)
            self._add_samples(shard_id, df, issues)
            # img_row (and row_idx, for the shard's own samples) must stay dense and aligned with what
            # score writes: renumber after rejections, over every image this shard holds (its own
            # samples and the metadata samples it attached to).
            self.m.execute(
                "UPDATE samples SET img_row = r.rn, row_idx = CASE WHEN samples.shard_id = $1 THEN r.rn "
                "ELSE samples.row_idx END FROM (SELECT uid, row_number() OVER (ORDER BY tar_offset) - 1 AS rn "
                "FROM samples WHERE img_shard_id = $1) r WHERE samples.uid = r.uid AND samples.img_shard_id = $1",
                [shard_id])
            if failed_dl is not None and failed_dl.height:
                self._record_failed_downloads(shard_id, failed_dl, issues)
            self._add_issues(shard_id, issues)
            self._finish_shard_row(shard_id)
        self.summary.warnings += sum(1 for i in issues if i[3] == "warning")
        self.summary.rejected += sum(1 for i in shard.issues if i[3] == "rejected")
        if shard.error:
            self.summary.shards_damaged += 1
            self.summary.failures.append((str(unit.path), shard.error))
            console.warn(f"{unit.path}: {shard.error}")

    def _record_failed_downloads(self, shard_id: int, failed: pl.DataFrame, issues: list[tuple]) -> None:
        def col(name):
            return failed[name].cast(pl.Utf8).to_list() if name in failed.columns else [None] * failed.height

        uids, keys, status, err = col("uid"), col("key"), col("status"), col("error_message")
        known = pa.table({"uid": [u for u in uids if u]})
        # A DataComp metadata sample whose download failed stays, metadata only: a warning on it.
        stays = {r[0] for r in self._with_frame("_failed", known, "SELECT s.uid FROM samples s JOIN _failed f "
                                                "USING (uid) WHERE s.source = 'datacomp'")} if known.num_rows else set()
        for k, u, s, e in zip(keys, uids, status, err):
            issues.append((k, u, "download_failed", "warning" if u in stays else "rejected",
                           f"{s}: {e}" if e else str(s)))
        if known.num_rows:
            self._with_frame("_failed", known, "UPDATE samples SET status = 'failed' FROM _failed f "
                             "WHERE samples.uid = f.uid AND samples.status = 'pending'")

    def ingest_datacomp(self, unit: ShardUnit, st: os.stat_result) -> None:
        import numpy as np

        from .datacomp import (FLOAT_DTYPES, ROW_PROBLEMS, SCORE_COLUMNS, NpzError, copy_member_to_npy, inspect_npz,
                               known_widths, npy_location, scan_rows, scorer_for_key)

        try:
            pf = pq.ParquetFile(unit.path)
        except Exception as exc:
            raise _ShardError(f"unreadable parquet ({exc})") from None
        names = set(pf.schema_arrow.names)
        text_col = "text" if "text" in names else ("caption" if "caption" in names else None)
        if "uid" not in names or text_col is None:
            raise _ShardError(f"DataComp metadata needs uid and text columns; it has {', '.join(sorted(names))}")
        n_rows = pf.metadata.num_rows
        members = {}
        if unit.npz is not None:
            try:
                members = inspect_npz(unit.npz)
            except NpzError as exc:
                raise _ShardError(str(exc)) from None
            npz_name = unit.npz.name
            for key, mem in members.items():
                if len(mem.shape) != 2:
                    raise _ShardError(f"{npz_name}:{key} has shape {mem.shape}; embeddings are 2-D "
                                      f"(rows x width)")
                if mem.shape[0] != n_rows:
                    raise _ShardError(f"row-count mismatch: {unit.path.name} has {n_rows} rows but "
                                      f"{npz_name}:{key} has shape {mem.shape}")
                if mem.dtype.kind != "f" or f"f{mem.dtype.itemsize}" not in FLOAT_DTYPES:
                    raise _ShardError(f"bad embedding dtype: {npz_name}:{key} is {mem.dtype.name}; "
                                      f"embeddings must be float16, float32 or float64")
            # Widths, per scorer: DataComp's own (b32 512, l14 768, or what a synth pool declares),
            # the width earlier files registered, and the img member's (its siblings must match).
            widths = known_widths(unit.path.parent)
            by_scorer: dict[str, list] = {}
            for key, mem in members.items():
                by_scorer.setdefault(scorer_for_key(key)[0], []).append((key, mem))
            for scorer, mems in by_scorer.items():
                rules = []
                if scorer in widths:
                    rules.append((widths[scorer], f"{scorer} embeddings are {widths[scorer]} wide"))
                have = self.m.one("SELECT sc.dim FROM scorers sc WHERE sc.name = ? AND sc.dim IS NOT NULL AND "
                                  "EXISTS (SELECT 1 FROM embeddings e WHERE e.scorer = sc.name)", [scorer])
                if have is not None:
                    rules.append((int(have[0]), f"{scorer} is {int(have[0])} wide in this workspace, from earlier files"))
                ref_key, ref_mem = next(((k, m) for k, m in mems if scorer_for_key(k)[1] == "img"), mems[0])
                rules.append((ref_mem.shape[1], f"its sibling {ref_key} is {ref_mem.shape[1]} wide"))
                for key, mem in sorted(mems, key=lambda km: km[0] != ref_key):
                    if mem.shape[1] < 1:
                        raise _ShardError(f"embedding width mismatch: {npz_name}:{key} has no columns "
                                          f"(shape {mem.shape})")
                    for want, why in rules:
                        if mem.shape[1] != want:
                            raise _ShardError(f"embedding width mismatch: {npz_name}:{key} is {mem.shape[1]} wide, "
                                              f"expected {want} ({why})")
        fingerprint = _file_fingerprint(unit.path, unit.npz)
        if self._skip_same_content(unit, fingerprint):
            return
        nbytes = st.st_size + (unit.npz.stat().st_size if unit.npz else 0)
        issues: list[tuple] = []
        n_bad_embeddings = n_bad_scores = 0
        with self.m.transaction():
            shard_id = self.m.next_shard_id()
            self._insert_shard_row(shard_id, unit, nbytes, st.st_mtime, fingerprint, "ok", None,
                                   {"npz": str(unit.npz) if unit.npz else None, "npz_keys": sorted(members)})
            # Embeddings: registered in place when stored, else streamed into the workspace; then
            # scanned, a chunk at a time, for rows no stage can use.
            scorers_dims: dict[str, int] = {}
            member_bad = []  # (scorer, kind, rows ascending, problem codes)
            for key, mem in members.items():
                scorer, kind = scorer_for_key(key)
                scorers_dims.setdefault(scorer, mem.shape[1])
                if mem.stored and not mem.fortran_order:
                    ref = EmbeddingRef(scorer, shard_id, kind, str(unit.npz.resolve()), key, mem.data_offset,
                                       mem.dtype.str, mem.shape[0], mem.shape[1])
                    where = (ref.path, mem.data_offset, mem.dtype, mem.shape, False)
                else:
                    dest = self.ws.embedding_path(scorer, shard_id, kind)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(dest.name + ".partial.npy")
                    try:
                        copy_member_to_npy(unit.npz, mem, tmp)
                    except BaseException:
                        tmp.unlink(missing_ok=True)
                        raise
                    os.replace(tmp, dest)
                    ref = EmbeddingRef(scorer, shard_id, kind, str(dest), None, None, mem.dtype.str,
                                       mem.shape[0], mem.shape[1])
                    offset, shape, dtype, fortran = npy_location(dest)
                    where = (dest, offset, dtype, shape, fortran)
                register(self.m, ref)
                rows, codes = scan_rows(*where)
                if len(rows):
                    member_bad.append((scorer, kind, rows, codes))
            for scorer, dim in scorers_dims.items():
                self.m.execute(
                    "INSERT OR IGNORE INTO scorers (name, kind, spec, dim, params, run_id, created_at) "
                    "VALUES (?, 'provided', 'DataComp metadata', ?, '{}', ?, now())", [scorer, dim, self.run_id])
                # checked above against the embeddings already in; this only corrects a width left by
                # files that are gone (--replace)
                self.m.execute("UPDATE scorers SET dim = ? WHERE name = ? AND kind = 'provided'", [dim, scorer])
            bad_by_scorer = {sc: np.unique(np.concatenate([r for s, _, r, _ in member_bad if s == sc]))
                             for sc in {s for s, _, _, _ in member_bad}}

            def bad_embedding_details(lo: int, hi: int) -> pl.DataFrame:
                """(row_idx, detail) of the rows in [lo, hi) with an unusable embedding, one row each."""
                parts = []
                for scorer, kind, rows, codes in member_bad:
                    a, b = np.searchsorted(rows, [lo, hi])
                    if a == b:
                        continue
                    text = np.array([""] + [f"{scorer} {kind}: {ROW_PROBLEMS[c]}" for c in sorted(ROW_PROBLEMS)],
                                    dtype=object)
                    parts.append(pl.DataFrame({"row_idx": rows[a:b], "detail": text[codes[a:b]].tolist()},
                                              schema={"row_idx": pl.Int64, "detail": pl.Utf8}))
                if not parts:
                    return pl.DataFrame(schema={"row_idx": pl.Int64, "detail": pl.Utf8})
                return (pl.concat(parts).group_by("row_idx", maintain_order=True)
                        .agg(pl.col("detail").str.join("; ")))

            def clean_scores(col: pl.Series) -> tuple[pl.Series, pl.Series]:
                """(float32 scores, NULL where not a finite number; the `bad_score` detail of each value
                that was given but is not a finite number, else NULL). Mistyped columns lose only
                the values that are not numbers."""
                dt = col.dtype
                if dt.is_numeric():
                    num = col.cast(pl.Float64)
                elif dt == pl.Utf8 or dt == pl.Categorical or isinstance(dt, pl.Enum):
                    num = col.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
                else:
                    num = pl.Series(col.name, [None] * len(col), dtype=pl.Float64)
                score = num.cast(pl.Float32)  # beyond float32's range: inf, caught below
                bad = (col.is_not_null() & ~score.is_finite().fill_null(False)).fill_null(False)
                detail = pl.Series("detail", [None] * len(col), dtype=pl.Utf8)
                if bad.any():
                    idx = bad.arg_true()
                    shown = [repr(v)[:80] if isinstance(v, (str, bytes)) else str(v)[:80]
                             for v in col.gather(idx).to_list()]
                    detail = detail.scatter(idx, pl.Series([f"{col.name} = {v} is not a finite number"
                                                            for v in shown], dtype=pl.Utf8))
                    score = score.scatter(idx, None)
                return score, detail

            def insert_issues(frame: pl.DataFrame, reason: str, action: str) -> None:
                """frame: row_idx, uid, detail."""
                self.m.insert_arrow("sample_issues", frame.select(
                    pl.lit(self.run_id, pl.Int64).alias("run_id"), pl.lit(shard_id, pl.Int64).alias("shard_id"),
                    pl.col("row_idx").cast(pl.Utf8).alias("key"), pl.col("uid").cast(pl.Utf8),
                    pl.lit(reason, pl.Utf8).alias("reason"), pl.lit(action, pl.Utf8).alias("action"),
                    pl.col("detail").cast(pl.Utf8)).to_arrow())

            score_cols = [c for c in SCORE_COLUMNS if c in names]
            cols = ["uid", text_col] + [c for c in ("url", "original_width", "original_height", "sha256") if c in names]
            start = 0
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols + score_cols):
                b = pl.from_arrow(batch)
                n = b.height
                b = b.with_columns(pl.int_range(start, start + n, dtype=pl.Int64).alias("row_idx"))
                lo, hi = start, start + n
                # bytes columns: text that is not UTF-8 is kept with U+FFFD (caption_not_utf8), a
                # uid that is not is a bad_uid; polars cannot cast them at all
                not_utf8: list[int] = []
                for col, replace in ((text_col, True), ("uid", False)):
                    if b.schema[col] == pl.Binary:
                        vals, broken = _decode_bytes(b[col].to_list(), replace)
                        b = b.with_columns(pl.Series(col, vals, dtype=pl.Utf8))
                        if replace:
                            not_utf8 = [start + i for i in broken]
                start += n
                uid_norm = pl.col("uid").cast(pl.Utf8).str.strip_chars(UID_SPACE).str.to_lowercase()
                b = b.with_columns(uid_norm.alias("_uid"), pl.col("uid").cast(pl.Utf8).alias("_uid_raw"))
                bad = b.filter(pl.col("_uid").is_null() | ~pl.col("_uid").str.contains(r"^[0-9a-f]{32}$"))
                if bad.height:
                    issues.extend(zip(bad["row_idx"].cast(pl.Utf8).to_list(), [None] * bad.height,
                                      ["bad_uid"] * bad.height, ["rejected"] * bad.height,
                                      [f"uid {str(u)[:80]!r} is not 32 hex chars" for u in bad["_uid_raw"].to_list()]))
                    self.summary.rejected += bad.height
                    b = b.join(bad.select("row_idx"), on="row_idx", how="anti")
                if not_utf8:
                    mangled = b.filter(pl.col("row_idx").is_in(not_utf8))
                    issues.extend((str(r), u, "caption_not_utf8", "warning",
                                   "invalid UTF-8; undecodable bytes replaced by U+FFFD")
                                  for r, u in zip(mangled["row_idx"].to_list(), mangled["_uid"].to_list()))
                nocap = b.filter(pl.col(text_col).is_null())
                if nocap.height:
                    issues.extend(zip(nocap["row_idx"].cast(pl.Utf8).to_list(), nocap["_uid"].to_list(),
                                      ["missing_caption"] * nocap.height, ["warning"] * nocap.height,
                                      ["text is null"] * nocap.height))
                def opt(c, dtype):
                    return pl.col(c).cast(dtype, strict=False) if c in b.columns else pl.lit(None, dtype)
                df = b.select(
                    pl.col("_uid").alias("uid"), pl.lit(shard_id, pl.Int64).alias("shard_id"),
                    pl.col("row_idx").cast(pl.Utf8).alias("key"), "row_idx", opt("url", pl.Utf8).alias("url"),
                    pl.col(text_col).cast(pl.Utf8).alias("caption"),
                    opt("original_width", pl.Int32).alias("width"), opt("original_height", pl.Int32).alias("height"),
                    opt("sha256", pl.Utf8).alias("sha256"), pl.lit("datacomp").alias("source"),
                    pl.lit("ok").alias("status"), *NO_IMAGE,
                )
                inserted = self._add_samples(shard_id, df, issues)
                if not inserted.height:
                    continue
                # Images whose download failed before their metadata came (shards first): the
                # sample is in now, metadata only, so the failure is a warning on it.
                touched = self._with_frame("_new", inserted.select("uid"),
                    "UPDATE sample_issues SET action = 'warning' WHERE reason = 'download_failed' "
                    "AND action = 'rejected' AND uid IN (SELECT uid FROM _new) RETURNING shard_id")
                for (img_shard,) in set(touched):
                    self._finish_shard_row(int(img_shard))
                # Samples with an unusable embedding stay (caption, url and size are fine), each with
                # one `bad_embedding` issue; their scores of that scorer are NULL.
                if member_bad:
                    hit = inserted.select("row_idx", "uid").join(bad_embedding_details(lo, hi), on="row_idx")
                    if hit.height:
                        insert_issues(hit, "bad_embedding", "unscored")
                        n_bad_embeddings += hit.height
                if score_cols:
                    kept = b.join(inserted.select("row_idx"), on="row_idx", how="semi")
                    rows = kept["row_idx"].to_numpy()
                    for c in score_cols:
                        score, detail = clean_scores(kept[c])
                        emb_bad = bad_by_scorer.get(SCORE_COLUMNS[c])
                        if emb_bad is not None:
                            score = score.scatter(np.flatnonzero(np.isin(rows, emb_bad)), None)
                        self.m.insert_arrow("scores", pl.DataFrame({
                            "scorer": pl.repeat(SCORE_COLUMNS[c], kept.height, dtype=pl.Utf8, eager=True),
                            "uid": kept["_uid"], "score": score}).to_arrow())
                        bad_score = detail.is_not_null()
                        if bad_score.any():
                            insert_issues(kept.select("row_idx", pl.col("_uid").alias("uid"))
                                          .with_columns(detail).filter(bad_score), "bad_score", "warning")
                            n_bad_scores += int(bad_score.sum())
            self._add_issues(shard_id, issues)
            self._finish_shard_row(shard_id)
        self.summary.warnings += sum(1 for i in issues if i[3] == "warning") + n_bad_scores
        self.summary.bad_embeddings += n_bad_embeddings
        self.summary.bad_scores += n_bad_scores

    def ingest_urls(self, unit: ShardUnit, st: os.stat_result) -> None:
        from .urls import read_url_table

        table = read_url_table(unit.path)
        if self._skip_same_content(unit, table.fingerprint):
            return
        frame = table.frame
        issues = [tuple(x) for x in table.issues]
        with self.m.transaction():
            shard_id = self.m.next_shard_id()
            self._insert_shard_row(shard_id, unit, st.st_size, st.st_mtime, table.fingerprint, "ok", None, None)
            n = frame.height
            df = frame.select(
                pl.col("uid"), pl.lit(shard_id, pl.Int64).alias("shard_id"), pl.col("key").cast(pl.Utf8),
                pl.int_range(0, n, dtype=pl.Int64).alias("row_idx"), pl.col("url").cast(pl.Utf8),
                pl.col("caption").cast(pl.Utf8), pl.lit(None, pl.Int32).alias("width"),
                pl.lit(None, pl.Int32).alias("height"), pl.lit(None, pl.Utf8).alias("sha256"),
                pl.lit("urls").alias("source"), pl.lit("pending").alias("status"), *NO_IMAGE)
            self._add_samples(shard_id, df, issues)
            self._add_issues(shard_id, issues)
            self._finish_shard_row(shard_id)
        self.summary.rejected += sum(1 for i in table.issues if i[3] == "rejected")

    # ---- driver ----------------------------------------------------------------------------
    def ingest_unit(self, unit: ShardUnit) -> None:
        self.summary.shards_seen += 1
        st = None
        try:
            proceed, st = self._precheck(unit)
            if not proceed:
                self.summary.shards_skipped += 1
                return
            before = (self.summary.shards_skipped, self.summary.shards_failed)
            getattr(self, f"ingest_{unit.format}")(unit, st)
            if (self.summary.shards_skipped, self.summary.shards_failed) == before:
                self.summary.shards_ingested += 1
        except _ShardError as exc:
            self._record_failure(unit, str(exc), st)
        except UsageError as exc:
            if not unit.in_folder:
                raise
            # a file found in a folder that turns out not to be a shard (a stray JSON beside the
            # tars): reported and left out, the rest of the folder goes on
            self.summary.shards_seen -= 1
            self.summary.not_shards.append((str(unit.path), str(exc)))
            console.warn(f"{unit.path}: skipped, not a shard ({exc})")
        except Exception as exc:  # anything else this shard's bytes provoke: recorded, the rest goes on
            if is_interrupt(exc):
                raise KeyboardInterrupt from None  # Ctrl-C inside a DuckDB query
            if is_disk_full(exc) or isinstance(exc, duckdb.Error):
                raise  # not the shard's fault (a full disk, the manifest)
            self._record_failure(unit, _one_line(f"{type(exc).__name__}: {exc}"), st)


class _ShardError(Exception):
    """This shard cannot be ingested; recorded and the rest goes on."""


def _decode_bytes(values: list, replace: bool) -> tuple[list, list[int]]:
    """UTF-8 text of a bytes column: undecodable bytes become U+FFFD (`replace`) or the value
    None; also the positions that were not valid UTF-8."""
    out, broken = [], []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(bytes(v).decode("utf-8"))
        except UnicodeDecodeError:
            broken.append(i)
            out.append(bytes(v).decode("utf-8", errors="replace") if replace else None)
    return out, broken


def _one_line(text: str) -> str:
    """An error as one line (polars and Arrow errors span several)."""
    return " ".join(text.split())[:2000]


def _file_fingerprint(*paths: Path | None) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def ingest_paths(ws, manifest, sources: list, fmt: str | None, run_id: int, *, replace: bool = False,
                 limits: ReadLimits | None = None) -> IngestSummary:
    not_shards: list[tuple[str, str]] = []
    units = expand_sources(sources, fmt, skipped=not_shards)
    ing = Ingester(ws, manifest, run_id, replace=replace, limits=limits)
    ing.summary.not_shards.extend(not_shards)
    for path, why in not_shards:
        console.warn(f"{path}: skipped, {why}")
    t0 = time.perf_counter()
    with console.progress() as bar:
        task = bar.add_task("ingest", total=len(units))
        for unit in units:
            bar.update(task, description=f"ingest {unit.path.name}")
            ing.ingest_unit(unit)
            bar.advance(task)
    ing.summary.seconds = round(time.perf_counter() - t0, 3)
    return ing.summary
