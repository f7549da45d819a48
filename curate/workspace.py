"""Workspace layout, the writer lock and atomic writes.

A workspace is one directory per pool::

    WS/
      manifest.duckdb        the single source of truth (curate.manifest)
      .curate.lock           writer lock: flock'd by the process that writes, holds its pid/command
      embeddings/<scorer>/<shard_id>.{img,txt}.npy   fp16, row-aligned with the shard's samples
      runs/<run_id>/         per-run artefacts (centroids, plots, ...)
      tmp/                   partial files; renamed into place when complete
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from .errors import UsageError, WorkspaceLocked, is_disk_full

MANIFEST_NAME = "manifest.duckdb"
LOCK_NAME = ".curate.lock"


def resolve_workspace(path: str | os.PathLike | None) -> Path:
    """The workspace from -w or CURATE_WORKSPACE; one clear error when neither is given."""
    if path is None or str(path) == "":
        env = os.environ.get("CURATE_WORKSPACE")
        if not env:
            raise UsageError("no workspace: pass -w/--workspace DIR or set CURATE_WORKSPACE")
        path = env
    return Path(path).expanduser().absolute()


class Workspace:
    """A pool's directory. Open it with `Workspace.open(path, write=True)` to take the lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_fh: IO[str] | None = None

    # ---- layout ---------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def tmp_dir(self) -> Path:
        d = self.root / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def embeddings_dir(self, scorer: str) -> Path:
        return self.root / "embeddings" / scorer

    def embedding_path(self, scorer: str, shard_id: int, kind: str) -> Path:
        """fp16 .npy of one shard's embeddings for one scorer; kind is 'img', 'txt' or 'img_flip'."""
        return self.embeddings_dir(scorer) / f"{shard_id:08d}.{kind}.npy"

    def run_path(self, run_id: int) -> Path:
        """Where a run's artefacts go (`runs/<id>/`), whether or not it exists."""
        return self.root / "runs" / f"{run_id:06d}"

    def run_dir(self, run_id: int) -> Path:
        d = self.run_path(run_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # ---- locking --------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | None, *, write: bool, create: bool = False) -> "Workspace":
        root = resolve_workspace(path)
        if not root.exists():
            if not create:
                raise UsageError(f"workspace {root} does not exist (run `curate ingest ... -w {root}` first)")
            root.mkdir(parents=True)
        elif not root.is_dir():
            raise UsageError(f"workspace {root} is not a directory")
        elif not create and not (root / MANIFEST_NAME).exists():
            raise UsageError(f"{root} is not a curate workspace (no {MANIFEST_NAME}); ingest a pool into it first")
        ws = cls(root)
        if write:
            ws.acquire_lock()
        return ws

    def acquire_lock(self) -> None:
        lock_path = self.root / LOCK_NAME
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            who = ""
            with contextlib.suppress(ValueError):
                info = json.loads(holder)
                who = f" by pid {info.get('pid')} (`{info.get('command')}`, since {info.get('since')})"
            raise WorkspaceLocked(f"workspace {self.root} is locked{who}; wait for it to finish") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["curate", *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }))
        fh.flush()
        self._lock_fh = fh
        self.remove_partials()

    # Partial files: `atomic_path`'s `.<name>.<pid>.partial[.ext]`, and DataComp ingest's
    # `<name>.partial.npy` (a compressed npz member being copied out).
    _PARTIAL = re.compile(r"(^\..+\.\d+\.partial(\.[A-Za-z0-9]+)?$)|(\.partial\.npy$)")

    def remove_partials(self) -> int:
        """Remove the partial files a killed writer left (an embedding array half written, a
        cache array, a result file): we hold the writer lock, so no live process is writing
        them. DuckDB's spill directory is its own. Returns how many were removed."""
        gone = 0
        for top in ("embeddings", "cache", "runs", "tmp"):
            for dirpath, dirnames, filenames in os.walk(self.root / top):
                if top == "tmp":
                    dirnames[:] = [d for d in dirnames if d != "duckdb"]
                for name in filenames:
                    if self._PARTIAL.search(name):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(dirpath, name))
                            gone += 1
        return gone

    def release_lock(self) -> None:
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                self._lock_fh.seek(0)
                self._lock_fh.truncate()
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def close(self) -> None:
        self.release_lock()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- atomic writes --------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    The temporary name keeps `suffix` (e.g. '.npy') so libraries that append extensions behave.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial{suffix}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        # numpy reports a short write as "N requested and M written", with no errno and no path:
        # say the disk is full, and where (measured before the partial file is removed)
        if is_disk_full(exc, final) and exc.errno is None:
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from exc
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(final: str | os.PathLike, obj) -> None:
    atomic_write_bytes(final, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_npy(final: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_path(final, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
