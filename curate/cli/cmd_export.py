"""`curate export`: write a selection as webdataset shards, a DataComp submission or a parquet
table; `curate verify-submission`: check a DataComp uid file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..errors import UsageError
from ..manifest import open_manifest
from ..workspace import Workspace
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="wds: a directory of shards; datacomp: the .npy file; "
                                                          "parquet: the .parquet file.", show_default=False)],
    workspace: WorkspaceOpt = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="wds | datacomp | parquet")] = "wds",
    run: Annotated[Optional[int], typer.Option("--run", help="The prune run to export (default: the latest "
                                                             "finished one).")] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Export the state after this stage of the run "
                                                                 "(its id or index) instead of the run's result.")] = None,
    all_samples: Annotated[bool, typer.Option("--all", help="Export every usable sample of the pool (no prune run).")] = False,
    shard_size: Annotated[int, typer.Option("--shard-size", help="wds: samples per output shard.")] = 10_000,
    shuffle: Annotated[bool, typer.Option("--shuffle", help="wds: permute the samples (seeded) before sharding.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="wds: seed of --shuffle.")] = 0,
    add_json: Annotated[bool, typer.Option("--add-json", help="wds: add the sample's scores and the run's decisions to "
                                                              "its json member (under \"curate\").")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="wds: processes writing shards "
                                                                     "(default: min(4, cores)).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous export at --out (wds: removes "
                                                                "its shards and nothing else).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be written; write nothing.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Export the kept samples of a prune run (or the state after one of its stages).

    `wds` copies every kept sample's original tar members byte for byte into contiguous shards
    `00000000.tar, 00000001.tar, ...` with `sizes.json` for open_clip's `--train-data`; an
    interrupted export rerun with the same arguments finishes the missing shards. `datacomp`
    writes the sorted uid array DataComp's resharder takes (verified before it is renamed into
    place). `parquet` writes the samples with metadata, scores and clusters.

    Example: `curate export -w ws/ --out shards/ --shard-size 10000` or `curate export -w ws/ --format datacomp --out uids.npy`
    """
    setup(json_output, quiet, debug)
    from ..export import FORMATS
    from ..export.select import resolve_selection

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "wds":
        given = [o for o, v in (("--shuffle", shuffle), ("--add-json", add_json), ("--workers", workers is not None),
                                ("--shard-size", shard_size != 10_000)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to --format wds")
    if shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")
    params = {"format": fmt, "out": str(out.expanduser().absolute()), "run": run, "stage": stage, "all": all_samples,
              "shard_size": shard_size if fmt == "wds" else None, "shuffle": shuffle, "seed": seed,
              "add_json": add_json, "workers": workers, "overwrite": overwrite}
    ws = Workspace.open(workspace, write=not dry_run)
    try:
        with open_manifest(ws, read_only=dry_run) as m:
            sel = resolve_selection(m, run, stage, all_samples)
            params.update({"run": sel.run_id, "stage_idx": sel.stage_idx, "stage": sel.stage})
            if dry_run:
                summary = _export(ws, m, sel, fmt, out, params, dry_run=True)
            else:
                with m.run("export", params, seed=seed if shuffle else None) as rec:
                    summary = _export(ws, m, sel, fmt, out, params, dry_run=False)
                    rec.summary = summary
                summary = {"run_id": rec.run_id, **summary}
    finally:
        ws.close()
    if dry_run:
        summary["dry_run"] = True
    console.emit(summary, title=f"export ({fmt})" + (" — dry run, nothing written" if dry_run else ""))


def _export(ws, m, sel, fmt: str, out: Path, params: dict, *, dry_run: bool) -> dict:
    import time

    t0 = time.perf_counter()
    if fmt == "wds":
        from ..export.wds import WdsOptions, export_wds

        opts = WdsOptions(out=out, shard_size=params["shard_size"], shuffle=params["shuffle"], seed=params["seed"],
                          add_json=params["add_json"], workers=params["workers"], overwrite=params["overwrite"])
        summary = export_wds(ws, m, sel, opts, dry_run=dry_run)
    elif fmt == "datacomp":
        from ..export.datacomp import write_submission

        summary = write_submission(m, sel, out, overwrite=params["overwrite"], dry_run=dry_run)
    else:
        from ..export.parquet import export_parquet

        summary = export_parquet(m, sel, out, params=params, overwrite=params["overwrite"], dry_run=dry_run)
    if not dry_run:
        secs = time.perf_counter() - t0
        summary["seconds"] = round(secs, 3)
        if fmt == "wds" and secs > 0:
            summary["mb_per_s"] = round(summary["bytes_written"] / secs / 1e6, 1)
    if "pattern" in summary:
        summary["pattern"] = summary.pop("pattern")  # last: what to paste into --train-data
    return summary


@app.command("verify-submission")
def verify_submission(
    file: Annotated[Path, typer.Argument(help="The DataComp submission to check: a .npy, or the headerless "
                                              "u8,u8 memory map DataComp's resharder also reads.",
                                         show_default=False)],
    workspace: Annotated[Optional[Path], typer.Option(
        "-w", "--workspace", help="Also check that every uid is in this workspace's pool.", show_default=False)] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Treat repeated uids as an error.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Check a DataComp submission (`np.save`d, or headerless raw `u8,u8` records as DataComp's
    resharder also reads them; the report's `layout` says which): dtype `u8,u8`, sorted ascending, repeated uids (a warning:
    DataComp reads them as repeated samples; an error with --strict), and with -w membership
    in the pool. Prints its size. Exit 1 when it is invalid.

    Example: `curate verify-submission uids.npy -w ws/`
    """
    setup(json_output, quiet, debug)
    from ..export.datacomp import verify_submission as verify

    if not file.exists():
        raise UsageError(f"{file}: no such file")
    if workspace is not None:
        ws = Workspace.open(workspace, write=False)
        try:
            with open_manifest(ws, read_only=True) as m:
                report = verify(file, m, strict=strict)
        finally:
            ws.close()
    else:
        report = verify(file, None, strict=strict)
    for w in report["warnings"]:
        console.warn(w)
    if not console.state.json:
        for e in report["errors"]:
            console.error_line(e)
    console.emit(report, title="submission " + ("valid" if report["ok"] else "INVALID"))
    if not report["ok"]:
        raise typer.Exit(1)
