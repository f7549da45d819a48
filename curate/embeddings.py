"""Where embeddings live and how they are read back.

The `embeddings` table maps (scorer, shard_id, kind) to an array: a `.npy` file in the
workspace (`path`), or an uncompressed member of a DataComp `.npz` (`path` + `member` +
byte `offset`). Arrays are row-aligned with the shard's samples (`samples.row_idx`) and read
as memory maps, a chunk at a time: nothing here loads a whole pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl

from .errors import UsageError
from .stages.base import EmbeddingView


@dataclass(frozen=True)
class EmbeddingRef:
    scorer: str
    shard_id: int
    kind: str
    path: str
    member: str | None
    offset: int | None
    dtype: str
    n_rows: int
    dim: int

    def open(self) -> np.ndarray:
        if self.member is None:
            return np.load(self.path, mmap_mode="r")
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=int(self.offset),
                         shape=(self.n_rows, self.dim))


def _root(manifest) -> Path:
    return Path(manifest.path).absolute().parent


def stored_path(manifest, path: str | Path) -> str:
    """How the manifest stores a file's path: relative to the workspace for the workspace's own
    files (so a moved workspace still finds them), absolute for anything else (a DataComp npz
    referenced in place; `curate relocate` rewrites those)."""
    p, root = Path(path).absolute(), _root(manifest)
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def resolved_path(manifest, path: str) -> str:
    return path if os.path.isabs(path) else str(_root(manifest) / path)


def register(manifest, ref: EmbeddingRef) -> None:
    manifest.execute("DELETE FROM embeddings WHERE scorer = ? AND shard_id = ? AND kind = ?",
                     [ref.scorer, ref.shard_id, ref.kind])
    manifest.execute(
        "INSERT INTO embeddings (scorer, shard_id, kind, path, member, byte_offset, dtype, n_rows, dim) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [ref.scorer, ref.shard_id, ref.kind, stored_path(manifest, ref.path), ref.member, ref.offset, ref.dtype,
         ref.n_rows, ref.dim])


def refs(manifest, scorer: str, kind: str) -> dict[int, EmbeddingRef]:
    rows = manifest.execute(
        "SELECT scorer, shard_id, kind, path, member, byte_offset, dtype, n_rows, dim FROM embeddings "
        "WHERE scorer = ? AND kind = ?", [scorer, kind]).fetchall()
    return {r[1]: EmbeddingRef(r[0], r[1], r[2], resolved_path(manifest, r[3]), *r[4:]) for r in rows}


def available(manifest) -> list[tuple[str, str, int, int]]:
    """(scorer, kind, dim, rows) for every embedding set in the workspace."""
    return [tuple(r) for r in manifest.execute(
        "SELECT scorer, kind, max(dim), sum(n_rows) FROM embeddings GROUP BY ALL ORDER BY ALL").fetchall()]


class ShardEmbeddingView(EmbeddingView):
    """Embeddings for the rows of a frame with `shard_id` and `row_idx`, in frame order.

    Reads shard by shard through memory maps and copies each chunk out, so resident memory
    stays at one chunk however large the pool. `at` builds one over positions of per-sample
    shard/row columns the caller already holds (the prune runner's spine), without copying them.
    """

    def __init__(self, frame: pl.DataFrame, shard_refs: dict[int, EmbeddingRef], scorer: str = "", kind: str = ""):
        self._setup(frame["shard_id"].to_numpy(), frame["row_idx"].to_numpy(), None, len(frame), shard_refs,
                    scorer, kind)

    @classmethod
    def at(cls, shard_ids, row_idx, pos: np.ndarray | None, shard_refs: dict[int, EmbeddingRef],
           scorer: str = "", kind: str = "", only: np.ndarray | None = None) -> "ShardEmbeddingView":
        """Input row i is the sample at position pos[i] (i itself when pos is None) of the
        `shard_ids` / `row_idx` columns (anything indexable by an int array). `only` (a mask
        over the rows, with pos None): the rows that will be read, whose shards must have
        embeddings."""
        view = cls.__new__(cls)
        view._setup(shard_ids, row_idx, pos, len(shard_ids) if pos is None else len(pos), shard_refs, scorer, kind,
                    only)
        return view

    def _setup(self, shard_ids, row_idx, pos, n: int, shard_refs, scorer: str, kind: str, only=None) -> None:
        self.shard_ids, self.row_idx, self.pos, self.n = shard_ids, row_idx, pos, n
        self.refs = shard_refs
        present: set[int] = set()
        for s in range(0, n, 1 << 20):  # a chunk at a time: no n-sized temporaries
            sel = np.arange(s, min(n, s + (1 << 20)))
            if only is not None:
                sel = sel[only[sel]]
            present.update(np.unique(shard_ids[sel if pos is None else pos[sel]]).tolist())
        missing = present - set(shard_refs)
        if missing:
            raise UsageError(f"no {kind} embeddings of scorer {scorer!r} for {len(missing)} shard(s) "
                             f"(e.g. shard {min(missing)}); run `curate score` first")
        by_dim: dict[int, list[int]] = {}
        for sid, r in sorted(shard_refs.items()):
            by_dim.setdefault(int(r.dim), []).append(sid)
        if len(by_dim) > 1:
            def shards(ids: list[int]) -> str:
                head = ", ".join(map(str, ids[:5])) + (f", ... ({len(ids)} shards)" if len(ids) > 5 else "")
                return f"shard{'s' if len(ids) > 1 else ''} {head}"
            parts = "; ".join(f"{d} wide in {shards(ids)}" for d, ids in sorted(by_dim.items()))
            raise UsageError(f"{kind} embeddings of scorer {scorer!r} differ in width: {parts}; re-ingest or "
                             f"re-score the odd shards so they agree")
        self.dim = next(iter(by_dim)) if by_dim else 0

    def _gather(self, sel: np.ndarray) -> np.ndarray:
        out = np.empty((len(sel), self.dim), dtype=np.float32)
        at = sel if self.pos is None else self.pos[sel]
        sid = np.asarray(self.shard_ids[at])
        rows = np.asarray(self.row_idx[at])
        order = np.argsort(sid, kind="stable")
        sid_sorted = sid[order]
        bounds = np.flatnonzero(np.diff(sid_sorted)) + 1
        for group in np.split(order, bounds):
            if len(group) == 0:
                continue
            arr = self.refs[int(sid[group[0]])].open()
            r = rows[group]
            rorder = np.argsort(r, kind="stable")
            r, dst = r[rorder], group[rorder]
            # cast into `out` as it is copied: no float32 temporary beside it (128 MiB a 65k-row batch)
            if (np.diff(r) == 1).all() and (np.diff(dst) == 1).all():
                out[dst[0]:dst[-1] + 1] = arr[r[0]:r[-1] + 1]  # contiguous on both sides: no copy of the rows at all
            else:
                out[dst] = arr[r]
            del arr
        return out

    def chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, rows):
            yield start, self._gather(np.arange(start, min(self.n, start + rows)))

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self._gather(np.asarray(positions, dtype=np.int64))


def store_shard_embeddings(ws, manifest, scorer: str, shard_id: int, kind: str, array: np.ndarray) -> EmbeddingRef:
    """Write one shard's fp16 embeddings atomically and register them."""
    from .workspace import atomic_save_npy

    path = ws.embedding_path(scorer, shard_id, kind)
    arr = np.ascontiguousarray(array, dtype=np.float16)
    atomic_save_npy(path, arr)
    ref = EmbeddingRef(scorer, shard_id, kind, str(path), None, None, "float16", int(arr.shape[0]), int(arr.shape[1]))
    register(manifest, ref)
    return ref


def open_view(manifest, frame: pl.DataFrame, scorer: str, kind: str = "img") -> ShardEmbeddingView:
    return ShardEmbeddingView(frame, refs(manifest, scorer, kind), scorer, kind)


