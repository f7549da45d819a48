"""Measure decisions against a synthetic pool's ground truth (`_truth.parquet`).

Only the demo and the tests read the truth; no pipeline stage does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pl.Series(scores).rank("average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def load_truth(pool: Path) -> pl.DataFrame:
    return pl.read_parquet(Path(pool) / "_truth.parquet")


def caption_match_auc(manifest, truth: pl.DataFrame, scorer: str) -> dict:
    """How well a scorer separates truly matched captions from mismatched ones."""
    s = manifest.frame("SELECT uid, score FROM scores WHERE scorer = ? AND score IS NOT NULL", [scorer])
    d = s.join(truth.select("uid", "caption_kind"), on="uid").filter(
        pl.col("caption_kind").is_in(["clean", "mismatched"]))
    pos = (d["caption_kind"] == "clean").to_numpy()
    return {"scorer": scorer, "auc_matched_vs_mismatched": round(roc_auc(d["score"].to_numpy(), pos), 4),
            "matched": int(pos.sum()), "mismatched": int((~pos).sum())}
