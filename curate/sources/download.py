"""Download a URL table into webdataset shards with img2dataset, resumably.

`download_urls(table, out_dir, ...)` runs `img2dataset.download()` as a library, in a child
Python process (`python -m curate.sources.download SPEC`): img2dataset spawns its own worker
and logger processes and installs a SIGINT handler that calls `sys.exit`, neither of which
belongs in the curate process (nor in pytest). The child's output goes to
`OUT/.curate/img2dataset.log`; the parent shows progress from the `NNNNN_stats.json` files
img2dataset writes as each shard finishes.

Defaults are DataComp's (`download_upstream.py` in mlfoundations/datacomp): image_size 512 with
resize_mode `keep_ratio_largest` and resize_only_if_bigger, so the longer side is at most 512 px
with the aspect ratio kept and small images left alone (img2dataset's `keep_ratio` would bound
the *shorter* side instead); webdataset output, jpg, 10,000 samples per shard, sha256 of the
downloaded bytes, the `uid` column carried into every sample's json. Ours: retries 2, timeout 10 s.

Layout of OUT (img2dataset's own, `{:05d}` by default)::

    00000.tar  00000.parquet  00000_stats.json  00001.tar ...
    .curate/urls.parquet        the url, caption, uid rows handed to img2dataset, in order
    .curate/download.meta.json  input digest + output-shaping options, checked on resume
    .curate/img2dataset.log     img2dataset's output, appended per run

Resume: img2dataset's `incremental` mode skips every shard whose `_stats.json` exists (it is
written last, after the tar and parquet are closed), so a rerun with the same table and options
downloads only the shards that never finished. Shard k always holds rows
[k*N, (k+1)*N) of the table, which is why a rerun with a different table or different
output options into the same OUT is refused (pass overwrite=True or use a new OUT).
"""

from __future__ import annotations

import ast
import collections
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from .. import console
from ..errors import CurateError, UsageError
from ..workspace import atomic_path, atomic_write_json

DATACOMP_DEFAULTS: dict[str, Any] = {
    "image_size": 512,
    "resize_mode": "keep_ratio_largest",
    "resize_only_if_bigger": True,
    "encode_format": "jpg",
    "encode_quality": 95,
    "number_sample_per_shard": 10_000,
    "compute_hash": "sha256",
    "extract_exif": True,
}
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")
HASHES = (None, "md5", "sha256", "sha512")

STATE_DIR = ".curate"
INPUT_NAME = "urls.parquet"
META_NAME = "download.meta.json"
LOG_NAME = "img2dataset.log"
ERROR_NAME = "error.txt"
META_VERSION = 1

# Options that shape what lands in the shards: changing one of them between a run and its
# resume would mix differently made shards in one folder.
_OUTPUT_OPTIONS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                   "number_sample_per_shard", "compute_hash", "extract_exif", "oom_shard_count",
                   "min_image_size", "max_image_area", "max_aspect_ratio", "skip_reencode",
                   "disable_all_reencoding", "upscale_interpolation", "downscale_interpolation")
# Ours to set: extra options may not override them.
_RESERVED = {"url_list", "output_folder", "input_format", "url_col", "caption_col", "save_additional_columns", "bbox_col",
             "output_format", "incremental_mode", "distributor", "enable_wandb", "processes_count",
             "thread_count", "timeout", "retries"}

URL_STATUS_COLUMNS = ("uid", "url", "caption", "key", "status", "error_message", "width", "height",
                      "original_width", "original_height", "sha256")


@dataclass
class DownloadResult:
    """What an img2dataset download left in OUT (finished shards from earlier runs included)."""

    out_dir: Path
    shard_digits: int
    n_urls: int                                   # rows handed to img2dataset
    expected_shards: int
    shards: list[Path]                            # finished tars, in shard order
    finished_before: list[int]                    # shard ids finished by an earlier run (skipped)
    missing_shards: list[int]                     # shard ids img2dataset gave up on (no _stats.json)
    stats: dict = field(default_factory=dict)     # summed _stats.json: count, successes, failed_*, status_dict
    seconds: float = 0.0
    log_path: Path | None = None
    number_sample_per_shard: int = 10_000

    def shard_name(self, shard: int) -> str:
        return f"{shard:0{self.shard_digits}d}"

    def sidecars(self) -> list[Path]:
        return [p.with_suffix(".parquet") for p in self.shards]

    def url_status(self) -> pl.DataFrame:
        """One row per URL of the finished shards, from img2dataset's per-shard parquet:
        uid, url, caption, key (img2dataset's tar key), status, error_message, width, height,
        original_width, original_height, sha256 (of the downloaded bytes), shard (tar path)."""
        frames = []
        for tar, side in zip(self.shards, self.sidecars()):
            if not side.exists():
                continue
            df = pl.read_parquet(side)
            cols = [pl.col(c) if c in df.columns else pl.lit(None).alias(c) for c in URL_STATUS_COLUMNS]
            frames.append(df.select(cols).with_columns(shard=pl.lit(str(tar))))
        if not frames:
            return pl.DataFrame(schema={**{c: pl.String for c in URL_STATUS_COLUMNS}, "shard": pl.String})
        return pl.concat(frames, how="diagonal_relaxed")

    def not_attempted(self) -> pl.DataFrame:
        """The (uid, url, caption) rows of shards that never finished: no status exists for them."""
        if not self.missing_shards:
            return pl.DataFrame(schema={"uid": pl.String, "url": pl.String, "caption": pl.String, "shard_idx": pl.Int64})
        n = self.number_sample_per_shard
        rows = pl.read_parquet(self.out_dir / STATE_DIR / INPUT_NAME).with_row_index("row")
        return (rows.with_columns(shard_idx=(pl.col("row") // n).cast(pl.Int64))
                .filter(pl.col("shard_idx").is_in(self.missing_shards))
                .select("uid", "url", "caption", "shard_idx"))

    def by_status(self) -> dict[str, int]:
        return {"success": int(self.stats.get("successes", 0)),
                "failed_to_download": int(self.stats.get("failed_to_download", 0)),
                "failed_to_resize": int(self.stats.get("failed_to_resize", 0))}

    def summary(self) -> dict:
        return {
            "urls": self.n_urls,
            "downloaded": int(self.stats.get("successes", 0)),
            "failed_to_download": int(self.stats.get("failed_to_download", 0)),
            "failed_to_resize": int(self.stats.get("failed_to_resize", 0)),
            "not_attempted": sum(self._shard_rows(s) for s in self.missing_shards),
            "shards": len(self.shards),
            "shards_resumed": len(self.finished_before),
            "shards_missing": len(self.missing_shards),
            "top_errors": dict(collections.Counter({k: v for k, v in self.stats.get("status_dict", {}).items()
                                                    if k != "success"}).most_common(8)),
            "out": str(self.out_dir),
        }

    def _shard_rows(self, shard: int) -> int:
        n = self.number_sample_per_shard
        return max(0, min(self.n_urls, (shard + 1) * n) - shard * n)


# ---- helpers ----------------------------------------------------------------------------

def img2dataset_options() -> set[str]:
    """Keyword arguments `img2dataset.download` accepts in the installed version.

    Read from its source with `ast`, because importing img2dataset takes seconds (wandb,
    albumentations, cv2) and the parent process never needs it otherwise."""
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.origin:
        raise CurateError("img2dataset is not installed (pip install img2dataset==1.47.0)")
    tree = ast.parse(Path(spec.origin).with_name("main.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "download":
            return {a.arg for a in node.args.args + node.args.kwonlyargs}
    raise CurateError("cannot find img2dataset.download in the installed img2dataset")


def _input_digest(frame: pl.DataFrame) -> str:
    """Digest of the rows in order: same digest, same shards."""
    h = hashlib.sha256()
    for col in ("uid", "url", "caption"):
        values = frame[col].fill_null("\x00<null>").to_list()
        h.update(col.encode() + b"\n")
        h.update("\n".join(values).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


_SHARD_FILE = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)$")


def _finished_shards(out_dir: Path) -> dict[int, Path]:
    """img2dataset's notion of done: a `<id>_stats.json` exists."""
    done = {}
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _SHARD_FILE.match(p.name)
            if m and m.group(2) == "_stats.json":
                done[int(m.group(1))] = p
    return done


def _clear(out_dir: Path) -> None:
    """Remove what img2dataset and curate wrote in OUT; other files are left alone."""
    for p in out_dir.iterdir():
        if _SHARD_FILE.match(p.name) and p.is_file():
            p.unlink()
    for d in ("_tmp", STATE_DIR):
        shutil.rmtree(out_dir / d, ignore_errors=True)


def _sum_stats(files: list[Path]) -> dict:
    total = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    statuses: collections.Counter = collections.Counter()
    for f in files:
        try:
            s = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for k in total:
            total[k] += int(s.get(k, 0) or 0)
        statuses.update(s.get("status_dict") or {})
    total["status_dict"] = dict(statuses.most_common())
    return total


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # albumentations (imported by img2dataset) asks PyPI for a newer version on import.
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("WANDB_SILENT", "true")
    env["PYTHONUNBUFFERED"] = "1"
    # The child must import this package even when curate is not installed (a checkout, pytest).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---- the download -------------------------------------------------------------------------

def download_urls(
    table,
    out_dir: str | os.PathLike,
    *,
    processes: int | None = None,
    threads: int = 128,
    image_size: int = DATACOMP_DEFAULTS["image_size"],
    resize_mode: str = DATACOMP_DEFAULTS["resize_mode"],
    resize_only_if_bigger: bool = DATACOMP_DEFAULTS["resize_only_if_bigger"],
    encode_format: str = DATACOMP_DEFAULTS["encode_format"],
    encode_quality: int = DATACOMP_DEFAULTS["encode_quality"],
    number_sample_per_shard: int = DATACOMP_DEFAULTS["number_sample_per_shard"],
    compute_hash: str | None = DATACOMP_DEFAULTS["compute_hash"],
    extract_exif: bool = DATACOMP_DEFAULTS["extract_exif"],
    retries: int = 2,
    timeout: float = 10,
    shard_digits: int = 5,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    url_col: str | None = None,
    caption_col: str | None = None,
    bbox_col: str | None = None,
) -> DownloadResult:
    """Download TABLE (a `UrlTable` or a path `read_url_table` reads) into webdataset shards in OUT_DIR.

    `extra` passes further `img2dataset.download` options through (e.g. min_image_size,
    max_aspect_ratio, user_agent_token, disallowed_header_directives). `bbox_col`: a column of
    the table's frame holding boxes (x0, y0, x1, y1, fractions of the image) that img2dataset
    blurs, as DataComp's download blurs `face_bboxes`. Raises UsageError for bad
    options or an OUT_DIR holding a different download; CurateError when img2dataset itself fails.
    """
    from .urls import UrlTable, read_url_table

    if not isinstance(table, UrlTable):
        table = read_url_table(table, url_col=url_col, caption_col=caption_col)
    out = Path(out_dir).expanduser().absolute()
    processes = int(processes or os.cpu_count() or 1)
    _check_options(processes=processes, threads=threads, image_size=image_size, resize_mode=resize_mode,
                   encode_format=encode_format, number_sample_per_shard=number_sample_per_shard,
                   compute_hash=compute_hash, retries=retries, timeout=timeout, shard_digits=shard_digits)
    extra = dict(extra or {})
    bad = set(extra) - img2dataset_options()
    if bad:
        raise UsageError(f"img2dataset {_installed_version()} has no option(s) {', '.join(sorted(bad))}")
    clash = set(extra) & (_RESERVED | set(DATACOMP_DEFAULTS) | {"image_size", "oom_shard_count"})
    if clash:
        raise UsageError(f"set {', '.join(sorted(clash))} with download_urls' own arguments, not `extra`")

    if bbox_col is not None and bbox_col not in table.frame.columns:
        raise UsageError(f"no {bbox_col!r} column to blur by in {table.path}")
    frame = table.frame.select("url", "caption", "uid", *([bbox_col] if bbox_col else []))
    n = frame.height
    expected = math.ceil(n / number_sample_per_shard) if n else 0
    output_opts = {
        "image_size": image_size, "resize_mode": resize_mode, "resize_only_if_bigger": resize_only_if_bigger,
        "encode_format": encode_format, "encode_quality": encode_quality,
        "number_sample_per_shard": number_sample_per_shard, "compute_hash": compute_hash,
        "extract_exif": extract_exif, "oom_shard_count": shard_digits,
        **({"bbox_col": bbox_col} if bbox_col else {}),
        **{k: v for k, v in extra.items() if k in _OUTPUT_OPTIONS},
    }
    meta = {"version": META_VERSION, "input_digest": _input_digest(frame), "n_urls": n,
            "source": str(table.path), "source_fingerprint": table.fingerprint,
            "options": json.loads(json.dumps(output_opts, default=str))}

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _out_lock(out):
        return _download_locked(out, frame, table, meta, output_opts, extra, overwrite=overwrite,
                                processes=processes, threads=threads, timeout=timeout, retries=retries,
                                expected=expected, shard_digits=shard_digits,
                                number_sample_per_shard=number_sample_per_shard)


@contextlib.contextmanager
def _out_lock(out: Path):
    """One download per OUT at a time (img2dataset would interleave two runs' shards)."""
    fh = open(out / ".curate.lock", "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another download is writing to {out}; wait for it to finish") from None
        yield
    finally:
        fh.close()


def _download_locked(out: Path, frame: pl.DataFrame, table, meta: dict, output_opts: dict, extra: dict, *,
                     overwrite: bool, processes: int, threads: int, timeout: float, retries: int, expected: int,
                     shard_digits: int, number_sample_per_shard: int) -> DownloadResult:
    n = frame.height
    state = out / STATE_DIR
    if overwrite:
        _clear(out)
    else:
        _check_resume(out, meta)
    state.mkdir(exist_ok=True)

    t0 = time.perf_counter()
    before = _finished_shards(out)
    finished_before = sorted(s for s in before if s < expected)
    log_path = state / LOG_NAME
    if n and len(finished_before) < expected:
        input_path = state / INPUT_NAME
        with atomic_path(input_path, suffix=".parquet") as tmp:
            frame.write_parquet(tmp)
        atomic_write_json(state / META_NAME, meta)
        kwargs = {
            "url_list": str(input_path), "input_format": "parquet", "url_col": "url", "caption_col": "caption",
            "save_additional_columns": ["uid"], "output_folder": str(out), "output_format": "webdataset",
            "incremental_mode": "incremental", "distributor": "multiprocessing", "enable_wandb": False,
            "processes_count": processes, "thread_count": int(threads), "timeout": timeout, "retries": int(retries),
            **output_opts, **extra,
        }
        todo = expected - len(finished_before)
        rows_todo = n - sum(min(n, (s + 1) * number_sample_per_shard) - s * number_sample_per_shard
                            for s in finished_before)
        _run_child(kwargs, out, log_path, expected, set(finished_before), rows_todo, todo)
    elif n:
        atomic_write_json(state / META_NAME, meta)

    done = _finished_shards(out)
    ids = sorted(s for s in done if s < expected)
    missing = sorted(set(range(expected)) - set(ids))
    shards = [out / f"{s:0{shard_digits}d}.tar" for s in ids]
    shards = [p for p in shards if p.exists()]
    return DownloadResult(out_dir=out, shard_digits=shard_digits, n_urls=n, expected_shards=expected,
                          shards=shards, finished_before=finished_before, missing_shards=missing,
                          stats=_sum_stats([done[s] for s in ids]), seconds=round(time.perf_counter() - t0, 3),
                          log_path=log_path if log_path.exists() else None,
                          number_sample_per_shard=number_sample_per_shard)


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("img2dataset")
    except PackageNotFoundError:
        return "(not installed)"


def _check_options(*, processes, threads, image_size, resize_mode, encode_format, number_sample_per_shard,
                   compute_hash, retries, timeout, shard_digits) -> None:
    if processes < 1 or threads < 1:
        raise UsageError("--processes and --threads must be at least 1")
    if image_size < 1:
        raise UsageError("--image-size must be a positive number of pixels")
    if resize_mode not in RESIZE_MODES:
        raise UsageError(f"unknown resize mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    if encode_format not in ENCODE_FORMATS:
        raise UsageError(f"unknown encode format {encode_format!r}; use one of {', '.join(ENCODE_FORMATS)}")
    if number_sample_per_shard < 1:
        raise UsageError("--samples-per-shard must be at least 1")
    if compute_hash not in HASHES:
        raise UsageError(f"unknown hash {compute_hash!r}; use md5, sha256, sha512 or none")
    if retries < 0 or timeout <= 0:
        raise UsageError("--retries must be >= 0 and --timeout > 0")
    if not 1 <= shard_digits <= 12:
        raise UsageError("shard_digits must be between 1 and 12")


def _check_resume(out: Path, meta: dict) -> None:
    done = _finished_shards(out)
    if not done:
        return
    meta_path = out / STATE_DIR / META_NAME
    try:
        prev = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{out} already holds img2dataset shards that curate did not write; "
                         f"use another --out, or --overwrite to replace them") from None
    if prev.get("input_digest") != meta["input_digest"]:
        raise UsageError(f"{out} holds a download of a different URL table ({prev.get('source')}); "
                         f"use another --out, or --overwrite to start again")
    changed = {k: (prev.get("options", {}).get(k), v) for k, v in meta["options"].items()
               if prev.get("options", {}).get(k) != v}
    if changed:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise UsageError(f"{out} was downloaded with other output options ({what}); "
                         f"use another --out, or --overwrite to start again")


def _run_child(kwargs: dict, out: Path, log_path: Path, expected: int, skip: set[int],
               rows_todo: int, shards_todo: int) -> None:
    spec_path = out / STATE_DIR / "spec.json"
    atomic_write_json(spec_path, {"kwargs": kwargs})
    with open(log_path, "ab") as log:
        log.write(f"\n==== curate download {time.strftime('%Y-%m-%dT%H:%M:%S')}: {shards_todo} shard(s), "
                  f"{rows_todo} url(s) ====\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "curate.sources.download", str(spec_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_child_env(), cwd=str(out), start_new_session=True)
    seen: set[int] = set()
    counted = 0
    with _suppress():
        (out / STATE_DIR / ERROR_NAME).unlink()
    try:
        with console.progress() as bar:
            task = bar.add_task("download", total=rows_todo)
            while True:
                rc = proc.poll()
                for s, p in _finished_shards(out).items():
                    if s in skip or s in seen or s >= expected:
                        continue
                    seen.add(s)
                    with _suppress():
                        counted += int(json.loads(p.read_text()).get("count", 0))
                bar.update(task, completed=counted, description=f"download {len(seen)}/{shards_todo} shards")
                if rc is not None:
                    break
                time.sleep(0.3)
    except BaseException:
        # Interrupted (Ctrl-C) or failing: stop img2dataset and its workers (the child leads its
        # own process group). Finished shards stay; a rerun resumes from them.
        _stop(proc)
        raise
    if rc != 0:
        _stop_group(proc)  # a worker or img2dataset's logger process may outlive a crashed child
        why = ""
        with _suppress():
            why = (out / STATE_DIR / ERROR_NAME).read_text().strip()
        raise CurateError(f"img2dataset exited with code {rc}" + (f" ({why[:300]})" if why else "")
                          + f"; full log: {log_path}")
    with _suppress():
        spec_path.unlink()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        return et is not None and issubclass(et, (OSError, ValueError))


def _stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, give it 5 s, then SIGKILL whatever is left of it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    _stop_group(proc)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# ---- the child ------------------------------------------------------------------------------

def _child_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    import img2dataset

    try:
        img2dataset.download(**spec["kwargs"])
    except BaseException as exc:
        # One line for the parent's error message; the traceback goes to the log.
        Path(argv[0]).with_name(ERROR_NAME).write_text(f"{type(exc).__name__}: {exc}".splitlines()[0] + "\n")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
