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


def caption_filter_report(manifest, truth: pl.DataFrame, run_id: int) -> dict:
    """Recall of injected junk / non-English captions and the false-drop rate on clean ones.

    A sample counts as dropped by the run if any of its stages dropped it."""
    dropped = manifest.frame("SELECT DISTINCT uid FROM decisions WHERE run_id = ? AND NOT keep", [run_id])
    seen = manifest.frame("SELECT DISTINCT uid FROM decisions WHERE run_id = ?", [run_id])
    t = truth.join(seen, on="uid", how="semi").with_columns(
        pl.col("uid").is_in(dropped["uid"].implode()).alias("dropped"))

    def rate(mask) -> tuple[float, int]:
        sub = t.filter(mask)
        return (round(float(sub["dropped"].mean()), 4) if sub.height else float("nan")), sub.height

    junk, n_junk = rate(pl.col("caption_kind").str.starts_with("junk"))
    non_en, n_non_en = rate(pl.col("caption_kind").str.starts_with("non_english"))
    clean, n_clean = rate(pl.col("caption_kind") == "clean")
    return {"junk_recall": junk, "junk": n_junk, "non_english_recall": non_en, "non_english": n_non_en,
            "clean_false_drop_rate": clean, "clean": n_clean}


def cluster_balance(manifest, truth: pl.DataFrame, run_id: int) -> dict:
    """How evenly a run's kept set covers the truth's concept clusters: normalised entropy
    (1 = perfectly even over all clusters) and the largest cluster's share."""
    from .selection import kept_uids

    kept = kept_uids(manifest, run_id)[2].join(truth.select("uid", "cluster"), on="uid")
    counts = kept["cluster"].value_counts()["count"].to_numpy().astype(float)
    p = counts / counts.sum()
    n_clusters = truth["cluster"].n_unique()
    return {"kept": kept.height, "entropy": round(float(-(p * np.log(p)).sum() / np.log(n_clusters)), 4),
            "max_share": round(float(p.max()), 4), "clusters_covered": int(len(counts)), "clusters": n_clusters}


def dedup_report(manifest, truth: pl.DataFrame, run_id: int, stages: tuple[str, ...]) -> dict:
    """Planted duplicate groups (an original and its copies, truth `dup_of`) among the samples that
    reached the dedup stages. A group of m members is fully caught when m - 1 of them are removed,
    whichever one stays (SemDeDup keeps the first in its cluster order). Recall = removed
    duplicates / (members - 1) over all groups; false removals = removed samples that belong to no
    planted group; ref_in_same_group = removed samples whose recorded ref_uid is in their group."""
    dec = manifest.frame("SELECT uid, stage, keep, ref_uid FROM decisions WHERE run_id = ?", [run_id])
    dec = dec.filter(pl.col("stage").is_in(list(stages)))
    dropped = dec.filter(~pl.col("keep"))
    group = truth.select("uid", pl.coalesce("dup_of", "uid").alias("group"))
    t = group.join(dec.select("uid").unique(), on="uid", how="semi").with_columns(
        pl.col("uid").is_in(dropped["uid"].implode()).alias("dropped"))
    g = t.group_by("group").agg(pl.len().alias("m"), pl.col("dropped").sum().alias("d"))
    dup_groups = g.filter(pl.col("m") >= 2)
    expected = int((dup_groups["m"] - 1).sum())
    caught = int(dup_groups.select(pl.min_horizontal("d", pl.col("m") - 1)).to_series().sum())
    singles = t.join(g.filter(pl.col("m") == 1).select("group"), on="group", how="semi")
    refs = dropped.join(group, on="uid").join(group.rename({"uid": "ref_uid", "group": "ref_group"}), on="ref_uid")
    return {"planted_duplicates": expected, "groups": dup_groups.height,
            "recall": round(caught / expected, 4) if expected else float("nan"),
            "false_removal_rate": round(float(singles["dropped"].mean()), 4) if singles.height else float("nan"),
            "ref_in_same_group": round(float((refs["group"] == refs["ref_group"]).mean()), 4) if refs.height else float("nan")}
