"""`curate relocate`: point a workspace at source files that now live under another path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .. import console
from ..errors import UsageError
from ..manifest import open_manifest
from ..workspace import Workspace
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


def _prefix(p: str) -> str:
    return str(Path(p).expanduser().absolute()).rstrip("/")


@app.command()
def relocate(
    old: Annotated[str, typer.Argument(help="The path prefix the workspace records (e.g. /data/pool).",
                                       show_default=False)],
    new: Annotated[str, typer.Argument(help="Where those files are now (e.g. /mnt/shared/pool).",
                                       show_default=False)],
    workspace: WorkspaceOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would change; change nothing.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Rewrite the source paths the workspace records (shards, and DataComp npz files read in
    place) from OLD to NEW, for a pool copied or mounted elsewhere (another machine, the nodes of
    a cluster). The workspace's own files need nothing: they are recorded relative to it.

    Refused when a rewritten path does not exist, so a typo changes nothing. Copies that keep
    modification times (`cp -p`, `rsync -a`, the same storage mounted elsewhere) are taken as
    they are; otherwise `ingest` of the new path asks for --replace, and export checks every
    record's header while copying.

    Example: `curate relocate -w ws/ /data/datacomp /mnt/nfs/datacomp`
    """
    setup(json_output, quiet, debug)
    old_p, new_p = _prefix(old), _prefix(new)
    if old_p == new_p:
        raise UsageError("OLD and NEW are the same path")
    ws = Workspace.open(workspace, write=not dry_run)
    try:
        with open_manifest(ws, read_only=dry_run) as m:
            match = "(path = ? OR starts_with(path, ? || '/'))"
            shard_rows = m.execute(f"SELECT path FROM shards WHERE {match}", [old_p, old_p]).fetchall()
            emb_rows = m.execute(f"SELECT DISTINCT path FROM embeddings WHERE {match}", [old_p, old_p]).fetchall()
            moved = sorted({new_p + p[len(old_p):] for (p,) in shard_rows + emb_rows})
            missing = [p for p in moved if not os.path.exists(p)]
            summary = {"old": old_p, "new": new_p, "shards": len(shard_rows), "embedding_files": len(emb_rows),
                       "missing": len(missing), "dry_run": dry_run}
            if not shard_rows and not emb_rows:
                raise UsageError(f"no recorded path starts with {old_p}; `curate status` lists the shards")
            if missing and not dry_run:
                raise UsageError(f"{len(missing):,} of the {len(moved):,} files would not exist under {new_p} "
                                 f"(e.g. {missing[0]}); nothing changed")
            if not dry_run:
                with m.run("relocate", {"old": old_p, "new": new_p}) as rec, m.transaction():
                    for table in ("shards", "embeddings"):
                        m.execute(f"UPDATE {table} SET path = ? || substr(path, length(?) + 1) WHERE {match}",
                                  [new_p, old_p, old_p, old_p])
                    rec.summary = summary
    finally:
        ws.close()
    console.emit(summary, title="relocate")
