"""`curate prune`: run a recipe of filters, dedup and budget stages; record every decision."""

from __future__ import annotations

import shutil
from typing import Annotated, Optional

import typer

from .. import console
from ..manifest import open_manifest
from ..workspace import Workspace
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


@app.command()
def prune(
    pipeline: Annotated[str, typer.Option("--pipeline", "--recipe", "-p", help="Recipe: a TOML path, a shipped "
                                          "name (datacomp_basic, dbp, ...) or a DataComp baseline name "
                                          "(no_filter, basic_filter, text_based, image_based, "
                                          "image_based_intersect_clip_score, clip_score, laion2b).")],
    workspace: WorkspaceOpt = None,
    budget: Annotated[Optional[str], typer.Option(
        "--budget", "-b", help="Samples to keep at the budget stage: a count (50000) or a fraction (0.3) of "
                               "what reaches it.")] = None,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a parameter: ID.PARAM=VALUE (repeatable), or seed=N.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and print the funnel; record nothing.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Run a pruning recipe over the workspace's samples.

    Each stage sees what the previous one kept and decides keep/drop per sample with a
    reason, the value and the threshold; all of it goes to the manifest's `decisions` table,
    with the run's fully resolved parameters in `runs`.

    Example: `curate prune -w ws/ --pipeline datacomp_clip_l14_30 --set clip_score.fraction=0.2`
    """
    setup(json_output, quiet, debug)
    from ..executors.local import run_pipeline
    from ..recipes import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe(pipeline), sets or [])
    ws = Workspace.open(workspace, write=not dry_run)
    try:
        with open_manifest(ws, read_only=dry_run) as m:
            params = {"recipe": recipe.as_dict(), "budget": budget, "dry_run": dry_run}
            if dry_run:
                summary = run_pipeline(ws, m, recipe, 0, budget=budget, record=False)
                run_id = None
            else:
                for gone in m.clear_unfinished("prune"):  # and their artefacts, as `curate runs --drop` does
                    shutil.rmtree(ws.run_path(gone), ignore_errors=True)
                # Decisions are committed stage by stage (one transaction for a 10M-sample run
                # would hold all of them in memory); the run is 'ok' only once all are in, and
                # readers only take 'ok' runs. A failed or interrupted run's decisions are
                # deleted here, or by the next prune when the process was killed.
                with m.run("prune", params, seed=recipe.seed) as rec:
                    try:
                        summary = run_pipeline(ws, m, recipe, rec.run_id, budget=budget)
                    except BaseException:
                        m.discard_decisions(rec.run_id)
                        raise
                    rec.summary = summary
                run_id = rec.run_id
    finally:
        ws.close()
    summary = {"run_id": run_id, **summary}
    if console.state.json:
        console.emit(summary)
        return
    console.print_table(f"prune: {recipe.name}" + (" (dry run, nothing recorded)" if dry_run else f" (run {run_id})"),
                        ["stage", "in", "kept", "dropped", "seconds", "top reasons"],
                        [(f["stage"], f["in"], f["kept"], f["dropped"], f["seconds"],
                          ", ".join(f"{r['reason']} {r['n']:,}" for r in f["top_reasons"])) for f in summary["funnel"]])
    console.stdout.print(f"kept {summary['kept']:,} of {summary['pool']:,} ({summary['kept_fraction']:.2%})")
