"""`curate score`: stream the pool's image shards through one or more models, shard by shard.

Data path: an IterableDataset hands each DataLoader worker whole shards; a worker reads the
sample byte ranges recorded at ingest (sequential reads), and yields batches that never cross a
shard boundary, already decoded, resized and tokenised by the shared `SampleCollator`. Because
a shard is always cut into the same batches, its outputs do not depend on what ran before it:
a resumed run writes exactly what an uninterrupted one would have.

Outputs per shard and scorer: `embeddings/<scorer>/<shard>.{img,txt[,img_flip]}.npy` (fp16,
row-aligned with `samples.row_idx`, zeros where the image failed), written atomically, then
one manifest transaction registers them with the scores (fp32 cosine; NULL where the image
failed or the caption is empty) and the per-sample failures (`sample_issues`, action
`unscored`). A shard is finished when that transaction commits; finished shards are skipped on
rerun unless `force`. With several devices (every visible GPU, or `--device cuda:0,cuda:1`;
`cpu,cpu` runs the same path on the CPU), one worker process per device (not a daemon: it has
DataLoader workers of its own) scores a disjoint set of shards, each shard's rows handed over as
a small parquet file, never as Python objects; the parent registers what they write. A worker
that dies or fails is started again on its unfinished shards (`retries` times); shards still
unfinished then make the command fail (exit 1) naming them. Nothing is registered that was not
written.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .. import console
from ..embeddings import EmbeddingRef, register
from ..errors import CurateError, UsageError
from ..export.tario import Source
from ..workspace import atomic_path, atomic_save_npy

FLIP_SUFFIX = ":flip"


@dataclass
class ShardJob:
    shard_id: int
    path: str
    n_rows: int
    rows: list[int]
    uids: list[str]
    keys: list[str]
    offsets: list[int]
    ends: list[int]
    exts: list[str]
    captions: list[str | None]

    def save(self, path: Path) -> None:
        """The job's rows as a parquet file (what a worker process is handed)."""
        with atomic_path(path, suffix=".parquet") as tmp:
            pl.DataFrame({"row_idx": self.rows, "uid": self.uids, "key": self.keys, "tar_offset": self.offsets,
                          "tar_end": self.ends, "image_ext": self.exts, "caption": self.captions},
                         schema={"row_idx": pl.Int64, "uid": pl.Utf8, "key": pl.Utf8, "tar_offset": pl.Int64,
                                 "tar_end": pl.Int64, "image_ext": pl.Utf8, "caption": pl.Utf8}).write_parquet(tmp)

    @classmethod
    def load(cls, shard_id: int, path: str, n_rows: int, job_file: Path) -> "ShardJob":
        g = pl.read_parquet(job_file)
        return cls(shard_id, path, n_rows, g["row_idx"].to_list(), g["uid"].to_list(), g["key"].to_list(),
                   g["tar_offset"].to_list(), g["tar_end"].to_list(), g["image_ext"].to_list(), g["caption"].to_list())


@dataclass
class ScoreOptions:
    batch_size: int = 64
    workers: int = 1
    flip: bool = False
    max_pixels: int | None = None
    preprocess: str = "fast"  # fast | exact


def plan_jobs(manifest, scorer_names: list[str], *, flip: bool, force: bool) -> tuple[list[ShardJob], int]:
    """The image shards still to score (and how many are already done)."""
    # Every image, where it is: a webdataset sample's own shard, or the image shard attached to a
    # DataComp metadata sample; embeddings are written per image shard, row-aligned with img_row.
    frame = manifest.frame(
        "SELECT s.img_shard_id AS shard_id, sh.path, s.img_row AS row_idx, s.uid, s.img_key AS key, s.tar_offset, "
        "s.tar_end, s.image_ext, s.caption FROM samples s JOIN shards sh ON sh.shard_id = s.img_shard_id "
        "WHERE s.status = 'ok' AND s.image_ext IS NOT NULL AND sh.format = 'wds' "
        "ORDER BY s.img_shard_id, s.img_row")
    if frame.height == 0:
        return [], 0
    kinds = ["img", "txt"] + (["img_flip"] if flip else [])
    done: set[int] | None = None
    for name in scorer_names:
        for kind in kinds:
            have = {r[0] for r in manifest.execute(
                "SELECT shard_id FROM embeddings WHERE scorer = ? AND kind = ?", [name, kind]).fetchall()}
            done = have if done is None else done & have
    done = set() if force or done is None else done
    jobs = []
    n_done = 0
    for (sid,), g in frame.group_by(["shard_id"], maintain_order=True):
        if sid in done:
            n_done += 1
            continue
        jobs.append(ShardJob(int(sid), g["path"][0], int(g["row_idx"].max()) + 1, g["row_idx"].to_list(),
                             g["uid"].to_list(), g["key"].to_list(), g["tar_offset"].to_list(),
                             g["tar_end"].to_list(), g["image_ext"].to_list(), g["caption"].to_list()))
    return jobs, n_done


def read_member(src, offset: int, end: int, ext: str) -> bytes | None:
    """The `ext` member of the sample whose tar members span [offset, end) of the source shard
    `src` (an `export.tario.Source`: offsets of a compressed shard are in its inflated stream)."""
    try:
        blob = src.read(offset, end - offset)
    except EOFError:
        return None  # the shard is shorter than at ingest: the sample scores as missing_image
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
            for info in tf:
                name = info.name.rsplit("/", 1)[-1]
                if info.isfile() and name.split(".", 1)[-1].lower() == ext:
                    f = tf.extractfile(info)
                    return f.read() if f else None
    except tarfile.TarError:
        return None
    return None


class ShardBatches(torch.utils.data.IterableDataset):
    """Yields (shard_id, positions, PreparedBatch) per batch; each worker takes every k-th shard."""

    def __init__(self, jobs: list[ShardJob], collator, batch_size: int):
        self.jobs, self.collator, self.batch_size = jobs, collator, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for j, job in enumerate(self.jobs):
            if j % nw != wid:
                continue
            src = Source(job.path)
            try:
                for start in range(0, len(job.rows), self.batch_size):
                    stop = min(len(job.rows), start + self.batch_size)
                    samples = [(i, read_member(src, job.offsets[i], job.ends[i], job.exts[i]), job.captions[i])
                               for i in range(start, stop)]
                    yield job.shard_id, np.arange(start, stop), self.collator(samples)
            finally:
                src.close()


@dataclass
class _Acc:
    job: ShardJob
    filled: int = 0
    arrays: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # per position: what the decoder warned, or None


def _new_acc(job: ShardJob, models, flip: bool) -> _Acc:
    acc = _Acc(job)
    n = len(job.rows)
    for m in models:
        kinds = ["img", "txt"] + (["img_flip"] if flip else [])
        for k in kinds:
            acc.arrays[(m.name, k)] = np.zeros((job.n_rows, m.embed_dim), dtype=np.float16)
        acc.scores[m.name] = np.full(n, np.nan, dtype=np.float32)
        if flip:
            acc.scores[m.name + FLIP_SUFFIX] = np.full(n, np.nan, dtype=np.float32)
    acc.reasons = [None] * n
    acc.warnings = [None] * n
    return acc


def result_dir(ws) -> Path:
    d = ws.root / "tmp" / "score"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_shard_outputs(ws, acc: _Acc, flip: bool) -> Path:
    """Write a finished shard's arrays atomically, and a small result file for registration."""
    job = acc.job
    scores = {name: s.copy() for name, s in acc.scores.items()}
    # A decoded sample whose embedding from a model is unusable (a non-finite value, or a zero
    # vector) is recorded as `bad_embedding` with that scorer's scores NULL; the arrays hold
    # zeros wherever a row is unusable (undecodable images included).
    rows = np.asarray(job.rows, dtype=np.int64)
    decoded = np.array([r is None for r in acc.reasons], dtype=bool)
    # per scorer: a scorer's rows are replaced when it is scored again, not another's
    bad_detail: dict[str, list[list[str]]] = {name: [[] for _ in job.rows] for name, _ in acc.arrays}
    files = []
    for (name, kind), arr in acc.arrays.items():
        nonfinite = ~np.isfinite(arr).all(axis=1)
        zero = ~nonfinite & ~(arr != 0).any(axis=1)  # fp16: a norm is 0 only when every value is
        arr[nonfinite] = 0
        bad = (nonfinite[rows] | zero[rows]) & decoded
        for p in np.flatnonzero(bad):
            bad_detail[name][p].append(f"{name} {kind}: {'non-finite values' if nonfinite[rows[p]] else 'zero vector'}")
        for sc in {"img": [name], "img_flip": [name + FLIP_SUFFIX]}.get(kind, [name, name + FLIP_SUFFIX]):
            if sc in scores:
                scores[sc][bad] = np.nan
        path = ws.embedding_path(name, job.shard_id, kind)
        atomic_save_npy(path, arr)
        files.append({"scorer": name, "kind": kind, "path": str(path), "n_rows": arr.shape[0], "dim": arr.shape[1]})
    empty = [c is None or not str(c).strip() for c in job.captions]
    for s in scores.values():
        s[np.asarray(empty, dtype=bool)] = np.nan
    result = pl.DataFrame({"uid": job.uids, "key": job.keys,
                           "reason": [r[0] if r else None for r in acc.reasons],
                           "detail": [r[1] if r else None for r in acc.reasons],
                           "empty_caption": empty,
                           **{f"bad::{name}": pl.Series([("; ".join(d) if d else None) for d in details],
                                                        dtype=pl.Utf8) for name, details in bad_detail.items()},
                           "decode_warning": pl.Series(acc.warnings, dtype=pl.Utf8),
                           **{f"score::{k}": v for k, v in scores.items()}})
    out = result_dir(ws) / f"{job.shard_id:08d}.parquet"
    # The parquet is written last: its presence means the shard's outputs are complete.
    with atomic_path(out.with_suffix(".files.json")) as tmp:
        tmp.write_text(json.dumps(files))
    with atomic_path(out, suffix=".parquet") as tmp:
        result.write_parquet(tmp)
    return out


def register_shard(manifest, ws, shard_id: int, run_id: int, scorer_rows: list[dict]) -> dict:
    """Register a shard's outputs (result parquet + arrays) in one transaction; idempotent."""
    rpath = result_dir(ws) / f"{shard_id:08d}.parquet"
    files = json.loads(rpath.with_suffix(".files.json").read_text())
    res = pl.read_parquet(rpath)
    counts = {"failed": 0, "empty_caption": 0, "bad_embedding": 0}
    if "decode_warning" not in res.columns:  # written by an older version
        res = res.with_columns(pl.lit(None, pl.Utf8).alias("decode_warning"))
    bad_cols = [c for c in res.columns if c.startswith("bad::")]
    scorers = sorted({f["scorer"] for f in files})
    with manifest.transaction():
        for s in scorer_rows:
            manifest.execute("INSERT OR IGNORE INTO scorers (name, kind, spec, dim, params, run_id, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, now())",
                             [s["name"], s["kind"], s["spec"], s["dim"], s["params"], run_id])
        for f in files:
            register(manifest, EmbeddingRef(f["scorer"], shard_id, f["kind"], f["path"], None, None, "<f2",
                                            f["n_rows"], f["dim"]))
        manifest.con.register("_res", res.to_arrow())
        try:
            for col in [c for c in res.columns if c.startswith("score::")]:
                name = col[len("score::"):]
                manifest.execute("DELETE FROM scores WHERE scorer = ? AND uid IN (SELECT uid FROM _res)", [name])
                manifest.execute(f'INSERT INTO scores SELECT ?, uid, "{col}"::FLOAT FROM _res', [name])
                manifest.execute("UPDATE scores SET score = NULL WHERE scorer = ? AND NOT isfinite(score) "
                                 "AND uid IN (SELECT uid FROM _res)", [name])
            # What this result says again: the image's (undecodable, empty caption, decoder
            # warnings) and the bad embeddings of the scorers it holds; another scorer's stay.
            manifest.execute(
                "DELETE FROM sample_issues WHERE shard_id = ? AND (reason IN ('undecodable', 'empty_caption', "
                "'decode_warning') OR (reason = 'bad_embedding' AND action = 'unscored' AND "
                "list_bool_or([starts_with(detail, s || ' ') FOR s IN ?::VARCHAR[]])))", [shard_id, scorers])
            manifest.execute(
                "INSERT INTO sample_issues SELECT ?, ?, key, uid, 'decode_warning', 'warning', decode_warning "
                "FROM _res WHERE decode_warning IS NOT NULL", [run_id, shard_id])
            manifest.execute(
                "INSERT INTO sample_issues SELECT ?, ?, key, uid, 'undecodable', 'unscored', "
                "reason || coalesce(': ' || detail, '') FROM _res WHERE reason IS NOT NULL", [run_id, shard_id])
            manifest.execute(
                "INSERT INTO sample_issues SELECT ?, ?, key, uid, 'empty_caption', 'unscored', "
                "'no caption to score' FROM _res WHERE empty_caption AND reason IS NULL", [run_id, shard_id])
            for col in bad_cols:
                manifest.execute(
                    f"INSERT INTO sample_issues SELECT ?, ?, key, uid, 'bad_embedding', 'unscored', \"{col}\" "
                    f"FROM _res WHERE \"{col}\" IS NOT NULL AND reason IS NULL", [run_id, shard_id])
        finally:
            manifest.con.unregister("_res")
    counts["failed"] = int(res["reason"].is_not_null().sum())
    counts["empty_caption"] = int((res["empty_caption"] & res["reason"].is_null()).sum())
    any_bad = pl.any_horizontal([pl.col(c).is_not_null() for c in bad_cols]) if bad_cols else pl.lit(False)
    counts["bad_embedding"] = int(res.select(any_bad & pl.col("reason").is_null()).to_series().sum())
    rpath.unlink(missing_ok=True)
    rpath.with_suffix(".files.json").unlink(missing_ok=True)
    return counts


def score_jobs(ws, jobs: list[ShardJob], models, opts: ScoreOptions, on_shard_done, on_batch=None) -> None:
    """Score `jobs` with `models` (all on one device); call on_shard_done(shard_id) as each finishes."""
    from .infer import MultiScorer

    scorer = MultiScorer(models, flip=opts.flip)
    kwargs = {}
    if opts.max_pixels:
        kwargs["max_pixels"] = opts.max_pixels
    if opts.preprocess == "exact":
        kwargs.update(resize_backend="pil", draft=False)
    collate = scorer.collator(**kwargs)
    device = models[0].device
    workers = max(0, min(opts.workers, len(jobs)))
    loader = torch.utils.data.DataLoader(
        ShardBatches(jobs, collate, opts.batch_size), batch_size=None, collate_fn=_as_is, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers else None)
    accs: dict[int, _Acc] = {}
    by_id = {j.shard_id: j for j in jobs}
    for shard_id, positions, batch in loader:
        acc = accs.get(shard_id)
        if acc is None:
            acc = accs[shard_id] = _new_acc(by_id[shard_id], models, opts.flip)
        outs = scorer.score(batch)
        rows = np.asarray([acc.job.rows[p] for p in positions])
        for name, o in outs.items():
            acc.arrays[(name, "img")][rows] = o.img
            acc.arrays[(name, "txt")][rows] = o.txt
            acc.scores[name][positions] = o.score
            if opts.flip:
                acc.arrays[(name, "img_flip")][rows] = o.img_flip
                acc.scores[name + FLIP_SUFFIX][positions] = o.score_flip
        for p, r, d in zip(positions, batch.reasons, batch.details):
            if r is not None:
                acc.reasons[p] = (r, d)
        for p, w in zip(positions, batch.warnings or ()):
            if w is not None:
                acc.warnings[p] = w
        acc.filled += len(positions)
        if on_batch:
            on_batch(len(positions))
        if acc.filled == len(acc.job.rows):
            write_shard_outputs(ws, acc, opts.flip)
            del accs[shard_id]
            on_shard_done(shard_id)


def _as_is(item):
    """The dataset yields finished batches; keep numpy positions as they are (no tensor conversion)."""
    return item


# Tests make a device worker kill itself (SIGKILL) after finishing N shards: "SLOT:N" on its
# first attempt, "SLOT:N:always" on every attempt.
CRASH_ENV = "CURATE_SCORE_WORKER_CRASH"


def _crash_after(slot: int, attempt: int) -> int | None:
    v = os.environ.get(CRASH_ENV)
    if not v:
        return None
    parts = v.split(":")
    if int(parts[0]) != slot or (attempt > 0 and parts[2:] != ["always"]):
        return None
    return int(parts[1])


def _device_worker(slot: int, attempt: int, ws_root: str, device: str, tasks: list[tuple[int, str, int, str]],
                   specs, cache_dir, opts: ScoreOptions, q) -> None:
    """One process per device: load the models, score its shards (each task: shard id, tar path,
    array rows, the parquet of its rows), report each finished shard to the parent."""
    from ..models.loader import load_models
    from ..workspace import Workspace

    try:
        models = load_models(specs, device, cache_dir=cache_dir)
        q.put((slot, "scorers", scorer_rows_of(models)))
        jobs = [ShardJob.load(sid, path, n, Path(f)) for sid, path, n, f in tasks]
        crash = _crash_after(slot, attempt)
        finished = 0

        def on_done(sid: int) -> None:
            nonlocal finished
            q.put((slot, "done", sid))
            finished += 1
            if crash is not None and finished >= crash:
                time.sleep(0.2)  # let the queue's feeder thread send it
                os.kill(os.getpid(), signal.SIGKILL)

        score_jobs(Workspace(Path(ws_root)), jobs, models, opts, on_done, on_batch=lambda n: q.put((slot, "batch", n)))
    except BaseException as exc:  # report, the parent decides
        q.put((slot, "error", f"{device}: {type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


def scorer_rows_of(models) -> list[dict]:
    return [{"name": m.name, "kind": m.spec.kind, "spec": m.spec.canonical, "dim": m.embed_dim,
             "params": json.dumps(m.describe(), default=str)} for m in models]


def _score_on_devices(ws, jobs: list[ShardJob], devices, specs, cache_dir, opts: ScoreOptions, *, retries: int,
                      on_rows, on_done, on_batch, retried: list[str]) -> None:
    """One worker process per device over disjoint shard sets; a worker that dies or fails is
    started again on its unfinished shards, `retries` times; then CurateError names them."""
    from .device import partition_shards

    job_dir = result_dir(ws) / "jobs"
    job_dir.mkdir(exist_ok=True)
    tasks = {}
    for j in jobs:
        f = job_dir / f"{j.shard_id:08d}.parquet"
        j.save(f)
        tasks[j.shard_id] = (j.shard_id, j.path, j.n_rows, str(f))
    parts = partition_shards([j.shard_id for j in jobs], len(devices), weights=[len(j.rows) for j in jobs])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    finished: set[int] = set()
    slots: dict[int, tuple] = {}  # slot -> (device, its shards, attempt, process), while it runs
    errors: dict[int, str | None] = {}  # slot -> what its current attempt reported, if it failed

    def start(slot: int, device, sids: list[int], attempt: int) -> None:
        p = ctx.Process(target=_device_worker, args=(slot, attempt, str(ws.root), str(device),
                                                     [tasks[s] for s in sids], specs, cache_dir, opts, q),
                        name=f"curate-score-{device}-{slot}")
        errors[slot] = None
        p.start()
        slots[slot] = (device, sids, attempt, p)

    def handle(msg) -> None:
        slot, kind, val = msg
        if kind == "done":
            on_done(val)
            finished.add(val)
        elif kind == "batch":
            on_batch(val)
        elif kind == "scorers":
            on_rows(val)
        elif kind == "error":
            errors[slot] = val

    for slot, (d, part) in enumerate(zip(devices, parts)):
        if part:
            start(slot, d, list(part), 0)
    unfinished: dict[int, str] = {}
    try:
        while slots:
            try:
                handle(q.get(timeout=1))
                continue
            except queue_mod.Empty:
                pass
            for slot in [s for s, v in slots.items() if not v[3].is_alive()]:
                device, sids, attempt, p = slots.pop(slot)
                p.join()
                while True:  # what it sent before it ended
                    try:
                        handle(q.get(timeout=0.2))
                    except queue_mod.Empty:
                        break
                error = errors[slot]
                for sid in sids:  # written, but its message was lost with the process: register it
                    if sid not in finished and (result_dir(ws) / f"{sid:08d}.files.json").exists():
                        on_done(sid)
                        finished.add(sid)
                left = [s for s in sids if s not in finished]
                if not left and p.exitcode == 0:
                    continue
                why = error or (f"exit code {p.exitcode}" if p.exitcode is not None and p.exitcode >= 0
                                else f"killed by signal {-(p.exitcode or 0)}")
                if left and attempt < retries:
                    retried.append(f"{device}: {why}; {len(left)} shard(s) again")
                    console.warn(f"score worker on {device} ended ({why}); starting it again on its "
                                 f"{len(left)} unfinished shard(s)")
                    start(slot, device, left, attempt + 1)
                else:
                    for s in left:
                        unfinished[s] = f"{device}: {why}"
    finally:
        for v in slots.values():  # Ctrl-C or an error here: stop the workers
            if v[3].is_alive():
                v[3].terminate()
            v[3].join()
        if not slots:
            for f in job_dir.glob("*.parquet"):
                f.unlink(missing_ok=True)
    if unfinished:
        shown = ", ".join(f"{s}" for s in sorted(unfinished)[:20]) + (" ..." if len(unfinished) > 20 else "")
        reasons = "; ".join(sorted(set(unfinished.values())))
        raise CurateError(f"{len(unfinished)} shard(s) not scored after {retries} retries (shard ids {shown}): "
                          f"{reasons}. What finished is registered; rerun to score the rest")


def run_score(ws, manifest, specs, *, device: str, cache_dir, opts: ScoreOptions, force: bool, run_id: int,
              retries: int = 2) -> dict:
    from ..models.loader import load_models
    from .device import worker_devices

    names = [s.name for s in specs]
    _check_scorer_names(manifest, specs)
    devices = worker_devices(device)
    t0 = time.perf_counter()
    # One device: the models load here. Several: each worker loads them on its device and
    # describes them to the parent (no copy of the weights in the parent).
    models = load_models(specs, devices[0], cache_dir=cache_dir) if len(devices) == 1 else None
    scorer_rows: list[dict] | None = scorer_rows_of(models) if models else None
    stats = {"failed": 0, "empty_caption": 0, "bad_embedding": 0}
    # Shards whose outputs were written but not registered before an interruption: register them.
    leftover = [int(p.stem) for p in sorted(result_dir(ws).glob("*.parquet"))
                if p.with_suffix(".files.json").exists() and not force]
    if leftover and scorer_rows is None:
        scorer_rows = scorer_rows_of(load_models(specs, "cpu", cache_dir=cache_dir))
    registered: set[int] = set()

    def done(sid: int) -> None:
        if sid in registered:
            return
        c = register_shard(manifest, ws, sid, run_id, scorer_rows)
        registered.add(sid)
        for k in stats:
            stats[k] += c[k]

    for sid in leftover:
        done(sid)
    recovered = len(leftover)
    jobs, n_done = plan_jobs(manifest, names, flip=opts.flip, force=force)
    total = sum(len(j.rows) for j in jobs)
    n_scored = 0
    retried: list[str] = []

    with console.progress() as bar:
        task = bar.add_task(f"score ({len(jobs)} shards)", total=total)
        if len(devices) == 1:
            def on_batch(n):
                nonlocal n_scored
                n_scored += n
                bar.advance(task, n)
            if jobs:
                score_jobs(ws, jobs, models, opts, done, on_batch)
        elif jobs:
            def on_rows(rows: list[dict]) -> None:
                nonlocal scorer_rows
                scorer_rows = scorer_rows or rows

            def on_batch(n: int) -> None:
                nonlocal n_scored
                n_scored += n
                bar.advance(task, n)

            _score_on_devices(ws, jobs, devices, specs, cache_dir, opts, retries=retries, on_rows=on_rows,
                              on_done=done, on_batch=on_batch, retried=retried)
    seconds = time.perf_counter() - t0
    return {"scorers": names, "device": str(devices[0]) if len(devices) == 1 else [str(d) for d in devices],
            "shards_scored": len(jobs), "shards_already_done": n_done - recovered, "shards_recovered": recovered,
            "samples_scored": n_scored, "undecodable": stats["failed"], "empty_captions": stats["empty_caption"],
            "bad_embeddings": stats["bad_embedding"], **({"workers_restarted": retried} if retried else {}),
            "seconds": round(seconds, 2), "samples_per_s": round(n_scored / seconds, 1) if seconds else None}


def _check_scorer_names(manifest, specs) -> None:
    for s in specs:
        row = manifest.one("SELECT spec, kind FROM scorers WHERE name = ?", [s.name])
        if row is None:
            continue
        if row[1] == "provided":
            raise UsageError(f"scorer name {s.name!r} is taken by embeddings that came with the pool; "
                             f"add ,name=OTHER to the spec")
        if row[0] != s.canonical:
            raise UsageError(f"scorer {s.name!r} was made with {row[0]!r}, not {s.canonical!r}; "
                             f"add ,name=OTHER to keep both")
