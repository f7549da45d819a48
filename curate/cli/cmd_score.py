"""`curate score`: CLIP/DFN embeddings and image-text scores for every sample with an image."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from .. import console
from ..manifest import open_manifest
from ..workspace import Workspace
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


@app.command()
def score(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model spec (repeatable): ARCH:PRETRAINED, "
                                             "hf-hub:ORG/NAME, an alias (dfn, l14, b32), ARCH@CHECKPOINT, or a "
                                             "checkpoint path. See docs/models.md.")],
    workspace: WorkspaceOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Scorer name (one --model only).")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture for a bare checkpoint path.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N, or a comma list "
                                        "(cuda:0,cuda:2; cpu,cpu runs the multi-device path on the CPU): one "
                                        "worker process per device. auto uses every visible GPU, else the CPU.")]
    = "auto",
    retries: Annotated[int, typer.Option("--retries", help="Times a device worker that dies or fails is started "
                                         "again on its unfinished shards (several devices).")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per batch (GPU chunks back off on OOM).")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers decoding and resizing.")] = max(1, min(8, (os.cpu_count() or 2) - 1)),
    flip: Annotated[bool, typer.Option("--flip", help="Also score the horizontally flipped image (stored as "
                                       "scorer NAME:flip): text rendered in images inflates CLIP scores, "
                                       "mirroring breaks that.")] = False,
    preprocess: Annotated[str, typer.Option("--preprocess", help="fast (measured-equivalent, ~2x) or exact "
                                            "(open_clip's own transform).")] = "fast",
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir", help="Where model weights are cached "
                                                     "(default: the Hugging Face cache).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rescore shards that are already done.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Score every image-caption pair with one or more CLIP/DFN models in a single pass.

    Images are decoded once per batch and fed to every model. Embeddings (fp16, L2-normalised)
    go to `WS/embeddings/`, cosine scores (fp32) to the manifest. Finished shards are never
    recomputed: an interrupted run resumes where it stopped. Undecodable images and empty
    captions are recorded per sample and never abort a shard. DataComp pools need no scoring:
    their `datacomp-b32`/`datacomp-l14` scorers come with ingest.

    Examples:
      `curate score -w ws/ --model ViT-L-14:datacomp_xl_s13b_b90k --model dfn --flip`
      `curate score -w ws/ --model dfn --device cuda:0,cuda:1 --workers 6`
    """
    setup(json_output, quiet, debug)
    if preprocess not in ("fast", "exact"):
        from ..errors import UsageError
        raise UsageError("--preprocess must be fast or exact")
    from ..models.specs import parse_specs
    from ..score.runner import ScoreOptions, run_score

    specs = parse_specs(model, arch=arch, name=name)
    for s in specs:
        for note in s.notes:
            console.info(f"[dim]{s.name}: {note}[/dim]")
    opts = ScoreOptions(batch_size=batch_size, workers=workers, flip=flip, preprocess=preprocess)
    ws = Workspace.open(workspace, write=True)
    try:
        with open_manifest(ws) as m:
            params = {"models": [s.canonical for s in specs], "names": [s.name for s in specs], "device": device,
                      "batch_size": batch_size, "workers": workers, "flip": flip, "preprocess": preprocess,
                      "force": force, "retries": retries}
            with m.run("score", params) as rec:
                summary = run_score(ws, m, specs, device=device, cache_dir=cache_dir, opts=opts, force=force,
                                    run_id=rec.run_id, retries=retries)
                rec.summary = summary
    finally:
        ws.close()
    console.emit({"run_id": rec.run_id, **summary}, title="score")
