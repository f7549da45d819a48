"""`curate status`: what a workspace holds, and what is running in it now."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

from ..workspace import LOCK_NAME, Workspace
from .. import console
from ..manifest import open_manifest
from ..manifest_reader import WriterGone
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


def lock_holder(ws: Workspace) -> dict | None:
    """The process holding the workspace's writer lock, from `.curate.lock`'s JSON, when it is
    alive. Read without taking the lock (status never blocks a writer). A writer killed with -9
    leaves its JSON behind: a dead pid on this host means nobody holds it."""
    try:
        info = json.loads((ws.root / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None
    if info.get("host") in (None, socket.gethostname()):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        cmdline = Path(f"/proc/{info['pid']}/cmdline")
        if cmdline.exists():  # a reused pid is not our writer
            try:
                if b"curate" not in cmdline.read_bytes():
                    return None
            except OSError:
                pass
    return {"pid": info["pid"], "host": info.get("host"), "command": info.get("command"), "since": info.get("since")}


def _in_progress(running: list, holder: dict | None) -> list[dict]:
    """Runs marked `running` that the lock holder is running (one started before the holder took
    the lock was left by a killed process), plus the holder itself when it has no run yet."""
    if holder is None:
        return []
    since = None
    try:
        since = dt.datetime.fromisoformat(holder["since"]) - dt.timedelta(seconds=1)
    except (TypeError, ValueError):
        pass
    who = {"pid": holder["pid"], "host": holder["host"], "since": holder["since"], "lock_command": holder["command"]}
    out = []
    for run_id, command, argv, started in running:
        if since is not None and started is not None and started < since:
            continue
        try:
            argv = json.loads(argv) if argv else None
        except ValueError:
            pass
        out.append({"run_id": int(run_id), "command": command, "argv": argv, "started_at": str(started), **who})
    if not out:
        out.append({"run_id": None, "command": None, "argv": None, "started_at": None, **who})
    return out


def _status_once(ws: Workspace) -> dict:
    with open_manifest(ws, read_only=True) as m:
        q = lambda sql: m.execute(sql).fetchall()  # noqa: E731
        shards = q("SELECT format, status, count(*), sum(n_samples), sum(n_rejected), sum(bytes) "
                   "FROM shards GROUP BY ALL ORDER BY ALL")
        has_img = q("SELECT count(*) FROM information_schema.columns WHERE table_name = 'samples' "
                    "AND column_name = 'img_shard_id'")[0][0]  # schema 1 (an older curate's manifest): no column
        samples = q(f"SELECT source, status, count(*), {'count(img_shard_id)' if has_img else 'count(image_ext)'} "
                    "FROM samples GROUP BY ALL ORDER BY ALL")
        issues = q("SELECT reason, action, count(*) FROM sample_issues GROUP BY ALL ORDER BY 3 DESC")
        scorers = q("SELECT s.name, s.kind, s.spec, s.dim, (SELECT count(*) FROM scores c WHERE c.scorer = s.name) "
                    "FROM scorers s ORDER BY s.name")
        runs = q("SELECT run_id, command, status, started_at, ended_at FROM runs ORDER BY run_id DESC LIMIT 20")
        running = q("SELECT run_id, command, argv, started_at FROM runs WHERE status = 'running' ORDER BY run_id")
        n_samples = m.scalar("SELECT count(*) FROM samples")
        n_shards = m.scalar("SELECT count(*) FROM shards")
        live, writer_pid = m.remote, getattr(m, "writer_pid", None)
    holder = lock_holder(ws)
    if live and (holder is None or holder["pid"] != writer_pid):  # the lock file is being rewritten
        holder = {"pid": writer_pid, "host": None, "command": None, "since": None}
    return {
        "workspace": str(ws.root),
        "live": live,
        "in_progress": _in_progress(running, holder),
        "n_shards": n_shards,
        "n_samples": n_samples,
        "shards": [dict(format=f, status=s, shards=n, samples=int(ns or 0), rejected=int(nr or 0), bytes=int(b or 0))
                   for f, s, n, ns, nr, b in shards],
        "samples": [dict(source=src, status=st, count=c, with_image=wi) for src, st, c, wi in samples],
        "issues": [dict(reason=r, action=a, count=c) for r, a, c in issues],
        "scorers": [dict(name=n, kind=k, spec=sp, dim=d, scores=c) for n, k, sp, d, c in scorers],
        "runs": [dict(run_id=r, command=c, status=s, started_at=str(a), ended_at=str(e) if e else None)
                 for r, c, s, a, e in runs],
    }


def workspace_status(ws: Workspace) -> dict:
    """Read-only, never takes the writer lock. While a writer runs, the figures are the
    snapshot of what it has committed, served by the writer (`live`)."""
    for attempt in range(3):
        try:
            return _status_once(ws)
        except WriterGone:  # the writer finished while we read: read again (the file, now)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@app.command()
def status(workspace: WorkspaceOpt = None, json_output: JsonOpt = False, quiet: QuietOpt = False,
           debug: DebugOpt = False) -> None:
    """Show a workspace's shards, samples, per-sample issues, scorers, recent runs and what is
    running now. Works while a writer (ingest, score, prune, ...) runs: the figures are then what
    it has committed so far (`live`).

    Example: `curate status -w ws/` (or `--json` for scripts)
    """
    setup(json_output, quiet, debug)
    ws = Workspace.open(workspace, write=False)
    st = workspace_status(ws)
    if console.state.json:
        console.emit(st)
        return
    console.stdout.print(f"[bold]workspace[/bold] {st['workspace']}: {st['n_shards']:,} shards, {st['n_samples']:,} samples")
    if st["live"]:
        console.stdout.print(f"[bold]live[/bold]: pid {st['in_progress'][0]['pid']} is writing; these figures are a "
                             "snapshot of what it has committed so far")
    if st["in_progress"]:
        console.print_table("in progress", ["run", "command", "pid", "since", "started", "command line"],
                            [(d["run_id"], d["command"], str(d["pid"]), d["since"], d["started_at"],
                              " ".join(d["argv"]) if isinstance(d["argv"], list) else (d["argv"] or d["lock_command"]))
                             for d in st["in_progress"]])
    console.print_table("shards", ["format", "status", "shards", "samples", "rejected", "bytes"],
                        [tuple(d.values()) for d in st["shards"]])
    console.print_table("samples", ["source", "status", "count", "with image"], [tuple(d.values()) for d in st["samples"]])
    if st["issues"]:
        console.print_table("per-sample issues", ["reason", "action", "count"], [tuple(d.values()) for d in st["issues"]])
    console.print_table("scorers", ["name", "kind", "spec", "dim", "scores"], [tuple(d.values()) for d in st["scorers"]])
    console.print_table("recent runs", ["run", "command", "status", "started", "ended"],
                        [tuple(d.values()) for d in st["runs"]])
