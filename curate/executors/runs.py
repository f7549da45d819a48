"""Per-sample integer columns stored as runs, for the prune runner's spine.

In a pool listed in (shard, row) order, `shard_id` is constant over each shard, `row_idx` counts
up by one within it, and the samples' row ids in the manifest usually count up by one too. A
`RunArray` keeps one (start, value) pair per run instead of a value per sample: a few thousand
pairs for millions of samples, so what the runner holds does not grow with the pool. Arrays
that do not fall into long runs are kept as they are.
"""

from __future__ import annotations

import numpy as np

# Keep the plain array unless runs take fewer than 1/DENSE_RATIO of its length.
DENSE_RATIO = 8


class RunArray:
    """A read-only int array a[i], stored as runs where a[i + 1] == a[i] + step (step 0 or 1)."""

    def __init__(self, a: np.ndarray, step: int):
        a = np.asarray(a)
        self.n, self.dtype, self.step = len(a), a.dtype, int(step)
        self._max = int(a.max()) if len(a) else -1
        if len(a):
            brk = np.flatnonzero(np.diff(a) != step) + 1 if len(a) > 1 else np.empty(0, np.int64)
        else:
            brk = np.empty(0, np.int64)
        if len(brk) + 1 > max(1, len(a) // DENSE_RATIO):
            self.dense: np.ndarray | None = a
            self.starts = self.values = None
        else:
            self.dense = None
            self.starts = np.r_[0, brk].astype(np.int64)
            self.values = a[self.starts].astype(np.int64)

    @property
    def runs(self) -> int:
        return self.n if self.dense is not None else len(self.starts)

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

    def nbytes(self) -> int:
        return self.dense.nbytes if self.dense is not None else self.starts.nbytes + self.values.nbytes


class RunInverse:
    """Position of each value of a RunArray of distinct values (step 1), -1 for values it lacks:
    `inv[v]` for an array v. Dense (one int32 per possible value) when the array is."""

    def __init__(self, ra: RunArray):
        self.size = ra.max() + 1
        if ra.dense is not None or ra.step != 1:
            a = ra.dense if ra.dense is not None else ra[np.arange(ra.n)]
            self.dense: np.ndarray | None = np.full(self.size, -1, dtype=np.int32 if ra.n < 2**31 else np.int64)
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
        return np.where(hit, self.pstart[jj] + off, -1).astype(np.int32 if self.size < 2**31 else np.int64)
