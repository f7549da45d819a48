"""Reading a workspace while a writer holds it: real `curate ingest` writers in subprocesses, real
`curate status` / `runs` / `export --dry-run` readers, and a raw client of the writer's socket
(docs/workspace.md, "Concurrency and atomicity"; curate/manifest_reader.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import CURATE, ROOT, run_cli

SOCK = ".curate.sock"
PER_SHARD = 3


def make_shards(folder: Path, n_shards: int, prefix: str) -> int:
    """Real webdataset tars (jpg + txt + json per record), small so that ingest's per-shard
    commit is what takes the time. Returns the number of records."""
    folder.mkdir(parents=True)
    imgs = []
    for i in range(8):
        b = io.BytesIO()
        Image.new("RGB", (64 + i, 48), (i * 30, 90, 160)).save(b, "JPEG")
        imgs.append(b.getvalue())
    for s in range(n_shards):
        with tarfile.open(folder / f"{prefix}{s:05d}.tar", "w") as tf:
            for i in range(PER_SHARD):
                key = f"{prefix}{s:05d}{i:04d}"
                for ext, data in (("jpg", imgs[(s + i) % 8]), ("txt", f"a photo of {key}".encode()),
                                  ("json", json.dumps({"key": key, "url": f"http://x.test/{key}.jpg"}).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return n_shards * PER_SHARD


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    big, huge, small = root / "big", root / "huge", root / "small"
    # Many small shards: ingest commits each in its own transaction, so the writer takes a while
    # (a few seconds on an idle machine, much longer on a busy one) and its counts grow as it goes.
    return {"big": big, "n_big": make_shards(big, 200, "b"), "small": small, "n_small": make_shards(small, 12, "s"),
            # never ingested to the end: its writers are stopped long before they could finish
            "huge": huge, "n_huge": make_shards(huge, 2400, "h")}


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_writers():
    yield
    while _STARTED:  # a failed test leaves no writer behind
        p = _STARTED.pop()
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def start_writer(*args) -> subprocess.Popen:
    p = subprocess.Popen([*CURATE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "CURATE_NO_PROGRESS": "1"})
    _STARTED.append(p)
    return p


def status(ws: Path) -> dict:
    proc = run_cli("status", "-w", ws, "--json", timeout=60)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_live(ws: Path, writer: subprocess.Popen, timeout: float = 60) -> dict:
    """The first `status` that the writer answers once its run has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert writer.poll() is None, f"the writer ended before it was seen live: {writer.communicate()}"
        if (ws / SOCK).exists():
            st = status(ws)
            if st["live"] and st["in_progress"][0]["run_id"] is not None:
                return st
        time.sleep(0.05)
    raise AssertionError("the writer never served status")


def finish(writer: subprocess.Popen) -> dict:
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


# ---- a raw client of the writer's socket (the protocol in curate/manifest_reader.py) ----------------

class Raw:
    def __init__(self, path: Path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(str(path))
        tag, hello = self.recv()
        assert tag == b"H"
        self.hello = json.loads(hello)

    def recv(self) -> tuple[bytes, bytes]:
        head = self._exact(9)
        tag, n = struct.unpack("!cQ", head)
        return tag, self._exact(n)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            b = self.s.recv(n - len(buf))
            if not b:
                raise ConnectionError("closed")
            buf += b
        return buf

    def send(self, tag: bytes, payload: bytes) -> None:
        self.s.sendall(struct.pack("!cQ", tag, len(payload)) + payload)

    def query(self, sql: str, params=None):
        """('ok', rows as lists) or ('error', message)."""
        import pyarrow as pa

        self.send(b"Q", json.dumps({"sql": sql, "params": params, "tables": []}).encode())
        data = b""
        while True:
            tag, payload = self.recv()
            if tag == b"D":
                data += payload
            elif tag == b"Z":
                t = pa.ipc.open_stream(data).read_all()
                return "ok", [list(r.values()) for r in t.to_pylist()]
            elif tag == b"E":
                return "error", json.loads(payload)["error"]
            else:
                raise AssertionError(tag)

    def close(self) -> None:
        self.s.close()


def test_status_is_live_while_ingest_runs(tmp_path, pools):
    ws = tmp_path / "ws"
    writer = start_writer("ingest", pools["big"], "-w", ws, "--json")
    seen = [wait_live(ws, writer)]
    while writer.poll() is None:
        proc = run_cli("status", "-w", ws, "--json", check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr  # never "in use by another curate process"
        seen.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        time.sleep(0.2)  # leave the writer some of the machine's cores
    summary = finish(writer)
    live = [s for s in seen if s["live"]]
    assert len(live) >= 2, f"only {len(live)} status calls while the writer ran"
    for s in live:
        (job,) = s["in_progress"]
        assert job["pid"] == writer.pid and job["lock_command"].startswith("curate ingest") and job["since"]
        if s["runs"][0]["status"] == "running":  # else the run had just ended, the writer was closing
            assert job["command"] == "ingest" and job["run_id"] == summary["run_id"] == s["runs"][0]["run_id"]
            assert job["argv"][:2] == ["curate", "ingest"] and job["started_at"]
    assert seen[0]["live"] and seen[0]["runs"][0]["status"] == "running"
    # consistent snapshots: what the writer commits only grows, and the figures agree with each other
    for a, b in zip(seen, seen[1:]):
        assert b["n_samples"] >= a["n_samples"] and b["n_shards"] >= a["n_shards"]
    for s in seen:
        assert s["n_samples"] == sum(d["count"] for d in s["samples"]) == sum(d["samples"] for d in s["shards"])
        assert s["n_samples"] == PER_SHARD * s["n_shards"]
    assert live[0]["n_samples"] < pools["n_big"]
    after = status(ws)
    assert after["live"] is False and after["in_progress"] == []
    assert after["n_samples"] == pools["n_big"] and after["runs"][0]["status"] == "ok"
    assert not (ws / SOCK).exists()  # the writer removed its socket


def test_readers_cannot_write_and_a_killed_writer_leaves_nothing_that_blocks(tmp_path, pools):
    ws = tmp_path / "ws"
    run_cli("ingest", pools["small"], "-w", ws, "--quiet")
    writer = start_writer("ingest", pools["huge"], "-w", ws, "--json")
    first = wait_live(ws, writer)
    sock = ws / SOCK
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600

    raw = Raw(sock)
    assert raw.hello["pid"] == writer.pid and raw.hello["db"] == os.path.realpath(ws / "manifest.duckdb")
    kind, rows = raw.query("SELECT count(*) FROM samples")
    assert kind == "ok" and rows[0][0] >= pools["n_small"]
    before = rows[0][0]
    copy_to = tmp_path / "leak.csv"
    for sql in ["DELETE FROM samples", f"COPY samples TO '{copy_to}'", "UPDATE runs SET status = 'ok'",
                "SELECT 1; DELETE FROM samples", "ATTACH ':memory:' AS x", "PRAGMA enable_profiling",
                "SET memory_limit = '1GB'", "CHECKPOINT", "CALL force_checkpoint()", "INSERT INTO meta VALUES (1, 2)",
                "SELECT * FROM checkpoint()", "SELECT * FROM force_checkpoint()",
                "WITH c AS (SELECT * FROM checkpoint()) SELECT * FROM c"]:
        kind, msg = raw.query(sql)
        assert kind == "error" and "refused" in msg, sql
    assert not copy_to.exists()
    kind, rows = raw.query("SELECT count(*) FROM samples")
    assert kind == "ok" and rows[0][0] == before  # one session, one snapshot; nothing deleted
    assert raw.query("DESCRIBE samples")[0] == "ok"
    # a write hidden in a SELECT: the session's transaction is read-only (the error starts a new one)
    kind, msg = raw.query("SELECT nextval('run_id_seq')")
    assert kind == "error" and "read-only" in msg
    kind, rows = raw.query("SELECT count(*) FROM samples")
    assert kind == "ok" and rows[0][0] >= before
    raw.close()
    # a reader that asks for a large result and vanishes mid-reply does not disturb the writer
    quitter = Raw(sock)
    quitter.send(b"Q", json.dumps({"sql": "SELECT range, md5(range::VARCHAR) FROM range(3000000)",
                                   "params": None, "tables": []}).encode())
    quitter.recv()
    quitter.close()
    mid = status(ws)
    assert mid["live"] and mid["n_samples"] >= first["n_samples"]

    assert writer.poll() is None, "the writer finished early: make the huge pool bigger"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert sock.exists()  # stale: nobody listens on it
    dead = status(ws)  # opens the file directly
    assert dead["live"] is False and dead["in_progress"] == []
    killed = dead["runs"][0]
    assert killed["command"] == "ingest" and killed["status"] == "running"  # nobody marked it
    assert mid["n_samples"] <= dead["n_samples"] < pools["n_small"] + pools["n_huge"]

    # the next writer binds over the stale socket and serves again; the killed run is not "in progress"
    again = start_writer("ingest", pools["huge"], "-w", ws, "--json")
    live = wait_live(ws, again)
    (job,) = live["in_progress"]
    assert job["pid"] == again.pid and job["run_id"] != killed["run_id"]
    assert live["n_samples"] >= dead["n_samples"]

    # the read-only commands run against the writer's snapshot
    out = tmp_path / "export.parquet"
    proc = run_cli("export", "-w", ws, "--all", "--format", "parquet", "--out", out, "--dry-run", "--json",
                   check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    exp = json.loads(proc.stdout.strip().splitlines()[-1])
    assert exp["dry_run"] is True and exp["samples"] >= live["n_samples"] and not out.exists()
    runs = json.loads(run_cli("runs", "-w", ws, "--json").stdout.strip().splitlines()[-1])
    assert runs["live"] is True and runs["runs"] == []
    # a read-only command that needs the file itself still waits for the writer, with one line
    proc = run_cli("prune", "-w", ws, "--pipeline", "random", "--budget", "5", "--dry-run", check=False)
    assert proc.returncode == 2 and "needs the file itself" in proc.stderr and "Traceback" not in proc.stderr

    assert again.poll() is None, "the writer finished early: make the huge pool bigger"
    again.send_signal(signal.SIGINT)  # an interrupted writer closes the manifest: the socket goes
    again.communicate(timeout=60)
    assert again.returncode != 0
    assert not sock.exists()
    final = status(ws)
    assert final["live"] is False and final["in_progress"] == []
    # 'interrupted', or 'failed' when the interrupt lands in a DuckDB query ("Query interrupted")
    assert final["runs"][0]["run_id"] == job["run_id"] and final["runs"][0]["status"] in ("interrupted", "failed")
    assert final["n_samples"] >= live["n_samples"]


FORKING_WRITER = textwrap.dedent("""
    import os, sys, time
    from curate.manifest import Manifest
    m = Manifest(sys.argv[1])
    child = os.fork()  # as a torch DataLoader worker: the child must not hold the socket
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
""")


def test_forked_children_do_not_serve(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", FORKING_WRITER, str(ws / "manifest.duckdb")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    _STARTED.append(writer)
    child = int(writer.stdout.readline())
    try:
        assert status(ws)["live"] is True
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        os.kill(child, 0)  # the child is still there, with the listening socket's inherited copy closed
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            s.connect(str(ws / SOCK))
        s.close()
        st = status(ws)
        assert st["live"] is False and st["n_samples"] == 0
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_status_is_live_while_score_runs(tmp_path, tiny_ckpt):
    """The same during a real `curate score` with its defaults (a DataLoader worker forked from
    the writer, torch busy in the main thread): status answers, live, and the scores it counts
    never go down."""
    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "wds", "--n", "1200", "--seed", "4", "--shard-size", "100")
    run_cli("ingest", pool, "-w", ws)
    writer = start_writer("score", "-w", ws, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", "--device", "cpu",
                          "--batch-size", "8", "--json")
    seen, live = [], 0
    try:
        while writer.poll() is None:
            st = status(ws)  # exits 0 every time (run_cli checks)
            scored = {s["name"]: s["scores"] for s in st["scorers"]}.get("tiny", 0)
            seen.append(scored)
            if st["live"]:
                live += 1
                assert [j["command"] for j in st["in_progress"]] == ["score"]
            time.sleep(0.5)
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert live >= 2, f"status saw the score live {live} times"
    assert seen == sorted(seen), "counts from consistent snapshots never go down"
    final = status(ws)
    assert final["live"] is False and {s["name"]: s["scores"] for s in final["scorers"]}["tiny"] >= max(seen)
