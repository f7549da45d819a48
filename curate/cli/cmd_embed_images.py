"""`curate embed-images`: embed an evaluation image folder for decontamination."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from .common import DebugOpt, JsonOpt, QuietOpt, setup
from .main import app


@app.command("embed-images")
def embed_images(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="The same model spec the pool was scored with.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npy (a .files.txt listing goes beside it).")],
    device: Annotated[str, typer.Option("--device")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir")] = None,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Embed a folder of images (e.g. an evaluation set) with the model the pool was scored with,
    for the `decontaminate` stage (`--set decontaminate.eval_embeddings=OUT.npy`).

    Example: `curate embed-images imagenet-val/ --model ViT-L-14:datacomp_xl_s13b_b90k --out imagenet-val.npy`
    """
    setup(json_output, quiet, debug)
    from ..models.specs import parse_spec
    from ..score.embed_folder import embed_folder

    summary = embed_folder(folder, out, parse_spec(model), device=device, batch_size=batch_size, cache_dir=cache_dir)
    console.emit(summary, title="embed-images")
