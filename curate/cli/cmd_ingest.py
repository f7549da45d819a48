"""`curate ingest`: register shards and samples of a pool in a workspace."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import console
from ..manifest import open_manifest
from ..workspace import Workspace
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Tar shards, DataComp metadata folders/files, URL tables, "
                                                      "folders or globs.", show_default=False)],
    workspace: WorkspaceOpt = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="wds | datacomp | urls (default: detect).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Re-ingest shards whose file changed since ingest.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Ingest a pool into a workspace (created if missing), shard by shard, resumably.

    Formats: webdataset tars as img2dataset writes them (jpg/png/webp + txt + json, optional
    `_stats.json` and `.parquet` sidecars); DataComp metadata (`<stem>.parquet` + `<stem>.npz`,
    whose embeddings and CLIP scores become scorers `datacomp-b32` and `datacomp-l14`); URL
    tables (parquet/CSV/JSONL with `url` + `caption`) registered as pending downloads.
    Re-ingesting the same shards adds nothing. Per-sample problems are recorded in
    `sample_issues`; an unreadable shard is recorded as failed and the rest goes on (exit 1).

    Example: `curate ingest shards/ -w ws/` or `curate ingest metadata/ -w ws/ --format datacomp`
    """
    setup(json_output, quiet, debug)
    from ..sources.ingest import ingest_paths

    ws = Workspace.open(workspace, write=True, create=True)
    try:
        with open_manifest(ws) as m:
            params = {"sources": [str(s) for s in sources], "format": fmt, "replace": replace}
            with m.run("ingest", params) as rec:
                summary = ingest_paths(ws, m, sources, fmt, rec.run_id, replace=replace)
                rec.summary = summary.as_dict()
            total = m.scalar("SELECT count(*) FROM samples")
    finally:
        ws.close()
    out = summary.as_dict()
    out["run_id"] = rec.run_id
    out["samples_in_workspace"] = total
    if not console.state.json:
        out["failures"] = len(summary.failures)
    console.emit(out, title="ingest")
    if summary.shards_failed:
        raise typer.Exit(1)
