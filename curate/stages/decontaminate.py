"""Evaluation-set decontamination (`decontaminate`): drop pool samples whose embedding is a
near-duplicate of an evaluation image.

Training on near-copies of test images inflates zero-shot numbers; DataComp checks its pools
against its evaluation sets with image embeddings for the same reason. Here the evaluation
set's embeddings (from the same scorer as the pool's, an .npy of shape (m, d), any float dtype)
go into an exact inner-product FAISS index; the pool is queried chunk by chunk; a sample is
dropped when its best cosine is >= `threshold`.

Reason `eval_near_duplicate`; value = cosine to the nearest evaluation row, threshold =
`threshold`, detail = `eval_row=<index>` (row of the .npy). Kept rows carry the best cosine too
(value), without detail.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl

from ..cluster import DEFAULT_CHUNK_ROWS, NearestIP, normalise_rows, resolve_device
from ..errors import UsageError
from .base import Stage, StageInput, StageResult, decisions_frame, reason_where, register_stage
from .semdedup import const_column, ge_threshold, sparse_strings

REASON = "eval_near_duplicate"


@register_stage
class Decontaminate(Stage):
    name = "decontaminate"
    scope = "row"  # each sample is decided from its own embedding: any partition works

    def needs_columns(self):
        return []

    def __init__(self, eval_embeddings: str, scorer: str = "datacomp-l14", kind: str = "img",
                 threshold: float = 0.95, device: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS):
        path = Path(eval_embeddings).expanduser()
        if not path.is_file():
            raise UsageError(f"decontaminate: no evaluation embeddings at {path}")
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise UsageError(f"decontaminate: {path} is not a .npy array ({exc})") from None
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise UsageError(f"decontaminate: {path} must be a non-empty (rows, dim) array, has shape {arr.shape}")
        if not -1.0 <= float(threshold) <= 1.0:
            raise UsageError("decontaminate: threshold is a cosine in [-1, 1]")
        self.eval_embeddings = str(path)
        self.scorer, self.kind, self.threshold = scorer, kind, float(threshold)
        self.device, self.chunk_rows = device, int(chunk_rows)
        self._eval = normalise_rows(np.asarray(arr))
        self.eval_rows, self.eval_dim = int(arr.shape[0]), int(arr.shape[1])
        self.eval_sha256 = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()

    def needs_embeddings(self):
        return [(self.scorer, self.kind)]

    def apply(self, inp: StageInput) -> StageResult:
        uids = inp.frame["uid"]
        n = len(uids)
        best = np.full(n, np.nan, dtype=np.float32)
        row = np.full(n, -1, dtype=np.int64)
        if n:
            view = inp.embedding(self.scorer, self.kind)
            if view.dim != self.eval_dim:
                raise UsageError(f"decontaminate: pool embeddings have dim {view.dim}, evaluation set {self.eval_dim} "
                                 "(use the same scorer for both)")
            search = NearestIP(self._eval, resolve_device(self.device))
            for start, block in view.chunks(self.chunk_rows):
                sims, nn = search.search(normalise_rows(block, inplace=True))
                best[start:start + len(block)] = sims
                row[start:start + len(block)] = nn
        drop = ge_threshold(best, self.threshold)
        detail = sparse_strings(drop, pl.select(pl.format("eval_row={}", pl.Series(row[drop]))).to_series())
        dec = decisions_frame(uids, pl.Series(~drop),
                              reason=reason_where(drop, REASON),
                              value=pl.Series(best, dtype=pl.Float64).fill_nan(None),
                              threshold=const_column(self.threshold, n, pl.Float64), ref_uid=None,
                              detail=detail)
        stats = {"n_in": n, "n_kept": int((~drop).sum()), "eval_rows": self.eval_rows, "threshold": self.threshold}
        return StageResult(dec, {}, stats)
