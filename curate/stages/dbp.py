"""Budget stages: Density-Based Pruning (`dbp`), Self-Supervised Prototype pruning (`ssp`) and
a seeded random subset (`random`). Each keeps exactly `StageInput.budget` samples (all of them,
with a warning in stats, when fewer remain).

DBP (Abbas et al. 2024, "Effective pruning of web-scale datasets based on complexity of concept
clusters"; run SemDeDup first; spherical k-means, k=500 on LAION-DeDup-280M, k=100 on DataComp
medium):
    d_intra(j) = mean over x in cluster j of (1 - cos(x, c_j))
    d_inter(j) = mean of (1 - cos(c_j, c_i)) over the l nearest other centroids (l=20)
    C_j = d_inter(j) · d_intra(j)                 (NaN -> mean of the other clusters)
    P = softmax(C / tau)                          (tau = 0.1 tuned; 0.5 in the public code)
    x = argmin ||x - P·N||²  s.t.  Σx = N,  lb <= x_j <= |C_j|
      = clip(P·N + λ, lb, |C_j|) with λ found by bisection, then largest-remainder rounding
    lb = ratio · N / k                            (SSP's class-balance floor; ratio 0.5 default,
                                                   0 in the paper's best run)
    within cluster j keep the x_j least prototypical samples (farthest from c_j, "hard").

SSP (Sorscher et al. 2022, "Beyond neural scaling laws"): difficulty = cosine distance to the
nearest centroid; keep the hardest (abundant data) or easiest (scarce data) globally, with a
per-cluster floor.

Clustering (`curate.cluster.clustering_for_stage`): the frame's `cluster` / `centroid_dist`
columns when present, else the runner's array cache (`StageInput.cache`: same parameters, same
uid set), else computed from the embeddings and cached, so a new budget never re-clusters.
Only clusters with at least one surviving sample take part (k_active).

Reasons (dropped): `dbp_over_quota`, `ssp_below_cut`, `random_not_drawn`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..cluster import ClusterSpec, UidOrder, cluster_sizes, clustering_for_stage, uid_ranks
from ..clustered import ClusteredInput, in_input_order, seeded_keys
from ..errors import UsageError
from .base import (REF_ROW, Stage, StageInput, StageResult, decisions_frame, in_chunks, index_dtype, reason_where,
                   register_stage)
from .semdedup import const_column

KEEP_DBP = ("hard", "easy", "random", "score")
KEEP_SSP = ("hard", "easy")


# ---------------------------------------------------------------------------------------------
# Cluster complexity
# ---------------------------------------------------------------------------------------------

def cluster_distances(cluster: np.ndarray, dist: np.ndarray, centroids: np.ndarray,
                      l_nearest: int = 20, block: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, d_intra, d_inter) per centroid; NaN for empty clusters (and d_inter when fewer
    than two clusters are non-empty). Neighbours are the other non-empty clusters."""
    k = int(centroids.shape[0])
    sizes = cluster_sizes(cluster, k)
    sums = np.zeros(k)
    for s in range(0, len(cluster), 1 << 20):  # float64 weights a chunk at a time
        sums += np.bincount(cluster[s:s + (1 << 20)], weights=dist[s:s + (1 << 20)].astype(np.float64), minlength=k)
    return sizes, intra_distances(sizes, sums), inter_distances(centroids, sizes > 0, l_nearest, block)


def intra_distances(sizes: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """d_intra from each cluster's size and Σ(1 - cos) to its centroid; NaN where empty."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, sums / np.maximum(sizes, 1), np.nan)


def inter_distances(centroids: np.ndarray, active: np.ndarray, l_nearest: int = 20,
                    block: int | None = None) -> np.ndarray:
    """d_inter of each active cluster over its l nearest other active centroids (NaN elsewhere,
    and everywhere when fewer than two are active)."""
    k = int(centroids.shape[0])
    d_inter = np.full(k, np.nan)
    active = np.flatnonzero(active)
    l = min(int(l_nearest), len(active) - 1)
    if l >= 1:
        ca = np.ascontiguousarray(centroids[active], dtype=np.float32)
        block = block or max(1, (1 << 21) // len(active))  # 2M similarities (16 MiB as float64) a block
        for s in range(0, len(active), block):
            sims = (ca[s:s + block] @ ca.T).astype(np.float64)
            sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf  # not its own neighbour
            top = np.sort(np.partition(sims, sims.shape[1] - l, axis=1)[:, -l:], axis=1)
            d_inter[active[s:s + len(sims)]] = (1.0 - top).mean(axis=1)
    return d_inter


def complexity(d_intra: np.ndarray, d_inter: np.ndarray, active: np.ndarray) -> np.ndarray:
    """C_j = d_inter · d_intra over active clusters; a NaN takes the mean of the others (all NaN: 1)."""
    c = d_inter * d_intra
    c = np.where(active, c, np.nan)
    bad = active & np.isnan(c)
    if bad.any():
        good = active & ~np.isnan(c)
        c[bad] = c[good].mean() if good.any() else 1.0
    return c


def softmax_shares(c: np.ndarray, tau: float, active: np.ndarray) -> np.ndarray:
    p = np.zeros(len(c))
    if active.any():
        z = c[active] / float(tau)
        z = np.exp(z - z.max())
        p[active] = z / z.sum()
    return p


# ---------------------------------------------------------------------------------------------
# Quotas
# ---------------------------------------------------------------------------------------------

@dataclass
class Allocation:
    quota: np.ndarray            # int64 per cluster, Σ = min(budget, total)
    real: np.ndarray             # float64 continuous solution
    lam: float
    lb: int
    notes: list[str] = field(default_factory=list)


def solve_quotas(target: np.ndarray, upper: np.ndarray, budget: float, lb: np.ndarray | float) -> tuple[np.ndarray, float]:
    """min ||x - target||² s.t. Σx = budget, lb <= x <= upper: x = clip(target + λ, lb, upper),
    λ by bisection to machine precision, then one exact step on the free set. Requires
    Σlb <= budget <= Σupper."""
    target = np.asarray(target, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    lower = np.minimum(np.broadcast_to(np.asarray(lb, dtype=np.float64), target.shape), upper)
    if len(target) == 0:
        return np.zeros(0), 0.0

    def total(lam: float) -> float:
        return float(np.clip(target + lam, lower, upper).sum())

    lo = float((lower - target).min())
    hi = float((upper - target).max())
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if total(mid) < budget:
            lo = mid
        else:
            hi = mid
    lam = hi
    x = np.clip(target + lam, lower, upper)
    free = (x > lower) & (x < upper)
    if free.any():
        # exact λ for the active set found by bisection (removes the last-ulp residue)
        fixed = x[~free].sum()
        lam2 = (budget - fixed - target[free].sum()) / free.sum()
        x2 = np.clip(target + lam2, lower, upper)
        if np.array_equal((x2 > lower) & (x2 < upper), free) and abs(x2.sum() - budget) <= abs(x.sum() - budget):
            lam, x = float(lam2), x2
    return x, float(lam)


def round_quotas(real: np.ndarray, upper: np.ndarray, lower: np.ndarray, budget: int) -> np.ndarray:
    """Largest remainder: floors, then +1 to the largest fractional parts (ties: lower cluster
    id) until Σ = budget; integer bounds lower <= q <= upper hold throughout."""
    upper = np.asarray(upper, dtype=np.int64)
    lower = np.minimum(np.asarray(lower, dtype=np.int64), upper)
    q = np.clip(np.floor(real).astype(np.int64), lower, upper)
    frac = real - np.floor(real)
    idx = np.arange(len(q))
    r = int(budget - q.sum())
    while r > 0:  # one pass unless floating-point residue left fewer fractions than needed
        elig = np.flatnonzero(q < upper)
        if len(elig) == 0:
            raise ValueError("budget exceeds the sum of the upper bounds")
        q[elig[np.lexsort((idx[elig], -frac[elig]))][:r]] += 1
        r = int(budget - q.sum())
    while r < 0:
        elig = np.flatnonzero(q > lower)
        if len(elig) == 0:
            raise ValueError("budget is below the sum of the lower bounds")
        q[elig[np.lexsort((idx[elig], frac[elig]))][:-r]] -= 1
        r = int(budget - q.sum())
    return q


def dbp_allocate(sizes: np.ndarray, shares: np.ndarray, budget: int, lb_ratio: float = 0.5) -> Allocation:
    """Integer quotas per cluster: Σ = min(budget, Σsizes), floor lb <= q_j <= |C_j|."""
    sizes = np.asarray(sizes, dtype=np.int64)
    active = sizes > 0
    k_active = int(active.sum())
    total = int(sizes.sum())
    notes: list[str] = []
    if budget >= total:
        if budget > total:
            notes.append(f"budget {budget} exceeds the {total} samples left: all kept")
        return Allocation(sizes.copy(), sizes.astype(np.float64), 0.0, 0, notes)
    if budget <= 0 or k_active == 0:
        return Allocation(np.zeros_like(sizes), np.zeros(len(sizes)), 0.0, 0, notes)
    lb = int(math.floor(lb_ratio * budget / k_active))
    if np.minimum(lb, sizes[active]).sum() > budget:
        new = budget // k_active
        notes.append(f"floor lb={lb} per cluster exceeds the budget over {k_active} clusters: lowered to {new}")
        lb = new
    lower = np.where(active, np.minimum(lb, sizes), 0)
    real, lam = solve_quotas(shares * budget, sizes, float(budget), lower)
    quota = round_quotas(real, sizes, lower, budget)
    return Allocation(quota, real, lam, lb, notes)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------

def rank_within(cluster: np.ndarray, key: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Rank of each sample within its cluster by key descending (ties: tiebreak, then position)."""
    n = len(cluster)
    order, first = cluster_sorted(cluster, key, tiebreak, int(cluster.max()) + 1 if n else 0)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first[cluster[order]]
    return rank


def cluster_sorted(cluster: np.ndarray, key: np.ndarray, tiebreak: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, first): positions sorted by cluster, then key descending, then tiebreak, then
    position; and the offset in that order where each of the k clusters starts (k + 1 values).
    The key is negated in its own type (exact for floats and integers alike)."""
    order = np.lexsort((tiebreak, -np.asarray(key), cluster))  # stable: then position
    first = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(cluster_sizes(cluster, k), out=first[1:])
    return order, first


def random_keys(tiebreak: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random key per sample (a permutation of 0..n-1) that depends on its uid rank, not
    on input order."""
    n = len(tiebreak)
    return np.random.default_rng(seed).permutation(n)[tiebreak].astype(index_dtype(n))


def top_global(key: np.ndarray, count: int, tiebreak: np.ndarray) -> np.ndarray:
    """Boolean mask of the `count` largest keys (ties: tiebreak, then position)."""
    n = len(key)
    mask = np.zeros(n, dtype=bool)
    if count > 0:
        order = np.lexsort((tiebreak, -np.asarray(key, dtype=np.float64)))  # stable: then position
        mask[order[:count]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def _decisions(uids: pl.Series, keep: np.ndarray, reason: str, value: np.ndarray | None = None,
               threshold: np.ndarray | float | None = None, detail=None) -> dict:
    """StageResult arguments for these decisions, built a chunk of rows at a time: `value` and
    `threshold` are float arrays (NaN: null), functions (start, stop) -> such an array for those
    rows, or a scalar; `detail(start, stop)` gives the detail strings of those rows."""
    def build(start: int, stop: int) -> pl.DataFrame:
        m = stop - start

        def col(v):
            if callable(v):
                v = v(start, stop)
                return pl.Series(np.asarray(v, dtype=np.float64), dtype=pl.Float64).fill_nan(None)
            if isinstance(v, np.ndarray):
                return pl.Series(v[start:stop], dtype=pl.Float64).fill_nan(None)
            return const_column(v, m, pl.Float64)

        k = keep[start:stop]
        return decisions_frame(uids.slice(start, m), pl.Series(k), reason=reason_where(~k, reason),
                               value=col(value), threshold=col(threshold), ref_uid=None,
                               detail=detail(start, stop) if detail else const_column(None, m, pl.Utf8))
    return {"chunks": in_chunks(len(uids), build)}


def _budget(inp: StageInput, stage: Stage) -> int:
    """inp.budget (the runner resolves --budget and the recipe's `budget`), else the stage's own
    `budget` param (a count, or a fraction of the input when below 1)."""
    b = inp.budget
    if b is None and getattr(stage, "budget", None) is not None:
        v = float(stage.budget)
        b = int(round(v * len(inp.frame))) if v < 1 else int(v)
    if b is None:
        raise UsageError(f"stage {stage.name!r} needs a budget (curate prune --budget N)")
    b = int(b)
    if b < 0:
        raise UsageError(f"budget must be >= 0, not {b}")
    return b


class _ClusteredBudgetStage(Stage):
    scope = "global"
    uses_budget = True

    def needs_columns(self):
        return []

    def _init_clustering(self, scorer, kind, k, niter, seed, sample_size, device, budget):
        if int(k) < 1:
            raise UsageError(f"{self.name}: k must be >= 1")
        if not scorer:
            raise UsageError(f"{self.name}: name the scorer whose embeddings to cluster")
        self.scorer, self.kind, self.k, self.niter = scorer, kind, int(k), int(niter)
        self.seed, self.sample_size, self.device, self.budget = seed, sample_size, device, budget

    def needs_embeddings(self):
        return [(self.scorer, self.kind)]

    def cluster_spec(self, inp: StageInput) -> ClusterSpec:
        """The clustering this stage wants for this input (`.key()` names it in the cache)."""
        return self.spec_for(len(inp.frame), inp.seed)

    def spec_for(self, n: int, run_seed: int) -> ClusterSpec:
        """The clustering this stage wants for n input samples in a run seeded `run_seed`."""
        seed = int(self.seed if self.seed is not None else run_seed)
        return ClusterSpec(self.k, self.niter, seed, self.sample_size, self.scorer, self.kind)

    def _begin(self, inp: StageInput):
        """(budget, uids, seed, result-if-empty) for this input."""
        budget = _budget(inp, self)
        uids = inp.frame["uid"]
        seed = int(self.seed if self.seed is not None else inp.seed)
        empty = (StageResult(decisions_frame(uids, pl.Series([], dtype=pl.Boolean)), {}, {"n_in": 0, "n_kept": 0})
                 if len(uids) == 0 else None)
        return budget, uids, seed, empty


@register_stage
class DensityBasedPruning(_ClusteredBudgetStage):
    """DBP; see the module docstring for the formulas."""

    name = "dbp"

    def __init__(self, scorer: str = "datacomp-l14", kind: str = "img", k: int = 100, niter: int = 20,
                 seed: int | None = None, sample_size: int | None = None, device: str = "auto",
                 tau: float = 0.1, l_nearest: int = 20, lb_ratio: float = 0.5, keep: str = "hard",
                 score: str | None = None, budget: int | float | None = None):
        if keep not in KEEP_DBP:
            raise UsageError(f"dbp: keep must be one of {', '.join(KEEP_DBP)}, not {keep!r}")
        if keep == "score" and not score:
            raise UsageError("dbp: keep='score' needs score=<scorer> (the score__<scorer> column)")
        if not tau > 0:
            raise UsageError("dbp: tau must be > 0")
        if lb_ratio < 0:
            raise UsageError("dbp: lb_ratio must be >= 0")
        self._init_clustering(scorer, kind, k, niter, seed, sample_size, device, budget)
        self.tau, self.l_nearest, self.lb_ratio = float(tau), int(l_nearest), float(lb_ratio)
        self.keep, self.score = keep, score

    def needs_scores(self):
        return [self.score] if self.keep == "score" else []

    def apply(self, inp: StageInput) -> StageResult:
        budget, uids, seed, empty = self._begin(inp)
        if empty is not None:
            return empty
        frame = inp.frame
        order = UidOrder(uids)
        clu = clustering_for_stage(inp, self.cluster_spec(inp), order=order, device=self.device, need_centroids=True)
        score_of = None
        if self.keep == "score":
            col = f"score__{self.score}"
            if col not in frame.columns:
                raise UsageError(f"dbp: keep='score' needs column {col!r}")
            score_of = lambda name, pos: frame[f"score__{name}"].gather(pos)  # noqa: E731
        cin = ClusteredInput.from_arrays(clu.cluster, clu.dist, order.tiebreak(), k=clu.k, centroids=clu.centroids,
                                         uids=uids, score_of=score_of, identity=clu.identity, source=clu.source)
        res = self.run_clustered(cin, budget, seed)
        return StageResult(in_input_order(res.decision_chunks(), len(uids), REF_ROW), res.artefacts, res.stats)

    def run_clustered(self, cin: ClusteredInput, budget: int, seed: int, cache=None) -> StageResult:
        """DBP over a cluster-major listing: one pass for the cluster sizes and distances, one
        that decides cluster by cluster; decisions carry each row's `POS`."""
        n = cin.n
        sizes, sums = cin.totals()
        active = sizes > 0
        d_intra, d_inter = intra_distances(sizes, sums), inter_distances(cin.centroids, active, self.l_nearest)
        comp = complexity(d_intra, d_inter, active)
        shares = softmax_shares(comp, self.tau, active)
        alloc = dbp_allocate(sizes, shares, budget, self.lb_ratio)
        quota = alloc.quota

        def chunks():
            for bt in cin.batches():
                if self.keep == "hard":  # the listing's own order: farthest first, ties by uid
                    value = key = bt.dist.astype(np.float64)
                elif self.keep == "easy":
                    bt, _ = bt.reordered(bt.dist)
                    value = key = bt.dist.astype(np.float64)
                elif self.keep == "random":
                    bt, _ = bt.reordered(seeded_keys(bt.uid, seed))
                    value, key = bt.dist.astype(np.float64), None
                else:
                    s = cin.scores(self.score, bt.pos).cast(pl.Float64).fill_null(-np.inf).fill_nan(-np.inf).to_numpy()
                    bt, perm = bt.reordered(-s)
                    key = s[perm]
                    value = np.where(np.isfinite(key), key, np.nan)
                q, size = quota[bt.ids], np.diff(bt.bounds)
                keep = bt.local_rank() < np.repeat(q, size)
                cut = np.full(len(bt.ids), np.nan)  # each cluster's last kept key
                if key is not None:
                    has = np.flatnonzero(q > 0)
                    cut[has] = key[bt.bounds[has] + np.minimum(q[has], size[has]) - 1]
                # `detail` short on purpose (<= 12 characters are stored inline, no string buffer
                # per row); the cluster's size, shares and quota are in the `dbp_clusters` artefact
                yield cin.decisions(bt, keep, reason=reason_where(~keep, "dbp_over_quota"),
                                    value=pl.Series(value, dtype=pl.Float64).fill_nan(None),
                                    threshold=pl.Series(np.repeat(cut, size), dtype=pl.Float64).fill_nan(None),
                                    detail=pl.select(pl.format("cluster={}", pl.Series(bt.cluster))).to_series())

        per_cluster = pl.DataFrame({
            "cluster": np.arange(cin.k, dtype=np.int32), "size": sizes, "d_intra": d_intra, "d_inter": d_inter,
            "complexity": comp, "share": shares, "quota_real": alloc.real, "quota": quota,
        }).filter(pl.col("size") > 0)
        stats = {"n_in": n, "budget": budget, "n_kept": int(quota.sum()), "k": cin.k, "k_active": int(active.sum()),
                 "lambda": alloc.lam, "lb": alloc.lb, "clustering": cin.source, "clustering_key": cin.identity,
                 "keep": self.keep}
        if alloc.notes:
            stats["warnings"] = alloc.notes
        return StageResult(None, {"dbp_clusters": per_cluster}, stats, chunks=chunks)


@register_stage
class PrototypePruning(_ClusteredBudgetStage):
    """SSP: global distance-to-prototype cut to the budget with a per-cluster floor."""

    name = "ssp"

    def __init__(self, scorer: str = "datacomp-l14", kind: str = "img", k: int = 100, niter: int = 20,
                 seed: int | None = None, sample_size: int | None = None, device: str = "auto",
                 keep: str = "hard", floor_ratio: float = 0.5, budget: int | float | None = None):
        if keep not in KEEP_SSP:
            raise UsageError(f"ssp: keep must be one of {', '.join(KEEP_SSP)}, not {keep!r}")
        if floor_ratio < 0:
            raise UsageError("ssp: floor_ratio must be >= 0")
        self._init_clustering(scorer, kind, k, niter, seed, sample_size, device, budget)
        self.keep, self.floor_ratio = keep, float(floor_ratio)

    def apply(self, inp: StageInput) -> StageResult:
        budget, uids, seed, empty = self._begin(inp)
        if empty is not None:
            return empty
        frame = inp.frame
        n = len(frame)
        order = UidOrder(uids)
        clu = clustering_for_stage(inp, self.cluster_spec(inp), order=order, device=self.device)
        sizes = cluster_sizes(clu.cluster, clu.k)
        active = sizes > 0
        k_active = int(active.sum())
        tb = order.tiebreak()
        key = clu.dist.astype(np.float64) if self.keep == "hard" else -clu.dist.astype(np.float64)
        notes = []
        by_floor = np.zeros(n, dtype=bool)
        if budget >= n:
            keep = np.ones(n, dtype=bool)
            floor = 0
            if budget > n:
                notes.append(f"budget {budget} exceeds the {n} samples left: all kept")
        else:
            floor = int(math.floor(self.floor_ratio * budget / k_active))
            if np.minimum(floor, sizes[active]).sum() > budget:
                new = budget // k_active
                notes.append(f"floor {floor} per cluster exceeds the budget over {k_active} clusters: lowered to {new}")
                floor = new
            rank = rank_within(clu.cluster, key, tb)
            by_floor = rank < floor
            rest = budget - int(by_floor.sum())
            fill = top_global(np.where(by_floor, -np.inf, key), rest, tb) & ~by_floor
            keep = by_floor | fill
        kept_sizes = np.bincount(clu.cluster[keep], minlength=clu.k)
        # the global cut: every sample not kept by its cluster's floor is kept iff beyond it
        beyond = keep & ~by_floor
        cut = float(key[beyond].min()) if beyond.any() else float("nan")
        thr = cut if self.keep == "hard" else -cut
        per_cluster = pl.DataFrame({"cluster": np.arange(clu.k, dtype=np.int32), "size": sizes,
                                    "kept": kept_sizes}).filter(pl.col("size") > 0)
        dec = _decisions(uids, keep, "ssp_below_cut", value=np.asarray(clu.dist, dtype=np.float64),
                         threshold=None if math.isnan(thr) else thr,
                         detail=lambda s, e: pl.select(pl.format(
                             "cluster={}{}", pl.Series(clu.cluster[s:e]),
                             pl.when(pl.Series(by_floor[s:e])).then(pl.lit(" floor")).otherwise(pl.lit("")))).to_series())
        stats = {"n_in": n, "budget": budget, "n_kept": int(keep.sum()), "k": clu.k, "k_active": k_active,
                 "floor": floor, "clustering": clu.source, "clustering_key": clu.identity, "keep": self.keep}
        if notes:
            stats["warnings"] = notes
        return StageResult(None, {"ssp_clusters": per_cluster}, stats, **dec)


@register_stage
class RandomSubset(Stage):
    """A seeded uniformly random subset of exactly the budget (the baseline every pruning
    method must beat). Depends on the uids and the seed, not on input order."""

    name = "random"
    scope = "global"
    uses_budget = True

    def needs_columns(self):
        return []

    def __init__(self, seed: int | None = None, budget: int | float | None = None):
        self.seed, self.budget = seed, budget

    def apply(self, inp: StageInput) -> StageResult:
        budget = _budget(inp, self)
        uids = inp.frame["uid"]
        n = len(uids)
        seed = int(self.seed if self.seed is not None else inp.seed)
        tb = uid_ranks(uids)
        keep = top_global(random_keys(tb, seed), min(budget, n), tb)
        stats = {"n_in": n, "budget": budget, "n_kept": int(keep.sum()), "seed": seed}
        if budget > n:
            stats["warnings"] = [f"budget {budget} exceeds the {n} samples left: all kept"]
        return StageResult(None, {}, stats, **_decisions(uids, keep, "random_not_drawn"))
