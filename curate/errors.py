"""Error types the CLI maps to exit codes.

`UsageError` (exit 2) is a mistake the user can fix: a bad path, a bad option, a locked
workspace. `CurateError` (exit 1) is a failure of the job itself. Both print one line.
"""


class CurateError(Exception):
    """The job failed; one clear line is shown (exit 1)."""

    exit_code = 1


class UsageError(CurateError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class WorkspaceLocked(UsageError):
    """Another process holds the workspace's writer lock."""


_NO_SPACE = (28, 122)  # ENOSPC, EDQUOT


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, as it surfaces from inside a DuckDB query: InterruptException, or (from the
    relation and Arrow APIs) a RuntimeError "Query interrupted"."""
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "InterruptException":
        return True
    return isinstance(exc, RuntimeError) and "Query interrupted" in str(exc)


def free_bytes(path) -> int | None:
    """Free bytes (for this user) on the file system holding `path` or its nearest existing parent."""
    import os
    from pathlib import Path

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def is_disk_full(exc: BaseException, path=None) -> bool:
    """ENOSPC/EDQUOT, or a short write with no errno (numpy's "N requested and M written")
    where the file system is (nearly) full."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    if isinstance(exc, OSError) and exc.errno is None and "written" in text and path is not None:
        free = free_bytes(path)
        return free is not None and free < (16 << 20)
    return False


def disk_full_line(path, exc: BaseException | None = None) -> str:
    where = f" writing {path} ({_size(free_bytes(path))} free there)" if path else ""
    return (f"the disk is full{where}; free some space (or write elsewhere: -w, --out) and rerun: "
            "finished work is kept and resumes")


def describe_os_error(exc: BaseException) -> str:
    """One line for an OS error: what happened, where, and what to do."""
    import errno as E

    path = getattr(exc, "filename", None)
    if is_disk_full(exc, path):
        return disk_full_line(path, exc)
    code = getattr(exc, "errno", None)
    what = getattr(exc, "strerror", None) or str(exc)
    where = f" ({path})" if path else ""
    hints = {
        E.EACCES: "check the permissions of that path, or run as a user who may write it",
        E.EPERM: "check the permissions of that path, or run as a user who may write it",
        E.EROFS: "the file system is read-only; give a writable workspace or output directory",
        E.ENOENT: "the path does not exist (was it moved or deleted while curate ran?)",
        E.ENOTDIR: "a part of the path is a file, not a directory",
        E.EISDIR: "the path is a directory where a file was expected",
        E.EEXIST: "something is already there (a file, or a symbolic link)",
        E.EMFILE: "too many open files; raise the limit (ulimit -n) and rerun",
        E.ENFILE: "too many open files on the system; retry when fewer are open",
        E.EIO: "an I/O error: the disk or the file may be damaged",
        E.ENOMEM: "out of memory; lower --batch-size / --workers or CURATE_DUCKDB_MEMORY and rerun",
        E.ENAMETOOLONG: "the path is too long; use a shorter one",
    }
    hint = hints.get(code, "rerun with --debug for the traceback")
    return f"{what}{where}: {hint}"
