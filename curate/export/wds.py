"""Webdataset export: reshard a selection into `00000000.tar, 00000001.tar, ...` by copying the
source tar members byte for byte.

The plan. The selected samples in canonical order (source shard id, then row), optionally
permuted with a seeded PCG64 (`--shuffle --seed S`), cut into shards of `shard_size`. Keys are
kept; a key already used by an earlier sample in canonical order (img2dataset keys are unique in
one pool, not across pools) becomes `<key>_<first 8 hex of the uid>` (longer if even that is
taken), so keys are unique in the whole export and do not depend on the shuffle.

The output directory. `_export_plan.json` (written first) holds the parameters and a
fingerprint of the plan; each finished shard has an `NNNNNNNN_stats.json` naming that
fingerprint; `sizes.json` (`{"00000000.tar": n, ...}`, what open_clip's loader reads) is
written last. An interrupted export rerun with the same arguments finds the same fingerprint
and writes only the unfinished shards; the output is identical to an uninterrupted run.
A directory holding anything else is refused unless `--overwrite`, which removes the files
of the previous export (shards, stats, sizes, plan, partial files) and nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from .. import console
from ..errors import CurateError, UsageError
from ..manifest import NO_IMAGE_INGESTED, why_no_image_sql
from ..workspace import _fsync_dir, atomic_path, atomic_write_json
from .select import Selection, decisions_of, query_with, scores_wide, selected_samples
from .tario import END_OF_ARCHIVE, RECORD
from .writer import init_worker, stats_name, write_shard

PLAN_NAME = "_export_plan.json"
SIZES_NAME = "sizes.json"
# The selected samples that have no image to export (DataComp metadata samples whose download
# failed, or was never ingested): uid, why, and where the sample is.
WITHOUT_IMAGE_NAME = "without_image.parquet"
PLAN_VERSION = 1
_SHARD_RE = re.compile(r"^\d{8}\.tar$")
_STATS_RE = re.compile(r"^\d{8}_stats\.json$")
_PARTIAL_RE = re.compile(r"^\.(\d{8}\.tar|\d{8}_stats\.json|sizes\.json|_export_plan\.json)\.\d+\.partial$")
# Test hook for fault injection: SIGKILL this process after N shards are written.
CRASH_ENV = "CURATE_EXPORT_CRASH_AFTER"


def shard_name(i: int) -> str:
    return f"{i:08d}.tar"


def brace_pattern(n_shards: int) -> str:
    """`{00000000..0000000N}.tar`: how webdataset, open_clip and DataComp's train.py take shards."""
    return f"{{{shard_name(0)[:-4]}..{shard_name(n_shards - 1)[:-4]}}}.tar"


def is_export_file(name: str) -> bool:
    return bool(name in (PLAN_NAME, SIZES_NAME, WITHOUT_IMAGE_NAME) or _SHARD_RE.match(name) or _STATS_RE.match(name)
                or _PARTIAL_RE.match(name))


@dataclass
class WdsOptions:
    out: Path
    shard_size: int = 10_000
    shuffle: bool = False
    seed: int = 0
    add_json: bool = False
    workers: int | None = None
    overwrite: bool = False

    def output_params(self) -> dict:
        """What determines the bytes written (not workers, not overwrite)."""
        return {"shard_size": self.shard_size, "shuffle": self.shuffle, "seed": self.seed if self.shuffle else None,
                "add_json": self.add_json}


# ---- the plan -----------------------------------------------------------------------------

def _no_image() -> pl.Expr:
    return (pl.col("image_ext").is_null() | pl.col("tar_offset").is_null() | pl.col("tar_end").is_null()
            | (pl.col("shard_format") != "wds")).fill_null(True)


def check_exportable(samples: pl.DataFrame) -> pl.DataFrame:
    """The selected samples without an image in a tar shard. Refuses a selection where that is
    every sample (a metadata-only pool)."""
    bad = samples.filter(_no_image())
    if bad.height == samples.height:
        kinds = ", ".join(f"{k or 'unknown'} {n:,}" for k, n in bad.group_by("source").len().sort("source").rows())
        raise UsageError(
            f"{bad.height:,} of the {samples.height:,} selected samples have no image in a tar shard ({kinds}): "
            "metadata-only pools (DataComp metadata, URL tables) cannot be exported as webdataset. Export "
            "`--format datacomp` and reshard with DataComp's tools, or download the images (`curate download`) "
            "and ingest the shards first")
    return bad


def without_image_table(manifest, bad: pl.DataFrame) -> pl.DataFrame:
    """uid, why it has no image (img2dataset's status for a failed download, a sha256 mismatch,
    or none ingested), the sample's own shard and key: what `without_image.parquet` lists."""
    return query_with(manifest, {"_noimg": bad.select("uid")},
        f"SELECT u.uid, coalesce({why_no_image_sql('u.uid')}, 'no_image: {NO_IMAGE_INGESTED}') AS why, "
        "sh.path AS shard, s.key "
        "FROM _noimg u JOIN samples s USING (uid) LEFT JOIN shards sh ON sh.shard_id = s.shard_id "
        "ORDER BY s.shard_id, s.row_idx")


def check_sources(samples: pl.DataFrame) -> list[str]:
    """Every source shard is there with the size ingest saw. Returns the shards whose mtime
    changed too: their every header is checked in full while copying (elsewhere, as ingest
    itself does, same size and mtime count as unchanged and headers are checked by name)."""
    missing, changed, touched = [], [], []
    for path, nbytes, mtime in samples.select("shard_path", "shard_bytes", "shard_mtime").unique().sort("shard_path").rows():
        try:
            st = os.stat(path)
        except OSError:
            missing.append(path)
            continue
        if nbytes is not None and st.st_size != nbytes:
            changed.append(f"{path} ({nbytes:,} bytes at ingest, {st.st_size:,} now)")
        elif mtime is None or abs(st.st_mtime - mtime) >= 1e-6:
            touched.append(path)
    if missing:
        raise CurateError(f"{len(missing)} source shard(s) are gone: {', '.join(missing[:3])}"
                          + (" ..." if len(missing) > 3 else ""))
    if changed:
        raise CurateError(f"{len(changed)} source shard(s) changed since ingest: {', '.join(changed[:3])}"
                          + (" ..." if len(changed) > 3 else "") + "; re-ingest them with --replace")
    return touched


def unique_keys(keys: list[str] | pl.Series, uids: list[str] | pl.Series) -> tuple[list[str], int]:
    """Output keys: each key as it is, unless an earlier sample took it; then `<key>_<uid[:8]>`
    (or `<key>_<uid>`, then `<key>_<uid>_<n>`, if that is taken too)."""
    keys, uids = pl.Series(keys, dtype=pl.Utf8), pl.Series(uids, dtype=pl.Utf8)
    repeat = ~keys.is_first_distinct()
    out = keys.to_list()
    if not repeat.any():
        return out, 0
    taken = set(out)
    idx = repeat.arg_true().to_list()
    for i in idx:
        k, u = out[i], uids[i]
        cands = itertools.chain((f"{k}_{u[:8]}", f"{k}_{u}"), (f"{k}_{u}_{j}" for j in itertools.count(1)))
        cand = next(c for c in cands if c not in taken)
        taken.add(cand)
        out[i] = cand
    return out, len(idx)


def _repeats(manifest, samples: pl.DataFrame) -> pl.DataFrame:
    rep = query_with(manifest, {}, "SELECT DISTINCT shard_id, key FROM sample_issues WHERE reason = 'repeated_member'")
    return samples.select("shard_id", "key").join(rep.with_columns(pl.lit(True).alias("drop_repeats")),
                                                  on=["shard_id", "key"], how="left")["drop_repeats"].fill_null(False)


def json_patches(manifest, sel: Selection, samples: pl.DataFrame) -> pl.Series:
    """Per sample, the `"curate"` object `--add-json` puts in its json: the selection, every
    score and the run's decisions on it (JSON text, aligned with `samples`)."""
    sc = scores_wide(manifest, sel)
    scorers = [c[len("score__"):] for c in sc.columns if c.startswith("score__")]
    dec = decisions_of(manifest, sel).with_columns(pl.col("value").fill_nan(None), pl.col("threshold").fill_nan(None))
    dec = dec.group_by("uid", maintain_order=True).agg(
        pl.struct("stage_idx", "stage", "keep", "reason", "value", "threshold", "ref_uid", "detail").alias("decisions"))
    frame = samples.select("uid").join(sc, on="uid", how="left").join(dec, on="uid", how="left")
    fields = [pl.lit(sel.run_id, pl.Int64).alias("prune_run"), pl.lit(sel.stage, pl.Utf8).alias("stage")]
    if scorers:
        fields.append(pl.struct([pl.col(f"score__{s}").cast(pl.Float64).fill_nan(None).alias(s)
                                 for s in scorers]).alias("scores"))
    fields.append(pl.col("decisions"))
    return frame.select(pl.struct(fields).struct.json_encode().alias("patch"))["patch"]


def build_plan(manifest, sel: Selection, samples: pl.DataFrame, opts: WdsOptions) -> tuple[pl.DataFrame, dict]:
    """Rows in output order with the columns `writer.write_shard` takes, and plan facts."""
    out_keys, renamed = unique_keys(samples["key"], samples["uid"])
    plan = samples.select(
        "uid", pl.col("shard_path"), pl.col("tar_offset").cast(pl.Int64), pl.col("tar_end").cast(pl.Int64), "key",
        pl.Series("out_key", out_keys, dtype=pl.Utf8), _repeats(manifest, samples).alias("drop_repeats"),
        (json_patches(manifest, sel, samples) if opts.add_json else pl.lit(None, pl.Utf8)).alias("patch"))
    if opts.shuffle:
        perm = np.random.default_rng(np.random.PCG64(opts.seed)).permutation(plan.height)
        plan = plan[perm]
    n_shards = -(-plan.height // opts.shard_size)
    counts = [min(opts.shard_size, plan.height - i * opts.shard_size) for i in range(n_shards)]
    body = (plan["tar_end"] - plan["tar_offset"]).to_numpy()
    bounds = np.cumsum([0, *counts])
    shard_bytes = [int(body[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    shard_bytes = [b + len(END_OF_ARCHIVE) + (-(b + len(END_OF_ARCHIVE))) % RECORD for b in shard_bytes]
    facts = {"samples": plan.height, "shards": n_shards, "counts": counts, "shard_bytes": shard_bytes,
             "bytes": int(sum(shard_bytes)),
             "renamed_keys": renamed, "source_shards": int(samples["shard_path"].n_unique())}
    return plan, facts


def plan_fingerprint(plan: pl.DataFrame, sel: Selection, opts: WdsOptions) -> str:
    """SHA-256 of everything that decides the output bytes: the parameters, and per row (in
    output order) the uid, source range, keys, repeat handling and json payload. Columns are
    hashed as Arrow buffers (values and offsets), so no Python step per row."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": PLAN_VERSION, "selection": sel.as_dict(), **opts.output_params(), "n": plan.height},
                        sort_keys=True).encode())
    for col in ("uid", "shard_path", "key", "out_key", "patch"):
        arr = plan[col].fill_null("\0").rechunk().to_arrow().cast(pa.large_string())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
        data = arr.buffers()[2]
        h.update(col.encode())
        h.update((offsets - offsets[0]).tobytes())
        h.update(memoryview(data)[offsets[0]:offsets[-1]] if data is not None else b"")
    for col in ("tar_offset", "tar_end"):
        h.update(col.encode())
        h.update(plan[col].cast(pl.Int64).to_numpy().astype("<i8").tobytes())
    h.update(plan["drop_repeats"].cast(pl.UInt8).to_numpy().tobytes())
    return h.hexdigest()


# ---- the output directory -----------------------------------------------------------------

def _read_plan(out: Path) -> dict | None:
    try:
        obj = json.loads((out / PLAN_NAME).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("written_by") == "curate export" else None


def guard_out_dir(out: Path, ws_root: Path, source_paths: list[str]) -> None:
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; "
                         "create its target directory or give another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; webdataset export writes a directory of shards")
    if out.resolve() == ws_root.resolve():
        raise UsageError("--out is the workspace itself; give a directory of its own")
    dirs = {Path(p).parent.resolve() for p in source_paths}
    if out.resolve() in dirs:
        raise UsageError(f"--out {out} holds source shards of this workspace; export to another directory")


def complete_shards(out: Path, fingerprint: str, counts: list[int]) -> set[int]:
    done = set()
    for i, n in enumerate(counts):
        tar = out / shard_name(i)
        try:
            st = json.loads((out / stats_name(shard_name(i))).read_text())
            size = tar.stat().st_size
        except (OSError, ValueError):
            continue
        if st.get("plan") == fingerprint and st.get("count") == n and st.get("bytes") == size:
            done.add(i)
    return done


def prepare_out_dir(out: Path, fingerprint: str, n_shards: int, overwrite: bool) -> tuple[bool, list[str]]:
    """(resuming, removed files). Refuses a non-empty directory that is not this export's,
    unless `overwrite`; then removes the previous export's files only."""
    removed: list[str] = []
    if not out.exists():
        out.mkdir(parents=True)
        return False, removed
    entries = sorted(os.listdir(out))
    prev = _read_plan(out)
    resuming = prev is not None and prev.get("fingerprint") == fingerprint
    if resuming:
        for name in entries:
            m = re.match(r"^(\d{8})(\.tar|_stats\.json)$", name)
            if _PARTIAL_RE.match(name) or (m and int(m.group(1)) >= n_shards):
                (out / name).unlink(missing_ok=True)
                removed.append(name)
        return True, removed
    if not entries:
        return False, removed
    ours = [e for e in entries if is_export_file(e)]
    if not overwrite:
        what = "a previous export with other parameters" if prev is not None else f"{len(entries)} entries"
        raise UsageError(f"--out {out} is not empty ({what}); pass --overwrite to replace a previous export, "
                         "or choose an empty directory")
    if prev is None and ours:
        raise UsageError(f"--out {out} holds {ours[0]} but no {PLAN_NAME}: not written by `curate export`, so "
                         "--overwrite will not delete it; remove it yourself or choose another directory")
    # The plan file goes last: if this is interrupted, the rerun still sees what to clean.
    for name in sorted(ours, key=lambda e: e == PLAN_NAME):
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    others = [e for e in entries if e not in removed]
    if others:
        console.warn(f"{out} keeps {len(others)} entries that are not export files (e.g. {others[0]})")
    return False, removed


# ---- running it ---------------------------------------------------------------------------

def _tasks(plan: pl.DataFrame, out: Path, fingerprint: str, shard_size: int, todo: list[int], touched: list[str],
           unchecked: list[str]):
    cols = ["uid", "shard_path", "tar_offset", "tar_end", "key", "out_key", "drop_repeats", "patch"]
    touched_set, unchecked_set = set(touched), set(unchecked)
    for i in todo:
        part = plan.slice(i * shard_size, shard_size)
        rows = part.select(cols).rows()
        here = set(part["shard_path"].unique().to_list())
        yield {"out_dir": str(out), "name": shard_name(i), "rows": rows, "plan": fingerprint,
               "check_all": sorted(here & touched_set), "parse_members": sorted(here & unchecked_set)}


def _crash_after() -> int | None:
    v = os.environ.get(CRASH_ENV)
    return int(v) if v else None


def export_wds(ws, manifest, sel: Selection, opts: WdsOptions, *, dry_run: bool = False) -> dict:
    samples = selected_samples(manifest, sel, metadata=False)
    if samples.height == 0:
        raise UsageError(f"the selection ({sel.describe()}) is empty; nothing to export")
    no_image = check_exportable(samples)
    if no_image.height:
        samples = samples.filter(~_no_image())
    touched = check_sources(samples)
    if opts.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    out = Path(opts.out).expanduser().absolute()
    source_paths = samples["shard_path"].unique().to_list()
    guard_out_dir(out, ws.root, source_paths)
    plan, facts = build_plan(manifest, sel, samples, opts)
    fp = plan_fingerprint(plan, sel, opts)
    summary = {"format": "wds", "out": str(out), **sel.as_dict(), "samples": facts["samples"],
               "samples_without_image": no_image.height,
               "shards": facts["shards"], "bytes": facts["bytes"], "renamed_keys": facts["renamed_keys"],
               "source_shards": facts["source_shards"], "pattern": f"{out}/{brace_pattern(facts['shards'])}"}
    if dry_run:
        done = complete_shards(out, fp, facts["counts"]) if (_read_plan(out) or {}).get("fingerprint") == fp else set()
        summary.update({"shards_to_write": facts["shards"] - len(done), "shards_complete": len(done),
                        "bytes_to_write": sum(b for i, b in enumerate(facts["shard_bytes"]) if i not in done)})
        if opts.add_json:
            summary["note"] = "bytes exclude the growth of json members under --add-json"
        return summary

    resuming, removed = prepare_out_dir(out, fp, facts["shards"], opts.overwrite)
    if not resuming:
        atomic_write_json(out / PLAN_NAME, {
            "written_by": "curate export", "version": PLAN_VERSION, "fingerprint": fp,
            "selection": sel.as_dict(), **opts.output_params(), "samples": facts["samples"],
            "shards": facts["shards"], "name_pattern": brace_pattern(facts["shards"])})
    done = complete_shards(out, fp, facts["counts"]) if resuming else set()
    todo = [i for i in range(facts["shards"]) if i not in done]
    # shards ingested before ingest checked member names and types: every sample is parsed
    unchecked = samples.filter(~pl.col("shard_checked"))["shard_path"].unique().to_list()
    written = _run_tasks(_tasks(plan, out, fp, opts.shard_size, todo, touched, unchecked), len(todo), opts.workers)
    _fsync_dir(out)  # every shard's rename is durable before sizes.json says the export is complete
    sizes = {shard_name(i): n for i, n in enumerate(facts["counts"])}
    if no_image.height:
        with atomic_path(out / WITHOUT_IMAGE_NAME, suffix=".parquet") as tmp:
            without_image_table(manifest, no_image).write_parquet(tmp)
        summary["without_image_list"] = str(out / WITHOUT_IMAGE_NAME)
        console.warn(f"{no_image.height:,} of the {no_image.height + facts['samples']:,} selected samples have no "
                     f"image (failed or missing downloads) and are not in the shards; listed in "
                     f"{out / WITHOUT_IMAGE_NAME}")
    else:
        (out / WITHOUT_IMAGE_NAME).unlink(missing_ok=True)
    atomic_write_json(out / SIZES_NAME, sizes)
    totals = {k: sum(r.get(k, 0) for r in written) for k in
              ("json_rewritten", "json_added", "json_unreadable", "repeats_dropped", "unsafe_members_dropped")}
    summary.update({
        "shards_written": len(written), "shards_skipped": len(done), "resumed": resuming,
        "removed_stale_files": len(removed),
        "bytes_written": sum(r["bytes"] for r in written),
        **{k: v for k, v in totals.items() if v or k == "json_rewritten" and opts.add_json},
    })
    return summary


def _run_tasks(tasks, n_tasks: int, workers: int | None) -> list[dict]:
    workers = max(1, min(workers or min(4, os.cpu_count() or 1), n_tasks or 1))
    crash = _crash_after()
    results: list[dict] = []
    with console.progress() as bar:
        task_id = bar.add_task("export", total=n_tasks)

        def done(res: dict) -> None:
            results.append(res)
            bar.advance(task_id)
            if crash is not None and len(results) >= crash:
                os.kill(os.getpid(), signal.SIGKILL)

        if workers == 1:
            for t in tasks:
                done(write_shard(t))
            return results
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                                 initargs=(os.getpid(),)) as pool:
            pending = set()
            try:
                for t in tasks:
                    pending.add(pool.submit(write_shard, t))
                    if len(pending) >= 2 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            done(f.result())
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done(f.result())
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    return results
