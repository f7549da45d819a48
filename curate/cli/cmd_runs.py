"""`curate runs`: the workspace's prune runs, and dropping the decisions of ones no longer needed."""

from __future__ import annotations

import json
import shutil
from typing import Annotated, Optional

import typer

from .. import console
from ..errors import UsageError
from ..manifest import open_manifest
from ..workspace import Workspace
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


def prune_runs(m) -> list[dict]:
    """Every prune run, newest first: status, recipe, kept count and how many decision rows it holds."""
    rows = m.execute(
        "SELECT r.run_id, r.status, r.started_at, r.params, r.summary, coalesce(d.n, 0) FROM runs r "
        "LEFT JOIN (SELECT run_id, count(*) AS n FROM decisions GROUP BY run_id) d USING (run_id) "
        "WHERE r.command = 'prune' ORDER BY r.run_id DESC").fetchall()
    out = []
    for run_id, status, started, params, summary, n in rows:
        p, s = json.loads(params or "{}"), json.loads(summary or "{}")
        out.append({"run_id": int(run_id), "status": status, "started_at": str(started),
                    "recipe": (p.get("recipe") or {}).get("name"), "budget": p.get("budget"),
                    "kept": s.get("kept"), "pool": s.get("pool"), "decisions": int(n)})
    return out


def runs_to_drop(runs: list[dict], drop: list[int], keep_last: int | None) -> list[int]:
    """The run ids the options name: explicit ids (each must be a prune run) and every finished
    run but the newest `keep_last`. Already dropped runs are left out. (A failed or interrupted
    run's decisions are deleted when it ends, or by the next prune if it was killed.)"""
    by_id = {r["run_id"]: r for r in runs}
    missing = [i for i in drop if i not in by_id]
    if missing:
        raise UsageError(f"no prune run {', '.join(map(str, missing))} in this workspace (see `curate runs`)")
    chosen = set(drop)
    if keep_last is not None:
        if keep_last < 0:
            raise UsageError("--keep-last must be >= 0")
        ok = [r["run_id"] for r in runs if r["status"] == "ok"]  # newest first
        chosen.update(ok[keep_last:])
    running = [i for i in chosen if by_id[i]["status"] == "running"]
    if running:
        raise UsageError(f"run {running[0]} is still running; it cannot be dropped")
    return sorted(i for i in chosen if by_id[i]["status"] != "dropped")


@app.command()
def runs(
    workspace: WorkspaceOpt = None,
    drop: Annotated[Optional[list[int]], typer.Option(
        "--drop", help="Drop this prune run's decisions, stage stats and artefacts (repeatable).")] = None,
    keep_last: Annotated[Optional[int], typer.Option(
        "--keep-last", help="Drop every finished prune run but the newest N.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be dropped; change nothing.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """List the workspace's prune runs, or drop the ones no longer needed.

    Every prune run keeps one decision row per sample per stage (about 30 bytes a row: ~1.3 GB
    for the dbp recipe over 10M samples). Dropping a run deletes its decisions, funnel and
    `WS/runs/<id>/` artefacts; its `runs` row stays, with status `dropped`, so the history of
    what was run is kept; nothing that reads decisions (export, train-filter) takes a
    dropped run. DuckDB reuses the freed space for later runs; the file does not shrink.

    Examples: `curate runs -w ws/` · `curate runs -w ws/ --keep-last 3` · `curate runs -w ws/ --drop 7 --drop 9`
    """
    setup(json_output, quiet, debug)
    changing = bool(drop) or keep_last is not None
    ws = Workspace.open(workspace, write=changing and not dry_run)
    try:
        with open_manifest(ws, read_only=not changing or dry_run) as m:
            listed = prune_runs(m)
            live = m.remote  # read from a running writer's snapshot (a prune in progress shows as running)
            ids = runs_to_drop(listed, list(drop or []), keep_last) if changing else []
            rows = sum(r["decisions"] for r in listed if r["run_id"] in ids)
            if ids and not dry_run:
                with console.progress() as bar:
                    task = bar.add_task("dropping runs", total=len(ids))
                    for rid in ids:
                        m.drop_run(rid)
                        shutil.rmtree(ws.run_path(rid), ignore_errors=True)
                        bar.advance(task)
                listed = prune_runs(m)
    finally:
        ws.close()
    summary = {"runs": listed, "dropped": ids, "decision_rows_dropped": rows, "dry_run": dry_run, "live": live}
    if console.state.json:
        console.emit(summary)
        return
    console.print_table("prune runs", ["run", "status", "recipe", "budget", "kept", "of", "decisions", "started"],
                        [(r["run_id"], r["status"], r["recipe"], r["budget"], r["kept"], r["pool"], r["decisions"],
                          r["started_at"][:19]) for r in listed])
    if live:
        console.stdout.print("live: a writer is running; this is a snapshot of what it has committed so far")
    if changing:
        verb = "would drop" if dry_run else "dropped"
        console.stdout.print(f"{verb} {len(ids)} run(s): {', '.join(map(str, ids)) or 'none'} "
                             f"({rows:,} decision rows)")
