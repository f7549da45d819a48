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
    dc_n: Annotated[int, typer.Option("--datacomp-n", help="Rows of the DataComp-layout pool.")] = 30000,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Run the pipeline end to end on synthetic pools: synth → ingest → train a filter on a clean
    pool → score the noisy pool with it (ROC-AUC against the synth truth) → caption-quality
    pruning (recall and false drops against the truth) → on a DataComp-layout pool: exact dedup,
    SemDeDup and DBP to a budget vs a random subset (duplicate recall, cluster balance of DBP's
    quotas filled hardest-first and at random, cache reuse
    on a rerun with a new eps and budget) → export (webdataset shards + DataComp
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

    # A DataComp-layout pool (embeddings with long-tailed concept clusters and planted
    # duplicates): dedup + DBP to a budget, against a random subset of the same size.
    dc, dcws = workdir / "datacomp-pool", workdir / "datacomp-ws"
    _step(["synth", str(dc), "--layout", "datacomp", "--n", str(dc_n), "--seed", str(seed), "--shard-size", "10000"])
    _step(["ingest", str(dc), "-w", str(dcws)])
    budget = str(dc_n // 5)
    _step(["prune", "-w", str(dcws), "--pipeline", "dbp", "--budget", str(dc_n // 4)])
    # New eps and budget: clustering and pairwise similarities come from the cache.
    _step(["prune", "-w", str(dcws), "--pipeline", "dbp", "--budget", budget, "--set", "semdedup.eps=0.06"])
    # The same quotas, filled at random within each cluster instead of hardest first.
    _step(["prune", "-w", str(dcws), "--pipeline", "dbp", "--budget", budget, "--set", "semdedup.eps=0.06",
           "--set", "dbp.keep=random"])
    _step(["prune", "-w", str(dcws), "--pipeline", "random", "--budget", budget])
    from ..evaluate import cluster_balance, dedup_report

    with open_manifest(Workspace.open(dcws, write=False), read_only=True) as m:
        truth = load_truth(dc)
        runs = [r for (r,) in m.execute("SELECT run_id FROM runs WHERE command = 'prune' AND status = 'ok' "
                                        "ORDER BY run_id").fetchall()]
        dbp_run, quota_run, random_run = runs[-3], runs[-2], runs[-1]
        dd = dedup_report(m, truth, dbp_run, ("exact_dedup", "semdedup"))
        b_dbp, b_quota, b_rand = (cluster_balance(m, truth, r) for r in (dbp_run, quota_run, random_run))
        cached = m.frame("SELECT stage, params FROM stage_stats WHERE run_id = ? AND stage IN ('semdedup', 'dbp')",
                         [dbp_run])
    console.stdout.print(
        f"[bold]exact + semantic dedup vs planted duplicates:[/bold] recall {dd['recall']:.1%} of "
        f"{dd['planted_duplicates']} copies in {dd['groups']} groups, "
        f"false removals {dd['false_removal_rate']:.2%}, recorded duplicate-of in the same group "
        f"{dd['ref_in_same_group']:.1%}")
    console.stdout.print(
        f"[bold]cluster balance of {b_dbp['kept']:,} kept over {b_dbp['clusters']} truth clusters[/bold] "
        f"(normalised entropy, largest cluster's share, clusters covered):")
    for name, b in (("random subset", b_rand), ("DBP quotas, random within clusters", b_quota),
                    ("DBP quotas, hardest within clusters (dbp.toml)", b_dbp)):
        console.stdout.print(f"  {name}: {b['entropy']:.3f}, {b['max_share']:.1%}, {b['clusters_covered']}")
    import json as _json
    for stage, params in cached.rows():
        st = _json.loads(params).get("stats", {})
        console.stdout.print(f"  second run, {stage}: clustering from {st.get('clustering', '?')}, "
                             f"similarities from {st.get('similarities', 'n/a')}")

    # The kept subset: byte-exact webdataset shards and a DataComp submission.
    _step(["export", "-w", str(ws), "--format", "wds", "--out", str(workdir / "export"), "--shard-size", "500"])
    _step(["export", "-w", str(ws), "--format", "datacomp", "--out", str(workdir / "uids.npy")])
    _step(["verify-submission", str(workdir / "uids.npy"), "-w", str(ws)])
    _step(["status", "-w", str(ws)])
    console.stdout.rule("[bold]demo done")
    console.stdout.print(f"workspace {ws} — {time.perf_counter() - t0:.0f} s in all")
