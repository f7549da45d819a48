"""Semantic deduplication (SemDeDup, Abbas et al. 2023, "SemDeDup: Data-efficient learning at
web-scale through semantic deduplication").

Paper setting: spherical k-means on L2-normalised CLIP image embeddings (LAION-440M: k=50,000,
niter 100, seed 1234). Within each cluster, samples are ordered by distance to the centroid,
farthest first; sample j is a duplicate when max over earlier i of cos(i, j) >= 1 - eps.
The paper drops j even when that earlier neighbour was itself dropped (A~B~C keeps only A).
Which copy is kept barely matters (farthest / random / closest: 66.90 / 66.90 / 66.73
ImageNet, Table A7); eps was chosen per target size (LAION: eps 0.07 keeps ~63%, 0.124 ~50%,
0.26 ~20%).

What is computed once and cached (`SemDedupCache`, kept in the runner's array cache
`StageInput.cache` under the clustering's identity, the keep order and the uid set): for every
sample its rank in the cluster order, `nn_sim` = max cos to an earlier sample of its cluster and
which one (`nn_pos` here, the neighbour's uid rank in the cache, `nn_uid` in `to_frame`; first
occurrence on ties). The paper rule for any eps is `nn_sim >= 1 - eps`: no
recomputation (`apply_eps`), and a target keep fraction is an exact quantile of `nn_sim`
(`calibrate_eps`). The greedy keep-set rule (j is a duplicate only of an earlier *kept*
sample) reuses the cache too: a sample whose nn_sim is below the threshold is kept, one whose
nearest earlier neighbour was kept is dropped, and only samples whose nearest neighbour was
dropped need their similarities to the earlier kept samples recomputed.

The similarity pass works in row blocks × column tiles (block_rows × tile_cols float32, sgemm
through numpy `@`), never a |C|×|C| matrix; clusters are read from the embedding view a batch
of clusters at a time.

Reasons: `semantic_duplicate` (dropped; ref_uid = the sample it duplicates, value = cosine,
threshold = 1 - eps, detail = `cluster=<c> rank=<r>`). Kept rows carry reason null and value =
nn_sim when they have an earlier sample in their cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from .. import console
from ..cluster import (ClusterSpec, UidOrder, cluster_sizes, clustering_for_stage, normalise_rows, rows_of_ranks,
                       short_hash, take_sorted)
from ..errors import UsageError
from .base import (REF_ROW, EmbeddingView, Stage, StageInput, StageResult, decisions_frame, in_chunks, index_dtype,
                   reason_where, register_stage)

KEEP_ORDERS = ("farthest", "closest", "random")
RULES = ("paper", "greedy")
REASON = "semantic_duplicate"


# ---------------------------------------------------------------------------------------------
# Column and threshold helpers (also used by the other pruning stages)
# ---------------------------------------------------------------------------------------------

def const_column(value, n: int, dtype) -> pl.Series:
    """A constant (or all-null) decision column without a Python list of n items."""
    return pl.repeat(value, n, dtype=dtype, eager=True)


def sparse_strings(mask: np.ndarray, strings: pl.Series) -> pl.Series:
    """A length-len(mask) string column: `strings` (one per True, in order) where mask is set,
    null elsewhere. Only the set rows' strings are ever built (a when/then over a full-length
    format would materialise, and keep alive, all n of them)."""
    idx = np.cumsum(mask, dtype=np.int64) - 1
    return strings.gather(pl.select(pl.when(pl.Series(mask)).then(pl.Series(idx))).to_series())


def ge_threshold(values: np.ndarray, thr: float) -> np.ndarray:
    """values >= thr for a float32 array and a float64 threshold, exactly, without a float64 copy:
    compare against the smallest float32 that is >= thr. NaN compares False."""
    t32 = np.float32(thr)
    if float(t32) < thr:
        t32 = np.nextafter(t32, np.float32(np.inf))
    with np.errstate(invalid="ignore"):
        return values >= t32


# ---------------------------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------------------------

def cluster_order(cluster: np.ndarray, dist: np.ndarray, keep: str = "farthest", seed: int = 0,
                  tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted by cluster, then by the keep order (the earliest of a duplicate group is
    kept): farthest from the centroid first, closest first, or a seeded random order; ties by
    `tiebreak` (uid rank), then position."""
    n = len(cluster)
    tb = np.arange(n) if tiebreak is None else np.asarray(tiebreak)
    if keep == "farthest":
        key = -np.asarray(dist, dtype=np.float32)  # exact: negation does not round
    elif keep == "closest":
        key = np.asarray(dist, dtype=np.float32)
    elif keep == "random":
        key = np.random.default_rng(seed).permutation(n)[tb]
    else:
        raise UsageError(f"keep must be one of {', '.join(KEEP_ORDERS)}, not {keep!r}")
    # lexsort is stable: equal (cluster, key, tiebreak) keep input order
    return np.lexsort((tb, key, cluster))


def _segments(sorted_cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids, start offsets + final end) of the runs in a cluster-sorted id array."""
    if len(sorted_cluster) == 0:
        return np.empty(0, np.int64), np.zeros(1, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_cluster[1:] != sorted_cluster[:-1]])
    return sorted_cluster[starts].astype(np.int64), np.r_[starts, len(sorted_cluster)].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Blocked max-over-earlier similarity
# ---------------------------------------------------------------------------------------------

_TRIU: dict[int, np.ndarray] = {}


def _triu(m: int) -> np.ndarray:
    """Boolean m×m mask of column >= row (the not-earlier part of a diagonal tile)."""
    b = 1 << max(0, (m - 1).bit_length())
    if b not in _TRIU:
        _TRIU[b] = np.triu(np.ones((b, b), dtype=bool))
    return _TRIU[b][:m, :m]


def max_earlier(x: np.ndarray, block_rows: int = 512, tile_cols: int = 8192) -> tuple[np.ndarray, np.ndarray, float]:
    """For each row j of x (unit rows, in cluster order): max over i < j of x_i·x_j and the
    first i reaching it. Row 0 gets -inf and -1. Returns (sim float32, idx int64, flops).

    Row block [s, e) is multiplied against columns [0, e) in tiles of at most tile_cols; in the
    tile that reaches the block itself the not-earlier entries (i >= j) are masked. At most
    block_rows × tile_cols similarities exist at a time, never |C| × |C|.
    """
    n = len(x)
    best = np.full(n, -np.inf, dtype=np.float32)
    arg = np.full(n, -1, dtype=np.int64)
    flops = 0.0
    d = x.shape[1] if x.ndim == 2 else 0
    tile_cols = max(int(tile_cols), int(block_rows))
    for s in range(0, n, block_rows):
        e = min(n, s + block_rows)
        q = x[s:e]
        m = e - s
        rows = np.arange(m)
        bb, ba = best[s:e], arg[s:e]
        tri = _triu(m)
        for t in range(0, e, tile_cols):
            t2 = min(e, t + tile_cols)
            sims = q @ x[t:t2].T
            flops += 2.0 * m * (t2 - t) * d
            if t2 > s:  # this tile holds columns of the block itself: hide i >= j
                lo = max(s, t)
                sims[:, lo - t:][tri[:, lo - s:t2 - s]] = -np.inf
            a = sims.argmax(axis=1)
            v = sims[rows, a]
            upd = v > bb  # strict: an earlier tile keeps ties (first occurrence)
            bb[upd] = v[upd]
            ba[upd] = a[upd] + t
            del sims
    return best, arg, flops


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

@dataclass
class SemDedupCache:
    """Per-sample results of the similarity pass, aligned with the stage's input rows.

    Loaded from the runner's cache (`from_arrays`), `rank` and `nn_pos` stay in the cache files
    until asked for: deciding needs only nn_sim, and the dropped rows' facts are read for those
    rows alone (`rank_of`, `nn_pos_of`), 8 bytes a sample less at the peak.
    """

    cluster: np.ndarray       # int32
    dist: np.ndarray | None   # float32, distance to centroid (defines the order); None once let go
    _rank: np.ndarray | None  # int32, position in the cluster order (0 = kept first)
    nn_sim: np.ndarray        # float32, NaN for the first sample of a cluster
    _nn_pos: np.ndarray | None  # int32 (int64 past 2**31 rows) input position of that earlier neighbour, -1 for none
    params: dict[str, Any] = field(default_factory=dict)
    _stored: tuple | None = None  # (rank, nn) in uid order (memory-mapped), UidOrder: what a lazy cache reads

    @property
    def n(self) -> int:
        return len(self.cluster)

    @property
    def rank(self) -> np.ndarray:
        if self._rank is None:
            (rank_u, _), order = self._stored
            self._rank = order.from_uid_order(rank_u).astype(np.int32, copy=False)
        return self._rank

    @property
    def nn_pos(self) -> np.ndarray:
        if self._nn_pos is None:
            self._nn_pos = self.nn_pos_of(np.arange(self.n))
        return self._nn_pos

    def rank_of(self, rows: np.ndarray) -> np.ndarray:
        if self._rank is not None:
            return self._rank[rows]
        (rank_u, _), order = self._stored
        return take_sorted(rank_u, order.rank[rows]).astype(np.int32, copy=False)

    def nn_pos_of(self, rows: np.ndarray) -> np.ndarray:
        """Input position of each row's nearest earlier neighbour, -1 for none."""
        if self._nn_pos is not None:
            return self._nn_pos[rows]
        (_, nn_u), order = self._stored
        nn = take_sorted(nn_u, order.rank[rows]).astype(index_dtype(self.n), copy=False)  # neighbours' uid ranks
        has = nn >= 0
        ranks, back = np.unique(nn[has], return_inverse=True)
        nn[has] = rows_of_ranks(order.rank, ranks)[back]
        return nn

    def order(self) -> np.ndarray:
        return np.lexsort((self.rank, self.cluster)).astype(np.int64)

    def to_frame(self, uids: pl.Series) -> pl.DataFrame:
        """uid | cluster | centroid_dist | rank | nn_sim | nn_uid (what the runner stores)."""
        has = self.nn_pos >= 0
        nn_uid = uids.gather(np.where(has, self.nn_pos, 0))
        nn_uid = pl.select(pl.when(pl.Series(has)).then(nn_uid)).to_series()
        return pl.DataFrame({
            "uid": uids, "cluster": pl.Series(self.cluster, dtype=pl.Int32),
            "centroid_dist": (pl.Series(self.dist, dtype=pl.Float32) if self.dist is not None
                              else const_column(None, self.n, pl.Float32)),
            "rank": pl.Series(self.rank, dtype=pl.Int32),
            "nn_sim": pl.Series(self.nn_sim, dtype=pl.Float32).fill_nan(None), "nn_uid": nn_uid.alias("nn_uid"),
        })

    def to_arrays(self, order: UidOrder) -> dict[str, Any]:
        """What goes into the runner's array cache, in uid order (neighbours as uid ranks); each
        array is built when the cache writes it, so only one exists at a time."""
        def nn() -> np.ndarray:
            out = np.full(self.n, -1, dtype=index_dtype(self.n))
            for s in range(0, self.n, 1 << 20):
                p = self.nn_pos[s:s + (1 << 20)]
                has = p >= 0
                out[s:s + len(p)][has] = order.rank[p[has]]
            return order.to_uid_order(out)

        return {"rank": lambda: order.to_uid_order(self.rank), "nn_sim": lambda: order.to_uid_order(self.nn_sim),
                "nn": nn}

    @classmethod
    def from_arrays(cls, arrays: dict, order: UidOrder, cluster: np.ndarray, dist: np.ndarray,
                    params: dict | None = None) -> "SemDedupCache":
        """A cache over stored arrays: nn_sim is read now, rank and neighbours when asked for."""
        return cls(cluster=cluster, dist=dist, _rank=None,
                   nn_sim=order.from_uid_order(arrays["nn_sim"]).astype(np.float32, copy=False), _nn_pos=None,
                   params=dict(params or {}), _stored=((arrays["rank"], arrays["nn"]), order))


def semdedup_pass(view: EmbeddingView, cluster: np.ndarray, dist: np.ndarray | None, *, keep: str = "farthest",
                  seed: int = 0, tiebreak: np.ndarray | None = None, block_rows: int = 512,
                  tile_cols: int = 8192, batch_rows: int = 65536, progress=None,
                  order: np.ndarray | None = None) -> SemDedupCache:
    """The one expensive step: nn_sim / nn_pos for every sample, cluster batch by cluster batch.

    Clusters are gathered from the view `batch_rows` rows at a time (a cluster larger than that
    alone); memory is that batch plus one block_rows × tile_cols similarity tile. `order` is
    `cluster_order(cluster, dist, keep, seed, tiebreak)` when the caller has it (and may then
    have let `dist` go: the cache holds it only when given).
    """
    n = len(cluster)
    cluster = np.asarray(cluster, dtype=np.int32)
    if dist is not None:
        dist = np.asarray(dist, dtype=np.float32)
    if order is None:
        order = cluster_order(cluster, dist, keep, seed, tiebreak)
    order = order.astype(index_dtype(n), copy=False)
    ids, bounds = _segments(cluster[order])
    rank = np.empty(n, dtype=np.int32)
    sizes = np.diff(bounds)
    nn_sim = np.full(n, np.nan, dtype=np.float32)
    nn_pos = np.full(n, -1, dtype=index_dtype(n))
    flops = 0.0
    compute = 0.0
    t0 = time.perf_counter()
    c = 0
    nclu = len(ids)
    while c < nclu:
        # a batch of whole clusters, singletons included (they cost nothing but a row read)
        c2 = int(np.searchsorted(bounds, bounds[c] + batch_rows, side="right")) - 1
        c2 = max(c2, c + 1)
        lo, hi = int(bounds[c]), int(bounds[c2])
        rank[order[lo:hi]] = np.arange(lo, hi, dtype=np.int32) - np.repeat(bounds[c:c2].astype(np.int32), sizes[c:c2])
        if int(sizes[c:c2].max()) > 1:
            pos = order[lo:hi]
            x = normalise_rows(view.take(pos), inplace=True)
            for ci in range(c, c2):
                a, b = int(bounds[ci]) - lo, int(bounds[ci + 1]) - lo
                if b - a < 2:
                    continue
                tc = time.perf_counter()
                sim, arg, f = max_earlier(x[a:b], block_rows, tile_cols)
                compute += time.perf_counter() - tc
                flops += f
                has = arg >= 0
                p = pos[a:b]
                nn_sim[p[has]] = sim[has]
                nn_pos[p[has]] = p[arg[has]]
            del x
        if progress is not None:
            progress(hi)
        c = c2
    params = {"keep": keep, "seed": int(seed), "flops": flops, "seconds": round(time.perf_counter() - t0, 3),
              "compute_seconds": round(compute, 3),
              "clusters": int(nclu), "largest_cluster": int(sizes.max()) if nclu else 0,
              "pairs": float((sizes.astype(np.float64) * (sizes - 1) / 2).sum())}
    return SemDedupCache(cluster, dist, rank, nn_sim, nn_pos, params)


# ---------------------------------------------------------------------------------------------
# Applying eps
# ---------------------------------------------------------------------------------------------

@dataclass
class DedupOutcome:
    keep: np.ndarray        # bool (n,)
    # input position of the sample a dropped one duplicates, -1 if kept: a whole array (greedy
    # rule), or the cache's nn_pos_of, read where dropped (paper rule: no n-sized array)
    refs: Any
    value: np.ndarray       # float32: cosine to ref (dropped) / nn_sim (kept), NaN when none (read-only)
    eps: float
    threshold: float
    rule: str
    stats: dict[str, Any] = field(default_factory=dict)
    refs_where_dropped: bool = False

    def ref_of(self, rows: np.ndarray) -> np.ndarray:
        """ref positions of these rows (an index array); a new array, never a view of the cache."""
        if not self.refs_where_dropped:
            return self.refs[rows]
        ref = self.refs(rows)
        return np.where(self.keep[rows], -1, ref).astype(ref.dtype, copy=False)

    @property
    def ref_pos(self) -> np.ndarray:
        return self.ref_of(np.arange(len(self.keep)))


def threshold_of(eps: float) -> float:
    return 1.0 - float(eps)


def apply_eps(cache: SemDedupCache, eps: float, rule: str = "paper", view: EmbeddingView | None = None,
              *, clusters: np.ndarray | None = None, x_cache: dict | None = None) -> DedupOutcome:
    """Decisions for one eps from the cache. The paper rule needs nothing else; the greedy rule
    needs the embeddings of the clusters that hold a chain (see module docstring).

    `clusters` restricts the greedy computation to those cluster ids (calibration samples);
    rows outside them are returned as kept.
    """
    thr = threshold_of(eps)
    dup = ge_threshold(cache.nn_sim, thr)  # NaN (first of its cluster) compares False
    if rule == "paper":
        return DedupOutcome(~dup, cache.nn_pos_of, cache.nn_sim, float(eps), thr, rule, {"dropped": int(dup.sum())},
                            refs_where_dropped=True)
    if rule != "greedy":
        raise UsageError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    if view is None:
        raise UsageError("the greedy rule needs the embeddings")
    return _greedy(cache, thr, float(eps), dup, view, clusters, x_cache)


def _greedy(cache: SemDedupCache, thr: float, eps: float, dup: np.ndarray, view: EmbeddingView,
            clusters: np.ndarray | None, x_cache: dict | None) -> DedupOutcome:
    n = cache.n
    keep = np.ones(n, dtype=bool)
    ref = np.full(n, -1, dtype=np.int64)
    value = cache.nn_sim.copy()  # rows get the similarity to the kept sample they duplicate
    if clusters is not None:
        dup = dup & np.isin(cache.cluster, clusters)
    order = cache.order()
    ids, bounds = _segments(cache.cluster[order])
    has_dup = np.add.reduceat(dup[order].astype(np.int64), bounds[:-1]) > 0 if n else np.zeros(0, bool)
    flops = 0.0
    recomputed = 0
    for ci in np.flatnonzero(has_dup):
        lo, hi = int(bounds[ci]), int(bounds[ci + 1])
        members = order[lo:hi]
        cand = dup[members]
        nn_local = np.where(cache.nn_pos[members] >= 0, cache.rank[np.maximum(cache.nn_pos[members], 0)], -1)
        kept = ~cand
        # Candidates whose nearest earlier neighbour is not a candidate: that neighbour is kept,
        # so the candidate is dropped against it (vectorised).
        cidx = np.flatnonzero(cand)
        direct = ~cand[nn_local[cidx]]
        d_idx = cidx[direct]
        ref[members[d_idx]] = members[nn_local[d_idx]]
        # The rest depend on earlier decisions: resolve in order.
        rest = cidx[~direct]
        if len(rest):
            x = None
            rows: dict[int, int] = {}
            block = None
            for q, j in enumerate(rest.tolist()):
                i = int(nn_local[j])
                if kept[i]:
                    ref[members[j]] = members[i]
                    continue
                if j not in rows:
                    if x is None:
                        key = int(ids[ci])
                        if x_cache is not None and key in x_cache:
                            x = x_cache[key]
                        else:
                            x = normalise_rows(view.take(members), inplace=True)
                            if x_cache is not None:
                                x_cache[key] = x
                    g = max(1, min(256, (1 << 24) // max(1, j)))
                    group = rest[q:q + g]
                    block = x[group] @ x[:int(group[-1])].T
                    flops += 2.0 * block.shape[0] * block.shape[1] * x.shape[1]
                    rows = {int(jj): r for r, jj in enumerate(group.tolist())}
                recomputed += 1
                row = np.where(kept[:j], block[rows[j], :j], -np.inf)
                a = int(row.argmax())
                if float(row[a]) >= thr:
                    ref[members[j]] = members[a]
                    value[members[j]] = row[a]
                else:
                    kept[j] = True
        keep[members] = kept
    keep[ref < 0] = True
    return DedupOutcome(keep, ref, value, eps, thr, "greedy",
                        {"dropped": int((~keep).sum()), "greedy_recomputed_rows": recomputed, "greedy_flops": flops})


def calibrate_eps(cache: SemDedupCache, target_keep: float, rule: str = "paper",
                  view: EmbeddingView | None = None, *, seed: int = 0, sample_rows: int = 100_000) -> tuple[float, dict]:
    """The eps whose decisions keep the fraction closest to `target_keep`.

    Paper rule: exact, a quantile of nn_sim (ties can make the exact count unreachable; the
    nearest count is taken). Greedy rule: bisection over the nn_sim values of a seeded sample of
    whole clusters (about `sample_rows` samples), then applied to all clusters; the achieved
    pool-wide fraction is reported by the caller.
    """
    if not 0.0 <= target_keep <= 1.0:
        raise UsageError(f"target_keep must be in [0, 1], not {target_keep}")
    if rule == "paper":
        return _calibrate_paper(cache.nn_sim, target_keep)
    if rule != "greedy":
        raise UsageError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    if view is None:
        raise UsageError("the greedy rule needs the embeddings")
    present, sizes = np.unique(cache.cluster, return_counts=True)
    perm = np.random.default_rng(seed).permutation(len(present))
    take = int(np.searchsorted(np.cumsum(sizes[perm]), sample_rows)) + 1
    chosen = np.sort(present[perm[:take]])
    in_sample = np.isin(cache.cluster, chosen)
    n_s = int(in_sample.sum())
    vals = np.unique(cache.nn_sim[in_sample & ~np.isnan(cache.nn_sim)]).astype(np.float64)
    target = target_keep * n_s
    x_cache: dict = {}

    def kept_at(thr: float) -> int:
        out = apply_eps(cache, 1.0 - thr, "greedy", view, clusters=chosen, x_cache=x_cache)
        return int(out.keep[in_sample].sum())

    if len(vals) == 0:
        return _eps_from_thr(1.0), {"calibration_rows": n_s, "calibration_clusters": int(len(chosen))}
    # candidate thresholds: each observed value (drop >= it) plus "above everything"
    cands = np.r_[vals, np.nextafter(np.float32(vals[-1]), np.float32(np.inf))]
    lo, hi = 0, len(cands) - 1  # kept count grows with the threshold index
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        k = kept_at(float(cands[mid]))
        if best is None or abs(k - target) < abs(best[1] - target):
            best = (mid, k)
        if k < target:
            lo = mid + 1
        elif k > target:
            hi = mid - 1
        else:
            break
    thr = float(cands[best[0]])
    return _eps_from_thr(thr), {"calibration_rows": n_s, "calibration_clusters": int(len(chosen)),
                                "calibration_keep_fraction": best[1] / max(1, n_s)}


def _eps_from_thr(thr: float) -> float:
    """eps with 1 - eps == thr exactly (so apply_eps reproduces the calibrated decisions)."""
    eps = 1.0 - thr
    for _ in range(4):
        if 1.0 - eps == thr:
            break
        eps = np.nextafter(eps, -np.inf if 1.0 - eps < thr else np.inf)
    return float(eps)


def _calibrate_paper(nn_sim: np.ndarray, target_keep: float) -> tuple[float, dict]:
    n = len(nn_sim)
    v = np.sort(nn_sim[~np.isnan(nn_sim)].astype(np.float64))
    firsts = n - len(v)
    m = int(np.clip(round(target_keep * n) - firsts, 0, len(v)))  # non-first samples to keep
    if len(v) == 0:
        return _eps_from_thr(1.0), {"target_kept": firsts}
    above = float(np.nextafter(np.float32(v[-1]), np.float32(np.inf)))
    if m == len(v):
        thr = above
    else:
        # keep values < thr; ties at v[m] make `m` unreachable: take the nearer of the two counts
        t_low = float(v[m])
        k_low = int(np.searchsorted(v, t_low, "left"))
        t_high = float(np.nextafter(np.float32(v[m]), np.float32(np.inf)))
        k_high = int(np.searchsorted(v, t_high, "left"))
        thr = t_low if (m - k_low) <= (k_high - m) else t_high
    return _eps_from_thr(thr), {"target_kept": int(round(target_keep * n))}


# ---------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------

def _per_cluster(cache: SemDedupCache, out: DedupOutcome) -> pl.DataFrame:
    """cluster | size | dropped, for the report (per-sample nn data stays in the cache)."""
    size = cluster_sizes(cache.cluster)
    dropped = cluster_sizes(cache.cluster[~out.keep], len(size))
    present = np.flatnonzero(size)
    return pl.DataFrame({"cluster": pl.Series(present, dtype=pl.Int32), "size": pl.Series(size[present], dtype=pl.UInt32),
                         "dropped": pl.Series(dropped[present], dtype=pl.UInt32)})


def auto_k(n: int, per_cluster: int = 5000, cap: int = 50_000) -> int:
    """~5,000 samples per cluster (LAION-440M / 50k ≈ 8,800): the cost is Σ|C|² per cluster."""
    return int(min(cap, max(1, round(n / per_cluster))))


@register_stage
class SemanticDedup(Stage):
    """SemDeDup over clusters of `scorer`'s image embeddings; see the module docstring."""

    name = "semdedup"
    scope = "global"

    def needs_columns(self):
        return []

    def __init__(self, scorer: str = "datacomp-l14", kind: str = "img", eps: float | None = 0.07,
                 target_keep: float | None = None, rule: str = "paper", keep: str = "farthest",
                 k: int | None = None, niter: int = 20, seed: int | None = None, sample_size: int | None = None,
                 device: str = "auto", block_rows: int = 512, tile_cols: int = 8192, batch_rows: int = 65536,
                 calibration_rows: int = 100_000):
        if rule not in RULES:
            raise UsageError(f"semdedup: rule must be one of {', '.join(RULES)}, not {rule!r}")
        if keep not in KEEP_ORDERS:
            raise UsageError(f"semdedup: keep must be one of {', '.join(KEEP_ORDERS)}, not {keep!r}")
        if target_keep is not None and not 0.0 <= float(target_keep) <= 1.0:
            raise UsageError(f"semdedup: target_keep must be in [0, 1], not {target_keep}")
        if target_keep is None and eps is None:
            raise UsageError("semdedup: give eps or target_keep")
        if k is not None and int(k) < 1:
            raise UsageError("semdedup: k must be >= 1")
        if not scorer:
            raise UsageError("semdedup: name the scorer whose embeddings to use")
        self.scorer, self.kind, self.rule, self.keep = scorer, kind, rule, keep
        self.eps = None if target_keep is not None else float(eps)
        self.target_keep = None if target_keep is None else float(target_keep)
        self.k, self.niter, self.seed, self.sample_size, self.device = k, int(niter), seed, sample_size, device
        self.block_rows, self.tile_cols, self.batch_rows = int(block_rows), int(tile_cols), int(batch_rows)
        self.calibration_rows = int(calibration_rows)

    def needs_embeddings(self):
        return [(self.scorer, self.kind)]

    def cluster_spec(self, inp: StageInput) -> ClusterSpec:
        """The clustering this stage wants for this input (`.key()` names it in the cache)."""
        seed = int(self.seed if self.seed is not None else inp.seed)
        return ClusterSpec(k=int(self.k) if self.k else auto_k(len(inp.frame)), niter=self.niter, seed=seed,
                           sample_size=self.sample_size, scorer=self.scorer, kind=self.kind)

    def apply(self, inp: StageInput) -> StageResult:
        frame = inp.frame
        n = len(frame)
        uids = frame["uid"]
        if n == 0:
            return StageResult(decisions_frame(uids, pl.Series([], dtype=pl.Boolean)), {}, {"n_in": 0, "n_kept": 0})
        seed = int(self.seed if self.seed is not None else inp.seed)
        stats: dict[str, Any] = {}
        order = UidOrder(uids)
        clu = clustering_for_stage(inp, self.cluster_spec(inp), order=order, device=self.device)
        stats["clustering"] = clu.source
        stats["clustering_key"] = clu.identity
        cache_store = getattr(inp, "cache", None)
        key = "semdedup-" + short_hash(clu.identity, self.keep, seed if self.keep == "random" else "")
        got = cache_store.get(key) if cache_store is not None else None
        if got is not None and len(got.get("rank", ())) == n:
            cache = SemDedupCache.from_arrays(got, order, clu.cluster, clu.dist, {"keep": self.keep, "key": key})
            del got  # nn_sim's mapped pages: read once, they would count as memory while mapped
            stats["similarities"] = "cache"
        else:
            view = inp.embedding(self.scorer, self.kind)
            with console.progress(transient=True) as bar:
                task = bar.add_task("semdedup: similarities within clusters", total=n)
                corder = cluster_order(clu.cluster, clu.dist, self.keep, seed, order.rank)
                corder = corder.astype(index_dtype(n), copy=False)
                clu.dist = None  # only the order needed it: 4 bytes a sample fewer while the pass runs
                cache = semdedup_pass(view, clu.cluster, None, keep=self.keep, seed=seed, order=corder,
                                      block_rows=self.block_rows, tile_cols=self.tile_cols,
                                      batch_rows=self.batch_rows,
                                      progress=lambda done: bar.update(task, completed=done))
                del corder
            if cache_store is not None:
                cache_store.put(key, cache.to_arrays(order))
            stats["similarities"] = "computed"
            stats.update({f"pass_{k}": v for k, v in cache.params.items()
                          if k in ("flops", "seconds", "compute_seconds", "clusters", "largest_cluster", "pairs")})
        view = inp.embedding(self.scorer, self.kind) if self.rule == "greedy" else None
        if self.target_keep is not None:
            eps, cal = calibrate_eps(cache, self.target_keep, self.rule, view, seed=seed,
                                     sample_rows=self.calibration_rows)
            stats.update(cal)
        else:
            eps = float(self.eps)
        out = apply_eps(cache, eps, self.rule, view)
        stats.update(out.stats)
        stats.update({"eps": out.eps, "threshold": out.threshold, "rule": self.rule, "n_in": n,
                      "n_kept": int(out.keep.sum()), "keep_fraction": float(out.keep.mean())})
        artefacts = {"semdedup_clusters": _per_cluster(cache, out)}
        # What the decisions need, and no more: keep and value for every row; the sample each
        # dropped row duplicates, its cluster and rank (for `detail`) for the dropped rows only.
        keep, value, threshold = out.keep, out.value, out.threshold
        drop = np.flatnonzero(~keep).astype(index_dtype(n))
        d_ref, d_cluster, d_rank = out.ref_of(drop), cache.cluster[drop], cache.rank_of(drop)
        del cache, out, clu, order
        return StageResult(None, artefacts, stats, chunks=in_chunks(n, lambda s, e: self._decisions(
            uids, keep, value, threshold, drop, d_ref, d_cluster, d_rank, s, e)))

    @staticmethod
    def _decisions(uids: pl.Series, keep: np.ndarray, value: np.ndarray, threshold: float, drop: np.ndarray,
                   d_ref: np.ndarray, d_cluster: np.ndarray, d_rank: np.ndarray, start: int, stop: int) -> pl.DataFrame:
        """Decisions of input rows [start, stop); `drop` lists the dropped rows, `d_*` their facts."""
        k = keep[start:stop]
        dm = ~k
        a, b = np.searchsorted(drop, [start, stop])
        ref = np.zeros(stop - start, dtype=d_ref.dtype)
        ref[drop[a:b] - start] = d_ref[a:b]
        ref_idx = pl.select(pl.when(pl.Series(dm)).then(pl.Series(ref))).to_series()
        # detail only where it explains a drop
        detail = sparse_strings(dm, pl.select(pl.format("cluster={} rank={}", pl.Series(d_cluster[a:b]),
                                                        pl.Series(d_rank[a:b]))).to_series())
        return decisions_frame(
            uids.slice(start, stop - start), pl.Series(k),
            reason=reason_where(dm, REASON),
            value=pl.Series(value[start:stop]).fill_nan(None),
            threshold=const_column(threshold, stop - start, pl.Float64),
            ref_uid=uids.gather(ref_idx), detail=detail,
        ).with_columns(ref_idx.cast(pl.Int64).alias(REF_ROW))
