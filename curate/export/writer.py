"""Write one output shard of a webdataset export (runs in worker processes; light imports only).

A task is the shard's name, its plan rows and the plan fingerprint. Each row is
`(uid, source_path, tar_offset, tar_end, key, out_key, drop_repeats, patch)`:

* rows that keep their key and need no change are copied as raw byte ranges; consecutive rows
  that are also consecutive in their source shard are read and written as one run;
* a renamed key gets new headers (member data and padding stay byte-identical);
* `patch` (a JSON object as text, `--add-json`) goes into the json member under `"curate"`;
* `drop_repeats` drops a second member with an extension already seen, as ingest ignored it.

Headers are checked against the recorded keys before bytes are copied: every sample read into
memory (name and checksum); for runs the kernel copies, the first (name and checksum) and last
(name) sample, or every sample by name when the shard's mtime differs from ingest's (`check_all`).
A source shard that changed since ingest fails loudly instead of producing garbage. The shard
is written under a temporary name and renamed; its `NNNNNNNN_stats.json` (deterministic: no
times) is written after it and marks it complete for a resumed export.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

from ..errors import CurateError
from .tario import (BLOCK, END_OF_ARCHIVE, RECORD, Source, check_header, header_for, member_bytes, members_of,
                    split_name, unsafe_name)

RUN_BYTES = 8 << 20          # contiguous samples read into memory (compressed sources) per step
KERNEL_RUN_BYTES = 64 << 20  # contiguous samples handed to copy_file_range per call
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
_FLUSH_BYTES = 1 << 20       # small pieces (rewritten samples) are gathered up to this size


class _Out:
    def __init__(self, fd: int):
        self.fd = fd
        self.pending = bytearray()
        self.total = 0
        self.kernel_copy = "copy_file_range"

    def copy_from(self, src_fd: int, offset: int, n: int) -> None:
        """Append `n` bytes of `src_fd` at `offset` without passing them through Python:
        copy_file_range, else sendfile, else pread + write."""
        self.flush()
        while n > 0:
            try:
                if self.kernel_copy == "copy_file_range":
                    k = os.copy_file_range(src_fd, self.fd, n, offset)
                elif self.kernel_copy == "sendfile":
                    k = os.sendfile(self.fd, src_fd, offset, n)
                else:
                    data = os.pread(src_fd, min(n, RUN_BYTES), offset)
                    self._write_all(data)
                    k = len(data)
            except OSError as exc:
                if self.kernel_copy == "pread" or exc.errno not in _NO_KERNEL_COPY:
                    raise
                self.kernel_copy = "sendfile" if self.kernel_copy == "copy_file_range" else "pread"
                continue
            if k == 0:
                raise EOFError(f"source ends at byte {offset}, {n} bytes before the recorded range end")
            offset += k
            n -= k
            self.total += k

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def write(self, data) -> None:
        n = len(data)
        self.total += n
        if n >= _FLUSH_BYTES:
            self.flush()
            self._write_all(data)
            return
        self.pending += data
        if len(self.pending) >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self._write_all(self.pending)
            self.pending = bytearray()


class _Sources:
    """Open source shards, a few at a time (shuffled exports touch many)."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self.open: dict[str, Source] = {}

    def get(self, path: str) -> Source:
        src = self.open.pop(path, None)
        if src is None:
            if len(self.open) >= self.keep:
                oldest = next(iter(self.open))
                self.open.pop(oldest).close()
            try:
                src = Source(path)
            except OSError as exc:
                raise CurateError(f"cannot read source shard {path}: {exc.strerror or exc}") from None
        self.open[path] = src  # most recently used last
        return src

    def close(self) -> None:
        for src in self.open.values():
            src.close()
        self.open.clear()


def _patch_json(data: bytes, patch: str) -> bytes | None:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    obj["curate"] = json.loads(patch)
    return json.dumps(obj).encode()  # compact: indent would switch json to its pure-Python encoder


def _rewrite(buf: memoryview, row: tuple, counts: dict) -> bytes:
    uid, path, _off, _end, key, out_key, drop_repeats, patch = row
    parts: list[bytes] = []
    seen: set[str] = set()
    first = None
    try:
        members = members_of(buf)
    except Exception as exc:  # tarfile.TarError, ValueError
        raise CurateError(f"{path}: cannot parse the members of key {key!r} at its recorded range: {exc}") from None
    for m in members:
        if not m.isreg:
            # links, devices and directories are never sample members, and a link in a shard is a
            # hazard to whoever extracts it: not written (ingest rejects records holding one)
            counts["unsafe_members_dropped"] += 1
            continue
        why = unsafe_name(m.name)
        if why:
            raise CurateError(f"{path}: member {m.name[:200]!r} of key {key!r}: {why}; not written (re-ingest "
                              "the shard with this curate version, which rejects such records)")
        k, ext = split_name(m.name)
        if k != key:
            raise CurateError(f"{path}: member {m.name!r} inside the recorded range of key {key!r}; "
                              "the shard changed since ingest (re-ingest it with --replace)")
        if ext in seen and drop_repeats:
            counts["repeats_dropped"] += 1
            continue
        seen.add(ext)
        first = first or m
        new_name = out_key + m.name[len(key):]
        if patch is not None and ext == "json":
            data = _patch_json(bytes(buf[m.d0:m.d0 + m.size]), patch)
            if data is not None:
                parts.append(member_bytes(header_for(m.info(), new_name, len(data)), data))
                counts["json_rewritten"] += 1
                continue
            counts["json_unreadable"] += 1
        if new_name != m.name:
            parts.append(header_for(m.info(), new_name, m.size) + bytes(buf[m.d0:m.end]))
        else:
            parts.append(bytes(buf[m.h0:m.end]))
    if patch is not None and "json" not in seen and first is not None:
        data = json.dumps({"uid": uid, "curate": json.loads(patch)}).encode()
        parts.append(member_bytes(header_for(first.info(), f"{out_key}.json", len(data)), data))
        counts["json_added"] += 1
    if key != out_key:
        counts["renamed"] += 1
    return b"".join(parts)


def _check(buf, pos: int, row: tuple, path: str, *, checksum: bool) -> None:
    err = check_header(buf, pos, row[4].encode("utf-8", "surrogateescape"), checksum=checksum)
    if err:
        raise CurateError(f"{path} @ {row[2]} (key {row[4]!r}): {err}; the shard changed since ingest "
                          "(re-ingest it with --replace)")


@contextlib.contextmanager
def _replace_into(final: Path, *, fsync: bool):
    """Write under `.<name>.<pid>.partial` beside `final`, then rename. The shard is fsync'd
    before its rename (a renamed shard is complete); directory fsyncs are left to the end of
    the export, and a lost rename or stats file only makes a resumed export rewrite that shard."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_shard(task: dict) -> dict:
    """Write `task['name']` into `task['out_dir']`; returns its stats (also saved beside it)."""
    try:
        return _write_shard(task)
    except OSError as exc:
        if exc.filename is None:  # os.write and copy_file_range name no file: say which shard
            raise OSError(exc.errno, exc.strerror or str(exc), str(Path(task["out_dir"]) / task["name"])) from None
        raise


def _write_shard(task: dict) -> dict:
    out_dir = Path(task["out_dir"])
    name: str = task["name"]
    rows: list[tuple] = task["rows"]
    check_all = set(task.get("check_all", ()))
    parse_members = set(task.get("parse_members", ()))
    t0 = time.perf_counter()
    counts = {"renamed": 0, "json_rewritten": 0, "json_added": 0, "json_unreadable": 0, "repeats_dropped": 0,
              "unsafe_members_dropped": 0}
    sources = _Sources()
    buf = bytearray()  # grown on first use: kernel-copied runs never pass through it
    read = 0
    try:
        with _replace_into(out_dir / name, fsync=True) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                out = _Out(fd)
                i, n = 0, len(rows)
                while i < n:
                    uid, path, off, end, key, out_key, drop, patch = rows[i]
                    plain = key == out_key and not drop and patch is None and path not in parse_members
                    src = sources.get(path)
                    j, run_end = i + 1, end
                    if plain:  # extend over the following rows that continue this one in the source
                        limit = RUN_BYTES if src.compressed else KERNEL_RUN_BYTES
                        while j < n and run_end - off < limit:
                            r = rows[j]
                            if r[1] != path or r[2] != run_end or r[4] != r[5] or r[6] or r[7] is not None:
                                break
                            run_end = r[3]
                            j += 1
                    size = run_end - off
                    try:
                        if plain and not src.compressed:
                            # Check the run's first and last headers (every header, by name, when
                            # the shard's mtime changed since ingest), then let the kernel copy it.
                            if path in check_all:
                                mm = src.map()
                                _check(mm, off, rows[i], path, checksum=True)
                                for r in rows[i + 1:j]:
                                    _check(mm, r[2], r, path, checksum=False)
                            else:
                                _check(src.pread(off, BLOCK), 0, rows[i], path, checksum=True)
                                if j - 1 > i:
                                    _check(src.pread(rows[j - 1][2], BLOCK), 0, rows[j - 1], path, checksum=False)
                            out.copy_from(src.fd, off, size)
                        else:
                            if size > len(buf):
                                buf = bytearray(max(size, min(RUN_BYTES, 1 << 20)))
                            view = memoryview(buf)[:size]
                            src.read_into(view, off)
                            for r in rows[i:j]:
                                _check(view, r[2] - off, r, path, checksum=True)
                            out.write(view if plain else _rewrite(view, rows[i], counts))
                    except EOFError as exc:
                        raise CurateError(f"{path}: {exc}; the shard changed since ingest "
                                          "(re-ingest it with --replace)") from None
                    read += size
                    i = j
                body = out.total
                out.write(END_OF_ARCHIVE + bytes((-(body + len(END_OF_ARCHIVE))) % RECORD))
                out.flush()
            finally:
                os.close(fd)
    finally:
        sources.close()
    nbytes = (out_dir / name).stat().st_size
    # img2dataset's keys first (DataComp's resharder reads `successes` when there is no sizes.json),
    # then curate's; no clock values, so a resumed export writes the same bytes
    stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": len(rows)},
             "shard": name, "bytes": nbytes, "plan": task["plan"],
             "first_uid": rows[0][0] if rows else None, "last_uid": rows[-1][0] if rows else None, **counts}
    with _replace_into(out_dir / stats_name(name), fsync=False) as tmp:
        tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return {**stats, "read_bytes": read, "seconds": time.perf_counter() - t0}


def stats_name(shard_name: str) -> str:
    return shard_name[: -len(".tar")] + "_stats.json"


# ---- worker processes ---------------------------------------------------------------------

def init_worker(parent: int) -> None:
    """Pool initializer: die with the parent (a killed export must not leave writers behind)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    try:  # Linux: the kernel signals us when the parent dies
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
