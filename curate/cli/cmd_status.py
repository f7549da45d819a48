"""`curate status`: what a workspace holds."""

from __future__ import annotations

from ..workspace import Workspace
from .. import console
from ..manifest import open_manifest
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


def workspace_status(ws: Workspace) -> dict:
    with open_manifest(ws, read_only=True) as m:
        q = lambda sql: m.execute(sql).fetchall()  # noqa: E731
        shards = q("SELECT format, status, count(*), sum(n_samples), sum(n_rejected), sum(bytes) "
                   "FROM shards GROUP BY ALL ORDER BY ALL")
        samples = q("SELECT source, status, count(*) FROM samples GROUP BY ALL ORDER BY ALL")
        issues = q("SELECT reason, action, count(*) FROM sample_issues GROUP BY ALL ORDER BY 3 DESC")
        scorers = q("SELECT s.name, s.kind, s.spec, s.dim, (SELECT count(*) FROM scores c WHERE c.scorer = s.name) "
                    "FROM scorers s ORDER BY s.name")
        runs = q("SELECT run_id, command, status, started_at, ended_at FROM runs ORDER BY run_id DESC LIMIT 20")
        n_samples = m.scalar("SELECT count(*) FROM samples")
        n_shards = m.scalar("SELECT count(*) FROM shards")
    return {
        "workspace": str(ws.root),
        "n_shards": n_shards,
        "n_samples": n_samples,
        "shards": [dict(format=f, status=s, shards=n, samples=int(ns or 0), rejected=int(nr or 0), bytes=int(b or 0))
                   for f, s, n, ns, nr, b in shards],
        "samples": [dict(source=src, status=st, count=c) for src, st, c in samples],
        "issues": [dict(reason=r, action=a, count=c) for r, a, c in issues],
        "scorers": [dict(name=n, kind=k, spec=sp, dim=d, scores=c) for n, k, sp, d, c in scorers],
        "runs": [dict(run_id=r, command=c, status=s, started_at=str(a), ended_at=str(e) if e else None)
                 for r, c, s, a, e in runs],
    }


@app.command()
def status(workspace: WorkspaceOpt = None, json_output: JsonOpt = False, quiet: QuietOpt = False,
           debug: DebugOpt = False) -> None:
    """Show a workspace's shards, samples, per-sample issues, scorers and recent runs.

    Example: `curate status -w ws/` (or `--json` for scripts)
    """
    setup(json_output, quiet, debug)
    ws = Workspace.open(workspace, write=False)
    st = workspace_status(ws)
    if console.state.json:
        console.emit(st)
        return
    console.stdout.print(f"[bold]workspace[/bold] {st['workspace']}: {st['n_shards']:,} shards, {st['n_samples']:,} samples")
    console.print_table("shards", ["format", "status", "shards", "samples", "rejected", "bytes"],
                        [tuple(d.values()) for d in st["shards"]])
    console.print_table("samples", ["source", "status", "count"], [tuple(d.values()) for d in st["samples"]])
    if st["issues"]:
        console.print_table("per-sample issues", ["reason", "action", "count"], [tuple(d.values()) for d in st["issues"]])
    console.print_table("scorers", ["name", "kind", "spec", "dim", "scores"], [tuple(d.values()) for d in st["scorers"]])
    console.print_table("recent runs", ["run", "command", "status", "started", "ended"],
                        [tuple(d.values()) for d in st["runs"]])
