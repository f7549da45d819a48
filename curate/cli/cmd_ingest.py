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
    max_member_size: Annotated[str, typer.Option(
        "--max-member-size", help="Largest tar member read; a record with a bigger one is rejected "
                                  "(image_too_large / member_too_large).")] = "64MiB",
    max_inflated_size: Annotated[str, typer.Option(
        "--max-inflated-size", help="Most a compressed shard may inflate to: a size, or a factor of its "
                                    "compressed size (Nx, at least 1GiB); the rest of the shard is not read.")] = "100x",
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", help="Images whose header announces more pixels are rejected as decompression_bomb "
                             "(Pillow's default bound).")] = 89_478_485,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Ingest a pool into a workspace (created if missing), shard by shard, resumably.

    Formats: webdataset tars as img2dataset writes them (jpg/png/webp + txt + json, optional
    `_stats.json` and `.parquet` sidecars); DataComp metadata (`<stem>.parquet` + `<stem>.npz`,
    whose embeddings and CLIP scores become scorers `datacomp-b32` and `datacomp-l14`); URL
    tables (parquet/CSV/JSONL with `url` + `caption`) registered as pending downloads.
    Re-ingesting the same shards adds nothing. Per-sample problems are recorded in
    `sample_issues`; an unreadable shard is recorded as failed and the rest goes on (exit 1).

    Limits: a tar member over --max-member-size is never read into memory (its record is
    rejected), a compressed shard stops inflating at --max-inflated-size, and an image whose
    header announces more than --max-pixels pixels is rejected as a decompression bomb. Files
    in a folder that are not shards are reported and skipped.

    Example: `curate ingest shards/ -w ws/` or `curate ingest metadata/ -w ws/ --format datacomp`
    """
    setup(json_output, quiet, debug)
    from ..errors import UsageError
    from ..sources.ingest import ingest_paths
    from ..sources.wds import ReadLimits, parse_size

    try:
        limits = ReadLimits(parse_size(max_member_size), parse_size(max_inflated_size, allow_factor=True), max_pixels)
    except ValueError as exc:
        raise UsageError(f"ingest: {exc}") from None
    if max_pixels < 1:
        raise UsageError("--max-pixels must be positive")
    ws = Workspace.open(workspace, write=True, create=True)
    try:
        with open_manifest(ws) as m:
            params = {"sources": [str(s) for s in sources], "format": fmt, "replace": replace,
                      "max_member_size": limits.max_member_bytes, "max_inflated_size": limits.max_inflated,
                      "max_pixels": max_pixels}
            with m.run("ingest", params) as rec:
                summary = ingest_paths(ws, m, sources, fmt, rec.run_id, replace=replace, limits=limits)
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
