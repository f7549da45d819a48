"""Spherical k-means over an `EmbeddingView`, trained on a seeded sample, assigned in streamed chunks.

Used by SemDeDup (Abbas et al. 2023: spherical k-means on L2-normalised image embeddings,
LAION-440M k=50,000, niter 100, seed 1234), DBP (Abbas et al. 2024: k=500 on LAION-DeDup-280M,
k=100 on DataComp medium) and SSP (Sorscher et al. 2022).

Why not `faiss.Kmeans(...).train(all_rows)`: FAISS silently subsamples to
`max_points_per_centroid * k` rows (256·k) and first converts its input to one contiguous
float32 array, so a memory-mapped pool is loaded whole. Here the training sample is drawn
explicitly (seeded, recorded) and read with `view.take`; FAISS's own subsampling is switched
off; every row is then assigned chunk by chunk, so resident memory is one chunk plus the sample.

Distances are cosine distances, `1 - cos(x, centroid)`, with x and the centroids L2-normalised.
Rows that are all zero or not finite are assigned with a zero vector (cosine 0, distance 1).

A `ClusterResult` is position-aligned with the view it was computed on (`save_clustering` /
`load_clustering` write and read it as .npy files; `clustering_frame` keys it by uid). Stages get
their clustering through `clustering_for_stage`: frame columns `cluster` / `centroid_dist`, else
the runner's array cache (`StageInput.cache`, keyed by the clustering parameters and the uid-set
fingerprint, stored in uid order), else computed and cached, so changing eps or a budget and
re-running never re-clusters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .errors import CurateError, UsageError
from .stages.base import EmbeddingView, index_dtype

DEFAULT_CHUNK_ROWS = 65536
# FAISS's default max_points_per_centroid: more training points than this per centroid add little.
POINTS_PER_CENTROID = 256
# Cap on the training sample: 2**19 rows, and at most MAX_TRAIN_BYTES of float32 (256 MiB:
# 131,072 rows at d = 512, 87,381 at d = 768), so the sample's memory does not grow with the
# embedding size; but never under 39 points per centroid (FAISS warns below that), so above
# k = 3,361 at d = 512 it grows with k (195,000 rows, 381 MiB, at k = 5000).
MAX_TRAIN_ROWS = 1 << 19
MAX_TRAIN_BYTES = 256 << 20
MIN_POINTS_PER_CENTROID = 39


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """Where FAISS runs: `cpu`, or `gpu` on the listed device ids."""

    kind: str = "cpu"
    gpu_ids: tuple[int, ...] = ()

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else "gpu:" + ",".join(map(str, self.gpu_ids))


def faiss_num_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_device(request: str | None = "auto", num_gpus: int | None = None) -> Device:
    """Turn `auto` | `cpu` | `gpu` | `gpu:0,2` into a Device.

    `auto` takes every GPU FAISS sees (`faiss.get_num_gpus() > 0`), else the CPU. `num_gpus`
    overrides what FAISS reports (the caller may already know; tests use it to exercise the
    GPU branches on a CPU-only machine).
    """
    req = (request or "auto").strip().lower()
    n = faiss_num_gpus() if num_gpus is None else int(num_gpus)
    if req == "cpu":
        return Device("cpu")
    if req == "auto":
        return Device("gpu", tuple(range(n))) if n > 0 else Device("cpu")
    if req == "gpu" or req.startswith("gpu:"):
        if n <= 0:
            raise UsageError(f"device {request!r} asked for, but FAISS sees no GPU (use device='cpu' or 'auto')")
        if req == "gpu":
            return Device("gpu", tuple(range(n)))
        try:
            ids = tuple(int(t) for t in req[4:].split(",") if t.strip() != "")
        except ValueError:
            raise UsageError(f"bad device {request!r}: expected gpu:ID[,ID...]") from None
        if not ids or len(set(ids)) != len(ids) or any(i < 0 or i >= n for i in ids):
            raise UsageError(f"bad device {request!r}: FAISS sees {n} GPU(s) (ids 0..{n - 1})")
        return Device("gpu", ids)
    raise UsageError(f"bad device {request!r}: expected auto, cpu, gpu or gpu:ID[,ID...]")


def flat_ip_index(dim: int, device: Device):
    """An empty exact inner-product index on the device (the assignment / training index)."""
    import faiss

    cpu_index = faiss.IndexFlatIP(dim)
    if device.kind == "cpu":
        return cpu_index
    if not hasattr(faiss, "StandardGpuResources"):
        raise CurateError(f"device {device} needs a GPU build of FAISS (pip install faiss-gpu); "
                          "this one is CPU-only")
    if len(device.gpu_ids) == 1:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, device.gpu_ids[0], cpu_index)
        index.referenced_objects = [res]  # keep the resources alive as long as the index
        return index
    return faiss.index_cpu_to_gpus_list(cpu_index, gpus=list(device.gpu_ids))


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------

def normalise_rows(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """L2-normalised float32 rows; zero or non-finite rows become zero vectors.

    Returns a copy unless `inplace` is set and x is a writeable, C-contiguous float32 array that
    owns its memory (a block a view has just allocated for the caller, never a view into
    someone's array). Works in row blocks, so temporaries stay small. Every path in curate
    (and the benchmark's dense reference) uses this formula, so similarities agree bit for bit.
    """
    x = np.asarray(x)
    if not (inplace and x.dtype == np.float32 and x.flags.writeable and x.flags.owndata
            and x.flags.c_contiguous and x.ndim == 2):
        x = np.array(x, dtype=np.float32, order="C", copy=True)
    for s in range(0, len(x), 8192):
        blk = x[s:s + 8192]
        bad = ~np.isfinite(blk).all(axis=1)
        if bad.any():
            blk[bad] = 0.0
        norms = np.linalg.norm(blk, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        blk /= norms
    return x


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------

@dataclass
class ClusterSpec:
    """What a clustering is computed from; `key()` names it for the runner's cache."""

    k: int = 100
    niter: int = 20
    seed: int = 0
    sample_size: int | None = None  # None: default_sample_size(N, k, d)
    scorer: str = ""
    kind: str = "img"

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ClusterResult:
    assignments: np.ndarray  # int32 (N,): centroid id of each row
    distances: np.ndarray    # float32 (N,): 1 - cos(row, its centroid)
    centroids: np.ndarray    # float32 (k, d): unit rows
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def sizes(self) -> np.ndarray:
        return cluster_sizes(self.assignments, self.k)


def clustering_frame(uids: pl.Series | list[str], result: ClusterResult) -> pl.DataFrame:
    """uid | cluster | centroid_dist: the per-sample columns stages accept as a provided clustering."""
    return pl.DataFrame({
        "uid": pl.Series("uid", uids, dtype=pl.Utf8),
        "cluster": pl.Series("cluster", result.assignments, dtype=pl.Int32),
        "centroid_dist": pl.Series("centroid_dist", result.distances, dtype=pl.Float32),
    })


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_clustering(result: ClusterResult, directory: str | os.PathLike) -> Path:
    """Write assignments.npy, distances.npy, centroids.npy and params.json (last: its presence
    marks a complete save) into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").unlink(missing_ok=True)
    _atomic_npy(d / "assignments.npy", np.ascontiguousarray(result.assignments, dtype=np.int32))
    _atomic_npy(d / "distances.npy", np.ascontiguousarray(result.distances, dtype=np.float32))
    _atomic_npy(d / "centroids.npy", np.ascontiguousarray(result.centroids, dtype=np.float32))
    tmp = d / f".params.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result.params, sort_keys=True, default=str))
    os.replace(tmp, d / "params.json")
    return d


def load_clustering(directory: str | os.PathLike, mmap: bool = False) -> ClusterResult:
    d = Path(directory)
    if not (d / "params.json").exists():
        raise UsageError(f"no complete clustering in {d}")
    mode = "r" if mmap else None
    return ClusterResult(
        assignments=np.load(d / "assignments.npy", mmap_mode=mode),
        distances=np.load(d / "distances.npy", mmap_mode=mode),
        centroids=np.load(d / "centroids.npy"),
        params=json.loads((d / "params.json").read_text()),
    )


# ---------------------------------------------------------------------------------------------
# Training and assignment
# ---------------------------------------------------------------------------------------------

def default_sample_size(n: int, k: int, dim: int = 512) -> int:
    """min(N, 256·k, 2**19, 256 MiB of float32 rows), but never under 39·k (FAISS's own floor)."""
    cap = min(MAX_TRAIN_ROWS, MAX_TRAIN_BYTES // (4 * max(int(dim), 1)))
    return int(min(n, max(min(POINTS_PER_CENTROID * k, cap), MIN_POINTS_PER_CENTROID * k)))


def training_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row positions of the seeded training sample (sorted: the view reads sequentially)."""
    size = int(min(max(size, 0), n))
    if size == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def train_centroids(sample: np.ndarray, k: int, *, niter: int = 20, seed: int = 0,
                    device: Device | None = None) -> np.ndarray:
    """Spherical k-means on the (already normalised) float32 sample; returns unit centroids (k, d).

    FAISS's subsampling is disabled (max_points_per_centroid large enough for the whole sample),
    so what trains is exactly the sample given.
    """
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    n, d = sample.shape
    if not 1 <= k <= n:
        raise UsageError(f"cannot train {k} centroids on {n} rows")
    cp = faiss.ClusteringParameters()
    cp.niter = int(niter)
    cp.seed = int(seed) % (2 ** 31)  # a C int in FAISS
    cp.spherical = True
    cp.verbose = False
    cp.nredo = 1
    cp.max_points_per_centroid = int(math.ceil(n / k)) + 1
    cp.min_points_per_centroid = 1
    clus = faiss.Clustering(d, k, cp)
    index = flat_ip_index(d, device or Device("cpu"))
    clus.train(sample, index)
    # FAISS renormalises the centroids after every update (spherical=True): they are unit rows.
    return faiss.vector_float_to_array(clus.centroids).reshape(k, d).astype(np.float32)


class NearestIP:
    """Exact max-inner-product search of query rows against a fixed set of unit rows.

    CPU: numpy sgemm on blocks of a fixed shape (rows_per_block × d) @ (d × m), the last block
    of a call zero-padded, then argmax. BLAS picks its kernel (and so the rounding of each dot
    product) from the call's shape; FAISS's `IndexFlatIP.search` even switches between a SIMD and
    a BLAS path with the number of queries. With one fixed shape, a row's result does not
    depend on how the caller chunks the rows: streamed and one-call runs agree bit for bit.
    GPU: a FAISS flat index on the device.
    """

    def __init__(self, base: np.ndarray, device: Device | None = None):
        self.base = np.ascontiguousarray(base, dtype=np.float32)
        self.device = device or Device("cpu")
        self._index = None
        if self.device.kind != "cpu":
            self._index = flat_ip_index(self.base.shape[1], self.device)
            self._index.add(self.base)
        fit = (1 << 22) // max(1, len(self.base))  # ~16 MiB of similarities per block
        self.rows_per_block = int(min(8192, max(256, 1 << max(0, fit.bit_length() - 1))))

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(best inner product float32, its row int64) for each row of x; ties: lowest row."""
        if self._index is not None:
            sims, nn = self._index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
            return sims[:, 0], nn[:, 0].astype(np.int64)
        r = self.rows_per_block
        best = np.empty(len(x), dtype=np.float32)
        arg = np.empty(len(x), dtype=np.int64)
        bt = self.base.T
        pad = None
        for s in range(0, len(x), r):
            q = x[s:s + r]
            m = len(q)
            if m < r:
                if pad is None:
                    pad = np.zeros((r, x.shape[1]), dtype=np.float32)
                pad[:m] = q
                pad[m:] = 0
                q = pad
            sims = q @ bt
            a = sims[:m].argmax(axis=1)
            arg[s:s + m] = a
            best[s:s + m] = sims[np.arange(m), a]
        return best, arg


def assign(view: EmbeddingView, centroids: np.ndarray, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
           device: Device | None = None, progress=None, sink=None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (max inner product) for every row, streamed: (int32 ids, float32 1-cos).
    With `sink`, each chunk goes to `sink(start, ids, dist)` instead (nothing n-sized is built;
    returns (None, None))."""
    search = NearestIP(centroids, device)
    ids = np.empty(view.n if sink is None else 0, dtype=np.int32)
    dist = np.empty(view.n if sink is None else 0, dtype=np.float32)
    for start, block in view.chunks(chunk_rows):
        x = normalise_rows(block, inplace=True)
        del block
        sims, nn = search.search(x)
        stop = start + len(x)
        if sink is not None:
            sink(start, nn.astype(np.int32), np.float32(1.0) - sims)
        else:
            ids[start:stop] = nn
            dist[start:stop] = np.float32(1.0) - sims
        del x, sims, nn
        if progress is not None:
            progress(stop)
    return (ids, dist) if sink is None else (None, None)


def spherical_kmeans(view: EmbeddingView, k: int, *, niter: int = 20, seed: int = 0,
                     sample_size: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                     device: str | Device | None = "auto", row_rank: np.ndarray | None = None,
                     progress=None, sink=None) -> ClusterResult:
    """Train on a seeded sample of the view, then assign every row in streamed chunks.

    `row_rank` (a permutation of 0..N-1, e.g. each row's uid rank) makes the result independent
    of the order of the rows: the sample is drawn over ranks and trained in rank order.
    k is capped at the number of rows (recorded as `k` vs `k_requested` in params).
    Deterministic for (view contents, k, niter, seed, sample_size) on one FAISS build.
    With `sink`, the assignments go to it chunk by chunk (see `assign`) and the result's
    assignments and distances are None.
    """
    dev = device if isinstance(device, Device) else resolve_device(device)
    n, d = view.n, view.dim
    if n == 0:
        return ClusterResult(np.empty(0, np.int32), np.empty(0, np.float32), np.empty((0, d), np.float32),
                             {"k": 0, "k_requested": int(k), "n": 0})
    k_eff = int(min(max(int(k), 1), n))
    m = default_sample_size(n, k_eff, d) if sample_size is None else int(sample_size)
    m = max(min(m, n), k_eff)
    t0 = time.perf_counter()
    pos = training_sample(n, m, seed)
    if row_rank is not None:
        pos = rows_of_ranks(row_rank, pos)  # the rows of those ranks, in rank order
    sample = normalise_rows(view.take(pos), inplace=True)
    del pos
    t1 = time.perf_counter()
    centroids = train_centroids(sample, k_eff, niter=niter, seed=seed, device=dev)
    del sample
    t2 = time.perf_counter()
    sizes = np.zeros(k_eff, dtype=np.int64)

    def counted(start, ids, dist):
        sizes[:] += np.bincount(ids, minlength=k_eff)
        sink(start, ids, dist)
    ids, dist = assign(view, centroids, chunk_rows=chunk_rows, device=dev, progress=progress,
                       sink=None if sink is None else counted)
    if sink is None:
        sizes = cluster_sizes(ids, k_eff)
    t3 = time.perf_counter()
    import faiss

    params = {
        "algorithm": "spherical_kmeans", "k": k_eff, "k_requested": int(k), "niter": int(niter),
        "seed": int(seed), "sample_size": int(m), "n": int(n), "dim": int(d), "device": str(dev),
        "faiss_version": faiss.__version__, "empty_clusters": int((sizes == 0).sum()),
        "seconds_sample": round(t1 - t0, 3), "seconds_train": round(t2 - t1, 3), "seconds_assign": round(t3 - t2, 3),
    }
    return ClusterResult(ids, dist, centroids, params)


def cluster_sizes(ids: np.ndarray, k: int = 0) -> np.ndarray:
    """np.bincount(ids, minlength=k) a million ids at a time: bincount copies its input to int64,
    8 bytes a sample at once otherwise."""
    out = np.zeros(max(int(k), int(ids.max()) + 1 if len(ids) else 0), dtype=np.int64)
    for s in range(0, len(ids), 1 << 20):
        part = np.bincount(ids[s:s + (1 << 20)])
        out[:len(part)] += part
    return out


def cluster_means(view: EmbeddingView, assignments: np.ndarray, k: int,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Normalised mean of each cluster's normalised rows, streamed (spherical k-means' update
    step): stands in for centroids when a clustering is provided without them."""
    sums = np.zeros((k, view.dim), dtype=np.float64)
    for start, block in view.chunks(chunk_rows):
        _segment_add(sums, assignments[start:start + len(block)], normalise_rows(block, inplace=True))
    return normalise_rows(sums.astype(np.float32))


def _segment_add(out: np.ndarray, ids: np.ndarray, x: np.ndarray) -> None:
    order = np.argsort(ids, kind="stable")
    sid = ids[order]
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    out[sid[starts]] += np.add.reduceat(x[order].astype(np.float64), starts, axis=0)


# ---------------------------------------------------------------------------------------------
# Stage glue: uid order, the runner's array cache, a provided or cached or computed clustering
# ---------------------------------------------------------------------------------------------

def uid_ranks(uids: pl.Series) -> np.ndarray:
    """Rank of each uid in sorted uid order (0-based): a tie-breaker and a storage order that do
    not depend on the order the runner lists the samples in."""
    if not len(uids):
        return np.empty(0, np.uint32)
    if uids.dtype.is_integer() and not uids.null_count() and uids.min() == 0 and uids.max() == len(uids) - 1:
        u = uids.to_numpy()
        seen = np.zeros(len(u), dtype=bool)
        seen[u] = True
        if seen.all():  # already a permutation of 0..n-1 (the runner's ranks of a whole pool)
            return u
    r = uids.rank("ordinal").to_numpy()
    return np.subtract(r, 1, dtype=r.dtype)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """int32 (int64 beyond 2**31 rows) inverse of a permutation of 0..n-1."""
    dt = index_dtype(len(perm))
    inv = np.empty(len(perm), dtype=dt)
    step = 1 << 20  # a million at a time: no n-sized arange beside the result
    for s in range(0, len(perm), step):
        inv[perm[s:s + step]] = np.arange(s, min(s + step, len(perm)), dtype=dt)
    return inv


def take_sorted(a: np.ndarray, idx: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """a[idx] for a 1-d array. A memory-mapped `a` (a cache file) is read a million entries at a
    time with plain file reads, so its pages are never mapped into this process: reading a
    scattered few entries of a mapped file touches, and keeps resident, nearly all its pages."""
    idx = np.asarray(idx)
    if not isinstance(a, np.memmap) or a.filename is None or a.ndim != 1 or not len(idx):
        return np.asarray(a[idx])
    srt = np.argsort(idx, kind="stable")
    want = idx[srt]
    if want[0] < 0 or want[-1] >= len(a):
        raise IndexError(f"index out of range for {len(a)} entries")
    out = np.empty(len(idx), dtype=a.dtype)
    with open(a.filename, "rb") as f:
        for s in range(int(want[0]) // chunk * chunk, int(want[-1]) + 1, chunk):
            lo, hi = np.searchsorted(want, [s, s + chunk])
            if lo == hi:
                continue
            f.seek(a.offset + s * a.itemsize)
            block = np.fromfile(f, dtype=a.dtype, count=min(chunk, len(a) - s))
            out[srt[lo:hi]] = block[want[lo:hi] - s]
    return out


def rows_of_ranks(row_rank: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The rows whose `row_rank` is in `ranks` (sorted), in rank order: what
    `inverse_permutation(row_rank)[ranks]` gives, with a byte a row of scratch instead of the
    whole inverse."""
    want = np.zeros(len(row_rank), dtype=bool)
    want[ranks] = True
    rows = np.flatnonzero(want[row_rank])
    return rows[np.argsort(row_rank[rows], kind="stable")]


class UidOrder:
    """Moves per-row arrays between input order and uid order. Cached arrays are stored in uid
    order, so a cache entry (keyed by the uid-set fingerprint) fits any order of the same pool."""

    def __init__(self, uids: pl.Series):
        self.uids = uids
        self._rank: np.ndarray | None = None

    @property
    def rank(self) -> np.ndarray:
        """Rank of each row's uid among the rows' uids (computed on first use)."""
        if self._rank is None:
            self._rank = uid_ranks(self.uids)
        return self._rank

    def tiebreak(self) -> np.ndarray:
        """An array that orders the rows like their uids: integer uids themselves (no copy),
        else the ranks."""
        if self.uids.dtype.is_integer() and not self.uids.null_count():
            return self.uids.to_numpy()
        return self.rank

    def to_uid_order(self, a: np.ndarray) -> np.ndarray:
        out = np.empty_like(np.asarray(a))
        out[self.rank] = a
        return out

    def from_uid_order(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)[self.rank]


def short_hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def input_fingerprint(inp) -> str:
    fp = getattr(inp, "fingerprint", None)
    if fp is not None:
        return fp()
    return short_hash(inp.frame["uid"].sort().to_numpy())


def resolve_scorer(inp, scorer: str | None, kind: str = "img") -> str:
    """The scorer whose `kind` embeddings a stage uses: the named one, or the only one given."""
    if scorer:
        return scorer
    have = sorted({s for s, k in inp.embeddings if k == kind})
    if len(have) == 1:
        return have[0]
    raise UsageError(f"set `scorer`: the stage needs {kind} embeddings and "
                     f"{'none are' if not have else 'several are'} available ({', '.join(have) or 'none'})")


@dataclass
class StageClustering:
    cluster: np.ndarray             # int32 (n,), aligned with the stage's input frame
    dist: np.ndarray                # float32 (n,)
    centroids: np.ndarray | None    # float32 (k, d) or None when neither given nor needed
    k: int
    source: str                     # provided | cache | computed
    identity: str                   # names this clustering of this uid set (cache keys build on it)
    params: dict[str, Any] = field(default_factory=dict)


def clustering_cache_key(inp, spec: ClusterSpec) -> str:
    return f"clustering-{spec.key()}-{input_fingerprint(inp)}"


def cache_clustering(inp, spec: ClusterSpec, cluster: np.ndarray, dist: np.ndarray, centroids: np.ndarray,
                     order: UidOrder | None = None) -> str:
    """Put a clustering of `inp`'s rows (input order) into `inp.cache` where a stage asking for
    `spec` finds it: how a runner hands a stage a clustering it already has, e.g. the pool's
    clustering restricted to the samples that survived SemDeDup."""
    if getattr(inp, "cache", None) is None:
        raise UsageError("cache_clustering needs a StageInput with a cache")
    order = order or UidOrder(inp.frame["uid"])
    key = clustering_cache_key(inp, spec)
    inp.cache.put(key, {"cluster": order.to_uid_order(np.asarray(cluster, dtype=np.int32)),
                        "dist": order.to_uid_order(np.asarray(dist, dtype=np.float32)),
                        "centroids": np.asarray(centroids, dtype=np.float32)})
    return key


def clustering_for_stage(inp, spec: ClusterSpec, *, order: UidOrder | None = None,
                         device: str | Device | None = "auto", need_centroids: bool = False,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> StageClustering:
    """The clustering a stage works on, cheapest first:

    1. provided: the frame has `cluster` and `centroid_dist` columns (centroids, when needed,
       are recomputed as normalised cluster means in one streamed pass);
    2. cache: `inp.cache` (the runner's array store) holds `clustering-<spec key>-<uid-set
       fingerprint>`, stored in uid order;
    3. computed with `spec` from the stage's embeddings, then put in `inp.cache`.

    Before all of these: a clustering the runner put in `inp.clusterings` under `spec.key()`.
    """
    held = getattr(inp, "clusterings", None) or {}
    if spec.key() in held:  # the runner's pool clustering, restricted to this input
        return held[spec.key()]
    frame = inp.frame
    order = order or UidOrder(frame["uid"])
    cache = getattr(inp, "cache", None)
    if "cluster" in frame.columns and "centroid_dist" in frame.columns:
        if frame["cluster"].null_count() or frame["centroid_dist"].null_count():
            raise UsageError("provided clustering has null `cluster`/`centroid_dist` values for some samples")
        cluster = frame["cluster"].to_numpy().astype(np.int32, copy=False)
        dist = frame["centroid_dist"].to_numpy().astype(np.float32, copy=False)
        if len(cluster) and cluster.min() < 0:
            raise UsageError("provided clustering has negative cluster ids")
        k = int(cluster.max()) + 1 if len(cluster) else 0
        identity = "provided-" + short_hash(order.to_uid_order(cluster), order.to_uid_order(dist),
                                            input_fingerprint(inp))
        centroids = None
        params: dict[str, Any] = {}
        if need_centroids:
            view = inp.embedding(resolve_scorer(inp, spec.scorer, spec.kind), spec.kind)
            centroids = cluster_means(view, cluster, k, chunk_rows)
            params["centroids"] = "normalised cluster means"
        return StageClustering(cluster, dist, centroids, k, "provided", identity, params)
    key = clustering_cache_key(inp, spec)
    got = cache.get(key) if cache is not None else None
    if got is not None and len(got.get("cluster", ())) == frame.height:
        centroids = np.array(got["centroids"], dtype=np.float32)
        return StageClustering(order.from_uid_order(got["cluster"]).astype(np.int32),
                               order.from_uid_order(got["dist"]).astype(np.float32), centroids,
                               int(centroids.shape[0]), "cache", key, {"key": key})
    view = inp.embedding(resolve_scorer(inp, spec.scorer, spec.kind), spec.kind)
    res = compute_clustering(view, spec, order.rank, device=device, chunk_rows=chunk_rows)
    if cache is not None:
        cache_clustering(inp, spec, res.assignments, res.distances, res.centroids, order)
    return StageClustering(res.assignments, res.distances, res.centroids, res.k, "computed", key,
                           dict(res.params, key=key))


def compute_clustering(view: EmbeddingView, spec: ClusterSpec, row_rank: np.ndarray | None, *,
                       device: str | Device | None = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS,
                       sink=None) -> ClusterResult:
    """`spherical_kmeans` with `spec`'s parameters, under a progress bar."""
    from . import console

    with console.progress(transient=True) as bar:
        task = bar.add_task(f"k-means (k={spec.k}): train, then assign", total=view.n)
        return spherical_kmeans(view, spec.k, niter=spec.niter, seed=spec.seed, sample_size=spec.sample_size,
                                chunk_rows=chunk_rows, device=device, row_rank=row_rank,
                                progress=lambda done: bar.update(task, completed=done), sink=sink)
