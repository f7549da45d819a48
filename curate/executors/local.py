"""The local executor: feeds a recipe's stages from the manifest and records their decisions.

The pool is held as a compact spine (`PoolSource`: uid ranks, shard/row positions, scores), and
each stage gets only the columns it names, read from the manifest for its input rows. Row-scope
stages get their input a batch at a time; global stages get it in one frame (condensed batch by
batch). After each stage: its decisions go to `decisions` (one row per sample it saw), its
funnel line to `stage_stats`, its artefacts to `runs/<run_id>/`; the next stage sees only what it
kept. Decisions are committed chunk by chunk; `curate prune` marks the run `ok` only at the end
and deletes the decisions of a run that fails or was killed (see `Manifest.clear_unfinished`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .. import console
from ..cluster import StageClustering, compute_clustering, inverse_permutation, short_hash
from ..clustered import POS, REF_POS, BitSet, ClusteredInput, ClusterIndex, npy_writers, read_range
from ..embeddings import ShardEmbeddingView, refs
from ..errors import CurateError, UsageError
from ..manifest import NO_IMAGE_INGESTED, why_no_image_sql
from ..recipes import Recipe
from ..stages.base import DECISION_COLUMNS, REF_ROW, Stage, StageInput, bitmap_fingerprint, get_stage, index_dtype
from ..workspace import atomic_path, atomic_save_npy
from .runs import RunBuilder, RunInverse

ROW_PARTITION = 1_000_000


class ArrayCache:
    """`StageInput.cache`: named groups of numpy arrays under WS/cache/<key>/, written atomically."""

    def __init__(self, root: Path):
        self.root = root

    def dir(self, key: str) -> Path:
        """The directory of entry `key` (complete once its `_complete.json` exists)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.root / safe

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        d = self.dir(key)
        if not (d / "_complete.json").exists():
            return None
        names = json.loads((d / "_complete.json").read_text())["arrays"]
        return {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in names}

    def clear_partials(self) -> int:
        """Remove what a killed run left half-written (partial files; k-means assignments in
        view order). Only while holding the workspace's writer lock. Returns how many."""
        gone = 0
        if self.root.exists():
            for f in [*self.root.glob("*/.*.partial"), *self.root.glob("*/.*.view.npy")]:
                f.unlink(missing_ok=True)
                gone += 1
        return gone

    def put_stream(self, key: str, dtypes: dict, n: int, parts) -> None:
        """Arrays of n entries written as they are computed: `parts` yields, chunk by chunk, one
        array per name of `dtypes` (in its order); nothing n-sized is held."""
        d = self.dir(key)
        with npy_writers({d / f"{name}.npy": dt for name, dt in dtypes.items()}, n) as writers:
            for chunk in parts:
                for w, a in zip(writers, chunk):
                    w.write(a)
        with atomic_path(d / "_complete.json") as tmp:
            tmp.write_text(json.dumps({"arrays": sorted(dtypes)}))

    def put(self, key: str, arrays: dict) -> None:
        """Arrays, or callables that return one (called one at a time, so big arrays built for
        the cache need not all exist at once)."""
        d = self.dir(key)
        d.mkdir(parents=True, exist_ok=True)
        for n, a in arrays.items():
            atomic_save_npy(d / f"{n}.npy", np.asarray(a() if callable(a) else a))
        with atomic_path(d / "_complete.json") as tmp:
            tmp.write_text(json.dumps({"arrays": sorted(arrays)}))


@dataclass
class StageOutcome:
    idx: int
    id: str
    stage: str
    n_in: int
    n_kept: int
    seconds: float
    params: dict
    stats: dict = field(default_factory=dict)
    top_reasons: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"stage": self.id, "in": self.n_in, "kept": self.n_kept, "dropped": self.n_in - self.n_kept,
                "seconds": round(self.seconds, 3), "top_reasons": self.top_reasons, **({"stats": self.stats} if self.stats else {})}


def resolve_budget(budget: str | float | int | None, n: int) -> int | None:
    """A count ('50000') or a fraction of what reaches the budget stage ('0.3')."""
    if budget is None:
        return None
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise UsageError(f"--budget {budget!r}: give a count (50000) or a fraction (0.3)") from None
    if b <= 0 or math.isnan(b):
        raise UsageError(f"--budget {budget!r} must be positive")
    if b < 1 or (isinstance(budget, str) and "." in budget and b <= 1):
        return int(round(b * n))
    if b != int(b):
        raise UsageError(f"--budget {budget!r}: a count must be a whole number")
    return int(b)


def build_stages(recipe: Recipe) -> list[tuple[str, Stage]]:
    out = []
    for spec in recipe.stages:
        cls = get_stage(spec.stage)
        try:
            st = cls(**spec.params)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"stage {spec.id!r} ({spec.stage}): {exc}") from None
        if spec.apply_to == "pool" and st.uses_budget:
            raise UsageError(f"stage {spec.id!r}: a budget stage cannot use apply_to = \"pool\"")
        st._apply_to = spec.apply_to
        out.append((spec.id, st))
    return out


SAMPLE_COLUMNS = ("key", "url", "caption", "width", "height", "sha256", "source", "image_ext", "image_bytes")
STREAM_BATCH = 262_144
TRIM_EVERY = 8  # batches between evictions of DuckDB's cached table blocks while streaming
WRITE_CHUNK = 262_144


def _file_backed(a: np.ndarray, tmp: Path) -> np.ndarray:
    """`a` as a read-only memory map of a file that is already unlinked (nothing is left behind
    if the process dies), so its pages are clean page cache the kernel can reclaim rather than
    this process's memory; `a` itself when the file cannot be written (a read-only workspace)."""
    import os

    path = tmp / f".spine-{os.getpid()}-{id(a)}.npy"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(path, a)
        out = np.load(path, mmap_mode="r")
    except OSError:
        return a
    finally:
        path.unlink(missing_ok=True)
    return out


class PoolSource:
    """The run's pool: a compact spine in memory, sample columns streamed from the manifest.

    The spine holds, per usable sample in (shard_id, row_idx) order (its *position*): the rank of
    its uid in sorted uid order (the `uid` stages see: 4 bytes, orders like the strings) and the
    scores the recipe needs (8 bytes each; a non-finite stored score reads as missing); the
    positions without a usable embedding: images that did not decode and `bad_embedding`
    samples (a sorted list, with the recorded message); its row id in the
    samples table, shard_id and row_idx as runs (`RunArray`: a pair per run of consecutive
    rows, a few thousand for a whole pool). The uid strings stay in DuckDB;
    decisions get them back by a join on the row id when they are written. A stage's other
    columns (`caption`, `url`, ...) are read for its input rows only, in batches, and condensed
    batch by batch for global stages; so what the runner holds does not grow with caption or
    URL length.
    """

    def __init__(self, manifest, scorers: list[str]):
        self.m = manifest
        n, max_rid = manifest.one("SELECT count(*) FILTER (WHERE status = 'ok'), coalesce(max(rowid), 0) FROM samples")
        self.n = int(n)
        # DataComp metadata samples with attached images hold them elsewhere than their own shard:
        # embeddings that `curate score` computed are found by the image's place (img_shard_id,
        # img_row), the metadata's own by the sample's (docs/datacomp.md).
        self.relocated = bool(manifest.scalar(
            "SELECT count(*) FROM samples WHERE status = 'ok' AND img_shard_id IS NOT NULL AND img_shard_id <> shard_id"))
        self.provided = {r[0] for r in manifest.execute("SELECT name FROM scorers WHERE kind = 'provided'").fetchall()}
        # Read a batch at a time: shard_id, row_idx and the row id fall into runs in this order
        # (RunArray: a pair per run).
        img_cols = (", coalesce(img_shard_id, -1)::INTEGER AS img_shard_id, coalesce(img_row, -1)::INTEGER AS img_row"
                    if self.relocated else "")
        batches = manifest.con.sql(
            f"SELECT rowid AS rid, shard_id::INTEGER AS shard_id, row_idx::INTEGER AS row_idx{img_cols} FROM samples "
            "WHERE status = 'ok' ORDER BY shard_id, row_idx, rid").to_arrow_reader(STREAM_BATCH)
        rid_type = np.int32 if max_rid < 2**31 - 1 else np.int64
        build = {"rid": RunBuilder(1, rid_type), "shard_id": RunBuilder(0, np.int32), "row_idx": RunBuilder(1, np.int32)}
        if self.relocated:
            build.update(img_shard_id=RunBuilder(0, np.int32), img_row=RunBuilder(1, np.int32))
        at = 0
        for rb in batches:
            for c, b in build.items():
                b.add(rb.column(c).to_numpy())
            at += rb.num_rows
        del batches
        if at != self.n:
            raise CurateError("the samples table changed while the run was reading it")
        self.rid, self.shard_id, self.row_idx = (build[c].finish() for c in ("rid", "shard_id", "row_idx"))
        self.img_shard_id, self.img_row = ((build["img_shard_id"].finish(), build["img_row"].finish())
                                           if self.relocated else (self.shard_id, self.row_idx))
        del build
        self.pos_of_rid = RunInverse(self.rid)
        # The uid rank of each position (a permutation, 4 bytes a sample): the row ids in uid
        # order, streamed from DuckDB's sort (it spills to disk rather than growing; a window
        # function over the same order needed ~4x the memory and failed under a small limit).
        self.rank = np.empty(self.n, dtype=np.uint32)
        at = 0
        for rb in manifest.con.sql("SELECT rowid AS rid FROM samples WHERE status = 'ok' ORDER BY uid, rowid") \
                .to_arrow_reader(STREAM_BATCH):
            rid = rb.column(0).to_numpy()
            if at + len(rid) > self.n or (len(rid) and int(rid.max()) >= len(self.pos_of_rid)):
                raise CurateError("the samples table changed while the run was reading it")
            p = self.pos_of_rid[rid]
            if len(p) and int(p.min()) < 0:
                raise CurateError("the samples table changed while the run was reading it")
            self.rank[p] = np.arange(at, at + len(rid), dtype=np.uint32)
            at += len(rid)
        if at != self.n:
            raise CurateError("the samples table changed while the run was reading it")
        self.rank = _file_backed(self.rank, Path(manifest.path).parent / "tmp")
        self._pos_of_rank: np.ndarray | None = None
        cnt, x, sm = manifest.one("SELECT count(*), bit_xor(hash(uid)), sum(hash(uid)::HUGEINT) FROM samples "
                                  "WHERE status = 'ok'")
        self.pool_key = f"{cnt}:{x}:{sm}"
        self.scores = {sc: self._scores(sc) for sc in scorers}
        # Samples without a usable embedding: undecodable images (detail: the decoder's message) and
        # bad embeddings (non-finite or zero vectors; detail `bad_embedding: ` + what is wrong,
        # which decode_failures reads to name its reason: stages.image_rules.BAD_EMBEDDING_PREFIX).
        # In a pool of metadata samples only some of which have an image: the samples without one
        # (`no_image: ` + why, stages.image_rules.NO_IMAGE_PREFIX). They have no embedding from
        # `curate score` (a computed scorer's views leave them out) but keep the pool's own.
        no_image = bool(manifest.scalar(
            "SELECT count(*) FILTER (WHERE img_shard_id IS NULL) > 0 AND count(*) FILTER (WHERE img_shard_id IS NOT "
            "NULL) > 0 FROM samples WHERE status = 'ok'"))
        no_image_sql = (
            f" UNION ALL SELECT s.rowid AS rid, 'no_image: ' || coalesce({why_no_image_sql('s.uid')}, "
            f"'{NO_IMAGE_INGESTED}') AS detail, 1 AS prio FROM samples s "
            "WHERE s.status = 'ok' AND s.img_shard_id IS NULL") if no_image else ""
        err = manifest.con.sql(
            "SELECT s.rowid AS rid, CASE WHEN bool_or(i.reason = 'undecodable') "
            "THEN any_value(i.detail) FILTER (WHERE i.reason = 'undecodable') "
            "ELSE 'bad_embedding: ' || coalesce(string_agg(DISTINCT i.detail, '; ' ORDER BY i.detail), '') END "
            "AS detail, 0 AS prio FROM sample_issues i JOIN samples s ON s.uid = i.uid "
            "WHERE s.status = 'ok' AND i.action = 'unscored' AND i.reason IN ('undecodable', 'bad_embedding') "
            "GROUP BY s.rowid" + no_image_sql
        ).to_arrow_table()
        if no_image:  # a sample without an image has no undecodable image nor computed embedding
            err = pl.from_arrow(err).sort("rid", "prio").unique("rid", keep="last", maintain_order=True).to_arrow()
        epos = self.pos_of_rid[err.column("rid").to_numpy()] if err.num_rows else np.empty(0, np.int32)
        order = np.argsort(epos, kind="stable")
        # every position with a decode_error (what decode_failures reads): for computed scorers'
        # embeddings, the unusable ones
        self.err_pos = epos[order]
        self.err_detail = pl.Series("decode_error", err.column("detail").to_pylist(), dtype=pl.Utf8).gather(order) \
            if err.num_rows else pl.Series("decode_error", [], dtype=pl.Utf8)
        # for the pool's own (provided) embeddings: the same without the samples that only lack an image
        prio = np.asarray(err.column("prio").to_numpy())[order] if err.num_rows else np.empty(0, np.int64)
        self.err_pos_provided = self.err_pos[prio == 0] if no_image else self.err_pos
        self._unusable: dict[bool, Unusable] = {}
        manifest.trim()  # the uid sort's table blocks

    def unusable(self, scorer: str | None) -> "Unusable":
        """The positions without a usable embedding of `scorer` (None: any decode_error)."""
        provided = scorer is not None and scorer in self.provided
        if provided not in self._unusable:
            self._unusable[provided] = Unusable(self, self.err_pos_provided if provided else self.err_pos)
        return self._unusable[provided]

    def location(self, scorer: str):
        """(shard ids, rows) where `scorer`'s embeddings of each position are: the sample's own
        for embeddings that came with the pool, its image's for those `curate score` computed."""
        if scorer in self.provided:
            return self.shard_id, self.row_idx
        return self.img_shard_id, self.img_row


    def _scores(self, sc: str) -> pl.Series:
        if not self.m.scalar("SELECT count(*) FROM scores WHERE scorer = ?", [sc]):
            have = [r[0] for r in self.m.execute("SELECT DISTINCT scorer FROM scores ORDER BY 1").fetchall()]
            raise UsageError(f"no scores of scorer {sc!r} in this workspace (have: {', '.join(have) or 'none'}); "
                             f"run `curate score` or change the recipe's scorer")
        vals = np.zeros(self.n, dtype=np.float64)
        has = np.zeros(self.n, dtype=bool)
        for rb in self.m.con.sql("SELECT p.rowid AS rid, s.score FROM scores s JOIN samples p ON p.uid = s.uid "
                                 "WHERE s.scorer = ? AND p.status = 'ok'", params=[sc]).to_arrow_reader(STREAM_BATCH):
            pos = self.pos_of_rid[rb.column("rid").to_numpy()]
            score = rb.column("score")
            v = score.to_numpy(zero_copy_only=False)
            vals[pos] = v
            # a non-finite stored score (NaN, ±Inf: a workspace written by an older version) is missing
            has[pos] = score.is_valid().to_numpy(zero_copy_only=False) & np.isfinite(v)
        name = f"score__{sc}"
        if has.all():
            return pl.Series(name, vals)
        return pl.select(pl.when(pl.Series(has)).then(pl.Series(vals)).alias(name)).to_series()

    def release(self) -> None:
        """Let the kernel take back the pages of the file-backed rank array this process has
        read (they stay in the page cache and come back on the next read): between stages and
        while decisions are written, which never read it."""
        mm = getattr(self.rank, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            import mmap

            mm.madvise(mmap.MADV_DONTNEED)

    def rank_at(self, pos: np.ndarray) -> np.ndarray:
        """uid ranks at these positions (sorted, distinct, as everywhere in the runner): the
        spine's own array, not a copy, when they are the whole pool."""
        if len(pos) == self.n and (self.n == 0 or (pos[0] == 0 and pos[-1] == self.n - 1)):
            return self.rank
        return self.rank[pos]

    @property
    def pos_of_rank(self) -> np.ndarray:
        if self._pos_of_rank is None:
            self._pos_of_rank = inverse_permutation(self.rank)
        return self._pos_of_rank

    def forget_pos_of_rank(self) -> None:
        """Drop `pos_of_rank` (4 bytes a sample); it is rebuilt when next asked for."""
        self._pos_of_rank = None

    def decode_error(self, pos: np.ndarray) -> pl.Series:
        if not len(self.err_pos):
            return pl.repeat(None, len(pos), dtype=pl.Utf8, eager=True).alias("decode_error")
        i = np.minimum(np.searchsorted(self.err_pos, pos), len(self.err_pos) - 1)
        hit = self.err_pos[i] == pos
        return self.err_detail.gather(pl.select(pl.when(pl.Series(hit)).then(pl.Series(i))).to_series())

    def base(self, pos: np.ndarray, want: "Wants | None" = None) -> pl.DataFrame:
        """uid (rank) of these positions, and what `want` asks of the spine: shard_id and row_idx,
        scores, decode_error (all of it when want is None)."""
        cols = [pl.Series("uid", self.rank_at(pos))]
        if want is None or want.location:
            cols += [pl.Series("shard_id", self.shard_id[pos]), pl.Series("row_idx", self.row_idx[pos])]
        cols += [self.scores[sc].gather(pos) for sc in (want.scorers if want else ())]
        if want is not None and want.decode_error:
            cols.append(self.decode_error(pos))
        return pl.DataFrame(cols)

    def frames(self, pos: np.ndarray, want: "Wants"):
        """(positions, frame) batches covering `pos` (positions, or a boolean mask over the pool
        read as the batches come: it may lose positions already yielded): `base` columns beside
        the streamed columns."""
        if pos.dtype == bool:
            wanted = pos
        else:
            wanted = np.zeros(self.n, dtype=bool)
            wanted[pos] = True
        for bpos, batch in self.stream(wanted, want.columns):
            yield bpos, pl.concat([self.base(bpos, want), batch], how="horizontal")

    def stream(self, wanted: np.ndarray, columns: list[str]):
        """(positions, frame of `columns`) for the wanted positions (a boolean mask over the pool),
        a batch at a time, in the manifest's storage order."""
        cur = self.m.con.cursor()  # its own connection: the run's transaction stays free for writes
        try:
            sel = ", ".join(f'"{c}"' for c in columns)
            reader = cur.sql(f"SELECT rowid AS _rid, {sel} FROM samples WHERE status = 'ok'").to_arrow_reader(STREAM_BATCH)
            for i, rb in enumerate(reader):
                if i % TRIM_EVERY == TRIM_EVERY - 1:
                    self.m.trim()  # a one-pass scan gains nothing from the blocks DuckDB keeps
                    self.release()
                rid = rb.column(0).to_numpy()
                if len(rid) and int(rid.max()) >= len(self.pos_of_rid):
                    raise CurateError("the samples table changed during the run")
                pos = self.pos_of_rid[rid]
                take = wanted[pos]
                if not take.any():
                    continue
                b = pl.from_arrow(rb).drop("_rid")
                yield pos[take], b.filter(pl.Series(take))
        finally:
            cur.close()
            self.m.trim()


@dataclass(frozen=True)
class Wants:
    """What a stage's frame holds besides `uid`: sample columns streamed from the manifest,
    scores, decode_error, and shard_id/row_idx (`location`)."""

    columns: list[str]
    scorers: list[str]
    decode_error: bool
    location: bool


def stage_wants(stage: Stage) -> Wants:
    want = stage.needs_columns()
    if want is None:
        return Wants(list(SAMPLE_COLUMNS), stage.needs_scores(), True, True)
    return Wants([c for c in SAMPLE_COLUMNS if c in want], stage.needs_scores(), "decode_error" in want,
                 "shard_id" in want or "row_idx" in want)


def stage_frame(src: PoolSource, stage: Stage, pos: np.ndarray) -> pl.DataFrame:
    """A global stage's input for these positions (sorted), with the columns it needs, in position
    order. Long columns are streamed and passed through `stage.condense` batch by batch."""
    want = stage_wants(stage)
    if not want.columns:
        return src.base(pos, want)
    parts, where = [], []
    for bpos, b in src.frames(pos, want):
        parts.append(stage.condense(b))
        where.append(bpos)
    if not parts:  # no rows: the columns with their manifest types
        sel = ", ".join(f'"{c}"' for c in want.columns)
        return stage.condense(pl.concat(
            [src.base(pos, want), pl.from_arrow(src.m.con.sql(f"SELECT {sel} FROM samples LIMIT 0").to_arrow_table())],
            how="horizontal"))
    # no rechunk: one contiguous copy of every column at once would double the frame's memory;
    # stages copy out the columns they turn into numpy arrays, one at a time
    frame = pl.concat(parts, how="vertical_relaxed", rechunk=False)
    del parts
    at = np.concatenate(where)
    if len(at) > 1 and not (np.diff(at) > 0).all():
        frame = frame[np.argsort(at, kind="stable")]
    return frame


def _normalise_decisions(sid: str, uid_type, dec: pl.DataFrame, extra: tuple[str, ...] = (REF_ROW,)) -> pl.DataFrame:
    """Decisions in the runner's column types (and the `extra` columns present, as Int64)."""
    missing = [c for c in ("uid", "keep") if c not in dec.columns]
    if missing:
        raise CurateError(f"stage {sid} returned decisions without {missing}")
    if dec["uid"].dtype != uid_type:
        raise CurateError(f"stage {sid} returned uids of type {dec['uid'].dtype}, was given {uid_type}")
    cols = []
    for c, t in DECISION_COLUMNS.items():
        t = t or uid_type
        if c not in dec.columns:
            cols.append(pl.lit(None, t).alias(c))
        elif c == "ref_uid" and dec[c].dtype in (uid_type, pl.Utf8):
            cols.append(pl.col(c))
        else:
            cols.append(pl.col(c).cast(t))
    cols += [pl.col(c).cast(pl.Int64) for c in extra if c in dec.columns]
    return dec.select(cols)


def _check_decisions(sid: str, inp_uid: pl.Series, dec: pl.DataFrame) -> tuple[pl.DataFrame, bool]:
    """Decisions in the runner's column types; and whether they are aligned row by row with the input."""
    dec = _normalise_decisions(sid, inp_uid.dtype, dec)
    if dec.height == len(inp_uid) and dec["uid"].equals(inp_uid):
        return dec, True  # aligned with the input (uids in the input are unique): nothing more to check
    if dec.height != len(inp_uid) or dec["uid"].n_unique() != dec.height:
        raise CurateError(f"stage {sid} returned {dec.height} decisions for {len(inp_uid)} samples")
    if dec.join(inp_uid.to_frame(), on="uid", how="anti").height:
        raise CurateError(f"stage {sid} returned decisions for samples it was not given")
    return dec, False


def run_pipeline(ws, manifest, recipe: Recipe, run_id: int, *, budget=None, record: bool = True) -> dict:
    stages = build_stages(recipe)
    budget_stages = [sid for sid, st in stages if st.uses_budget]
    if budget is not None and not budget_stages:
        raise UsageError(f"--budget given but recipe {recipe.name} has no budget stage (dbp, ssp, random, ...)")
    if len(budget_stages) > 1:
        raise UsageError(f"recipe {recipe.name} has several budget stages: {budget_stages}")
    scorers = sorted({s for _, st in stages for s in st.needs_scores()})
    # DuckDB's sorts and joins spill to disk under the working limit, and what it caches up to
    # any limit counts as this process's memory: the whole run stays under the small one
    with manifest.working_memory():
        src = load_pool(manifest, scorers)
        return _run(ws, manifest, recipe, run_id, stages, src, budget, record)


def load_pool(manifest, scorers: list[str]) -> PoolSource:
    src = PoolSource(manifest, scorers)
    if src.n == 0:
        raise UsageError("the workspace has no usable samples; ingest a pool first")
    return src


def _run(ws, manifest, recipe: Recipe, run_id: int, stages, src: PoolSource, budget, record: bool) -> dict:
    n_pool = src.n
    cache = ArrayCache(ws.root / "cache")
    if record:  # the writer lock is ours: nothing else is writing these
        cache.clear_partials()
        for d in [*(ws.root / "tmp").glob("decisions-*"), *(ws.root / "tmp").glob("keyed-*")]:
            shutil.rmtree(d, ignore_errors=True)
    alive = np.ones(n_pool, dtype=bool)
    n_alive = n_pool
    clustering_pool = _Pools(src)
    run_dir = ws.run_dir(run_id) if record else None
    outcomes: list[StageOutcome] = []
    warnings: list[str] = []
    with console.progress() as bar:
        task = bar.add_task("prune", total=len(stages))
        for idx, (sid, stage) in enumerate(stages):
            bar.update(task, description=f"{sid} ({n_alive:,} in)")
            t0 = time.perf_counter()
            b = None
            if stage.uses_budget:
                # --budget wins over the recipe's own `budget` parameter.
                b = resolve_budget(budget if budget is not None else stage.params().get("budget"), n_alive)
                if b is None:
                    raise UsageError(f"stage {sid} needs a budget: pass --budget N or 0.F")
                if b > n_alive:
                    warnings.append(f"budget {b:,} exceeds the {n_alive:,} samples that reach {sid}; all are kept")
            # remember captions' languages only for a later stage that will ask again
            languages_later = any(st.remembers_languages for _, st in stages[idx + 1:])
            if stage.remembers_languages:
                from ..stages import langid

                langid.use_memo(languages_later)
            if stage.needs_score_run:
                _check_score_run(manifest, sid, stage, warnings)
            over_pool = stage._apply_to == "pool"
            # clustering stages over the survivors read them cluster by cluster from the pool's
            # cluster index: no per-sample arrays, decisions in cluster order (staged, below)
            clustered = not over_pool and hasattr(stage, "run_clustered")
            keyed = hasattr(stage, "run_keyed")
            if clustered:
                run = _apply_clustered(sid, stage, src, alive, n_alive, manifest, recipe.seed, b, cache,
                                       clustering_pool)
            elif keyed or (stage.scope == "row" and not stage.needs_embeddings()):
                # streamed a batch at a time: a mask of the input, not a list of positions (a
                # position is read once, so the drops recorded meanwhile never hide one unread)
                mask = np.ones(n_pool, dtype=bool) if over_pool else alive
                run = (_apply_keyed(sid, stage, src, mask, n_pool if over_pool else n_alive, manifest,
                                    ws.root / "tmp" / f"keyed-{run_id}-{idx}") if keyed
                       else _apply(sid, stage, src, mask, manifest, recipe.seed, b, cache))
                del mask
            else:
                pos = (np.arange(n_pool) if over_pool else np.flatnonzero(alive)).astype(index_dtype(n_pool),
                                                                                        copy=False)
                run = _apply(sid, stage, src, pos, manifest, recipe.seed, b, cache,
                             None if over_pool else clustering_pool)
                del pos
            staged = (_StagedDecisions(ws.root / "tmp" / f"decisions-{run_id}-{idx}")
                      if (clustered or keyed) and record else None)
            # Decisions arrive in chunks (one per partition for row stages): each is recorded at
            # once, so a row stage never holds the decisions of the whole pool.
            reasons: dict = {}
            n_seen = n_kept = n_kept_pool = 0
            for dec, dec_pos in run:
                if over_pool:
                    n_kept_pool += int(dec["keep"].sum())
                    here = alive[dec_pos]
                    dec, dec_pos = dec.filter(pl.Series(here)), dec_pos[here]
                keep = dec["keep"].to_numpy()
                n_seen += len(keep)
                n_kept += int(keep.sum())
                for r, c in dec.filter(~pl.col("keep")).group_by("reason").len().iter_rows():
                    reasons[r] = reasons.get(r, 0) + c
                if staged is not None:
                    staged.add(dec, dec_pos)
                elif record:
                    _record_decisions(manifest, src, run_id, idx, sid, dec, dec_pos)
                # later chunks never hold these positions, and streamed stages have read them
                alive[dec_pos[~keep]] = False
                del dec, dec_pos, keep
            src.release()
            if staged is not None:
                for part, part_pos in staged.drain(manifest):
                    _record_decisions(manifest, src, run_id, idx, sid, part, part_pos)
            stats, artefacts = run.stats, run.artefacts
            if n_seen != n_alive:
                raise CurateError(f"stage {sid} returned {n_seen} decisions for {n_alive} samples")
            if over_pool:
                stats = {**stats, "applied_to": "pool", "kept_over_pool": n_kept_pool}
            seconds = time.perf_counter() - t0
            top = sorted(reasons.items(), key=lambda kv: (-kv[1], str(kv[0])))[:5]
            out = StageOutcome(idx, sid, stage.name, n_alive, n_kept, seconds, stage.params(), stats,
                               [{"reason": r, "n": c} for r, c in top])
            outcomes.append(out)
            if record:
                manifest.execute(
                    "INSERT INTO stage_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, idx, sid, out.n_in, out.n_kept, out.n_in - out.n_kept, seconds,
                     json.dumps({"stage": stage.name, "params": stage.params(), "stats": stats}, default=str)])
                _save_artefacts(run_dir, sid, artefacts)
            if stage.remembers_languages and not languages_later:
                from ..stages import langid

                langid.clear_memo()  # up to MEMO_MAX captions nobody will ask about again
                langid.use_memo(True)
            n_alive = n_kept
            src.forget_pos_of_rank()
            bar.advance(task)
    for w in warnings:
        console.warn(w)
    return {"recipe": recipe.name, "pool": n_pool, "kept": n_alive,
            "kept_fraction": round(n_alive / n_pool, 6) if n_pool else 0.0,
            "funnel": [o.as_dict() for o in outcomes], "warnings": warnings}


def _check_score_run(manifest, sid: str, stage: Stage, warnings: list[str]) -> None:
    """A stage that reads what `curate score` found out about images (decode failures) over a
    pool whose images no score run has decoded would keep them all, the broken ones too."""
    n = manifest.scalar(
        "SELECT count(*) FROM samples s WHERE s.status = 'ok' AND s.image_ext IS NOT NULL AND s.img_shard_id NOT IN "
        "(SELECT DISTINCT e.shard_id FROM embeddings e JOIN scorers c ON c.name = e.scorer "
        "WHERE c.kind <> 'provided' AND e.kind = 'img')")
    if not n:
        return
    msg = (f"stage {sid}: {n:,} samples have images that no `curate score` run has decoded, so their decode "
           "failures are unknown")
    if getattr(stage, "require_score", True):
        raise UsageError(msg + f"; run `curate score` first, or --set {sid}.require_score=false to keep them")
    warnings.append(msg + "; they are kept")


def _record_decisions(manifest, src: PoolSource, run_id: int, idx: int, sid: str, dec: pl.DataFrame,
                      pos: np.ndarray) -> None:
    """Insert a stage's decisions, turning uid ranks (and ref_uid ranks) back into uid strings
    by a join on the samples' row ids."""
    ref_rank = dec["ref_uid"].dtype == dec["uid"].dtype and dec["ref_uid"].null_count() < dec.height
    ref_sql, ref_join = (("r.uid", "LEFT JOIN samples r ON r.rowid = d._ref") if ref_rank
                         else ("d.ref_uid::VARCHAR", ""))
    for start in range(0, dec.height, WRITE_CHUNK):
        part = dec.slice(start, WRITE_CHUNK)
        rid = src.rid[pos[start:start + WRITE_CHUNK]]
        # the rows' row-id range: DuckDB then reads only the row groups that hold them
        sql = ("INSERT INTO decisions (run_id, stage_idx, stage, uid, keep, reason, value, threshold, ref_uid, "
               f"detail) SELECT {int(run_id)}, {int(idx)}, ?, p.uid, d.keep, d.reason, d.value, d.threshold, "
               f"{ref_sql}, d.detail FROM _curate_dec d JOIN samples p ON p.rowid = d._rid {ref_join} "
               f"WHERE p.rowid BETWEEN {int(rid.min())} AND {int(rid.max())} "
               "ORDER BY d._i")
        cols = [pl.Series("_rid", rid)]
        if ref_rank:
            ref = part["ref_uid"]
            has = ref.is_not_null().to_numpy()
            r = np.full(len(ref), -1, dtype=src.rid.dtype)
            if "_ref_pos" in part.columns:  # the stage said which input row: no uid → position inverse
                r[has] = src.rid[part["_ref_pos"].to_numpy()[has]]
            else:
                r[has] = src.rid[src.pos_of_rank[ref.fill_null(0).to_numpy()[has]]]
            cols.append(pl.select(pl.when(pl.Series(has)).then(pl.Series(r))).to_series().alias("_ref"))
        drop = ["uid"] + (["ref_uid"] if ref_rank else []) + (["_ref_pos"] if "_ref_pos" in part.columns else [])
        table = part.drop(drop).with_columns(cols).with_row_index("_i").to_arrow()
        manifest.con.register("_curate_dec", table)
        try:
            manifest.execute(sql, [sid])
        finally:
            manifest.con.unregister("_curate_dec")
        manifest.trim()  # each chunk's join caches table blocks; they would pile up over the pool


class Unusable:
    """Positions of the pool (sorted) without a usable embedding of a kind of scorer: undecodable
    images and bad embeddings; for scorers `curate score` computed, also the samples without an
    image (PoolSource.unusable)."""

    def __init__(self, src: PoolSource, err_pos: np.ndarray):
        self.src, self.err_pos = src, err_pos

    @property
    def all_decodable(self) -> bool:
        return not len(self.err_pos)

    def decodable(self) -> np.ndarray:
        """Whether each position's embedding is usable (built when asked: a byte a sample)."""
        m = np.ones(self.src.n, dtype=bool)
        m[self.err_pos] = False
        return m

    def decodable_by_rank(self) -> np.ndarray:
        """`decodable()` in uid-rank order."""
        m = np.ones(self.src.n, dtype=bool)
        m[self.src.rank[self.err_pos]] = False
        return m

    def undecodable_among(self, pos: np.ndarray) -> int:
        """How many of these positions (sorted) have no usable embedding."""
        if not len(self.err_pos) or not len(pos):
            return 0
        i = np.minimum(np.searchsorted(pos, self.err_pos), len(pos) - 1)
        return int((pos[i] == self.err_pos).sum())


class _Pools:
    """The run's `_Pool`s, one per set of unusable samples (the pool's own embeddings, computed ones)."""

    def __init__(self, src: PoolSource):
        self.src = src
        self._pools: dict[Unusable, _Pool] = {}

    def for_scorer(self, scorer: str | None) -> "_Pool":
        u = self.src.unusable(scorer)
        if u not in self._pools:
            self._pools[u] = _Pool(self.src, u)
        return self._pools[u]


class _Pool:
    """The run's starting pool as clustering stages see it: the samples that have embeddings
    (decodable images), in uid-rank order. Each clustering of it is computed once and cached in
    WS/cache (arrays in that order) across runs; stages get it restricted to their input."""

    def __init__(self, src: PoolSource, unusable: Unusable):
        self.src = src
        self.u = unusable
        self.all_decodable = unusable.all_decodable
        self._fingerprint: str | None = None
        self._drank: np.ndarray | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            bits = self.u.decodable_by_rank()
            self._fingerprint = bitmap_fingerprint(bits, self.src.pool_key)
        return self._fingerprint

    def index(self, pos: np.ndarray) -> np.ndarray:
        """Row of each position's sample in the pool clustering's arrays."""
        r = self.src.rank_at(pos)
        if self.all_decodable:
            return r
        if self._drank is None:
            self._drank = np.cumsum(self.u.decodable_by_rank(), dtype=index_dtype(self.src.n)) - 1
        return self._drank[r]

    def clustering_key(self, spec) -> str:
        return f"clustering-{spec.key()}-{self.fingerprint()}"

    def input_fingerprint(self, alive: np.ndarray) -> str:
        """`StageInput.fingerprint` of the samples where `alive` is set (a bitmap over uid ranks)."""
        bits = np.zeros(self.src.n, dtype=bool)
        step = 1 << 20
        for s in range(0, self.src.n, step):
            bits[self.src.rank[s:s + step][alive[s:s + step]]] = True
        return bitmap_fingerprint(bits, self.src.pool_key)

    def cluster_index(self, spec, manifest, cache) -> ClusterIndex:
        """The pool clustering's samples as pool positions sorted by cluster (`ClusterIndex`),
        built once per clustering and workspace layout (the positions depend on the order the
        samples are listed in) and kept in the cache."""
        src = self.src
        key = self.clustering_key(spec)
        layout = short_hash(src.rank, self.u.err_pos)
        d = cache.dir(f"clusteridx-{spec.key()}-{self.fingerprint()}-{layout}")
        if ClusterIndex.complete(d):
            return ClusterIndex(d)
        files = cache.dir(key)
        n = len(np.load(files / "cluster.npy", mmap_mode="r"))
        k = int(np.load(files / "centroids.npy", mmap_mode="r").shape[0])
        pr = src.pos_of_rank
        dpos = pr if self.all_decodable else pr[self.u.decodable_by_rank()]  # position of each clustered row
        step = 1 << 20

        def rows():
            for s in range(0, n, step):
                e = min(n, s + step)
                yield (read_range(files / "cluster.npy", s, e), read_range(files / "dist.npy", s, e),
                       np.arange(s, e), dpos[s:e])
        index = ClusterIndex.build(d, manifest.con, k, n, rows(), pos_dtype=index_dtype(src.n))
        dpos = pr = None  # noqa: F841  (4 bytes a sample each)
        src.forget_pos_of_rank()
        src.release()
        return index

    def clustering(self, stage: Stage, spec, manifest, cache) -> tuple[dict, str]:
        """(arrays cluster/dist/centroids in pool order, 'cache' | 'computed') for `spec`."""
        key = self.clustering_key(spec)
        got = cache.get(key)
        if got is not None:
            return got, "cache"
        src = self.src
        pos = None if self.all_decodable else np.flatnonzero(self.u.decodable()).astype(index_dtype(src.n), copy=False)
        view = ShardEmbeddingView.at(*src.location(spec.scorer), pos, refs(manifest, spec.scorer, spec.kind),
                                     spec.scorer, spec.kind)
        row = src.rank if pos is None else self.index(pos)  # each view row's place in pool order
        del pos
        # the assignments stream to files in view order, then each array in turn is put in pool
        # order: 4 bytes a sample at a time, never the whole result twice
        d = cache.dir(key)
        n = view.n
        views = {"cluster": (d / ".cluster.view.npy", np.int32), "dist": (d / ".dist.view.npy", np.float32)}
        with npy_writers(dict(views.values()), n) as (wc, wd):
            def sink(start, ids, dist):
                wc.write(ids)
                wd.write(dist)
            res = compute_clustering(view, spec, row, device=getattr(stage, "device", "auto"), sink=sink)
        del view

        def in_pool_order(name: str):
            def build() -> np.ndarray:
                path, dtype = views[name]
                a = np.empty(n, dtype=dtype)
                for s in range(0, n, 1 << 20):
                    a[row[s:s + (1 << 20)]] = read_range(path, s, s + (1 << 20))
                return a
            return build
        try:
            cache.put(key, {"cluster": in_pool_order("cluster"), "dist": in_pool_order("dist"),
                            "centroids": res.centroids})
        finally:
            for path, _ in views.values():
                path.unlink(missing_ok=True)
        src.release()
        return cache.get(key), "computed"


class _ParquetAppender:
    """Frames appended to one Parquet file as they come (its schema: the first frame's)."""

    def __init__(self, path: Path):
        self.path = path
        self.writer = None

    def add(self, frame: pl.DataFrame) -> None:
        import pyarrow.parquet as pq

        table = frame.to_arrow()
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> bool:
        """Finish the file; False when nothing was added (and no file exists)."""
        if self.writer is None:
            return False
        self.writer.close()
        return True


class _StagedDecisions:
    """Decisions that arrive in cluster order, not position order: appended to a Parquet file
    as they come, sorted by position by DuckDB (within its memory limit, spilling to disk),
    then handed back a chunk at a time in position order, which is how `_record_decisions`
    writes fast (each chunk joins a narrow row-id range of the samples table)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.file = _ParquetAppender(directory / "staged.parquet")

    def add(self, dec: pl.DataFrame, pos: np.ndarray) -> None:
        self.file.add(dec.with_columns(pl.Series("_p", np.asarray(pos, dtype=np.int64))))

    def drain(self, manifest):
        """(decisions, positions) in position order, WRITE_CHUNK rows at a time; the files go."""
        import pyarrow.parquet as pq

        try:
            if not self.file.close():
                return
            src, out = self.file.path, self.dir / "sorted.parquet"
            manifest.execute(f"COPY (SELECT * FROM read_parquet('{src}') ORDER BY _p) TO '{out}' (FORMAT parquet)")
            src.unlink()
            # no pre-buffering: it keeps every row group it has read until the iteration ends
            for rb in pq.ParquetFile(out, pre_buffer=False).iter_batches(batch_size=WRITE_CHUNK):
                part = pl.from_arrow(rb)
                yield part.drop("_p"), part["_p"].to_numpy()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _apply_clustered(sid: str, stage: Stage, src: PoolSource, alive: np.ndarray, n_in: int, manifest, seed: int,
                     budget, cache, pools: "_Pools") -> _StageRun:
    """Run a clustering stage (`run_clustered`) over the surviving samples listed cluster by
    cluster from the pool's cluster index. Chunks are (decisions, positions) in cluster order."""
    def chunks(run):
        spec = stage.spec_for(n_in, seed)
        pool = pools.for_scorer(spec.scorer)
        err_pos = pool.u.err_pos
        bad = int(alive[err_pos].sum()) if len(err_pos) else 0
        if bad:
            raise UsageError(f"stage {stage.name} needs embeddings, but {bad:,} of its samples have no usable "
                             f"embedding (undecodable images or bad embeddings, see `curate status`); put a "
                             f"decode_failures stage before it")
        if n_in == 0:
            run.stats = {"n_in": 0, "n_kept": 0}
            return
        arrays, source = pool.clustering(stage, spec, manifest, cache)
        centroids = np.array(arrays["centroids"], dtype=np.float32)
        del arrays
        index = pool.cluster_index(spec, manifest, cache)
        wanted = BitSet.of(alive)
        views = {(sc, kind): ShardEmbeddingView.at(*src.location(sc), None, refs(manifest, sc, kind), sc, kind,
                                                   only=alive)
                 for sc, kind in stage.needs_embeddings()}
        embed = next(iter(views.values())).take if views else None
        ident = f"clustering-{spec.key()}-{pool.input_fingerprint(alive)}"
        cin = ClusteredInput(
            n=n_in, k=int(centroids.shape[0]), centroids=centroids, bounds=index.bounds, read=index.read,
            uid_of=lambda p: src.rank[p], uid_series=lambda p, u: pl.Series("uid", u), embed=embed, wanted=wanted,
            score_of=lambda name, p: src.scores[name].gather(p), identity=ident, source=source)
        res = stage.run_clustered(cin, budget, spec.seed, cache)
        run.stats, run.artefacts = res.stats, res.artefacts
        yield from _positioned(sid, src, wanted, res.decision_chunks())
    return _StageRun(chunks)


def _positioned(sid: str, src: PoolSource, wanted, chunks):
    """Check decision chunks that name their rows (`POS`, any order): each a sample the stage was
    given (`wanted[pos]`), none twice; yield (normalised decisions with `_ref_pos`, positions)."""
    seen = BitSet(src.n)
    uid_type = pl.Series(src.rank[:0]).dtype
    for dec in chunks:
        if POS not in dec.columns:
            raise CurateError(f"stage {sid} returned decisions without {POS}")
        p = dec[POS].to_numpy()
        if len(p) and (p.min() < 0 or p.max() >= src.n or not wanted[p].all() or seen[p].any()
                       or len(np.unique(p)) != len(p)):
            raise CurateError(f"stage {sid} returned decisions for samples it was not given, or twice")
        seen.add(p)
        dec = dec.with_columns(pl.col(REF_POS).fill_null(-1).alias("_ref_pos")) if REF_POS in dec.columns else dec
        yield _normalise_decisions(sid, uid_type, dec, ("_ref_pos",)), p


def _apply_keyed(sid: str, stage: Stage, src: PoolSource, mask: np.ndarray, n_in: int, manifest,
                 directory: Path) -> "_StageRun":
    """Run a grouping stage (`run_keyed`) over the samples where `mask` is set: its condensed
    batches are streamed into a Parquet file that DuckDB then queries
    (`curate.keyed.KeyedTable`), so the stage's whole input is never held in memory."""
    from ..keyed import KeyedTable

    def chunks(run):
        want = stage_wants(stage)
        file = _ParquetAppender(directory / "input.parquet")
        try:
            wanted = BitSet(src.n)
            for bpos, batch in src.frames(mask, want):
                wanted.add(bpos)
                file.add(stage.condense(batch).with_columns(pl.Series(POS, bpos.astype(np.int64))))
            if not file.close():  # no rows
                run.stats = {"n_in": 0, "n_kept": 0}
                return
            if wanted.count() != n_in:
                raise CurateError(f"stage {sid}: read {wanted.count()} of its {n_in} samples")
            res = stage.run_keyed(KeyedTable(manifest.con, f"read_parquet('{file.path}')", n_in))
            run.stats, run.artefacts = res.stats, res.artefacts
            yield from _positioned(sid, src, wanted, res.decision_chunks())
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return _StageRun(chunks)


class _StageRun:
    """Iterating gives a stage's (decisions, positions) chunks; `stats` and `artefacts` are set
    once the iteration is over."""

    def __init__(self, chunks):
        self.stats: dict = {}
        self.artefacts: dict = {}
        self._chunks = chunks(self)

    def __iter__(self):
        return self._chunks


def _apply(sid: str, stage: Stage, src: PoolSource, pos: np.ndarray, manifest, seed: int, budget, cache,
           pool: _Pools | None = None) -> _StageRun:
    """Run a stage over its samples: a row stage a partition at a time (bounded memory) over
    those where `pos` (a boolean mask over the pool) is set; others in one call over the
    positions `pos`."""
    if stage.scope == "row" and not stage.needs_embeddings():
        def row_chunks(run):
            want = stage_wants(stage)
            if want.columns:
                batches = _gather(src.frames(pos, want), ROW_PARTITION)
            else:  # partitions of the pool, each its set positions
                parts = (np.flatnonzero(pos[s:s + ROW_PARTITION]) + s for s in range(0, len(pos), ROW_PARTITION))
                batches = ((p, src.base(p, want)) for p in parts if len(p))
            for bpos, frame in batches:
                res = stage.apply(StageInput(frame, {}, seed, budget, cache, pool_key=src.pool_key))
                yield _positions(sid, src, frame, bpos, res.decisions)
        return _StageRun(row_chunks)

    def global_chunks(run):
        bad = max((src.unusable(sc).undecodable_among(pos) for sc, _ in stage.needs_embeddings()), default=0)
        if bad and stage._apply_to == "pool":
            raise UsageError(f"stage {stage.name} needs embeddings, but {bad:,} of the pool's samples have no usable "
                             f"embedding (undecodable images or bad embeddings, see `curate status`); with "
                             f"apply_to = \"pool\" it sees them all: apply it to the survivors of a "
                             f"decode_failures stage instead")
        if bad:
            raise UsageError(f"stage {stage.name} needs embeddings, but {bad:,} of its samples have no usable "
                             f"embedding (undecodable images or bad embeddings, see `curate status`); put a "
                             f"decode_failures stage before it")
        frame = stage_frame(src, stage, pos)
        views = {(sc, kind): ShardEmbeddingView.at(*src.location(sc), pos, refs(manifest, sc, kind), sc, kind)
                 for sc, kind in stage.needs_embeddings()}
        inp = StageInput(frame, views, seed, budget, cache, pool_key=src.pool_key)
        if pool is not None and hasattr(stage, "cluster_spec") and frame.height:
            _share_pool_clustering(stage, inp, pool, pos, manifest, cache)
        res = stage.apply(inp)
        run.stats, run.artefacts, chunks = res.stats, res.artefacts, res.decision_chunks()
        uid = frame["uid"]
        del inp, views, res, frame
        at = 0
        for dec in chunks:  # in input order; one chunk unless the stage builds them as it goes
            h = dec.height
            if at + h > len(uid):
                raise CurateError(f"stage {sid} returned more decisions than the {len(uid)} samples it was given")
            out = _positions(sid, src, uid.slice(at, h).to_frame(), pos[at:at + h], dec)
            at += h
            del dec
            yield _ref_positions(sid, out, pos)
        if at != len(uid):
            raise CurateError(f"stage {sid} returned {at} decisions for {len(uid)} samples")
    return _StageRun(global_chunks)


def _gather(batches, rows: int):
    """Merge streamed (positions, frame) batches into ones of at least `rows` rows (the last may be
    smaller): row stages pay their per-call costs (worker start, distinct-caption tables) once
    per partition, not once per read batch."""
    pos, frames, n = [], [], 0
    for p, f in batches:
        pos.append(p)
        frames.append(f)
        n += len(p)
        if n >= rows:
            yield np.concatenate(pos), pl.concat(frames)
            pos, frames, n = [], [], 0
    if frames:
        yield np.concatenate(pos), pl.concat(frames)


def _positions(sid: str, src: PoolSource, frame: pl.DataFrame, pos: np.ndarray, dec: pl.DataFrame):
    """Checked decisions and the pool position of each of their rows."""
    dec, aligned = _check_decisions(sid, frame["uid"], dec)
    if aligned:
        return dec, pos
    return dec, src.pos_of_rank[dec["uid"].to_numpy()].astype(np.int64)


def _ref_positions(sid: str, out: tuple[pl.DataFrame, np.ndarray], pos: np.ndarray):
    """A stage's `REF_ROW` column (rows of its input) as `_ref_pos`, pool positions."""
    dec, dec_pos = out
    if REF_ROW not in dec.columns:
        return out
    rows = dec[REF_ROW]
    has = rows.is_not_null().to_numpy()
    r = rows.fill_null(0).to_numpy()
    if has.any() and (r[has].min() < 0 or r[has].max() >= len(pos)):
        raise CurateError(f"stage {sid} returned {REF_ROW} outside its {len(pos)} input rows")
    ref_pos = np.full(len(r), -1, dtype=np.int64)
    ref_pos[has] = pos[r[has]]
    return dec.drop(REF_ROW).with_columns(pl.Series("_ref_pos", ref_pos)), dec_pos


def _share_pool_clustering(stage: Stage, inp: StageInput, pools: _Pools, pos: np.ndarray, manifest, cache) -> None:
    """Cluster the run's whole pool once (cached across runs) and hand the stage that clustering
    restricted to its input (`inp.clusterings`), so a new eps, budget or upstream filter never
    re-clusters."""
    spec = stage.cluster_spec(inp)
    pool = pools.for_scorer(spec.scorer)
    bad = pool.u.undecodable_among(pos)
    if bad:
        raise UsageError(f"stage {stage.name} needs embeddings, but {bad:,} of its samples have no usable "
                         f"embedding (undecodable images or bad embeddings, see `curate status`); put a "
                         f"decode_failures stage before it")
    arrays, source = pool.clustering(stage, spec, manifest, cache)
    idx = pool.index(pos)
    cluster = np.asarray(arrays["cluster"][idx], dtype=np.int32)
    dist = np.asarray(arrays["dist"][idx], dtype=np.float32)
    centroids = np.array(arrays["centroids"], dtype=np.float32)
    del arrays, idx
    ident = f"clustering-{spec.key()}-{inp.fingerprint()}"
    inp.clusterings[spec.key()] = StageClustering(cluster, dist, centroids, int(centroids.shape[0]), source, ident,
                                                  {"key": ident, "pool_clustering": f"clustering-{spec.key()}-"
                                                                                    f"{pool.fingerprint()}"})


def _save_artefacts(run_dir: Path | None, sid: str, artefacts: dict) -> None:
    if run_dir is None:
        return
    for name, obj in artefacts.items():
        base = run_dir / f"{sid}.{name}"
        if isinstance(obj, pl.DataFrame):
            with atomic_path(base.with_suffix(base.suffix + ".parquet"), suffix=".parquet") as tmp:
                obj.write_parquet(tmp)
        elif isinstance(obj, np.ndarray):
            atomic_save_npy(base.with_suffix(base.suffix + ".npy"), obj)
        else:
            with atomic_path(base.with_suffix(base.suffix + ".json")) as tmp:
                tmp.write_text(json.dumps(obj, default=str, indent=2))
