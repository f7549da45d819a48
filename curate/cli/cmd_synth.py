"""`curate synth`: generate a deterministic synthetic pool (webdataset shards or DataComp metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .. import console
from ..errors import UsageError
from .common import DebugOpt, JsonOpt, QuietOpt, setup
from .main import app


def _parse_rates(items: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise UsageError(f"--rate takes KIND=RATE (e.g. junk=0.1), got {part!r}")
            k, v = part.split("=", 1)
            try:
                out[k.strip()] = float(v)
            except ValueError:
                raise UsageError(f"--rate {k.strip()}: {v!r} is not a number") from None
    return out


def _parse_dims(text: str) -> tuple[int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2 or min(parts) < 1:
        raise UsageError(f"--dims takes two positive sizes B32,L14 (e.g. 512,768), got {text!r}")
    return parts  # type: ignore[return-value]


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the pool into (must be empty unless --overwrite).",
                                        show_default=False)],
    layout: Annotated[str, typer.Option("--layout", help="wds (img2dataset tars with images) or datacomp "
                                                         "(parquet + npz embeddings).")] = "wds",
    n: Annotated[int, typer.Option("--n", help="Records to generate (failed downloads and duplicates included).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Same seed and options give byte-identical files.")] = 0,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="Records per shard [default: 1000 wds, "
                                                      "100000 datacomp].", show_default=False)] = None,
    name_digits: Annotated[Optional[int], typer.Option("--name-digits", help="Zero-padding of shard names "
                                                       "[default: 5 wds (img2dataset), 10 datacomp].",
                                                       show_default=False)] = None,
    no_uid: Annotated[bool, typer.Option("--no-uid", help="wds: leave `uid` out of the json and parquet sidecar.")] = False,
    compressed: Annotated[bool, typer.Option("--compressed", help="datacomp: deflate the npz "
                                             "(np.savez_compressed format).")] = False,
    dims: Annotated[str, typer.Option("--dims", help="datacomp: embedding sizes B32,L14.")] = "512,768",
    clusters: Annotated[int, typer.Option("--clusters", help="Concept clusters (concept/colour/background "
                                          "combinations) with long-tailed sizes.")] = 300,
    rate: Annotated[Optional[List[str]], typer.Option("--rate", help="Defect rate KIND=RATE, repeatable "
                                                      "(e.g. --rate junk=0.1 --rate corrupt=0); see docs/synth.md.",
                                                      show_default=False)] = None,
    no_defects: Annotated[bool, typer.Option("--no-defects", help="All defect rates 0 (then --rate may enable some).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty OUT, first removing the "
                                            "shard files a previous synth left there.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Generate a deterministic synthetic pool with ground truth, for tests, the demo and benchmarks.

    `wds` writes img2dataset-style shards (NNNNN.tar with jpg/txt/json, NNNNN_stats.json,
    NNNNN.parquet) of rendered shapes with captions; `datacomp` writes DataComp metadata
    (<stem>.parquet + <stem>.npz with b32/l14 embeddings). Both inject real-world defects
    (mismatched, non-English and junk captions, small and wide images, exact and near
    duplicates, and for wds corrupt, truncated, non-image and missing payloads) and record
    what every record really is in OUT/_truth.parquet.

    Example: `curate synth pool/ --layout wds --n 2000 --seed 0`
    """
    setup(json_output, quiet, debug)
    from ..synth import generate

    summary = generate(out, layout=layout, n=n, seed=seed, shard_size=shard_size, name_digits=name_digits,
                       no_uid=no_uid, compressed=compressed, dims=_parse_dims(dims), clusters=clusters,
                       rates=_parse_rates(rate), no_defects=no_defects, overwrite=overwrite)
    if not console.state.json:   # the table: no rate list, booleans as words
        summary = {k: ("yes" if v else "no") if isinstance(v, bool) else v
                   for k, v in summary.items() if k != "rates" and not (k == "dims" and v is None)}
    console.emit(summary, title=f"synth {layout}: {summary['records']:,} records in {summary['shards']:,} shards")
