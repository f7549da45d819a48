"""`curate train-filter`: train a data filtering network (DFN) on a trusted image-text set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..errors import UsageError
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


@app.command("train-filter")
def train_filter_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for filter.pt, params.txt, train_log.json.")],
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Trusted webdataset shards or folders "
                                                      "(repeatable).")] = None,
    workspace: WorkspaceOpt = None,
    run: Annotated[Optional[int], typer.Option("--run", help="With -w: train on what this prune run kept.")] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="With --run: the state after this stage.")] = None,
    arch: Annotated[str, typer.Option("--arch", help="open_clip architecture to train from scratch.")] = "curate-tiny-vit",
    init: Annotated[Optional[str], typer.Option("--init", help="Fine-tune from this model spec instead "
                                                "(e.g. ViT-B-32:openai).")] = None,
    epochs: Annotated[int, typer.Option("--epochs")] = 10,
    max_minutes: Annotated[float, typer.Option("--max-minutes", help="Stop after this long (a checkpoint is "
                                                "always written).")] = 30.0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--wd")] = 0.1,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up steps.")] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    val_fraction: Annotated[float, typer.Option("--val-fraction")] = 0.1,
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when one is visible, bf16 autocast where "
                                        "supported) | cpu | cuda | cuda:N.")] = "auto",
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Train (or fine-tune) an open_clip model as a data filtering network on trusted data.

    The trusted set is webdataset shards (`--data`) or a workspace's samples (`-w`, optionally
    what prune run `--run` kept). The checkpoint scores pools with
    `curate score --model OUT/filter.pt` (the architecture is read from OUT/params.txt).

    Example: `curate train-filter --data trusted-shards/ --out filters/dfn-tiny --arch curate-tiny-vit --max-minutes 2`
    """
    setup(json_output, quiet, debug)
    from ..models.train_filter import samples_from_shards, samples_from_workspace, train_filter

    if bool(data) == (workspace is not None or run is not None):
        raise UsageError("give the trusted set either as --data SHARDS or as -w WORKSPACE [--run ID]")
    if data:
        samples = samples_from_shards(data)
    else:
        from ..manifest import open_manifest
        from ..workspace import Workspace

        ws = Workspace.open(workspace, write=False)
        with open_manifest(ws, read_only=True) as m:
            samples = samples_from_workspace(m, run, stage)
    summary = train_filter(samples, out, arch=arch, init=init, epochs=epochs, max_minutes=max_minutes,
                           batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup, seed=seed,
                           val_fraction=val_fraction, cache_dir=cache_dir, device=device)
    console.emit(summary, title="train-filter")
