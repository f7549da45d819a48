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
from typing import Any, Iterator

import numpy as np
import polars as pl

from .. import console
from ..cluster import ClusterSpec, UidOrder, clustering_for_stage, normalise_rows, short_hash
from ..clustered import BATCH_ROWS, ClusterBatch, ClusteredInput, in_input_order, read_range, seeded_keys
from ..errors import UsageError
from .base import (REF_ROW, EmbeddingView, Stage, StageInput, StageResult, decisions_frame, reason_where,
                   register_stage)

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

def order_key(keep: str, dist: np.ndarray, uid: np.ndarray, seed: int = 0) -> np.ndarray:
    """The within-cluster sort key (ascending) of a keep order: farthest from the centroid first,
    closest first, or a seeded random order (a key per uid, `seeded_keys`)."""
    if keep == "farthest":
        return -np.asarray(dist, dtype=np.float32)  # exact: negation does not round
    if keep == "closest":
        return np.asarray(dist, dtype=np.float32)
    if keep == "random":
        return seeded_keys(uid, seed)
    raise UsageError(f"keep must be one of {', '.join(KEEP_ORDERS)}, not {keep!r}")


def cluster_order(cluster: np.ndarray, dist: np.ndarray, keep: str = "farthest", seed: int = 0,
                  tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted by cluster, then by the keep order (the earliest of a duplicate group is
    kept), ties by `tiebreak` (integers ordered like the uids), then position: the order the
    stage's cluster-major passes give each cluster's rows."""
    n = len(cluster)
    tb = np.arange(n) if tiebreak is None else np.asarray(tiebreak)
    # lexsort is stable: equal (cluster, key, tiebreak) keep input order
    return np.lexsort((tb, order_key(keep, dist, tb, seed), cluster))


def in_keep_order(bt: ClusterBatch, keep: str, seed: int) -> ClusterBatch:
    """A batch of the cluster-major listing (farthest first, ties by uid) in the keep order."""
    if keep == "farthest":
        return bt  # the listing's own order
    return bt.reordered(order_key(keep, bt.dist, bt.uid, seed))[0]


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


def max_earlier_torch(x: np.ndarray, device: str, block_rows: int = 512,
                      tile_cols: int = 8192) -> tuple[np.ndarray, np.ndarray, float]:
    """`max_earlier` as torch matmuls on `device` (a GPU when the stage finds one): the same
    blocks, tiles, masking and first-occurrence ties; the cluster's rows go to the device once."""
    import torch

    n = len(x)
    best = np.full(n, -np.inf, dtype=np.float32)
    arg = np.full(n, -1, dtype=np.int64)
    d = x.shape[1] if x.ndim == 2 else 0
    if n == 0:
        return best, arg, 0.0
    flops = 0.0
    tile_cols = max(int(tile_cols), int(block_rows))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    bt = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    at = torch.full((n,), -1, dtype=torch.int64, device=device)
    with torch.no_grad():
        for s in range(0, n, block_rows):
            e = min(n, s + block_rows)
            q = xt[s:e]
            m = e - s
            tri = torch.ones((m, m), dtype=torch.bool, device=device).triu()
            for t in range(0, e, tile_cols):
                t2 = min(e, t + tile_cols)
                sims = q @ xt[t:t2].T
                flops += 2.0 * m * (t2 - t) * d
                if t2 > s:  # this tile holds columns of the block itself: hide i >= j
                    lo = max(s, t)
                    sims[:, lo - t:].masked_fill_(tri[:, lo - s:t2 - s], float("-inf"))
                v, a = sims.max(dim=1)
                upd = v > bt[s:e]  # strict: an earlier tile keeps ties (first occurrence)
                bt[s:e] = torch.where(upd, v, bt[s:e])
                at[s:e] = torch.where(upd, a + t, at[s:e])
                del sims
    best[:] = bt.cpu().numpy()
    arg[:] = at.cpu().numpy()
    return best, arg, flops


def similarity_device(device: str | None) -> str | None:
    """Where the within-cluster similarities run: a torch CUDA device when the stage's `device`
    allows a GPU and torch sees one, else None (numpy / BLAS on the CPU)."""
    req = (device or "auto").strip().lower()
    if req == "cpu":
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    if req.startswith("gpu:") and req[4:].split(",")[0].strip().isdigit():
        return f"cuda:{int(req[4:].split(',')[0])}"
    return "cuda:0"


# ---------------------------------------------------------------------------------------------
# The similarity pass and its cache
# ---------------------------------------------------------------------------------------------

def similarity_pass(cin: ClusteredInput, keep: str = "farthest", seed: int = 0, *, block_rows: int = 512,
                    tile_cols: int = 8192, batch_rows: int = BATCH_ROWS, stats: dict | None = None,
                    progress=None, device: str | None = None) -> Iterator[tuple[ClusterBatch, np.ndarray, np.ndarray]]:
    """The one expensive step, batch by batch of whole clusters: (batch in keep order, nn_sim
    float32 = max cos to an earlier row of its cluster (NaN for a cluster's first row), nn
    int32 = that row's place in its cluster (-1: none, first occurrence on ties)). Memory: one
    batch of embeddings and one block_rows × tile_cols similarity tile. `stats` gets the flops,
    seconds, clusters, largest cluster and pairs. `device`: a torch device for the matmuls
    (`similarity_device`), None for numpy."""
    st = stats if stats is not None else {}
    st.update(flops=0.0, compute_seconds=0.0, clusters=0, largest_cluster=0, pairs=0.0)
    t0 = time.perf_counter()
    done = 0
    for bt in cin.batches(batch_rows):
        bt = in_keep_order(bt, keep, seed)
        m = len(bt)
        sim = np.full(m, np.nan, dtype=np.float32)
        nn = np.full(m, -1, dtype=np.int32)
        sizes = np.diff(bt.bounds)
        if int(sizes.max()) > 1:
            x = normalise_rows(cin.embeddings(bt.pos), inplace=True)
            for a, b in zip(bt.bounds[:-1].tolist(), bt.bounds[1:].tolist()):
                if b - a < 2:
                    continue
                tc = time.perf_counter()
                s, arg, f = (max_earlier(x[a:b], block_rows, tile_cols) if device is None
                             else max_earlier_torch(x[a:b], device, block_rows, tile_cols))
                st["compute_seconds"] += time.perf_counter() - tc
                st["flops"] += f
                has = arg >= 0
                sim[a:b][has] = s[has]
                nn[a:b][has] = arg[has]
            del x
        st["clusters"] += len(sizes)
        st["largest_cluster"] = max(st["largest_cluster"], int(sizes.max()))
        st["pairs"] += float((sizes.astype(np.float64) * (sizes - 1) / 2).sum())
        done += m
        if progress is not None:
            progress(done)
        yield bt, sim, nn
    st["seconds"] = round(time.perf_counter() - t0, 3)
    st["compute_seconds"] = round(st["compute_seconds"], 3)


def _part(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """a[lo:hi]; a cache file is read with a plain read (mapped pages would stay resident)."""
    if isinstance(a, np.memmap) and a.filename is not None:
        return read_range(a.filename, lo, hi)
    return np.asarray(a[lo:hi])


@dataclass
class SemDedupCache:
    """The similarity pass's results over a `ClusteredInput`, in its listing order (the keep
    order within each cluster): arrays in memory or the runner's cache files, read a batch at a
    time. Any eps, either rule and a target keep fraction are decided from it."""

    cin: ClusteredInput
    nn_sim: np.ndarray  # float32 (n,)
    nn: np.ndarray      # int32 (n,): the nearest earlier row's place in its cluster, -1 for none
    keep: str = "farthest"
    seed: int = 0

    @property
    def n(self) -> int:
        return self.cin.n

    def batches(self, rows: int = BATCH_ROWS) -> Iterator[tuple[ClusterBatch, np.ndarray, np.ndarray]]:
        at = 0
        for bt in self.cin.batches(rows):
            bt = in_keep_order(bt, self.keep, self.seed)
            m = len(bt)
            yield bt, _part(self.nn_sim, at, at + m), _part(self.nn, at, at + m)
            at += m
        if at != self.n:
            raise UsageError(f"the SemDeDup cache holds {self.n} samples, the input {at}")

    def sims(self, rows: int = 1 << 20) -> Iterator[np.ndarray]:
        """nn_sim a chunk at a time."""
        for s in range(0, self.n, rows):
            yield _part(self.nn_sim, s, min(self.n, s + rows))


def semdedup_pass(view: EmbeddingView, cluster: np.ndarray, dist: np.ndarray, *, keep: str = "farthest",
                  seed: int = 0, tiebreak: np.ndarray | None = None, block_rows: int = 512,
                  tile_cols: int = 8192, batch_rows: int = BATCH_ROWS) -> SemDedupCache:
    """`similarity_pass` over in-memory rows (input row i = `view` row i), results in memory."""
    tb = np.arange(len(cluster)) if tiebreak is None else np.asarray(tiebreak)
    cin = ClusteredInput.from_arrays(cluster, dist, tb, embed=view.take)
    nn_sim, nn = _in_memory(similarity_pass(cin, keep, seed, block_rows=block_rows, tile_cols=tile_cols,
                                            batch_rows=batch_rows))
    return SemDedupCache(cin, nn_sim, nn, keep, seed)


def _in_memory(rows) -> tuple[np.ndarray, np.ndarray]:
    """A pass's (nn_sim, nn) concatenated (a caller without a cache to write them to)."""
    sims, nns = [np.empty(0, np.float32)], [np.empty(0, np.int32)]
    for _, s, nn in rows:
        sims.append(s)
        nns.append(nn)
    return np.concatenate(sims), np.concatenate(nns)


# ---------------------------------------------------------------------------------------------
# Applying eps
# ---------------------------------------------------------------------------------------------

def threshold_of(eps: float) -> float:
    return 1.0 - float(eps)


def greedy_in_cluster(sim: np.ndarray, nn: np.ndarray, thr: float, rows_of) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray, int, float]:
    """The greedy keep-set rule in one cluster (rows in keep order): a row is dropped only as a
    duplicate of an earlier *kept* row. (keep, ref = place of the kept row it duplicates or -1,
    value = cosine to it (else nn_sim), rows recomputed, flops). Rows whose nearest earlier row
    is kept are decided from the pass's results; only rows whose nearest earlier row was dropped
    get their similarities to the earlier rows recomputed (`rows_of()`: the cluster's unit rows)."""
    m = len(sim)
    cand = ge_threshold(sim, thr)  # NaN (the first row) compares False
    kept = ~cand
    ref = np.full(m, -1, dtype=np.int64)
    value = np.array(sim, dtype=np.float32)
    cidx = np.flatnonzero(cand)
    direct = ~cand[nn[cidx]]  # its nearest earlier row is not a candidate: that row is kept
    ref[cidx[direct]] = nn[cidx[direct]]
    rest = cidx[~direct]
    recomputed, flops = 0, 0.0
    x = block = None
    rows: dict[int, int] = {}
    for q, j in enumerate(rest.tolist()):  # these depend on earlier decisions: in order
        i = int(nn[j])
        if kept[i]:
            ref[j] = i
            continue
        if j not in rows:
            if x is None:
                x = rows_of()
            g = max(1, min(256, (1 << 24) // max(1, j)))
            group = rest[q:q + g]
            block = x[group] @ x[:int(group[-1])].T
            flops += 2.0 * block.shape[0] * block.shape[1] * x.shape[1]
            rows = {int(jj): r for r, jj in enumerate(group.tolist())}
        recomputed += 1
        row = np.where(kept[:j], block[rows[j], :j], -np.inf)
        a = int(row.argmax())
        if float(row[a]) >= thr:
            ref[j] = a
            value[j] = row[a]
        else:
            kept[j] = True
    kept[ref < 0] = True
    return kept, ref, value, recomputed, flops


def decide(cache: SemDedupCache, thr: float, rule: str = "paper",
           stats: dict | None = None) -> Iterator[tuple[ClusterBatch, np.ndarray, np.ndarray, np.ndarray]]:
    """(batch, keep, ref = batch row it duplicates or -1, value) for every batch of the cache at
    the threshold 1 - eps. The paper rule needs nothing but the cache; the greedy rule reads
    the embeddings of the clusters that hold a chain."""
    if rule not in RULES:
        raise UsageError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    st = stats if stats is not None else {}
    st.setdefault("dropped", 0)
    if rule == "greedy":
        st.setdefault("greedy_recomputed_rows", 0)
        st.setdefault("greedy_flops", 0.0)
    for bt, sim, nn in cache.batches():
        dup = ge_threshold(sim, thr)
        if rule == "paper":
            keep, value = ~dup, sim
            ref = np.where(dup, bt.starts() + nn, -1)
        else:
            keep = np.ones(len(bt), dtype=bool)
            ref = np.full(len(bt), -1, dtype=np.int64)
            value = np.array(sim)
            for a, b in zip(bt.bounds[:-1].tolist(), bt.bounds[1:].tolist()):
                if not dup[a:b].any():
                    continue

                def rows_of(a=a, b=b):
                    return normalise_rows(cache.cin.embeddings(bt.pos[a:b]), inplace=True)
                k, r, v, rec, f = greedy_in_cluster(sim[a:b], nn[a:b], thr, rows_of)
                keep[a:b], value[a:b] = k, v
                ref[a:b] = np.where(r >= 0, a + r, -1)
                st["greedy_recomputed_rows"] += rec
                st["greedy_flops"] += f
        st["dropped"] += int((~keep).sum())
        yield bt, keep, ref, value


@dataclass
class DedupOutcome:
    keep: np.ndarray     # bool (n,), input order
    ref_pos: np.ndarray  # int64 (n,): input row of the sample a dropped one duplicates, -1 if kept
    value: np.ndarray    # float32: cosine to ref (dropped) / nn_sim (kept), NaN when none
    eps: float
    threshold: float
    rule: str
    stats: dict[str, Any] = field(default_factory=dict)


def apply_eps(cache: SemDedupCache, eps: float, rule: str = "paper") -> DedupOutcome:
    """Every row's decision at one eps, in input order, for a cache over in-memory rows
    (`semdedup_pass`): what the stage decides batch by batch, gathered into arrays."""
    thr = threshold_of(eps)
    n = cache.n
    keep = np.ones(n, dtype=bool)
    ref = np.full(n, -1, dtype=np.int64)
    value = np.full(n, np.nan, dtype=np.float32)
    stats: dict = {}
    for bt, k, r, v in decide(cache, thr, rule, stats):
        keep[bt.pos], value[bt.pos] = k, v
        ref[bt.pos] = np.where(r >= 0, bt.pos[np.maximum(r, 0)], -1)
    return DedupOutcome(keep, ref, value, float(eps), thr, rule, stats)


def calibrate_eps(cache: SemDedupCache, target_keep: float, rule: str = "paper", *, seed: int = 0,
                  sample_rows: int = 100_000) -> tuple[float, dict]:
    """The eps whose decisions keep the fraction closest to `target_keep`.

    Paper rule: exact, a quantile of nn_sim found from streamed histograms (ties can make the
    exact count unreachable; the nearest count is taken). Greedy rule: bisection over the
    nn_sim values of a seeded sample of whole clusters (about `sample_rows` samples), then
    applied to all clusters; the achieved pool-wide fraction is reported by the caller.
    """
    if not 0.0 <= target_keep <= 1.0:
        raise UsageError(f"target_keep must be in [0, 1], not {target_keep}")
    if rule == "paper":
        return _calibrate_paper(cache.sims, cache.n, target_keep)
    if rule != "greedy":
        raise UsageError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    sizes, _ = cache.cin.totals()
    present = np.flatnonzero(sizes)
    perm = np.random.default_rng(seed).permutation(len(present))
    take = int(np.searchsorted(np.cumsum(sizes[present][perm]), sample_rows)) + 1
    chosen = set(present[perm[:take]].tolist())
    sample = []  # (sim, nn, rows_of) of each chosen cluster
    for bt, sim, nn in cache.batches():
        for ci, (a, b) in enumerate(zip(bt.bounds[:-1].tolist(), bt.bounds[1:].tolist())):
            if int(bt.ids[ci]) in chosen:
                pos = bt.pos[a:b].copy()
                memo: list = []

                def rows_of(pos=pos, memo=memo):
                    if not memo:
                        memo.append(normalise_rows(cache.cin.embeddings(pos), inplace=True))
                    return memo[0]
                sample.append((sim[a:b].copy(), nn[a:b].copy(), rows_of))
    n_s = sum(len(s) for s, _, _ in sample)
    info = {"calibration_rows": n_s, "calibration_clusters": len(sample)}
    vals = np.unique(np.concatenate([s[~np.isnan(s)] for s, _, _ in sample] or [np.empty(0, np.float32)]))
    if len(vals) == 0:
        return _eps_from_thr(1.0), info
    target = target_keep * n_s

    def kept_at(thr: float) -> int:
        return sum(int(greedy_in_cluster(s, nn, thr, rows_of)[0].sum()) for s, nn, rows_of in sample)

    # candidate thresholds: each observed value (drop >= it) plus "above everything"
    cands = np.r_[vals.astype(np.float64), float(np.nextafter(np.float32(vals[-1]), np.float32(np.inf)))]
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
    return _eps_from_thr(float(cands[best[0]])), {**info, "calibration_keep_fraction": best[1] / max(1, n_s)}


def _eps_from_thr(thr: float) -> float:
    """eps with 1 - eps == thr exactly (so a rerun with it reproduces the calibrated decisions)."""
    eps = 1.0 - thr
    for _ in range(4):
        if 1.0 - eps == thr:
            break
        eps = np.nextafter(eps, -np.inf if 1.0 - eps < thr else np.inf)
    return float(eps)


def _sortable(v: np.ndarray) -> np.ndarray:
    """uint32 keys that order like the float32 values (NaN excluded by the caller)."""
    b = np.asarray(v, dtype=np.float32).view(np.uint32)
    return np.where(b >> np.uint32(31), ~b, b | np.uint32(0x80000000))


def _from_sortable(key: int) -> float:
    b = np.uint32(key)
    b = b & np.uint32(0x7FFFFFFF) if b >> np.uint32(31) else ~b
    return float(np.array(b, dtype=np.uint32).view(np.float32))


def _calibrate_paper(chunks, n: int, target_keep: float) -> tuple[float, dict]:
    """Exact quantile of the non-NaN values that `chunks()` yields (float32), from two streamed
    histograms of their sortable 32-bit keys (high 16 bits, then low 16 bits inside one bin):
    two passes, 65,536 counters, nothing per sample."""
    hi_hist = np.zeros(1 << 16, dtype=np.int64)
    for c in chunks():
        c = c[~np.isnan(c)]
        hi_hist += np.bincount(_sortable(c) >> np.uint32(16), minlength=1 << 16)
    total = int(hi_hist.sum())
    firsts = n - total
    target = int(round(target_keep * n))
    m = int(np.clip(target - firsts, 0, total))  # non-first samples to keep
    if total == 0:
        return _eps_from_thr(1.0), {"target_kept": firsts}
    top_bin = int(np.flatnonzero(hi_hist)[-1])

    def low_hist(bin_: int) -> np.ndarray:
        h = np.zeros(1 << 16, dtype=np.int64)
        for c in chunks():
            k = _sortable(c[~np.isnan(c)])
            k = k[(k >> np.uint32(16)) == bin_]
            h += np.bincount(k & np.uint32(0xFFFF), minlength=1 << 16)
        return h

    if m == total:  # keep everything: just above the largest value
        top = int(np.flatnonzero(low_hist(top_bin))[-1])
        thr = float(np.nextafter(np.float32(_from_sortable((top_bin << 16) | top)), np.float32(np.inf)))
        return _eps_from_thr(thr), {"target_kept": target}
    # the m-th smallest value (0-based), and how many values are below it and at it
    cum = np.cumsum(hi_hist)
    b = int(np.searchsorted(cum, m, side="right"))
    below_bin = int(cum[b - 1]) if b else 0
    lh = np.cumsum(low_hist(b))
    lo16 = int(np.searchsorted(lh, m - below_bin, side="right"))
    value = np.float32(_from_sortable((b << 16) | lo16))
    k_low = below_bin + (int(lh[lo16 - 1]) if lo16 else 0)   # values < v[m]
    k_high = below_bin + int(lh[lo16])                       # values <= v[m]
    # keep values < thr; ties at v[m] make `m` unreachable: take the nearer of the two counts
    thr = float(value) if (m - k_low) <= (k_high - m) else float(np.nextafter(value, np.float32(np.inf)))
    return _eps_from_thr(thr), {"target_kept": target}


# ---------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------

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
        return self.spec_for(len(inp.frame), inp.seed)

    def spec_for(self, n: int, run_seed: int) -> ClusterSpec:
        """The clustering this stage wants for n input samples in a run seeded `run_seed`."""
        seed = int(self.seed if self.seed is not None else run_seed)
        return ClusterSpec(k=int(self.k) if self.k else auto_k(n), niter=self.niter, seed=seed,
                           sample_size=self.sample_size, scorer=self.scorer, kind=self.kind)

    def apply(self, inp: StageInput) -> StageResult:
        frame = inp.frame
        n = len(frame)
        uids = frame["uid"]
        if n == 0:
            return StageResult(decisions_frame(uids, pl.Series([], dtype=pl.Boolean)), {}, {"n_in": 0, "n_kept": 0})
        seed = int(self.seed if self.seed is not None else inp.seed)
        order = UidOrder(uids)
        clu = clustering_for_stage(inp, self.cluster_spec(inp), order=order, device=self.device)
        cin = ClusteredInput.from_arrays(clu.cluster, clu.dist, order.tiebreak(), k=clu.k, uids=uids,
                                         embed=lambda pos: inp.embedding(self.scorer, self.kind).take(pos),
                                         identity=clu.identity, source=clu.source)
        res = self.run_clustered(cin, None, seed, getattr(inp, "cache", None))
        return StageResult(in_input_order(res.decision_chunks(), n, REF_ROW), res.artefacts, res.stats)

    def run_clustered(self, cin: ClusteredInput, budget, seed: int, cache=None) -> StageResult:
        """SemDeDup over a cluster-major listing: the similarity pass (or its cache), then the
        decisions batch by batch; they carry each row's `POS` and its duplicate's `REF_POS`."""
        n = cin.n
        # where the similarities run (or would have: a cached pass is the same on either)
        stats: dict[str, Any] = {"clustering": cin.source, "clustering_key": cin.identity,
                                 "similarity_device": similarity_device(self.device) or "cpu"}
        key = "semdedup-" + short_hash(cin.identity, self.keep, seed if self.keep == "random" else "", "listing")
        got = cache.get(key) if cache is not None else None
        if got is not None and len(got.get("nn_sim", ())) == n:
            stats["similarities"] = "cache"
        else:
            pstats: dict = {}
            with console.progress(transient=True) as bar:
                task = bar.add_task("semdedup: similarities within clusters", total=n)
                sim_dev = similarity_device(self.device)
                rows = similarity_pass(cin, self.keep, seed, block_rows=self.block_rows, tile_cols=self.tile_cols,
                                       batch_rows=self.batch_rows, stats=pstats,
                                       progress=lambda done: bar.update(task, completed=done), device=sim_dev)
                if cache is not None:  # written as it is computed: nothing n-sized in memory
                    cache.put_stream(key, {"nn_sim": np.float32, "nn": np.int32}, n,
                                     ((s, nn) for _, s, nn in rows))
                    got = cache.get(key)
                else:
                    got = dict(zip(("nn_sim", "nn"), _in_memory(rows)))
            stats["similarities"] = "computed"
            stats.update({f"pass_{k}": v for k, v in pstats.items()})
        sd = SemDedupCache(cin, got["nn_sim"], got["nn"], self.keep, seed)
        if self.target_keep is not None:
            eps, cal = calibrate_eps(sd, self.target_keep, self.rule, seed=seed, sample_rows=self.calibration_rows)
            stats.update(cal)
        else:
            eps = float(self.eps)
        thr = threshold_of(eps)
        stats.update({"eps": eps, "threshold": thr, "rule": self.rule, "n_in": n})
        artefacts: dict[str, Any] = {}
        size, dropped = np.zeros(cin.k, dtype=np.int64), np.zeros(cin.k, dtype=np.int64)

        def chunks():
            dstats: dict = {}
            for bt, keep, ref, value in decide(sd, thr, self.rule, dstats):
                dm = ~keep
                size[:] += np.bincount(bt.cluster, minlength=cin.k)
                dropped[:] += np.bincount(bt.cluster[dm], minlength=cin.k)
                # detail only where it explains a drop
                detail = sparse_strings(dm, pl.select(pl.format("cluster={} rank={}", pl.Series(bt.cluster[dm]),
                                                                pl.Series(bt.local_rank()[dm]))).to_series())
                yield cin.decisions(bt, keep, reason=reason_where(dm, REASON),
                                    value=pl.Series(value, dtype=pl.Float64).fill_nan(None),
                                    threshold=const_column(thr, len(bt), pl.Float64), ref=ref, detail=detail)
            kept = n - dstats["dropped"]
            stats.update(dstats)
            stats.update({"n_kept": kept, "keep_fraction": kept / n if n else 0.0})
            present = np.flatnonzero(size)
            artefacts["semdedup_clusters"] = pl.DataFrame({
                "cluster": pl.Series(present, dtype=pl.Int32), "size": pl.Series(size[present], dtype=pl.UInt32),
                "dropped": pl.Series(dropped[present], dtype=pl.UInt32)})
        return StageResult(None, artefacts, stats, chunks=chunks)
