"""Per-sample integer columns stored as runs, for the prune runner's spine.

In a pool listed in (shard, row) order, `shard_id` is constant over each shard, `row_idx` counts
up by one within it, and the samples' row ids in the manifest usually count up by one too. A
`RunArray` keeps one (start, value) pair per run instead of a value per sample: a few thousand
pairs for millions of samples, so what the runner holds does not grow with the pool. Arrays
that do not fall into long runs are kept as they are.
"""

from __future__ import annotations

import numpy as np

from ..stages.base import index_dtype

# Keep the plain array unless runs take fewer than 1/DENSE_RATIO of its length.
DENSE_RATIO = 8


class RunArray:
    """A read-only int array a[i], stored as runs where a[i + 1] == a[i] + step (step 0 or 1)."""

    def __init__(self, a: np.ndarray, step: int):
        a = np.asarray(a)
        b = RunBuilder(step, a.dtype)
        b.add(a)
        self.__dict__.update(b.finish().__dict__)

    @classmethod
    def _make(cls, n: int, step: int, dtype, mx: int, dense=None, starts=None, values=None) -> "RunArray":
        ra = cls.__new__(cls)
        ra.n, ra.step, ra.dtype, ra._max = n, int(step), np.dtype(dtype), mx
        ra.dense, ra.starts, ra.values = dense, starts, values
        return ra

    def __len__(self) -> int:
        return self.n

    def max(self) -> int:
        return self._max

    def __getitem__(self, idx) -> np.ndarray:
        if self.dense is not None:
            return self.dense[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        j = np.searchsorted(self.starts, idx, side="right") - 1
        out = self.values[j]
        if self.step:
            out = out + (idx - self.starts[j])
        return out.astype(self.dtype, copy=False)


class RunBuilder:
    """Builds a RunArray from consecutive chunks: runs are collected as the chunks come (a run
    may continue across chunks), so the whole array is only ever made when it turns out not to
    fall into runs."""

    def __init__(self, step: int, dtype):
        self.step, self.dtype = int(step), np.dtype(dtype)
        self.starts: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.plain: list[np.ndarray] | None = None
        self.n, self.nruns, self.last, self.mx = 0, 0, None, -1

    def add(self, a: np.ndarray) -> None:
        a = np.asarray(a).astype(self.dtype, copy=False)
        if not len(a):
            return
        self.mx = max(self.mx, int(a.max()))
        if self.plain is not None:
            self.plain.append(a)
        else:
            s = np.r_[0, np.flatnonzero(np.diff(a) != self.step) + 1]
            if self.last is not None and int(a[0]) == self.last + self.step:
                s = s[1:]  # continues the previous chunk's last run
            self.starts.append(s + self.n)
            self.values.append(a[s].astype(np.int64))
            self.nruns += len(s)
            if self.nruns > max(1 << 16, (self.n + len(a)) // DENSE_RATIO):  # not runs: keep the values
                self.plain = [self._decode(), a]
        self.last = int(a[-1])
        self.n += len(a)

    def _runs(self) -> RunArray:
        return RunArray._make(self.n, self.step, self.dtype, self.mx,
                              starts=np.concatenate(self.starts) if self.starts else np.zeros(0, np.int64),
                              values=np.concatenate(self.values) if self.values else np.zeros(0, np.int64))

    def _decode(self) -> np.ndarray:
        out = self._runs()[np.arange(self.n)]
        self.starts, self.values = [], []
        return out

    def finish(self) -> RunArray:
        if self.plain is None and self.n and self.nruns > max(1, self.n // DENSE_RATIO):
            self.plain = [self._decode()]
        if self.plain is not None:
            return RunArray._make(self.n, self.step, self.dtype, self.mx, dense=np.concatenate(self.plain))
        return self._runs()


class RunInverse:
    """Position of each value of a RunArray of distinct values (step 1), -1 for values it lacks:
    `inv[v]` for an array v. Dense (one int32 per possible value) when the array is."""

    def __init__(self, ra: RunArray):
        self.size = ra.max() + 1
        if ra.dense is not None or ra.step != 1:
            a = ra.dense if ra.dense is not None else ra[np.arange(ra.n)]
            self.dense: np.ndarray | None = np.full(self.size, -1, dtype=index_dtype(ra.n))
            self.dense[a] = np.arange(ra.n, dtype=self.dense.dtype)
            return
        self.dense = None
        order = np.argsort(ra.values, kind="stable")
        self.vstart = ra.values[order]
        self.pstart = ra.starts[order]
        self.length = np.diff(np.r_[ra.starts, ra.n])[order]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, v) -> np.ndarray:
        if self.dense is not None:
            return self.dense[v]
        v = np.asarray(v, dtype=np.int64)
        j = np.searchsorted(self.vstart, v, side="right") - 1
        jj = np.maximum(j, 0)
        off = v - self.vstart[jj]
        hit = (j >= 0) & (off < self.length[jj])
        return np.where(hit, self.pstart[jj] + off, -1).astype(index_dtype(self.size))
