"""`curate synth`: deterministic synthetic pools for tests, the demo and benchmarks.

    from curate.synth import generate
    summary = generate("pool/", layout="wds", n=2000, seed=0)

Two layouts:

* ``wds``: img2dataset-style webdataset shards (``NNNNN.tar`` + ``NNNNN_stats.json`` +
  ``NNNNN.parquet``) with real rendered images (coloured shapes on textured backgrounds) and
  captions that name them, plus injected real-world defects.
* ``datacomp``: DataComp metadata (``<stem>.parquet`` + ``<stem>.npz``) with CLIP-like
  embeddings (cluster structure, matched/mismatched pairs, duplicate groups) and scores.

Both write ``OUT/_truth.parquet``: what each record really is, with the generation parameters
in its schema metadata (`read_params`). Same (layout, n, seed, options) -> byte-identical files.
See docs/synth.md.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from .. import __version__, console
from ..errors import UsageError
from . import captions as C
from .plan import (CAPTION_RATE_KEYS, DATACOMP_IMAGE_KINDS, DEFAULT_RATES, IK, IMAGE_KINDS, IMAGE_RATE_KEYS,
                   ShardPlan, assign_kinds, make_world, max_clusters, rng_for)
from .truth import TRUTH_NAME, TRUTH_SCHEMA, truth_table
from .writers import ParquetStream

__all__ = ["generate", "DEFAULT_RATES", "LAYOUTS", "IMAGE_KINDS", "CAPTION_KINDS", "TRUTH_NAME", "TRUTH_SCHEMA",
           "PARAMS_KEY", "default_rates", "read_params"]

LAYOUTS = ("wds", "datacomp")
CAPTION_KINDS = C.CAPTION_KINDS
PARAMS_KEY = b"curate.synth"   # key of the parameters in _truth.parquet's schema metadata
DEFAULT_SHARD_SIZE = {"wds": 1000, "datacomp": 100_000}
DEFAULT_NAME_DIGITS = {"wds": 5, "datacomp": 10}
DEFAULT_DIMS = (512, 768)
DEFAULT_CLUSTERS = 300

# Files `generate` owns in OUT (removed by overwrite=True); anything else is left alone.
_OWNED = re.compile(r"^(\d+\.(tar|parquet|npz)|\d+_stats\.json|_truth\.parquet|\..*\.partial.*)$")


def default_rates(layout: str = "wds") -> dict[str, float]:
    """The default defect rates of a layout (image-payload defects are wds-only)."""
    if layout == "wds":
        return dict(DEFAULT_RATES)
    return {k: v for k, v in DEFAULT_RATES.items() if k in CAPTION_RATE_KEYS or k in DATACOMP_IMAGE_KINDS}


def _resolve_rates(layout: str, rates: dict[str, float] | None, no_defects: bool) -> dict[str, float]:
    out = default_rates(layout)
    if no_defects:
        out = {k: 0.0 for k in out}
    for k, v in (rates or {}).items():
        if k not in DEFAULT_RATES:
            raise UsageError(f"unknown defect rate {k!r}; known: {', '.join(DEFAULT_RATES)}")
        if layout == "datacomp" and k not in out:
            if float(v) > 0:
                raise UsageError(f"defect {k!r} needs image payloads; the datacomp layout has only "
                                 f"{', '.join(CAPTION_RATE_KEYS + DATACOMP_IMAGE_KINDS)}")
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise UsageError(f"rate {k}={v!r} is not a number") from None
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"rate {k}={v} must be between 0 and 1")
        out[k] = v
    if sum(out.get(k, 0.0) for k in CAPTION_RATE_KEYS) > 0.9:
        raise UsageError("caption defect rates add up to more than 0.9")
    if sum(out.get(k, 0.0) for k in IMAGE_RATE_KEYS) > 0.9:
        raise UsageError("image defect rates add up to more than 0.9")
    return out


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir():
        entries = list(out.iterdir())
        if entries and not overwrite:
            raise UsageError(f"{out} is not empty; pass --overwrite to replace the pool in it")
        if overwrite:
            others = []
            for p in entries:
                if p.is_file() and _OWNED.match(p.name):
                    p.unlink()
                else:
                    others.append(p.name)
            if others:
                console.warn(f"{out}: left {len(others)} entries synth did not write ({', '.join(sorted(others)[:3])}...)")
    out.mkdir(parents=True, exist_ok=True)


def generate(out: str | Path, layout: str = "wds", n: int = 1000, seed: int = 0, *,
             shard_size: int | None = None, name_digits: int | None = None, no_uid: bool = False,
             compressed: bool = False, dims: tuple[int, int] = DEFAULT_DIMS, clusters: int = DEFAULT_CLUSTERS,
             rates: dict[str, float] | None = None, no_defects: bool = False, overwrite: bool = False,
             on_progress: Callable[[int, int], None] | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Generate a synthetic pool in `out` and return its summary (counts per defect kind).

    layout      "wds" (webdataset tars with images) or "datacomp" (parquet + npz embeddings)
    n           records, including failed downloads (wds) and duplicates
    seed        everything is a function of (layout, n, seed, options)
    shard_size  records per shard (default 1000 wds, 100000 datacomp)
    name_digits zero-padding of shard names (default 5 wds like img2dataset, 10 datacomp)
    no_uid      wds: leave `uid` out of the json/parquet sidecar (ingest derives uids)
    compressed  datacomp: write the npz with deflate (np.savez_compressed format)
    dims        datacomp: (b32, l14) embedding dimensions; the real ones by default
    clusters    concept clusters of the world (distinct concept/colour/background combinations)
    rates       defect rates overriding the defaults, e.g. {"junk": 0.1, "corrupt": 0}
    no_defects  start from all rates 0 (then `rates` may enable some)
    overwrite   allow a non-empty `out`: files synth owns there are removed first
    on_progress callback(done, total) after each record batch
    """
    t0 = time.perf_counter()
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    n, seed = int(n), int(seed)
    if n < 1:
        raise UsageError("--n must be at least 1")
    if seed < 0:
        raise UsageError("--seed must be >= 0")
    shard_size = int(shard_size or DEFAULT_SHARD_SIZE[layout])
    if shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    digits = int(name_digits or DEFAULT_NAME_DIGITS[layout])
    if not 1 <= digits <= 16:
        raise UsageError("--name-digits must be between 1 and 16")
    n_shards = -(-n // shard_size)
    if n_shards > 10 ** digits:
        raise UsageError(f"{n_shards} shards do not fit in {digits}-digit names; raise --name-digits")
    dims = tuple(int(d) for d in dims)
    if len(dims) != 2 or min(dims) < 1:
        raise UsageError("--dims takes two positive sizes: B32,L14 (e.g. 512,768)")
    if not 1 <= clusters <= max_clusters():
        raise UsageError(f"--clusters must be between 1 and {max_clusters()}")
    if layout == "wds" and compressed:
        raise UsageError("--compressed applies to the datacomp layout only")
    if layout == "datacomp" and no_uid:
        raise UsageError("--no-uid applies to the wds layout only (DataComp metadata always has uids)")
    rates = _resolve_rates(layout, rates, no_defects)
    out = Path(out).expanduser().absolute()
    _prepare_out(out, overwrite)

    world = make_world(seed, clusters)
    rk = rng_for(seed, 0x4B)
    image_keys = IMAGE_RATE_KEYS if layout == "wds" else DATACOMP_IMAGE_KINDS
    img_codes = assign_kinds(n, rates, image_keys, IK, rk)
    cap_codes = assign_kinds(n, rates, CAPTION_RATE_KEYS, {k: i + 1 for i, k in enumerate(CAPTION_RATE_KEYS)}, rk)

    scorers = sem = None
    if layout == "wds":
        from .wds import write_shard as write_wds
    else:
        from .datacomp import write_shard as write_dc
        from .embed import Scorer, Semantics
        sem = Semantics(seed, world)
        scorers = {"b32": Scorer("b32", dims[0], seed, sem), "l14": Scorer("l14", dims[1], seed, sem)}

    cap_counts: Counter[str] = Counter()
    img_counts: Counter[str] = Counter()
    n_clean = n_matched = demoted = 0
    params = {"layout": layout, "n": n, "seed": seed, "shard_size": shard_size, "name_digits": digits,
              "no_uid": no_uid, "compressed": compressed, "dims": list(dims) if layout == "datacomp" else None,
              "clusters": clusters, "rates": rates, "generator": f"curate {__version__}"}
    schema = TRUTH_SCHEMA.with_metadata({PARAMS_KEY: json.dumps(params, sort_keys=True).encode()})
    truth = ParquetStream(out / TRUTH_NAME, schema)
    ok = False
    done = 0
    try:
        with (console.progress() if show_progress else _nullcontext()) as bar:
            task = bar.add_task(f"synth {layout}", total=n) if bar is not None else None

            def advance(k: int) -> None:
                nonlocal done
                done += k
                if bar is not None:
                    bar.advance(task, k)
                if on_progress is not None:
                    on_progress(done, n)

            reservoir = None
            for s in range(n_shards):
                a, b = s * shard_size, min(n, (s + 1) * shard_size)
                shard_name = f"{s:0{digits}d}.tar" if layout == "wds" else f"{s:0{digits}d}.parquet"
                plan = ShardPlan(layout=layout, seed=seed, shard=s, start=a, img_kind=img_codes[a:b],
                                 cap_kind=cap_codes[a:b], world=world, shard_size=shard_size, digits=digits,
                                 shard_name=shard_name, reservoir=reservoir)
                if layout == "wds":
                    _stats, reservoir = write_wds(plan, out, seed=seed, digits=digits, no_uid=no_uid,
                                                  reservoir=reservoir, advance=advance)
                else:
                    reservoir = write_dc(plan, out, seed=seed, digits=digits, scorers=scorers, sem=sem,
                                         compressed=compressed, reservoir=reservoir, advance=advance)
                tt = truth_table(plan)
                truth.write(tt)
                cap_counts.update(c.split(":")[0] for c in plan.captions.kind)
                img_counts.update(k.split(":")[0] for k in plan.image_kind_names())
                n_clean += int(((plan.cap_kind == 0) & (plan.img_kind == 0)).sum())
                n_matched += int(plan.matched.sum())
                demoted += plan.demoted
        ok = True
    finally:
        truth.close(ok)

    counts = {
        "records": n, "shards": n_shards, "clean": n_clean, "matched": n_matched,
        "caption_kinds": {k: cap_counts.get(k, 0) for k in CAPTION_KINDS},
        "image_kinds": {k: img_counts.get(k, 0) for k in (IMAGE_KINDS if layout == "wds" else ("ok",) + DATACOMP_IMAGE_KINDS)},
        "duplicates_without_original": demoted,
    }
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and _OWNED.match(p.name))
    params.pop("generator")
    return {"out": str(out), **params, **counts, "clean_fraction": round(n_clean / n, 4), "bytes": size,
            "seconds": round(time.perf_counter() - t0, 2)}


def read_params(out: str | Path) -> dict[str, Any]:
    """The parameters a pool was generated with (from its _truth.parquet schema metadata)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(Path(out) / TRUTH_NAME).metadata or {}
    if PARAMS_KEY not in meta:
        raise UsageError(f"{out}: {TRUTH_NAME} carries no synth parameters")
    return json.loads(meta[PARAMS_KEY])


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
