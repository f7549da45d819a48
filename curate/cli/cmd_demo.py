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
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Run the pipeline end to end on a synthetic pool: synth → ingest → status.

    Example: `curate demo --workdir /tmp/demo`
    """
    setup(False, quiet, debug)
    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    pool, ws = workdir / "pool", workdir / "ws"
    _step(["synth", str(pool), "--layout", "wds", "--n", str(n), "--seed", str(seed)])
    _step(["ingest", str(pool), "-w", str(ws)])
    _step(["ingest", str(pool), "-w", str(ws), "--quiet"])  # a rerun adds nothing
    _step(["status", "-w", str(ws)])
    console.stdout.rule("[bold]demo done")
    console.stdout.print(f"workspace {ws} — {time.perf_counter() - t0:.0f} s in all")
