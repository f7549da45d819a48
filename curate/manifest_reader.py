"""Reads while a writer runs: the writer serves read-only queries over a Unix socket.

DuckDB lets one process open a database file read-write, and then no other process can open
it at all. So while a writer (`ingest`, `score`, `prune`, ...) holds `manifest.duckdb`, readers
(`status`, `runs`, `export --dry-run`, ...) ask the writer instead: a read-write `Manifest`
starts a `ReadServer` (one daemon thread) on a Unix-domain socket, and `Manifest.for_workspace`
falls back to `RemoteManifest` when the direct read-only open is refused by DuckDB's lock.

Socket: `WS/.curate.sock` when that path fits AF_UNIX (< 100 bytes), else (or when the
workspace's file system cannot hold a socket) `/tmp/curate-<sha1(manifest path)[:16]>.sock`.
Mode 0600, only peers of the same uid are served. It is bound under a temporary name and renamed
over the final one, so a socket left by a killed writer is replaced atomically.

Protocol (a frame is a 1-byte tag, an 8-byte big-endian length, the payload):

    server -> client  H  {"protocol": 1, "pid": ..., "db": "/abs/manifest.duckdb", "version": ...}
                         (or E {"error": ...} and close, when it is busy)
    client -> server  Q  {"sql": "...", "params": [...] | {...} | null, "tables": ["name", ...]}
                      T  one frame per named table: an Arrow IPC stream
    server -> client  D* the result as an Arrow IPC stream, cut into frames of about 1 MB
                      Z  {"columns": [...], "types": ["BIGINT", ...], "rows": n}
                   or E  {"error": "...", "kind": "CatalogException"}   (may follow some D frames)
    client -> server  X  (goodbye; closing the socket does the same)

A connection is a session: one DuckDB cursor of the writer's database in one read-only
transaction (`BEGIN TRANSACTION READ ONLY`), so every query of a reader sees the same snapshot
of what the writer had committed when the reader connected. After an error (or an out-of-memory
retry: the writer lowers DuckDB's memory limit for an instant in `Manifest.trim`), the session
starts a new transaction, a newer snapshot. Each statement must be exactly one statement of type
SELECT (DESCRIBE, SHOW, SUMMARIZE, FROM, VALUES and WITH count as SELECT); anything else is
refused, and the read-only transaction refuses writes hidden in a SELECT (`nextval`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import hashlib
import json
import logging
import os
import re
import selectors
import socket
import stat
import struct
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from .errors import WorkspaceLocked

log = logging.getLogger("curate.live")

PROTOCOL = 1
SOCK_NAME = ".curate.sock"
MAX_SOCK_PATH = 100        # bytes; AF_UNIX's sun_path holds 108 on Linux, 104 on macOS
DISABLE_ENV = "CURATE_LIVE_READS"   # "0": a writer serves no reads (readers get "in use" as before)

_HEADER = struct.Struct("!cQ")
MAX_JSON_FRAME = 64 << 20  # a request's SQL + params
CHUNK = 1 << 20            # result frames
BATCH_ROWS = 65_536
MAX_SESSIONS = 8
IDLE_TIMEOUT = 60.0        # a session whose reader sends nothing for this long ends (its snapshot goes)
SEND_TIMEOUT = 10.0        # ... and one that stops reading a reply for this long (it holds the query lock)
STOP_GRACE = 2.0           # a closing writer lets connected readers finish for this long
OOM_RETRY_SECONDS = 3.0  # the writer's trim() lowers the memory limit for an instant
CONNECT_TIMEOUT = 5.0
QUERY_TIMEOUT = 600.0


# ---- paths and frames ----------------------------------------------------------------

def _identity(db_path) -> str:
    return os.path.realpath(os.fspath(db_path))


def _tmp_root() -> Path:
    # Not tempfile.gettempdir(): TMPDIR may differ between the writer and a reader.
    return Path("/tmp") if os.path.isdir("/tmp") else Path(__import__("tempfile").gettempdir())


def socket_paths(db_path) -> list[Path]:
    """Where the writer of `db_path` serves, in the order a writer binds and a reader tries:
    `WS/.curate.sock` if short enough for AF_UNIX, then a fixed name under /tmp from a hash of
    the manifest's real path (both sides compute it; no file says where)."""
    ident = _identity(db_path)
    paths = []
    in_ws = Path(os.path.dirname(ident)) / SOCK_NAME
    if len(os.fsencode(str(in_ws))) < MAX_SOCK_PATH:
        paths.append(in_ws)
    paths.append(_tmp_root() / f"curate-{hashlib.sha1(os.fsencode(ident)).hexdigest()[:16]}.sock")
    return paths


class _Closed(Exception):
    """The peer closed the connection."""


# A reader that vanishes must never raise SIGPIPE in the writer (whatever its SIGPIPE handler is).
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def _send(sock: socket.socket, tag: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
    sock.sendall(_HEADER.pack(tag, len(payload)), _NOSIGNAL)
    if len(payload):
        sock.sendall(payload, _NOSIGNAL)


def _send_json(sock: socket.socket, tag: bytes, obj) -> None:
    _send(sock, tag, json.dumps(obj, default=_jsonable).encode())


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        b = sock.recv(min(left, 1 << 20))
        if not b:
            raise _Closed()
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def _recv(sock: socket.socket, max_len: int | None = None) -> tuple[bytes, bytes]:
    tag, n = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if max_len is not None and n > max_len:
        raise ValueError(f"frame of {n} bytes is too long")
    return tag, _recv_exact(sock, n)


def _jsonable(o):
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, (dt.datetime, dt.date, dt.time)):
        return o.isoformat()
    if isinstance(o, (decimal.Decimal, uuid.UUID, Path)):
        return str(o)
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    raise TypeError(f"cannot send a {type(o).__name__} as a query parameter")


def _ipc_bytes(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _to_arrow(obj):
    import pyarrow as pa

    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    if isinstance(obj, pa.RecordBatchReader):
        return obj.read_all()
    if hasattr(obj, "to_arrow"):  # polars
        return obj.to_arrow()
    if hasattr(obj, "to_arrow_table"):
        return obj.to_arrow_table()
    return pa.Table.from_pandas(obj)  # pandas


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


# ---- the writer's side -----------------------------------------------------------------

_SERVERS: "weakref.WeakSet[ReadServer]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child (a torch DataLoader worker, ...) has no server thread, but it inherits the
    # listening socket and the readers' connections: close its copies, so a reader never waits
    # on a socket nobody answers, and sees the end of its session when the writer ends it.
    for srv in list(_SERVERS):
        with contextlib.suppress(Exception):
            srv._drop_fds_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _FrameSink:
    """A file-like sink for pyarrow's IPC writer that sends D frames of about CHUNK bytes."""

    closed = False

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.buf = bytearray()
        self.frames = 0

    def write(self, data) -> int:
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush_frame()
        return len(data)

    def flush_frame(self) -> None:
        if self.buf:
            _send(self.conn, b"D", self.buf)
            self.buf = bytearray()
            self.frames += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


_ACTING_FUNCTIONS = {"checkpoint", "force_checkpoint", "sqlite_attach", "postgres_attach", "mysql_attach",
                     "enable_logging", "disable_logging", "truncate_duckdb_logs"}


class _Refused(Exception):
    kind = "PermissionException"


class ReadServer:
    """Answers read-only queries on the writer's database from a daemon thread (see module doc).

    Only the process that started it serves; nothing it does can raise into the writer."""

    def __init__(self, con, db_path):
        self.con = con
        self.db = _identity(db_path)
        self.pid = os.getpid()
        self.path: Path | None = None
        self._ino: tuple[int, int] | None = None
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.query_lock = threading.Lock()
        self._sessions: dict[socket.socket, Any] = {}   # conn -> its cursor (None until opened)
        self._threads: set[threading.Thread] = set()
        self._thread: threading.Thread | None = None
        self.served = 0
        self.errors = 0

    # ---- life ----------------------------------------------------------------------
    def start(self) -> bool:
        for path in socket_paths(self.db):
            try:
                self._listener = self._bind(path)
                self._listener.setblocking(False)
                self.path = path
                break
            except OSError as exc:
                log.debug("cannot serve reads at %s: %s", path, exc)
        if self._listener is None:
            self._close_wake()
            return False
        _SERVERS.add(self)
        self._thread = threading.Thread(target=self._accept_loop, name="curate-read-server", daemon=True)
        self._thread.start()
        return True

    def _bind(self, path: Path) -> socket.socket:
        """Bind under a temporary name, make it 0600, rename it over `path`: readers never see
        a socket with looser permissions, and a stale one is replaced in one step."""
        tmp = path.with_name(f"{path.name}.{self.pid:x}")
        if len(os.fsencode(str(tmp))) > 104:
            raise OSError(f"socket path {tmp} is too long")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(tmp))
            try:
                os.chmod(tmp, 0o600)
                s.listen(MAX_SESSIONS)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            st = os.stat(path)
            self._ino = (st.st_dev, st.st_ino)
            return s
        except BaseException:
            s.close()
            raise

    def stop(self) -> None:
        """Stop accepting, let connected readers finish for up to STOP_GRACE seconds, then end
        their sessions; remove the socket. Only in the process that started the server; never
        raises (the writer is closing its manifest)."""
        if os.getpid() != self.pid or self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self._unlink()
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            if self._thread is not None:
                self._thread.join(timeout=2.0)
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline:
                with self._lock:
                    if not self._threads:
                        break
                time.sleep(0.02)
            with self._lock:
                sessions = list(self._sessions.items())
                threads = list(self._threads)
            for conn, cur in sessions:
                with contextlib.suppress(Exception):
                    conn.shutdown(socket.SHUT_RDWR)
                if cur is not None:
                    with contextlib.suppress(Exception):
                        cur.interrupt()
            for t in threads:
                with contextlib.suppress(Exception):
                    t.join(timeout=5.0)
        except Exception as exc:
            log.debug("stopping the read server: %r", exc)
        finally:
            self._close_wake()
            _SERVERS.discard(self)

    def _unlink(self) -> None:
        """Remove our socket file, and only ours (not one a later writer bound at the same path)."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                self.path.unlink()

    def _close_wake(self) -> None:
        for s in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()

    def _drop_fds_in_child(self) -> None:
        self._stopping.set()
        for s in [self._listener, self._wake_r, self._wake_w, *list(self._sessions)]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._sessions = {}
        self._threads = set()

    # ---- serving ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._listener
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(listener, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    try:
                        sel.select()
                        if self._stopping.is_set():
                            break
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:  # EMFILE and the like: do not spin
                        self.errors += 1
                        log.debug("accept failed: %s", exc)
                        time.sleep(0.1)
                        continue
                    self._admit(conn)
        except Exception as exc:  # never raise into anything; the writer carries on unserved
            self.errors += 1
            log.debug("read server stopped: %r", exc)
        finally:
            with contextlib.suppress(OSError):
                listener.close()

    def _admit(self, conn: socket.socket) -> None:
        try:
            if not self._same_user(conn):
                conn.close()
                return
            with self._lock:
                busy = len(self._threads) >= MAX_SESSIONS
                if not busy:
                    t = threading.Thread(target=self._session, args=(conn,), name="curate-read-session", daemon=True)
                    self._sessions[conn] = None
                    self._threads.add(t)
            if busy:
                conn.settimeout(1.0)
                _send_json(conn, b"E", {"error": f"the writer already serves {MAX_SESSIONS} readers; try again",
                                        "kind": "busy"})
                conn.close()
                return
            t.start()
        except Exception as exc:  # e.g. no thread can be started
            self.errors += 1
            log.debug("cannot admit a reader: %r", exc)
            with self._lock:
                self._sessions.pop(conn, None)
                self._threads = {t for t in self._threads if t.ident is not None}
            with contextlib.suppress(OSError):
                conn.close()

    @staticmethod
    def _same_user(conn: socket.socket) -> bool:
        opt = getattr(socket, "SO_PEERCRED", None)
        if opt is None:
            return True  # the socket's 0600 mode is the check
        try:
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
        except OSError:
            return False
        return uid == os.getuid()

    def _session(self, conn: socket.socket) -> None:
        cur = None
        try:
            conn.settimeout(IDLE_TIMEOUT)
            _send_json(conn, b"H", {"protocol": PROTOCOL, "pid": self.pid, "db": self.db, "version": _version()})
            cur = self.con.cursor()
            with self._lock:
                self._sessions[conn] = cur
            self._begin(cur)
            while True:  # also while the writer closes: it gives connected readers STOP_GRACE to finish
                try:
                    tag, payload = _recv(conn, MAX_JSON_FRAME)
                except (_Closed, ConnectionError, socket.timeout):
                    break
                if tag == b"X":
                    break
                if tag != b"Q":
                    raise ValueError(f"unexpected frame {tag!r}")
                self._query(conn, cur, json.loads(payload))
        except Exception as exc:  # a reader that vanished mid-reply, a bad frame, a closed database
            self.errors += 1
            log.debug("read session ended: %r", exc)
        finally:
            if cur is not None:
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
                with contextlib.suppress(Exception):
                    cur.close()
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._sessions.pop(conn, None)
                self._threads.discard(threading.current_thread())

    @staticmethod
    def _begin(cur) -> None:
        cur.execute("BEGIN TRANSACTION READ ONLY")

    def _restart(self, cur) -> None:
        """After an error: keep the transaction (the snapshot) if DuckDB did not abort it."""
        try:
            cur.execute("SELECT 1").fetchall()
            return
        except Exception:
            pass
        with contextlib.suppress(Exception):
            cur.execute("ROLLBACK")
        self._begin(cur)

    @staticmethod
    def _check(cur, sql: str) -> None:
        stmts = cur.extract_statements(sql)
        if len(stmts) != 1:
            raise _Refused(f"refused: the running writer serves one read-only statement per query, not {len(stmts)}")
        import duckdb

        kind = stmts[0].type
        if kind != duckdb.StatementType.SELECT:
            raise _Refused(f"refused: the running writer serves read-only queries, not {kind.name} statements")
        # Functions that act on the database though called in a SELECT (the read-only transaction
        # already refuses writes, not these); looked up in the parse tree, or the text if the
        # statement has none (DESCRIBE, SHOW).
        tree = cur.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]  # fetchall: DuckDB 2 refuses
        # further work on a connection whose last result was only partly read
        try:
            called = set(re.findall(r'"function_name":"([^"]+)"', tree)) if not json.loads(tree).get("error") else None
        except ValueError:
            called = None
        if called is None:
            called = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", sql))
        denied = {c.lower() for c in called} & _ACTING_FUNCTIONS
        if denied:
            raise _Refused(f"refused: the running writer does not serve {', '.join(sorted(denied))}()")

    def _query(self, conn: socket.socket, cur, req: dict) -> None:
        import pyarrow as pa

        tables = {}
        for name in req.get("tables") or []:
            tag, data = _recv(conn)
            if tag != b"T":
                raise ValueError(f"expected a table frame, got {tag!r}")
            tables[str(name)] = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        sql, params = req.get("sql") or "", req.get("params")
        try:
            self._check(cur, sql)
            deadline, attempt = time.monotonic() + OOM_RETRY_SECONDS, 0
            while True:
                sink = _FrameSink(conn)
                try:
                    with self.query_lock:  # one reader query at a time in the writer's process
                        conn.settimeout(SEND_TIMEOUT)
                        try:
                            rows, cols, types = self._run(cur, sql, params, tables, sink)
                        finally:
                            conn.settimeout(IDLE_TIMEOUT)
                    break
                except (ConnectionError, socket.timeout, BrokenPipeError):
                    raise
                except Exception as exc:
                    # the writer's trim() lowers the memory limit for an instant: try again
                    if _is_oom(exc) and sink.frames == 0 and time.monotonic() < deadline:
                        attempt += 1
                        self._restart(cur)
                        time.sleep(min(0.25, 0.02 * attempt))
                        continue
                    raise
            _send_json(conn, b"Z", {"columns": cols, "types": types, "rows": rows})
            self.served += 1
        except (ConnectionError, socket.timeout, BrokenPipeError):
            raise
        except Exception as exc:
            kind = getattr(exc, "kind", None) or type(exc).__name__
            if not isinstance(exc, _Refused):
                self._restart(cur)  # most errors abort DuckDB's transaction
            _send_json(conn, b"E", {"error": str(exc), "kind": kind})

    @staticmethod
    def _run(cur, sql, params, tables, sink) -> tuple[int, list[str], list[str]]:
        import pyarrow as pa

        for name, t in tables.items():
            cur.register(name, t)
        try:
            rel = cur.sql(sql, params=params) if params is not None else cur.sql(sql)
            if rel is None:
                raise _Refused("the statement returned no result")
            cols, types = list(rel.columns), [str(t) for t in rel.types]
            reader = rel.to_arrow_reader(BATCH_ROWS)
            rows = 0
            try:
                with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), reader.schema) as w:
                    for batch in reader:
                        w.write_batch(batch)
                        rows += batch.num_rows
            finally:
                with contextlib.suppress(Exception):
                    reader.close()
            sink.flush_frame()
            return rows, cols, types
        finally:
            for name in tables:
                with contextlib.suppress(Exception):
                    cur.unregister(name)


def _version() -> str:
    from . import __version__

    return __version__


def start_server(con, db_path) -> ReadServer | None:
    """Serve reads of the writer's database; None when disabled or no socket could be bound.
    Never raises."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        srv = ReadServer(con, db_path)
        return srv if srv.start() else None
    except Exception as exc:
        log.debug("not serving reads: %r", exc)
        return None


# ---- the reader's side ------------------------------------------------------------------

class WriterGone(WorkspaceLocked):
    """The writer serving this reader ended (or stopped answering) in the middle of its reads."""


def _raise_remote(err: dict):
    import duckdb

    kind, msg = err.get("kind") or "Error", err.get("error") or "error"
    cls = getattr(duckdb, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, duckdb.Error)):
        cls = duckdb.Error
    raise cls(msg)


_TO_INT = ("HUGEINT", "UHUGEINT")


def _fix(values: list, dtype: str) -> list:
    """Python values as DuckDB's own fetchall gives them, where Arrow's differ."""
    if dtype in _TO_INT:
        return [None if v is None else int(v) for v in values]
    if dtype == "UUID":
        return [None if v is None else uuid.UUID(str(v)) for v in values]
    if dtype == "INTERVAL":
        return [None if v is None else dt.timedelta(days=v.months * 30 + v.days, microseconds=v.nanoseconds // 1000)
                for v in values]
    return values


class RemoteResult:
    """A query's result from the writer: DuckDB's fetch methods over an Arrow table."""

    def __init__(self, table, columns: list[str], types: list[str]):
        self._table = table
        self.columns = columns
        self.types = types
        self.description = [(c, t, None, None, None, None, None) for c, t in zip(columns, types)]
        self._rows: list[tuple] | None = None
        self._at = 0

    def _all_rows(self) -> list[tuple]:
        if self._rows is None:
            cols = [_fix(self._table.column(i).to_pylist(), t) for i, t in enumerate(self.types)]
            self._rows = list(zip(*cols)) if cols else []
        return self._rows

    def fetchall(self) -> list[tuple]:
        rows = self._all_rows()[self._at:]
        self._at += len(rows)
        return rows

    def fetchone(self):
        rows = self._all_rows()
        if self._at >= len(rows):
            return None
        self._at += 1
        return rows[self._at - 1]

    def fetchmany(self, size: int = 1) -> list[tuple]:
        rows = self._all_rows()[self._at:self._at + size]
        self._at += len(rows)
        return rows

    def fetch_arrow_table(self, *_a, **_k):
        return self._table

    to_arrow_table = arrow = fetch_arrow_table

    def to_arrow_reader(self, batch_size: int = 1_000_000):
        import pyarrow as pa

        return pa.RecordBatchReader.from_batches(self._table.schema, self._table.to_batches(batch_size))

    fetch_record_batch = fetch_arrow_reader = to_arrow_reader

    def pl(self, *_a, **_k):
        import polars as pl

        return pl.from_arrow(self._table)

    def df(self, *_a, **_k):
        return self._table.to_pandas()

    fetchdf = fetch_df = to_df = df

    def fetchnumpy(self) -> dict:
        return {c: self._table.column(c).to_numpy() for c in self._table.column_names}

    def close(self) -> None:
        pass


class _Session:
    """One connection to the writer: one snapshot; requests one at a time."""

    def __init__(self, sock: socket.socket, hello: dict, db_path: Path):
        self.sock = sock
        self.hello = hello
        self.db_path = db_path
        self.lock = threading.Lock()
        self.closed = False

    def gone(self, why: str) -> WriterGone:
        self.close()
        return WriterGone(f"the curate process (pid {self.hello.get('pid')}) writing {self.db_path} {why}; "
                          "run the command again")

    def query(self, sql: str, params, tables: dict) -> RemoteResult:
        import pyarrow as pa

        if self.closed:
            raise self.gone("is no longer serving this reader")
        with self.lock:
            try:
                _send_json(self.sock, b"Q", {"sql": sql, "params": params, "tables": list(tables)})
                for t in tables.values():
                    _send(self.sock, b"T", _ipc_bytes(t))
                chunks = []
                while True:
                    tag, payload = _recv(self.sock)
                    if tag == b"D":
                        chunks.append(payload)
                    elif tag == b"Z":
                        meta = json.loads(payload)
                        break
                    elif tag == b"E":
                        _raise_remote(json.loads(payload))
                    else:
                        raise self.gone(f"sent an unexpected frame {tag!r}")
            except socket.timeout:
                raise self.gone(f"did not answer within {QUERY_TIMEOUT:.0f} s") from None
            except (_Closed, OSError):
                raise self.gone("ended while this command was reading the manifest") from None
        table = pa.ipc.open_stream(pa.py_buffer(b"".join(chunks))).read_all()
        return RemoteResult(table, meta.get("columns") or table.column_names, meta.get("types") or [])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)
            _send(self.sock, b"X")
        with contextlib.suppress(OSError):
            self.sock.close()


def _connect(db_path: Path) -> _Session | None:
    """A session with the writer serving `db_path`, or None (no socket, a stale one, an older
    writer, another user's socket, or a busy writer)."""
    ident = _identity(db_path)
    for path in socket_paths(db_path):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(str(path))
            tag, payload = _recv(s, MAX_JSON_FRAME)
            hello = json.loads(payload)
            if tag != b"H" or hello.get("protocol") != PROTOCOL or hello.get("db") != ident:
                raise OSError(f"not the writer of {ident}: {hello}")
            s.settimeout(QUERY_TIMEOUT)
            return _Session(s, hello, Path(db_path))
        except (OSError, ValueError, _Closed) as exc:
            log.debug("no reads from %s: %r", path, exc)
            with contextlib.suppress(OSError):
                s.close()
    return None


class RemoteConnection:
    """What read-only code uses of a DuckDB connection (`sql`, `execute`, `cursor`, `register`,
    `unregister`), answered by the writer. Its cursors share the session, hence the snapshot;
    registered tables are kept here and sent with each query."""

    def __init__(self, session: _Session):
        self._session = session
        self._tables: dict[str, Any] = {}
        self._last: RemoteResult | None = None

    def execute(self, query: str, parameters=None) -> RemoteResult:
        self._last = self._session.query(query, parameters, self._tables)
        return self._last

    def sql(self, query: str, *, params=None, alias: str = "") -> RemoteResult:
        return self._session.query(query, params, self._tables)

    query = sql

    def register(self, name: str, obj) -> "RemoteConnection":
        self._tables[name] = _to_arrow(obj)
        return self

    def unregister(self, name: str) -> "RemoteConnection":
        self._tables.pop(name, None)
        return self

    def cursor(self) -> "RemoteConnection":
        return RemoteConnection(self._session)

    def fetchall(self):
        return self._last.fetchall() if self._last else []

    def fetchone(self):
        return self._last.fetchone() if self._last else None

    def close(self) -> None:
        self._tables.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteManifest:
    """A read-only `Manifest` answered by the running writer (see the module doc). It has what
    read-only callers use: `execute`, `frame`, `one`, `scalar`, `con`, `path`, `close`; the rest
    of `Manifest` (runs, transactions, memory limits) raises `WorkspaceLocked`: a command that
    needs the file itself (e.g. `prune --dry-run`) still has to wait for the writer."""

    remote = True
    read_only = True

    def __init__(self, path: Path, session: _Session):
        self.path = Path(path)
        self._session = session
        self.con = RemoteConnection(session)
        self.writer_pid = session.hello.get("pid")
        self.writer_version = session.hello.get("version")

    @classmethod
    def connect(cls, path) -> "RemoteManifest | None":
        session = _connect(Path(path))
        return None if session is None else cls(Path(path), session)

    def execute(self, sql: str, params: Any = None) -> RemoteResult:
        return self.con.execute(sql, params)

    def frame(self, sql: str, params: Any = None):
        import polars as pl

        return pl.from_arrow(self.con.sql(sql, params=params).fetch_arrow_table())

    def one(self, sql: str, params: Any = None):
        rows = self.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Any = None):
        row = self.one(sql, params)
        return None if row is None else row[0]

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "RemoteManifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _needs_file(self, *_a, **_k):
        raise WorkspaceLocked(f"manifest {self.path} is in use by another curate process (pid {self.writer_pid}); "
                              "this command needs the file itself: wait for it to finish")

    init_schema = trim = working_memory = transaction = insert_arrow = start_run = finish_run = run = \
        discard_decisions = drop_run = clear_unfinished = next_shard_id = find_shard = _needs_file
