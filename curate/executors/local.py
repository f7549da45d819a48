"""The local executor: feeds a recipe's stages from the manifest and records their decisions.

Row-scope stages get the surviving samples in partitions (bounded memory); global stages get
them all at once. After each stage: its decisions go to `decisions` (one row per sample it
saw), its funnel line to `stage_stats`, its artefacts to `runs/<run_id>/`; the next stage sees
only what it kept. The whole run is one transaction: an interrupted prune leaves nothing
half-recorded.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .. import console
from ..embeddings import open_view
from ..errors import CurateError, UsageError
from ..recipes import Recipe
from ..stages.base import DECISION_COLUMNS, Stage, StageInput, get_stage
from ..workspace import atomic_path, atomic_save_npy

ROW_PARTITION = 1_000_000


class ArrayCache:
    """`StageInput.cache`: named groups of numpy arrays under WS/cache/<key>/, written atomically."""

    def __init__(self, root: Path):
        self.root = root

    def _dir(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.root / safe

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        d = self._dir(key)
        if not (d / "_complete.json").exists():
            return None
        names = json.loads((d / "_complete.json").read_text())["arrays"]
        return {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in names}

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        for n, a in arrays.items():
            atomic_save_npy(d / f"{n}.npy", np.asarray(a))
        with atomic_path(d / "_complete.json") as tmp:
            tmp.write_text(json.dumps({"arrays": sorted(arrays)}))


@dataclass
class StageOutcome:
    idx: int
    id: str
    stage: str
    n_in: int
    n_kept: int
    seconds: float
    params: dict
    stats: dict = field(default_factory=dict)
    top_reasons: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"stage": self.id, "in": self.n_in, "kept": self.n_kept, "dropped": self.n_in - self.n_kept,
                "seconds": round(self.seconds, 3), "top_reasons": self.top_reasons, **({"stats": self.stats} if self.stats else {})}


def resolve_budget(budget: str | float | int | None, n: int) -> int | None:
    """A count ('50000') or a fraction of what reaches the budget stage ('0.3')."""
    if budget is None:
        return None
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise UsageError(f"--budget {budget!r}: give a count (50000) or a fraction (0.3)") from None
    if b <= 0 or math.isnan(b):
        raise UsageError(f"--budget {budget!r} must be positive")
    if b < 1 or (isinstance(budget, str) and "." in budget and b <= 1):
        return int(round(b * n))
    if b != int(b):
        raise UsageError(f"--budget {budget!r}: a count must be a whole number")
    return int(b)


def build_stages(recipe: Recipe) -> list[tuple[str, Stage]]:
    out = []
    for spec in recipe.stages:
        cls = get_stage(spec.stage)
        try:
            st = cls(**spec.params)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"stage {spec.id!r} ({spec.stage}): {exc}") from None
        if spec.apply_to == "pool" and st.uses_budget:
            raise UsageError(f"stage {spec.id!r}: a budget stage cannot use apply_to = \"pool\"")
        st._apply_to = spec.apply_to
        out.append((spec.id, st))
    return out


def load_pool(manifest, scorers: list[str]) -> pl.DataFrame:
    """Every usable sample with its columns and one `score__<scorer>` column per scorer, in
    (shard_id, row_idx) order.

    The table scan keeps insertion order, which is already (shard_id, row_idx) for ingested pools,
    so the sort (and the joins below) are only paid when they change something: decode errors
    are joined only when there are any, and a scorer's scores are attached as a column when they
    were stored in the same uid order as the samples (as `curate ingest` and `curate score` write
    them), joined by uid otherwise.
    """
    frame = manifest.frame(
        "SELECT uid, shard_id, row_idx, key, url, caption, width, height, sha256, source, image_ext, image_bytes, "
        "NULL::VARCHAR AS decode_error FROM samples WHERE status = 'ok'")
    order = pl.col("shard_id").cast(pl.Int64) * (1 << 32) + pl.col("row_idx").cast(pl.Int64)
    key = frame.select(order).to_series()
    if not key.is_sorted():
        frame = frame.sort(["shard_id", "row_idx"], maintain_order=True)
    issues = manifest.frame("SELECT uid, any_value(detail) AS detail FROM sample_issues "
                            "WHERE action = 'unscored' AND reason = 'undecodable' GROUP BY uid")
    if issues.height:
        frame = (frame.drop("decode_error").join(issues.rename({"detail": "decode_error"}), on="uid", how="left",
                                                  maintain_order="left").select(frame.columns))
    for sc in scorers:
        col = manifest.frame("SELECT uid, score FROM scores WHERE scorer = ?", [sc])
        if col.height == 0:
            have = [r[0] for r in manifest.execute("SELECT DISTINCT scorer FROM scores ORDER BY 1").fetchall()]
            raise UsageError(f"no scores of scorer {sc!r} in this workspace (have: {', '.join(have) or 'none'}); "
                             f"run `curate score` or change the recipe's scorer")
        name = f"score__{sc}"
        if col.height == frame.height and col["uid"].equals(frame["uid"]):
            frame = frame.with_columns(col["score"].alias(name))
        else:
            frame = frame.join(col.rename({"score": name}), on="uid", how="left", maintain_order="left")
    return frame


def _check_decisions(sid: str, alive: pl.DataFrame, dec: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("uid", "keep") if c not in dec.columns]
    if missing:
        raise CurateError(f"stage {sid} returned decisions without {missing}")
    for c, t in DECISION_COLUMNS.items():
        dec = dec.with_columns(pl.col(c).cast(t)) if c in dec.columns else dec.with_columns(pl.lit(None, t).alias(c))
    dec = dec.select(list(DECISION_COLUMNS))
    if dec.height == alive.height and dec["uid"].equals(alive["uid"]):
        return dec  # aligned with the input (uids in `alive` are unique): nothing more to check
    if dec.height != alive.height or dec["uid"].n_unique() != dec.height:
        raise CurateError(f"stage {sid} returned {dec.height} decisions for {alive.height} samples")
    if dec.join(alive.select("uid"), on="uid", how="anti").height:
        raise CurateError(f"stage {sid} returned decisions for samples it was not given")
    return dec


def run_pipeline(ws, manifest, recipe: Recipe, run_id: int, *, budget=None, record: bool = True) -> dict:
    stages = build_stages(recipe)
    budget_stages = [sid for sid, st in stages if st.uses_budget]
    if budget is not None and not budget_stages:
        raise UsageError(f"--budget given but recipe {recipe.name} has no budget stage (dbp, ssp, random, ...)")
    if len(budget_stages) > 1:
        raise UsageError(f"recipe {recipe.name} has several budget stages: {budget_stages}")
    scorers = sorted({s for _, st in stages for s in st.needs_scores()})
    alive = load_pool(manifest, scorers)
    pool = alive
    clustering_pool = _Pool(pool)
    n_pool = alive.height
    if n_pool == 0:
        raise UsageError("the workspace has no usable samples; ingest a pool first")
    cache = ArrayCache(ws.root / "cache")
    run_dir = ws.run_dir(run_id) if record else None
    outcomes: list[StageOutcome] = []
    warnings: list[str] = []
    with console.progress() as bar:
        task = bar.add_task("prune", total=len(stages))
        for idx, (sid, stage) in enumerate(stages):
            bar.update(task, description=f"{sid} ({alive.height:,} in)")
            t0 = time.perf_counter()
            b = None
            if stage.uses_budget:
                # --budget wins over the recipe's own `budget` parameter.
                b = resolve_budget(budget if budget is not None else stage.params().get("budget"), alive.height)
                if b is None:
                    raise UsageError(f"stage {sid} needs a budget: pass --budget N or 0.F")
                if b > alive.height:
                    warnings.append(f"budget {b:,} exceeds the {alive.height:,} samples that reach {sid}; all are kept")
            over_pool = stage._apply_to == "pool"
            dec, stats, artefacts = _apply(stage, pool if over_pool else alive, manifest, recipe.seed, b, cache,
                                           None if over_pool else clustering_pool)
            if over_pool:
                full = _check_decisions(sid, pool, dec)
                stats = {**stats, "applied_to": "pool", "kept_over_pool": int(full["keep"].sum())}
                dec = full.join(alive.select("uid"), on="uid", how="semi", maintain_order="left")
            dec = _check_decisions(sid, alive, dec)
            seconds = time.perf_counter() - t0
            kept = dec.filter(pl.col("keep")).select("uid")
            top = (dec.filter(~pl.col("keep")).group_by("reason").len().sort("len", descending=True).head(5)
                   .rows())
            out = StageOutcome(idx, sid, stage.name, alive.height, kept.height, seconds, stage.params(), stats,
                               [{"reason": r, "n": n} for r, n in top])
            outcomes.append(out)
            if record:
                manifest.insert_arrow("decisions", dec.select(
                    pl.lit(run_id, pl.Int64).alias("run_id"), pl.lit(idx, pl.Int32).alias("stage_idx"),
                    pl.lit(sid).alias("stage"), *DECISION_COLUMNS).to_arrow())
                manifest.execute(
                    "INSERT INTO stage_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, idx, sid, out.n_in, out.n_kept, out.n_in - out.n_kept, seconds,
                     json.dumps({"stage": stage.name, "params": stage.params(), "stats": stats}, default=str)])
                _save_artefacts(run_dir, sid, artefacts)
            # Stages return decisions in input order; a mask is much cheaper than a join.
            alive = (alive.filter(dec["keep"]) if dec["uid"].equals(alive["uid"])
                     else alive.join(kept, on="uid", how="semi", maintain_order="left"))
            bar.advance(task)
    for w in warnings:
        console.warn(w)
    return {"recipe": recipe.name, "pool": n_pool, "kept": alive.height,
            "kept_fraction": round(alive.height / n_pool, 6) if n_pool else 0.0,
            "funnel": [o.as_dict() for o in outcomes], "warnings": warnings}


class _Pool:
    """The run's starting pool as clustering stages see it: the samples that have embeddings,
    and the hash of their uid set, computed once per run."""

    def __init__(self, pool: pl.DataFrame):
        self.frame = pool.filter(pl.col("decode_error").is_null()) if "decode_error" in pool.columns else pool
        self.fingerprint: str | None = None


def _apply(stage: Stage, frame: pl.DataFrame, manifest, seed: int, budget, cache, pool: _Pool | None = None):
    """Run a stage over `frame`: row stages in partitions (bounded memory), others in one call."""
    if stage.scope == "row" and not stage.needs_embeddings() and frame.height > ROW_PARTITION:
        parts = [stage.apply(StageInput(frame.slice(s, ROW_PARTITION), {}, seed, budget, cache)).decisions
                 for s in range(0, frame.height, ROW_PARTITION)]
        return pl.concat(parts), {}, {}
    views = {(sc, kind): open_view(manifest, frame, sc, kind) for sc, kind in stage.needs_embeddings()}
    inp = StageInput(frame, views, seed, budget, cache)
    if pool is not None and hasattr(stage, "cluster_spec") and frame.height:
        _share_pool_clustering(stage, inp, pool, manifest, seed, cache)
    res = stage.apply(inp)
    return res.decisions, res.stats, res.artefacts


def _share_pool_clustering(stage: Stage, inp: StageInput, pool: _Pool, manifest, seed: int, cache) -> None:
    """Cluster the run's whole pool once (cached across runs) and hand the stage that clustering
    restricted to its input, so a new eps, budget or upstream filter never re-clusters."""
    from ..cluster import cache_clustering, clustering_for_stage

    spec = stage.cluster_spec(inp)
    base = pool.frame
    pos = inp.frame.select("uid").join(base.select("uid").with_row_index("_pos"), on="uid", how="left",
                                       maintain_order="left")["_pos"]
    if pos.null_count():
        raise UsageError(f"stage {stage.name} needs embeddings, but {pos.null_count():,} of its samples have none "
                         f"(undecodable images); put a decode_failures stage before it")
    views = {(sc, kind): open_view(manifest, base, sc, kind) for sc, kind in stage.needs_embeddings()}
    pool_inp = StageInput(base, views, seed, None, cache, _fingerprint=pool.fingerprint)
    pc = clustering_for_stage(pool_inp, spec, need_centroids=True)
    pool.fingerprint = pool_inp.fingerprint()
    idx = pos.to_numpy()
    cache_clustering(inp, spec, pc.cluster[idx], pc.dist[idx], pc.centroids)


def _save_artefacts(run_dir: Path | None, sid: str, artefacts: dict) -> None:
    if run_dir is None:
        return
    for name, obj in artefacts.items():
        base = run_dir / f"{sid}.{name}"
        if isinstance(obj, pl.DataFrame):
            with atomic_path(base.with_suffix(base.suffix + ".parquet"), suffix=".parquet") as tmp:
                obj.write_parquet(tmp)
        elif isinstance(obj, np.ndarray):
            atomic_save_npy(base.with_suffix(base.suffix + ".npy"), obj)
        else:
            with atomic_path(base.with_suffix(base.suffix + ".json")) as tmp:
                tmp.write_text(json.dumps(obj, default=str, indent=2))
