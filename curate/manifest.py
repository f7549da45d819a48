"""The DuckDB manifest: schema, runs, and the queries every command shares.

One file, `WS/manifest.duckdb`, records every run and every per-sample decision. Bulk
inserts go through Arrow tables (no per-row Python). docs/workspace.md documents each table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import duckdb

from . import __version__
from .errors import CurateError, UsageError, WorkspaceLocked, is_interrupt

SCHEMA_VERSION = 2

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE SEQUENCE IF NOT EXISTS run_id_seq START 1""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id      BIGINT PRIMARY KEY,
        command     VARCHAR NOT NULL,
        argv        VARCHAR,          -- JSON list: the full command line
        params      VARCHAR,          -- JSON object: resolved parameters
        version     VARCHAR,
        seed        BIGINT,
        started_at  TIMESTAMP,
        ended_at    TIMESTAMP,
        status      VARCHAR,          -- running | ok | failed | interrupted
        error       VARCHAR,
        summary     VARCHAR           -- JSON object printed at the end
    )""",
    """CREATE SEQUENCE IF NOT EXISTS shard_id_seq START 0 MINVALUE 0""",
    """CREATE TABLE IF NOT EXISTS shards (
        shard_id     BIGINT PRIMARY KEY,
        path         VARCHAR NOT NULL, -- absolute source path
        format       VARCHAR NOT NULL, -- wds | datacomp | urls
        n_samples    BIGINT,           -- rows that went into `samples`
        n_rejected   BIGINT,           -- records that went into `sample_issues` instead
        bytes        BIGINT,
        mtime        DOUBLE,
        fingerprint  VARCHAR,          -- sha256 of the file's bytes (datacomp: of parquet + npz)
        status       VARCHAR,          -- ok | failed
        error        VARCHAR,
        run_id       BIGINT,
        ingested_at  TIMESTAMP,
        extra        VARCHAR           -- JSON: sidecar stats, npz keys, ...
    )""",
    """CREATE TABLE IF NOT EXISTS samples (
        uid          VARCHAR NOT NULL, -- 32 hex chars (docs/workspace.md#uids)
        shard_id     BIGINT NOT NULL,
        key          VARCHAR,          -- key in the shard (tar key, or row number for tables)
        row_idx      BIGINT NOT NULL,  -- row in the shard's arrays (embeddings are row-aligned)
        url          VARCHAR,
        caption      VARCHAR,
        width        INTEGER,
        height       INTEGER,
        sha256       VARCHAR,
        source       VARCHAR,          -- wds | datacomp | urls
        image_ext    VARCHAR,          -- jpg | png | webp | ... (NULL: no image held)
        image_bytes  BIGINT,
        members      VARCHAR,          -- tar member extensions, e.g. 'jpg,json,txt'
        tar_offset   BIGINT,           -- byte offset of the sample's first tar header in the shard
        tar_end      BIGINT,           -- byte offset just past its last member's (padded) data
        status       VARCHAR,          -- ok | pending (URL not downloaded yet) | failed (download failed)
        -- Where the sample's image is (NULL: no image held). A webdataset sample's own shard and row;
        -- a DataComp metadata sample's downloaded image, attached by uid from an image shard
        -- (shard_id/row_idx stay the metadata's: its npz embeddings are row-aligned). image_ext,
        -- image_bytes, members, tar_offset and tar_end describe this image record.
        img_shard_id BIGINT,           -- the tar shard holding the image
        img_key      VARCHAR,          -- its key in that tar
        img_row      BIGINT,           -- its row in that shard's computed embeddings (curate score)
        img_width    INTEGER,          -- the stored image's own size (width/height: the original's)
        img_height   INTEGER,
        img_sha256   VARCHAR           -- the sha256 img2dataset recorded for the download (json `sha256`)
    )""",
    """CREATE TABLE IF NOT EXISTS sample_issues (
        run_id    BIGINT,
        shard_id  BIGINT,
        key       VARCHAR,
        uid       VARCHAR,
        reason    VARCHAR NOT NULL,   -- short stable name, e.g. missing_image, duplicate_uid
        action    VARCHAR NOT NULL,   -- rejected (not in samples) | warning (in samples, noted)
        detail    VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS scorers (
        name        VARCHAR PRIMARY KEY,
        kind        VARCHAR,          -- provided (came with the pool) | open_clip | hf_hub | local_dir | checkpoint
        spec        VARCHAR,
        dim         INTEGER,
        params      VARCHAR,          -- JSON
        run_id      BIGINT,
        created_at  TIMESTAMP
    )""",
    """CREATE TABLE IF NOT EXISTS embeddings (
        scorer    VARCHAR NOT NULL,
        shard_id  BIGINT NOT NULL,
        kind      VARCHAR NOT NULL,   -- img | txt | img_flip
        path      VARCHAR NOT NULL,   -- .npy file, or the .npz holding `member`
        member    VARCHAR,            -- npz member name, when the array lives inside an npz
        byte_offset BIGINT,           -- byte offset of the raw array in `path` (npz stored members)
        dtype     VARCHAR,
        n_rows    BIGINT,
        dim       INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS scores (
        scorer  VARCHAR NOT NULL,
        uid     VARCHAR NOT NULL,
        score   FLOAT                 -- cosine(image, text), fp32
    )""",
    """CREATE TABLE IF NOT EXISTS decisions (
        run_id     BIGINT NOT NULL,
        stage_idx  INTEGER,
        stage      VARCHAR NOT NULL,
        uid        VARCHAR NOT NULL,
        keep       BOOLEAN NOT NULL,
        reason     VARCHAR,
        value      DOUBLE,
        threshold  DOUBLE,
        ref_uid    VARCHAR,           -- the sample this one duplicates / was matched to
        detail     VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS stage_stats (
        run_id     BIGINT NOT NULL,
        stage_idx  INTEGER,
        stage      VARCHAR,
        n_in       BIGINT,
        n_kept     BIGINT,
        n_dropped  BIGINT,
        seconds    DOUBLE,
        params     VARCHAR
    )""",
]


def why_no_image_sql(uid: str) -> str:
    """SQL for why the sample with uid `uid` (a column) has no image, from its issues:
    `download_failed: <img2dataset status>` or `sha256_mismatch: ...`; NULL when neither was
    recorded (then NO_IMAGE_INGESTED). Prune's no_image detail and export's list say the same."""
    return (f"(SELECT any_value(i.reason || ': ' || coalesce(i.detail, '')) FROM sample_issues i WHERE i.uid = {uid} "
            "AND i.reason IN ('download_failed', 'sha256_mismatch'))")


NO_IMAGE_INGESTED = "no image shard holding this uid was ingested"

_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def _bytes(size: str) -> float:
    """DuckDB's size strings ('512MB', '1.5GiB', '100KB') in bytes; inf when not understood, so
    the other limit wins."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(size))
    unit = (m.group(2).lower() or "b") if m else ""
    if not m or unit not in _UNITS:
        return math.inf
    return float(m.group(1)) * _UNITS[unit]


def _smaller(a: str, b: str) -> str:
    return a if _bytes(a) <= _bytes(b) else b


# A writer waits this long for readers that opened the file directly; a reader waits this long
# for a writer that holds the file but does not serve yet (starting, or closing).
WRITER_WAIT = 10.0
READER_WAIT = 3.0


def _now() -> dt.datetime:
    return dt.datetime.now()


class Manifest:
    """A connection to `manifest.duckdb`. Writers must hold the workspace lock."""

    remote = False  # a `RemoteManifest` (answered by the running writer) says True

    def __init__(self, path: Path, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._server = None
        # A writer holds the workspace lock, so the only other process that can hold the file is
        # a reader that opened it directly (no writer was running then): wait for it a little.
        deadline = time.monotonic() + (0 if read_only else WRITER_WAIT)
        while True:
            try:
                self.con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise CurateError(f"cannot open manifest {self.path}: {exc}") from None
                if time.monotonic() >= deadline:
                    raise WorkspaceLocked(
                        f"manifest {self.path} is in use by another curate process; wait for it to finish"
                    ) from None
                time.sleep(0.1)
        # Bounded memory: DuckDB spills to the workspace's tmp/ rather than growing with the pool.
        # `memory_limit` is for whole-pool sorts and joins; `working_memory()` holds the
        # streaming and per-chunk work of a long command (and the closing checkpoint) to less.
        self.memory_limit = os.environ.get("CURATE_DUCKDB_MEMORY", "512MB")
        self.working_limit = _smaller(os.environ.get("CURATE_DUCKDB_WORKING_MEMORY", "128MB"), self.memory_limit)
        self.con.execute(f"SET memory_limit = '{self.memory_limit}'")
        if read_only:
            self._check_schema()
        else:
            tmp = self.path.parent / "tmp" / "duckdb"
            tmp.mkdir(parents=True, exist_ok=True)
            self.con.execute(f"SET temp_directory = '{tmp}'")
            self.init_schema()
            # Readers cannot open the file while we hold it: answer their queries (curate/manifest_reader.py).
            from .manifest_reader import start_server

            self._server = start_server(self.con, self.path)

    @classmethod
    def for_workspace(cls, ws, *, read_only: bool = False) -> "Manifest":
        return open_read_only(ws.manifest_path) if read_only else cls(ws.manifest_path)

    def init_schema(self) -> None:
        with self.transaction():
            for stmt in SCHEMA:
                self.con.execute(stmt)
            self.con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('created_by', ?)",
                [str(SCHEMA_VERSION), f"curate {__version__}"],
            )
            self._migrate()

    def _check_schema(self) -> None:
        """A reader cannot upgrade the file: say so when an older curate wrote it."""
        try:
            rows = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        except duckdb.Error:
            return  # not initialised yet
        row = rows[0] if rows else None
        if row is not None and int(row[0]) < SCHEMA_VERSION:
            self.con.close()
            raise UsageError(f"manifest {self.path} has schema {row[0]} (written by an older curate); run one "
                             f"command that writes to the workspace (ingest, score, prune, export) to bring it to "
                             f"schema {SCHEMA_VERSION}, then read it")

    def _migrate(self) -> None:
        """Bring a manifest written by an older curate to this schema (inside init's transaction)."""
        have = {r[0] for r in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'samples'").fetchall()}
        if "img_shard_id" not in have:  # schema 1 -> 2
            # image locations
            for col, typ in (("img_shard_id", "BIGINT"), ("img_key", "VARCHAR"), ("img_row", "BIGINT"),
                             ("img_width", "INTEGER"), ("img_height", "INTEGER"), ("img_sha256", "VARCHAR")):
                self.con.execute(f"ALTER TABLE samples ADD COLUMN {col} {typ}")
            self.con.execute("UPDATE samples SET img_shard_id = shard_id, img_key = key, img_row = row_idx "
                             "WHERE image_ext IS NOT NULL")
            # the workspace's own embedding files by paths relative to it (a moved workspace still
            # finds them)
            root = str(self.path.absolute().parent)
            self.con.execute("UPDATE embeddings SET path = substr(path, length(?) + 2) "
                             "WHERE starts_with(path, ? || '/')", [root, root])
        self.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version' AND value::INTEGER < ?",
                         [str(SCHEMA_VERSION), SCHEMA_VERSION])

    def trim(self) -> None:
        """Let DuckDB drop the table blocks it keeps cached (they count as this process's memory
        and grow with the pool up to the memory limit): lowering the limit evicts them, then it
        is restored. Blocks a query still holds stay; nothing is lost, later reads go to the file.
        Skipped while a reader's query served by this writer runs: at 16MB it could fail that
        query, and the query could make restoring the limit fail (its blocks are in use anyway)."""
        with self._readers_paused(0) as paused:
            if not paused:
                return
            with contextlib.suppress(duckdb.Error):
                self.con.execute("SET memory_limit = '16MB'")
            self.con.execute(f"SET memory_limit = '{self.memory_limit}'")

    @contextlib.contextmanager
    def _readers_paused(self, timeout: float) -> Iterator[bool]:
        """Hold off the reader queries this writer serves (curate/manifest_reader.py) for the
        block, waiting up to `timeout` s for a running one to end; yields whether they are held
        off. DuckDB's memory limit is shared with them: lowering it below what a reader's query
        holds fails."""
        lock = getattr(self._server, "query_lock", None)
        ok = lock is None or (lock.acquire(timeout=timeout) if timeout > 0 else lock.acquire(blocking=False))
        try:
            yield ok
        finally:
            if ok and lock is not None:
                lock.release()

    @contextlib.contextmanager
    def working_memory(self) -> Iterator[None]:
        """Hold DuckDB to `working_limit` for the block: scans, chunked inserts and checkpoints
        need little, and what DuckDB caches up to its limit counts as this process's memory (a
        10M-sample prune filled the whole 512MB with blocks it never read again)."""
        old = self.memory_limit
        self.memory_limit = self.working_limit
        with self._readers_paused(WRITER_WAIT):
            self.con.execute(f"SET memory_limit = '{self.memory_limit}'")
        try:
            yield
        finally:
            self.memory_limit = old
            with contextlib.suppress(duckdb.Error), self._readers_paused(WRITER_WAIT):
                self.con.execute(f"SET memory_limit = '{old}'")

    def close(self) -> None:
        server, self._server = getattr(self, "_server", None), None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()  # before the checkpoint: no reader transaction is left open
        if not self.read_only:
            # Write the WAL into the file under the working limit: closing checkpoints too, and a
            # checkpoint fills whatever limit it has (~350 MB at 512MB after a 2M-sample prune).
            # If it cannot, closing checkpoints with the full limit (or the next open replays the WAL).
            with contextlib.suppress(duckdb.Error), self.working_memory():
                self.con.execute("CHECKPOINT")
        with contextlib.suppress(Exception):
            self.con.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers ----------------------------------------------------------------------
    def execute(self, sql: str, params: Any = None):
        return self.con.execute(sql, params) if params is not None else self.con.execute(sql)

    def frame(self, sql: str, params: Any = None):
        """A query's result as a polars DataFrame (through Arrow)."""
        import polars as pl

        rel = self.con.sql(sql, params=params) if params is not None else self.con.sql(sql)
        return pl.from_arrow(rel.to_arrow_table())

    def one(self, sql: str, params: Any = None):
        """The first row, or None. Fetches the whole result: DuckDB refuses further work on a
        connection while a result is only partly read."""
        rows = self.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Any = None):
        row = self.one(sql, params)
        return None if row is None else row[0]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        else:
            self.con.execute("COMMIT")

    def insert_arrow(self, table: str, arrow_table) -> None:
        """Append an Arrow table whose columns are named like the target table's."""
        if arrow_table.num_rows == 0:
            return
        cols = ", ".join(f'"{c}"' for c in arrow_table.column_names)
        self.con.register("_curate_insert", arrow_table)
        try:
            self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _curate_insert")
        finally:
            self.con.unregister("_curate_insert")

    # ---- runs -------------------------------------------------------------------------
    def start_run(self, command: str, params: dict, *, argv: list[str] | None = None, seed: int | None = None) -> int:
        # We hold the workspace's writer lock, so a run still `running` belongs to a process that
        # died (kill -9, power loss): say so, rather than leave it looking alive. Prune runs are
        # left to `clear_unfinished`, which also deletes the decisions they committed.
        self.execute("UPDATE runs SET status = 'interrupted', ended_at = coalesce(ended_at, ?), "
                     "error = coalesce(error, 'the process ended before the run finished') "
                     "WHERE status = 'running' AND command <> 'prune'", [_now()])
        run_id = self.scalar("SELECT nextval('run_id_seq')")
        self.execute(
            "INSERT INTO runs (run_id, command, argv, params, version, seed, started_at, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
            [run_id, command, json.dumps(argv if argv is not None else ["curate", *sys.argv[1:]]),
             json.dumps(params, default=str, sort_keys=True), __version__, seed, _now()],
        )
        return int(run_id)

    def finish_run(self, run_id: int, status: str, *, summary: dict | None = None, error: str | None = None) -> None:
        self.execute(
            "UPDATE runs SET status = ?, ended_at = ?, summary = ?, error = ? WHERE run_id = ?",
            [status, _now(), json.dumps(summary or {}, default=str, sort_keys=True), error, run_id],
        )

    @contextlib.contextmanager
    def run(self, command: str, params: dict, *, seed: int | None = None) -> Iterator["RunRecord"]:
        """Record a run: 'running' now; 'ok', 'failed' or 'interrupted' when the block ends."""
        rec = RunRecord(self.start_run(command, params, seed=seed))
        try:
            yield rec
        except KeyboardInterrupt:
            self.finish_run(rec.run_id, "interrupted", summary=rec.summary, error="interrupted")
            raise
        except BaseException as exc:
            if is_interrupt(exc):  # Ctrl-C that landed inside a DuckDB query
                self.finish_run(rec.run_id, "interrupted", summary=rec.summary, error="interrupted")
                raise KeyboardInterrupt from None
            self.finish_run(rec.run_id, "failed", summary=rec.summary, error=f"{type(exc).__name__}: {exc}"[:2000])
            raise
        else:
            self.finish_run(rec.run_id, "ok", summary=rec.summary)

    def discard_decisions(self, run_id: int) -> None:
        """Delete what a prune run recorded (decisions, stage_stats): a run that did not finish."""
        self.execute("DELETE FROM decisions WHERE run_id = ?", [run_id])
        self.execute("DELETE FROM stage_stats WHERE run_id = ?", [run_id])

    def drop_run(self, run_id: int) -> None:
        """Delete a prune run's decisions and stage stats; its `runs` row stays, as `dropped`."""
        with self.transaction():
            self.discard_decisions(run_id)
            self.execute("UPDATE runs SET status = 'dropped' WHERE run_id = ?", [run_id])

    def clear_unfinished(self, command: str) -> list[int]:
        """Runs of `command` left 'running' by a killed process become 'interrupted', and every
        unfinished run's decisions are deleted. Call only while holding the workspace lock (then
        no other process is running one). Returns the run ids cleaned."""
        ids = [int(r[0]) for r in self.execute(
            "SELECT run_id FROM runs WHERE command = ? AND status <> 'ok' AND "
            "(status = 'running' OR run_id IN (SELECT DISTINCT run_id FROM stage_stats)) ORDER BY run_id",
            [command]).fetchall()]
        for rid in ids:
            self.discard_decisions(rid)
            self.execute("UPDATE runs SET status = 'interrupted', ended_at = coalesce(ended_at, ?), "
                         "error = coalesce(error, 'the process ended before the run finished') "
                         "WHERE run_id = ? AND status = 'running'", [_now(), rid])
        return ids

    # ---- shards -----------------------------------------------------------------------
    def next_shard_id(self) -> int:
        return int(self.scalar("SELECT nextval('shard_id_seq')"))

    def find_shard(self, *, path: str | None = None, fingerprint: str | None = None):
        """The ok shard with this path (same size/mtime checked by the caller) or fingerprint."""
        if path is not None:
            return self.one(
                "SELECT shard_id, bytes, mtime, fingerprint, status FROM shards WHERE path = ? "
                "ORDER BY shard_id DESC LIMIT 1", [path])
        return self.one(
            "SELECT shard_id, path, status FROM shards WHERE fingerprint = ? AND status = 'ok' LIMIT 1",
            [fingerprint])


class RunRecord:
    def __init__(self, run_id: int):
        self.run_id = run_id
        self.summary: dict = {}


def open_read_only(path):
    """The manifest for reading: the file itself when no writer holds it; else the running
    writer's snapshot through its socket (`RemoteManifest`, `.remote` is True). Raises
    `WorkspaceLocked` when the file is held and nobody answers (an older curate, or a writer
    that is starting or closing and stays so longer than READER_WAIT)."""
    from .manifest_reader import RemoteManifest

    deadline = time.monotonic() + READER_WAIT
    while True:
        try:
            return Manifest(path, read_only=True)
        except WorkspaceLocked as exc:
            locked = exc
        remote = RemoteManifest.connect(path)
        if remote is not None:
            return remote
        if time.monotonic() >= deadline:
            raise locked
        time.sleep(0.1)


def open_manifest(ws, *, read_only: bool = False) -> Manifest:
    return Manifest.for_workspace(ws, read_only=read_only)
