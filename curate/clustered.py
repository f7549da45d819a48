"""Cluster-major input for the clustering stages (SemDeDup, DBP).

A `ClusteredInput` lists a stage's input samples cluster by cluster, each cluster farthest from
its centroid first (ties: uid order), in batches of whole clusters. A stage works one batch at a
time and returns decisions that name each row's place (`POS`, and `REF_POS` for the sample a row
duplicates) instead of following the input order, so what it holds is a batch, never an array
over the pool.

The prune runner reads the batches from a `ClusterIndex` on disk (the pool's positions sorted
by cluster, built once per pool clustering and workspace layout, cached) and keeps the rows of
the samples that reach the stage; `ClusteredInput.from_arrays` makes the same listing in memory
from per-row arrays (a stage called directly with a frame). Both list the same samples in the
same order, so a stage's results do not depend on which one fed it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import polars as pl

from .stages.base import DECISION_COLUMNS, decisions_frame
from .workspace import atomic_path, atomic_save_npy

POS = "_pos"
REF_POS = "_ref_pos"
BATCH_ROWS = 65536


@dataclass
class ClusterBatch:
    """Whole clusters of a stage's input, in the listing's order."""

    cluster: np.ndarray   # int32 per row, rows of a cluster together
    pos: np.ndarray       # int64 per row: its place (a pool position, or an input row)
    uid: np.ndarray       # integer per row, orders like the uids (tie-breaker, seeded keys)
    dist: np.ndarray      # float32 per row: 1 - cos to its centroid
    ids: np.ndarray = field(init=False)     # cluster id of each segment
    bounds: np.ndarray = field(init=False)  # segment starts in the batch, then its length

    def __post_init__(self):
        n = len(self.cluster)
        starts = np.flatnonzero(np.r_[True, self.cluster[1:] != self.cluster[:-1]]) if n else np.zeros(0, np.int64)
        self.ids = self.cluster[starts].astype(np.int64)
        self.bounds = np.r_[starts, n].astype(np.int64)

    def __len__(self) -> int:
        return len(self.cluster)

    def starts(self) -> np.ndarray:
        """Each row's cluster's first row in the batch."""
        return np.repeat(self.bounds[:-1], np.diff(self.bounds))

    def local_rank(self) -> np.ndarray:
        """Each row's place within its cluster (0 = first)."""
        return (np.arange(len(self)) - self.starts()).astype(np.int32)

    def reordered(self, key: np.ndarray) -> tuple["ClusterBatch", np.ndarray]:
        """(the batch with each cluster's rows sorted by `key` ascending, ties by uid (then the
        listing's order); the permutation that did it)."""
        perm = np.lexsort((self.uid, key, self.cluster))
        return ClusterBatch(self.cluster[perm], self.pos[perm], self.uid[perm], self.dist[perm]), perm


def seeded_keys(uid: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 key per sample from its integer uid (splitmix64): the same
    for a sample whatever else is in the input or however it is batched."""
    x = np.asarray(uid).astype(np.uint64) + np.uint64((int(seed) * 0x9E3779B97F4A7C15) % 2**64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ClusteredInput:
    """A stage's input, listed cluster by cluster (see the module docstring).

    `read(lo, hi)` gives (pos, dist) of entries [lo, hi) of the listing of every clustered
    sample; cluster j holds entries bounds[j]:bounds[j + 1]. `wanted[pos]` says which of them
    are in the stage's input (all when None).
    """

    def __init__(self, *, n: int, k: int, centroids: np.ndarray | None, bounds: np.ndarray,
                 read: Callable[[int, int], tuple[np.ndarray, np.ndarray]], uid_of: Callable[[np.ndarray], np.ndarray],
                 uid_series: Callable[[np.ndarray, np.ndarray], pl.Series],
                 embed: Callable[[np.ndarray], np.ndarray] | None, wanted: np.ndarray | None = None,
                 score_of: Callable[[str, np.ndarray], pl.Series] | None = None,
                 identity: str = "", source: str = ""):
        self.n, self.k, self.centroids = int(n), int(k), centroids
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self._read, self._uid_of, self._uid_series = read, uid_of, uid_series
        self._embed, self.wanted, self._score_of = embed, wanted, score_of
        self.identity, self.source = identity, source
        self._totals: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_arrays(cls, cluster: np.ndarray, dist: np.ndarray, uid: np.ndarray, *, k: int | None = None,
                    centroids: np.ndarray | None = None, uids: pl.Series | None = None,
                    embed: Callable[[np.ndarray], np.ndarray] | None = None,
                    score_of: Callable[[str, np.ndarray], pl.Series] | None = None, **kw) -> "ClusteredInput":
        """An in-memory listing of rows 0..n-1 (`pos` = row). `uid` orders like the uids;
        `uids` (the frame's uid column) is what decisions name, `uid` itself when None."""
        cluster = np.asarray(cluster, dtype=np.int32)
        dist = np.asarray(dist, dtype=np.float32)
        uid = np.asarray(uid)
        n = len(cluster)
        k = int(k if k is not None else (int(cluster.max()) + 1 if n else 0))
        if n and (int(cluster.min()) < 0 or int(cluster.max()) >= k):
            raise ValueError(f"cluster ids must be in 0..{k - 1}")
        order = np.lexsort((uid, -dist, cluster))
        bounds = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(np.bincount(cluster, minlength=k)[:k], out=bounds[1:])
        sorted_dist = dist[order]
        if uids is None:
            series = lambda pos, u: pl.Series("uid", u)  # noqa: E731
        else:
            series = lambda pos, u: uids.gather(pos)  # noqa: E731
        return cls(n=n, k=k, centroids=centroids, bounds=bounds, read=lambda lo, hi: (order[lo:hi], sorted_dist[lo:hi]),
                   uid_of=lambda pos: uid[pos], uid_series=series, embed=embed, score_of=score_of, **kw)

    # -- reading ---------------------------------------------------------------------------

    def batches(self, rows: int = BATCH_ROWS) -> Iterator[ClusterBatch]:
        """Batches of whole clusters of about `rows` listed samples (a larger cluster alone)."""
        b = self.bounds
        c = 0
        while c < self.k:
            c2 = max(c + 1, min(self.k, int(np.searchsorted(b, b[c] + rows, side="right")) - 1))
            lo, hi = int(b[c]), int(b[c2])
            if hi > lo:
                pos, dist = self._read(lo, hi)
                cl = np.repeat(np.arange(c, c2, dtype=np.int32), np.diff(b[c:c2 + 1]))
                if self.wanted is not None:
                    m = self.wanted[pos]
                    pos, dist, cl = pos[m], dist[m], cl[m]
                if len(pos):
                    pos = pos.astype(np.int64, copy=False)
                    yield ClusterBatch(cl, pos, self._uid_of(pos), np.asarray(dist, dtype=np.float32))
            c = c2

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(size, Σ dist as float64) of each of the k clusters over the input: one pass."""
        if self._totals is None:
            sizes = np.zeros(self.k, dtype=np.int64)
            sums = np.zeros(self.k)
            for bt in self.batches():
                sizes += np.bincount(bt.cluster, minlength=self.k)
                sums += np.bincount(bt.cluster, weights=bt.dist.astype(np.float64), minlength=self.k)
            if int(sizes.sum()) != self.n:
                raise RuntimeError(f"the cluster listing holds {int(sizes.sum())} of the input's {self.n} samples")
            self._totals = (sizes, sums)
        return self._totals

    def embeddings(self, pos: np.ndarray) -> np.ndarray:
        if self._embed is None:
            raise RuntimeError("this input has no embeddings")
        return self._embed(pos)

    def scores(self, name: str, pos: np.ndarray) -> pl.Series:
        """The `score__<name>` values of these rows."""
        if self._score_of is None:
            raise RuntimeError("this input has no scores")
        return self._score_of(name, pos)

    # -- decisions ---------------------------------------------------------------------------

    def decisions(self, batch: ClusterBatch, keep: np.ndarray, *, reason=None, value=None, threshold=None,
                  ref: np.ndarray | None = None, detail=None) -> pl.DataFrame:
        """A decisions frame for the batch's rows plus `POS` and `REF_POS` (null without a ref);
        `ref` holds, per row, the batch row it duplicates (-1: none)."""
        uid = self._uid_series(batch.pos, batch.uid).alias("uid")
        ref_uid, ref_pos = None, pl.repeat(None, len(batch), dtype=pl.Int64, eager=True)
        if ref is not None:
            has = ref >= 0
            r = np.where(has, ref, 0)
            mask = pl.Series(has)
            ref_uid = pl.select(pl.when(mask).then(uid.gather(r))).to_series()
            ref_pos = pl.select(pl.when(mask).then(pl.Series(batch.pos[r]))).to_series()
        dec = decisions_frame(uid, pl.Series(keep), reason=reason, value=value, threshold=threshold,
                              ref_uid=ref_uid, detail=detail)
        return dec.with_columns(pl.Series(POS, batch.pos), ref_pos.alias(REF_POS))


def in_input_order(chunks: Iterator[pl.DataFrame], n: int, ref_row: str) -> pl.DataFrame:
    """Decisions listed with `POS` = input row, back in input order; `REF_POS` becomes the
    `ref_row` column (the input row a duplicate names)."""
    parts = list(chunks)
    if not parts:
        return pl.DataFrame({c: pl.Series([], dtype=t or pl.Utf8) for c, t in DECISION_COLUMNS.items()})
    dec = pl.concat(parts).sort(POS)
    if dec.height != n or (n and not np.array_equal(dec[POS].to_numpy(), np.arange(n))):
        raise RuntimeError(f"the clustered pass decided {dec.height} rows of {n}")
    dec = dec.drop(POS)
    if dec[REF_POS].null_count() == dec.height:
        return dec.drop(REF_POS)
    return dec.rename({REF_POS: ref_row})


# ---------------------------------------------------------------------------------------------
# The on-disk listing
# ---------------------------------------------------------------------------------------------

def read_range(path: str | os.PathLike, lo: int, hi: int) -> np.ndarray:
    """Entries [lo, hi) of a 1-d .npy file, read with a plain file read (a memory map would keep
    the pages it touched resident)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        hi = min(int(hi), shape[0])
        if hi <= lo:
            return np.empty(0, dtype=dtype)
        f.seek(int(lo) * dtype.itemsize, os.SEEK_CUR)
        return np.fromfile(f, dtype=dtype, count=hi - int(lo))


class NpyWriter:
    """A 1-d .npy file written chunk by chunk (header first: the length is known), put in
    place atomically by `close()` only when exactly `n` entries were written."""

    def __init__(self, path: Path, dtype, n: int):
        self.path, self.dtype, self.n, self.at = Path(path), np.dtype(dtype), int(n), 0
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        np.lib.format.write_array_header_2_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": (self.n,)})

    def write(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if self.at + len(a) > self.n:
            raise RuntimeError(f"{self.path.name}: more than {self.n} entries")
        a.tofile(self.f)
        self.at += len(a)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if self.at != self.n:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path.name}: {self.at} entries written of {self.n}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def npy_writers(dtypes: dict[Path, object], n: int) -> Iterator[list[NpyWriter]]:
    """`NpyWriter`s of n entries for these paths: all put in place when the block ends, none
    (their partial files removed) when it raises."""
    writers = [NpyWriter(path, dt, n) for path, dt in dtypes.items()]
    try:
        yield writers
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise


class ClusterIndex:
    """Every clustered sample of a pool, as `ClusteredInput.read` lists them: `pos.npy` (pool
    positions) and `dist.npy` sorted by cluster, then distance descending, then uid rank;
    `bounds.npy` (k + 1 offsets). A directory of the runner's array cache."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.bounds = np.load(self.dir / "bounds.npy")

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return read_range(self.dir / "pos.npy", lo, hi), read_range(self.dir / "dist.npy", lo, hi)

    @staticmethod
    def complete(directory: Path) -> bool:
        return (Path(directory) / "_complete.json").exists()

    @classmethod
    def build(cls, directory: Path, con, k: int, n: int, chunks: Iterator[tuple[np.ndarray, ...]],
              pos_dtype=np.int32) -> "ClusterIndex":
        """Sort (cluster, dist, uid rank, pos) chunks with DuckDB (`con`: it sorts within its
        memory limit, spilling to disk) and write the listing."""
        import pyarrow as pa

        directory = Path(directory)
        table = "_curate_cluster_index"
        con.execute(f"CREATE OR REPLACE TEMP TABLE {table} (c INTEGER, d FLOAT, t BIGINT, p BIGINT)")
        try:
            for c, d, t, p in chunks:
                con.register("_curate_chunk", pa.table({"c": np.asarray(c, np.int32), "d": np.asarray(d, np.float32),
                                                        "t": np.asarray(t, np.int64), "p": np.asarray(p, np.int64)}))
                try:
                    con.execute(f"INSERT INTO {table} SELECT * FROM _curate_chunk")
                finally:
                    con.unregister("_curate_chunk")
            sizes = np.zeros(k, dtype=np.int64)
            with npy_writers({directory / "pos.npy": pos_dtype, directory / "dist.npy": np.float32}, n) as (wp, wd):
                for rb in con.sql(f"SELECT c, d, p FROM {table} ORDER BY c, d DESC, t").to_arrow_reader(1 << 20):
                    c = rb.column(0).to_numpy()
                    if len(c) and (c.min() < 0 or c.max() >= k):
                        raise RuntimeError(f"cluster id outside 0..{k - 1}")
                    sizes += np.bincount(c, minlength=k)
                    wd.write(rb.column(1).to_numpy())
                    wp.write(rb.column(2).to_numpy())
        finally:
            con.execute(f"DROP TABLE IF EXISTS {table}")
        bounds = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        atomic_save_npy(directory / "bounds.npy", bounds)
        with atomic_path(directory / "_complete.json") as tmp:
            tmp.write_text(json.dumps({"arrays": ["bounds", "dist", "pos"], "n": n, "k": k}))
        return cls(directory)


class BitSet:
    """A set of pool positions, a bit each."""

    def __init__(self, n: int, bits: np.ndarray | None = None):
        self.n = int(n)
        self.bits = bits if bits is not None else np.zeros((self.n + 7) // 8, dtype=np.uint8)

    @classmethod
    def of(cls, mask: np.ndarray, chunk: int = 1 << 23) -> "BitSet":
        out = cls(len(mask))
        for s in range(0, len(mask), chunk):  # chunk is a multiple of 8
            packed = np.packbits(mask[s:s + chunk])
            out.bits[s // 8:s // 8 + len(packed)] = packed
        return out

    def __getitem__(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos)
        return ((self.bits[pos >> 3] >> (7 - (pos & 7)).astype(np.uint8)) & 1).astype(bool)

    def add(self, pos: np.ndarray) -> None:
        pos = np.asarray(pos)
        np.bitwise_or.at(self.bits, pos >> 3, (np.uint8(1) << (7 - (pos & 7)).astype(np.uint8)))

    def count(self) -> int:
        return int(np.unpackbits(self.bits, count=self.n).sum()) if self.n else 0

