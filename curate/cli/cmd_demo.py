"""`curate demo`: the whole pipeline that exists, offline, on CPU, on a generated pool.

Each step is the real command a user would type, run in this process and printed first, so
the demo doubles as a tour. Grows with every capability (see README's table).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from .. import console
from .common import DebugOpt, QuietOpt, setup
from .main import app


def _step(args: list[str]) -> None:
    from .main import main

    console.stdout.rule(f"[bold]$ curate {' '.join(args)}")
    rc = main(args)
    if rc not in (0,):
        raise typer.Exit(rc)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the pool and the workspace go (replaced).")] = Path("demo-out"),
    n: Annotated[int, typer.Option("--n", help="Samples in the generated pool.")] = 2000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    train_minutes: Annotated[float, typer.Option("--train-minutes", help="Time budget for the filter network.")] = 1.5,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Run the pipeline end to end on synthetic pools: synth → ingest → train a filter on a clean
    pool → score the noisy pool with it (ROC-AUC against the synth truth) → caption-quality
    pruning (recall and false drops against the truth) → export (webdataset shards + DataComp
    uids, verified) → status.

    Example: `curate demo --workdir /tmp/demo`
    """
    setup(False, quiet, debug)
    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    pool, ws = workdir / "pool", workdir / "ws"
    trusted, filt = workdir / "trusted", workdir / "filter"
    _step(["synth", str(pool), "--layout", "wds", "--n", str(n), "--seed", str(seed)])
    _step(["ingest", str(pool), "-w", str(ws)])
    _step(["ingest", str(pool), "-w", str(ws), "--quiet"])  # a rerun adds nothing

    # A data filtering network: a tiny CLIP trained for at most ~2 minutes on a clean pool.
    _step(["synth", str(trusted), "--layout", "wds", "--n", "1500", "--seed", str(seed + 1000), "--no-defects"])
    _step(["train-filter", "--data", str(trusted), "--out", str(filt), "--arch", "curate-tiny-vit",
           "--epochs", "30", "--batch-size", "64", "--max-minutes", str(train_minutes), "--seed", str(seed)])
    _step(["score", "-w", str(ws), "--model", f"{filt / 'filter.pt'},name=dfn-demo", "--device", "cpu"])
    from ..evaluate import caption_match_auc, load_truth
    from ..manifest import open_manifest
    from ..workspace import Workspace

    with open_manifest(Workspace.open(ws, write=False), read_only=True) as m:
        auc = caption_match_auc(m, load_truth(pool), "dfn-demo")
    console.stdout.print(
        f"[bold]trained filter vs synth truth:[/bold] ROC-AUC {auc['auc_matched_vs_mismatched']:.3f} separating "
        f"{auc['matched']:,} matched from {auc['mismatched']:,} mismatched captions (0.5 = chance)")

    # Caption quality: catch the injected junk and non-English captions.
    _step(["prune", "-w", str(ws), "--pipeline", "caption_quality"])
    from ..evaluate import caption_filter_report
    from ..selection import resolve_run

    with open_manifest(Workspace.open(ws, write=False), read_only=True) as m:
        rep = caption_filter_report(m, load_truth(pool), resolve_run(m, None))
    console.stdout.print(
        f"[bold]caption_quality vs synth truth:[/bold] junk recall {rep['junk_recall']:.1%} (of {rep['junk']}), "
        f"non-English recall {rep['non_english_recall']:.1%} (of {rep['non_english']}), "
        f"false drops on clean captions {rep['clean_false_drop_rate']:.1%} (of {rep['clean']})")

    # The kept subset: byte-exact webdataset shards and a DataComp submission.
    _step(["export", "-w", str(ws), "--format", "wds", "--out", str(workdir / "export"), "--shard-size", "500"])
    _step(["export", "-w", str(ws), "--format", "datacomp", "--out", str(workdir / "uids.npy")])
    _step(["verify-submission", str(workdir / "uids.npy"), "-w", str(ws)])
    _step(["status", "-w", str(ws)])
    console.stdout.rule("[bold]demo done")
    console.stdout.print(f"workspace {ws} — {time.perf_counter() - t0:.0f} s in all")
