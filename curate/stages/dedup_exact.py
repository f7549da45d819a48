"""Exact deduplication (`exact_dedup`): identical uids, image bytes, normalised URLs or
(image, caption) pairs.

DataComp pools carry repeated uids when a shard is ingested twice, and repeated sha256 values
mostly from the placeholder images dead links return (REFERENCES.md, "known pitfalls"); the same
URL with tracking parameters or a different host case is the same image.

Keys are applied in the order given, each among the survivors of the previous ones:

    uid              the `uid` column
    sha256           the `sha256` column (hex, compared case-insensitively)
    url              `normalise_urls(url)`: lowercase scheme and host, default ports (:80 for http,
                     :443 for https) dropped, fragment dropped, trailing slashes of the path dropped,
                     tracking parameters (utm_*, fbclid, gclid, ...) and empty ones removed from the query
    sha256_caption   the pair (sha256, caption): same image *and* same caption

Which copy of a group stays (`policy`):
    first            the earliest by (shard_id, row_idx) (input order when those are absent)
    highest_score    the largest `score__<score>` (nulls last), then `first`
    largest_image    the largest width·height (then image_bytes), then `first`

A null or empty key never matches anything. Dropped rows get reason `duplicate_<key>`
(`duplicate_uid`, `duplicate_sha256`, `duplicate_url`, `duplicate_sha256_caption`), ref_uid =
the copy that stayed for that key, value = the size of the group.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .base import Stage, StageInput, StageResult, decisions_frame, register_stage

KEYS = ("uid", "sha256", "url", "sha256_caption")
POLICIES = ("first", "highest_score", "largest_image")

TRACKING_PARAMS = (
    r"utm_[a-z0-9_]*", "fbclid", "gclid", "dclid", "gbraid", "wbraid", "msclkid", "yclid", "igshid",
    "mc_cid", "mc_eid", "_ga", "_gl", "_hsenc", "_hsmi", "mkt_tok", "oly_anon_id", "oly_enc_id",
    "vero_id", "rb_clickid", "s_cid", "spm", "ref_src",
)

_URL_PARTS = r"^(?:([A-Za-z][A-Za-z0-9+.\-]*):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?"


def normalise_url_expr(url: pl.Expr, tracking: Sequence[str] = TRACKING_PARAMS) -> pl.Expr:
    """Polars expression for the normalised URL (see module docstring); null for null/empty."""
    u = url.str.strip_chars()
    parts = u.str.extract_groups(_URL_PARTS)
    scheme = parts.struct.field("1").str.to_lowercase()
    host = parts.struct.field("2").str.to_lowercase()
    host = (pl.when((scheme == "http") & host.str.ends_with(":80")).then(host.str.slice(0, host.str.len_chars() - 3))
            .when((scheme == "https") & host.str.ends_with(":443")).then(host.str.slice(0, host.str.len_chars() - 4))
            .otherwise(host))
    path = parts.struct.field("3").str.replace(r"/+$", "")
    drop = "(?i)^(?:" + "|".join(tracking) + ")$"
    query = (parts.struct.field("4").fill_null("").str.split("&")
             .list.eval(pl.element().filter((pl.element() != "")
                                            & ~pl.element().str.extract(r"^([^=]*)", 1).str.contains(drop)))
             .list.join("&"))
    out = pl.concat_str([
        pl.when(scheme.is_not_null()).then(scheme + pl.lit(":")).otherwise(pl.lit("")),
        pl.when(host.is_not_null()).then(pl.lit("//") + host).otherwise(pl.lit("")),
        path.fill_null(""),
        pl.when(query != "").then(pl.lit("?") + query).otherwise(pl.lit("")),
    ])
    return pl.when(u.is_null() | (u == "")).then(None).otherwise(out)


def normalise_urls(urls: pl.Series | Sequence[str | None]) -> pl.Series:
    s = urls if isinstance(urls, pl.Series) else pl.Series("url", list(urls), dtype=pl.Utf8)
    return pl.select(normalise_url_expr(pl.lit(s.cast(pl.Utf8)))).to_series().alias(s.name or "url")


def _key_expr(key: str) -> pl.Expr:
    if key == "uid":
        return pl.col("uid").cast(pl.Utf8)
    if key == "sha256":
        return pl.col("sha256").cast(pl.Utf8).str.strip_chars().str.to_lowercase()
    if key == "url":
        return normalise_url_expr(pl.col("url").cast(pl.Utf8))
    if key == "sha256_caption":
        sha = pl.col("sha256").cast(pl.Utf8).str.strip_chars().str.to_lowercase()
        return pl.when(sha.is_null() | (sha == "")).then(None).otherwise(
            pl.concat_str([sha, pl.lit("\x00"), pl.col("caption").cast(pl.Utf8).fill_null("")]))
    raise UsageError(f"exact_dedup: unknown key {key!r}; known: {', '.join(KEYS)}")


_NEEDS = {"uid": ["uid"], "sha256": ["sha256"], "url": ["url"], "sha256_caption": ["sha256", "caption"]}


@register_stage
class ExactDedup(Stage):
    """Drop exact duplicates by uid, image bytes, normalised URL or (image, caption)."""

    name = "exact_dedup"
    scope = "global"

    def __init__(self, keys: Sequence[str] = ("uid", "sha256", "url"), policy: str = "first",
                 score: str | None = None):
        keys = [keys] if isinstance(keys, str) else list(keys)
        for k in keys:
            if k not in KEYS:
                raise UsageError(f"exact_dedup: unknown key {k!r}; known: {', '.join(KEYS)}")
        if policy not in POLICIES:
            raise UsageError(f"exact_dedup: policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if policy == "highest_score" and not score:
            raise UsageError("exact_dedup: policy 'highest_score' needs score=<scorer> (the score__<scorer> column)")
        self.keys, self.policy, self.score = keys, policy, score

    def needs_scores(self):
        return [self.score] if self.policy == "highest_score" else []

    def _priority(self, df: pl.DataFrame) -> pl.DataFrame:
        """Add `_pri`: 0 for the copy that should stay first, ties broken by (shard_id, row_idx), input order."""
        by: list[pl.Expr] = []
        desc: list[bool] = []
        if self.policy == "highest_score":
            col = f"score__{self.score}"
            if col not in df.columns:
                raise UsageError(f"exact_dedup: policy 'highest_score' needs column {col!r}")
            by.append(pl.col(col).cast(pl.Float64).fill_nan(None))
            desc.append(True)
        elif self.policy == "largest_image":
            for c in ("width", "height"):
                if c not in df.columns:
                    raise UsageError("exact_dedup: policy 'largest_image' needs width and height columns")
            by.append(pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64))
            desc.append(True)
            if "image_bytes" in df.columns:
                by.append(pl.col("image_bytes").cast(pl.Int64))
                desc.append(True)
        for c in ("shard_id", "row_idx"):
            if c in df.columns:
                by.append(pl.col(c))
                desc.append(False)
        by.append(pl.col("_pos"))
        desc.append(False)
        order = df.select(pl.arg_sort_by(by, descending=desc, nulls_last=True)).to_series().to_numpy()
        pri = np.empty(len(df), dtype=np.int64)
        pri[order] = np.arange(len(df))
        return df.with_columns(pl.Series("_pri", pri))

    def apply(self, inp: StageInput) -> StageResult:
        frame = inp.frame
        n = len(frame)
        for key in self.keys:
            for c in _NEEDS[key]:
                if c not in frame.columns:
                    raise UsageError(f"exact_dedup: key {key!r} needs column {c!r}")
        df = self._priority(frame.with_row_index("_pos").with_columns(pl.col("_pos").cast(pl.Int64)))
        alive = np.ones(n, dtype=bool)
        drops = []
        stats = {"n_in": n}
        for key in self.keys:
            sub = (df.filter(pl.Series(alive)).select("_pos", "_pri", "uid", _key_expr(key).alias("_k"))
                   .filter(pl.col("_k").is_not_null() & (pl.col("_k") != "")))
            grouped = sub.with_columns(
                pl.col("_pri").min().over("_k").alias("_rep_pri"),
                pl.col("uid").sort_by("_pri").first().over("_k").alias("_ref"),
                pl.len().over("_k").alias("_size"),
            ).filter(pl.col("_pri") != pl.col("_rep_pri"))
            d = grouped.select("_pos", pl.lit(f"duplicate_{key}").alias("_reason"), "_ref",
                               pl.col("_size").cast(pl.Float64).alias("_value"))
            alive[d["_pos"].to_numpy()] = False
            drops.append(d)
            stats[f"dropped_{key}"] = len(d)
        if drops:
            allr = pl.concat(drops)
        else:
            allr = pl.DataFrame(schema={"_pos": pl.Int64, "_reason": pl.Utf8, "_ref": pl.Utf8, "_value": pl.Float64})
        j = df.select("_pos", "uid").join(allr, on="_pos", how="left", maintain_order="left")
        stats["n_kept"] = int(alive.sum())
        dec = decisions_frame(j["uid"], pl.Series(alive), reason=j["_reason"], value=j["_value"], ref_uid=j["_ref"])
        return StageResult(dec, {}, stats)
