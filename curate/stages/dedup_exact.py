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

`uid` is compared as it is (an opaque ordered key: strings, or the runner's UInt32 ranks). The
other keys are compared through 128-bit hashes of their normalised values (two 64-bit polars
hashes with different seeds), which `condense` computes batch by batch, so the URLs and captions
of a whole pool are never held at once; two distinct values among n collide with odds about
n²/2^129 (~1e-25 at 10M rows), which is negligible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .base import (DECISION_COLUMNS, REF_ROW, Stage, StageInput, StageResult, decisions_frame, in_chunks,
                   index_dtype, register_stage)

KEYS = ("uid", "sha256", "url", "sha256_caption")
POLICIES = ("first", "highest_score", "largest_image")

TRACKING_PARAMS = (
    r"utm_[a-z0-9_]*", "fbclid", "gclid", "dclid", "gbraid", "wbraid", "msclkid", "yclid", "igshid",
    "mc_cid", "mc_eid", "_ga", "_gl", "_hsenc", "_hsmi", "mkt_tok", "oly_anon_id", "oly_enc_id",
    "vero_id", "rb_clickid", "s_cid", "spm", "ref_src",
)

_URL_PARTS = r"^(?:([A-Za-z][A-Za-z0-9+.\-]*):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?"


def normalise_urls(urls: pl.Series | Sequence[str | None], tracking: Sequence[str] = TRACKING_PARAMS) -> pl.Series:
    """The normalised URLs (see the module docstring); null for null/empty ones.

    URLs that are already normal are recognised by one regex and kept; only the others are parsed,
    part by part over a frame (as one nested expression polars would re-evaluate the parsed parts
    for every use, several times slower)."""
    s = urls if isinstance(urls, pl.Series) else pl.Series("url", list(urls), dtype=pl.Utf8)
    name = s.name or "url"
    u = s.cast(pl.Utf8).str.strip_chars()
    alts = "|".join(tracking)
    # Already normal: lowercase scheme and host, no port, no trailing slash, no fragment, and a
    # non-empty query without empty or tracking parameters ('&' in the path only costs a slow look).
    normal = (u.str.contains(r"^[a-z][a-z0-9+.\-]*://[a-z0-9.\-]+(?:/[^?#]*[^/?#])?(?:\?[^#]+)?$")
              & ~u.str.contains(rf"[?&](?:&|$)|[?&](?i:{alts})(?:[=&]|$)")).fill_null(False)
    idx = (~normal).arg_true()
    if len(idx) == 0:
        return u.alias(name)
    return u.scatter(idx, _normalise_parsed(u.gather(idx), alts)).alias(name)


def _normalise_parsed(u: pl.Series, alts: str) -> pl.Series:
    """normalise_urls for stripped URLs, by parsing them into scheme, host, path and query."""
    parts = (u.str.extract_groups(_URL_PARTS).struct.unnest()
             .rename({"1": "scheme", "2": "host", "3": "path", "4": "query"})
             .with_columns(pl.col("scheme", "host").str.to_lowercase(),
                           pl.col("path").str.replace(r"/+$", "").fill_null(""),
                           pl.col("query").fill_null("")))
    scheme, host, query = pl.col("scheme"), pl.col("host"), pl.col("query")
    parts = parts.with_columns(
        host=pl.when((scheme == "http") & host.str.ends_with(":80")).then(host.str.slice(0, host.str.len_chars() - 3))
        .when((scheme == "https") & host.str.ends_with(":443")).then(host.str.slice(0, host.str.len_chars() - 4))
        .otherwise(host))
    # Only queries with an empty parameter or a tracking one change; the others are kept as they are.
    dirty = query.str.contains(rf"(?:^|&)(?:&|$)|(?:^|&)(?i:{alts})(?:[=&]|$)") & (query != "")
    idx = parts.select(dirty).to_series().arg_true()
    if len(idx):
        drop = f"(?i)^(?:{alts})$"
        clean = (parts["query"].gather(idx).str.split("&")
                 .list.eval(pl.element().filter((pl.element() != "")
                                                & ~pl.element().str.extract(r"^([^=]*)", 1).str.contains(drop)))
                 .list.join("&"))
        parts = parts.with_columns(parts["query"].scatter(idx, clean))
    out = parts.select(pl.concat_str([
        pl.when(scheme.is_not_null()).then(scheme + pl.lit(":")).otherwise(pl.lit("")),
        pl.when(host.is_not_null()).then(pl.lit("//") + host).otherwise(pl.lit("")),
        pl.col("path"),
        pl.when(query != "").then(pl.lit("?") + query).otherwise(pl.lit("")),
    ])).to_series()
    return pl.select(pl.when(pl.lit(u.is_null() | (u == ""))).then(None).otherwise(pl.lit(out))).to_series()


def normalised_key(frame: pl.DataFrame, key: str) -> pl.Series:
    """The normalised value of a key other than `uid` for each row; null where it is null or empty."""
    if key == "url":
        k = normalise_urls(frame["url"])
    elif key in ("sha256", "sha256_caption"):
        k = frame["sha256"].cast(pl.Utf8).str.strip_chars().str.to_lowercase()
        if key == "sha256_caption":
            k = pl.select(pl.when(pl.lit(k).is_null() | (pl.lit(k) == "")).then(None).otherwise(
                pl.concat_str([pl.lit(k), pl.lit("\x00"), pl.lit(frame["caption"].cast(pl.Utf8).fill_null(""))])
            )).to_series()
    else:
        raise UsageError(f"exact_dedup: unknown key {key!r}; known: {', '.join(KEYS)}")
    return pl.select(pl.when(pl.lit(k) != "").then(pl.lit(k))).to_series().alias(key)


# Seeds of the two 64-bit halves of a key's hash (any two distinct values).
HASH_SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344)


def hash_columns(key: str) -> tuple[str, str]:
    """Names of the two UInt64 columns `condense` stores for a key."""
    return f"_h_{key}_0", f"_h_{key}_1"


def hash128(values: pl.Series, names: Sequence[str]) -> list[pl.Series]:
    """Two UInt64 Series (a 128-bit hash) of the values; null where the value is null."""
    return [pl.select(pl.when(pl.lit(values).is_not_null()).then(pl.lit(values).hash(seed))).to_series().alias(name)
            for seed, name in zip(HASH_SEEDS, names)]


def group_runs(codes: Sequence, rows: np.ndarray | None = None,
               stable: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(perm, start) over the rows `rows` of the code arrays (all rows when None; the codes after
    the first may be polars Series, only read where first codes are equal): perm puts
    equal code tuples next to each other (within a group in ascending row order when `stable`,
    else in no particular order), start[i] is True where permuted row i begins a new group.

    Sorts on the first code only and compares the others where first codes are equal; a 64-bit
    collision there (equal first, different later codes) falls back to a sort on all of them.
    Memory: the permutation and one sorted copy of the first code."""
    def at(c, idx: np.ndarray) -> np.ndarray:
        i = idx if rows is None else rows[idx]
        return c.gather(i).to_numpy() if isinstance(c, pl.Series) else c[i]

    first = codes[0] if rows is None else codes[0][rows]
    perm = np.argsort(first, kind="stable" if stable else None)
    srt = first[perm]
    del first
    same = srt[1:] == srt[:-1]
    del srt
    if len(codes) > 1:
        eq = np.flatnonzero(same)
        for s in range(0, len(eq), 1 << 20):
            i = eq[s:s + (1 << 20)]
            if not all(np.array_equal(at(c, perm[i]), at(c, perm[i + 1])) for c in codes[1:]):
                cols = [np.asarray(c.to_numpy() if isinstance(c, pl.Series) else c) for c in codes]
                cols = [c if rows is None else c[rows] for c in cols]
                perm = np.lexsort(cols[::-1])  # stable
                srt = [c[perm] for c in cols]
                same = np.logical_and.reduce([x[1:] == x[:-1] for x in srt])
                break
    start = np.ones(len(perm), dtype=bool)
    start[1:] = ~same
    return perm, start


def lexsort_keys(s: pl.Series, descending: bool = False) -> list[np.ndarray]:
    """np.lexsort keys (most significant last) ordering s ascending or descending, nulls last."""
    if not s.dtype.is_numeric():
        s = s.rank("dense")
    v = s.fill_null(0).to_numpy()
    keys = [-v.astype(np.float64 if s.dtype.is_float() else np.int64) if descending else v]
    if s.null_count():
        keys.append(s.is_null().to_numpy())
    return keys


def _lex_sorted(keys: Sequence[np.ndarray]) -> bool:
    """Whether rows are already in np.lexsort order of keys (most significant last)."""
    before = np.zeros(max(len(keys[0]) - 1, 0), dtype=bool)  # row i < row i + 1 on a more significant key
    tied = ~before
    for k in reversed(keys):
        before |= tied & (k[:-1] < k[1:])
        tied &= k[:-1] == k[1:]
    return bool(np.all(before | tied))


def _where(mask: np.ndarray, values: pl.Series) -> pl.Series:
    """values where mask holds, null elsewhere (same dtype)."""
    return pl.select(pl.when(pl.lit(pl.Series(mask))).then(pl.lit(values))).to_series().alias(values.name)


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

    def needs_columns(self) -> list[str]:
        cols: list[str] = []
        for key in self.keys:
            cols += [c for c in _NEEDS[key] if c != "uid" and c not in cols]
        if self.policy == "largest_image":
            cols += [c for c in ("width", "height", "image_bytes") if c not in cols]
        return cols

    def _carried(self) -> list[str]:
        """Columns `condense` keeps as they are: uid, the tie-break and the policy's inputs."""
        cols = ["uid", "shard_id", "row_idx"]
        if self.policy == "highest_score":
            cols.append(f"score__{self.score}")
        elif self.policy == "largest_image":
            cols += ["width", "height", "image_bytes"]
        return cols

    def _hashed_keys(self) -> list[str]:
        return [k for k in dict.fromkeys(self.keys) if k != "uid"]

    def _hashed(self) -> list[str]:
        return [c for key in self._hashed_keys() for c in hash_columns(key)]

    def condense(self, frame: pl.DataFrame) -> pl.DataFrame:
        """uid, shard_id/row_idx, the policy's inputs and a 128-bit hash (`_h_<key>_0`, `_h_<key>_1`,
        null for a null or empty key) of each key but `uid`; raw strings are dropped."""
        carried = [c for c in self._carried() if c in frame.columns]
        if all(c in frame.columns for c in self._hashed()) and "uid" in frame.columns:
            return frame.select(carried + self._hashed())  # already condensed
        for key in self.keys:
            for c in _NEEDS[key]:
                if c not in frame.columns:
                    raise UsageError(f"exact_dedup: key {key!r} needs column {c!r}")
        hashes = [h for key in self._hashed_keys() for h in hash128(normalised_key(frame, key), hash_columns(key))]
        return frame.select(carried).with_columns(hashes)

    def _priority_order(self, df: pl.DataFrame) -> np.ndarray | None:
        """Row positions, the copy that should stay first: by policy, then (shard_id, row_idx), then
        input order; None when that is input order."""
        by: list[tuple[pl.Series, bool]] = []  # most significant first
        if self.policy == "highest_score":
            col = f"score__{self.score}"
            if col not in df.columns:
                raise UsageError(f"exact_dedup: policy 'highest_score' needs column {col!r}")
            by.append((df[col].cast(pl.Float64).fill_nan(None), True))
        elif self.policy == "largest_image":
            for c in ("width", "height"):
                if c not in df.columns:
                    raise UsageError("exact_dedup: policy 'largest_image' needs width and height columns")
            by.append((df["width"].cast(pl.Int64) * df["height"].cast(pl.Int64), True))
            if "image_bytes" in df.columns:
                by.append((df["image_bytes"].cast(pl.Int64), True))
        by += [(df[c], False) for c in ("shard_id", "row_idx") if c in df.columns]
        keys = [k for s, desc in reversed(by) for k in lexsort_keys(s, desc)]
        if not keys or _lex_sorted(keys):  # the runner's rows come in (shard_id, row_idx) order
            return None
        return np.lexsort(keys)  # stable: input order last

    def _codes(self, df: pl.DataFrame, key: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(integer arrays that are equal exactly when the key is, mask of rows whose key may match)."""
        if key == "uid":
            uid = df["uid"]
            valid = uid.is_not_null()
            if uid.dtype == pl.Utf8:
                valid &= uid != ""
            codes = uid if uid.dtype.is_integer() else uid.rank("dense")
            return [codes.fill_null(0).to_numpy()], valid.to_numpy()
        h = [df[c] for c in hash_columns(key)]
        h = [c.fill_null(0) if c.null_count() else c for c in h]
        return [h[0].to_numpy(), *h[1:]], df[hash_columns(key)[0]].is_not_null().to_numpy()

    def apply(self, inp: StageInput) -> StageResult:
        df = self.condense(inp.frame)
        n = df.height
        order = self._priority_order(df)
        alive = np.ones(n, dtype=bool)
        reason = np.zeros(n, dtype=np.int8)  # index into self.keys, for dropped rows
        idx_t = index_dtype(n)
        ref = np.zeros(n, dtype=idx_t)  # the copy that stayed, for dropped rows
        size = np.zeros(n, dtype=idx_t)  # its group's size, for dropped rows
        stats = {"n_in": n}
        for i, key in enumerate(self.keys):
            codes, valid = self._codes(df, key)
            cand = alive & valid
            rows = np.flatnonzero(cand) if order is None else order[cand[order]]  # candidates, best first
            del cand, valid
            if len(rows) == 0:
                stats[f"dropped_{key}"] = 0
                continue
            # stable: within a group rows stay best first, so each group's first copy stays
            whole = order is None and len(rows) == n  # rows is 0..n-1: no gathered copy of the codes
            perm, start = group_runs(codes, None if whole else rows, stable=True)
            del codes
            dup = np.flatnonzero(~start)
            # the group's first row, for each duplicate: the last start at or before it
            first_at = np.maximum.accumulate(np.where(start, np.arange(len(start), dtype=idx_t), 0))[dup]
            del start
            new = np.ones(len(first_at), dtype=bool)
            new[1:] = first_at[1:] != first_at[:-1]
            run = np.cumsum(new) - 1
            dropped = rows[perm[dup]]
            alive[dropped] = False
            reason[dropped] = i
            ref[dropped] = rows[perm[first_at]]
            size[dropped] = np.bincount(run)[run] + 1
            stats[f"dropped_{key}"] = len(dropped)
            del perm, dup, first_at, new, run, dropped, rows
        stats["n_kept"] = int(alive.sum())
        uid = df["uid"]
        del df
        names = pl.Series("reason", [f"duplicate_{k}" for k in self.keys], dtype=DECISION_COLUMNS["reason"])

        def build(s: int, e: int) -> pl.DataFrame:
            gone = ~alive[s:e]
            return decisions_frame(uid.slice(s, e - s), pl.Series(alive[s:e]),
                                   reason=_where(gone, names.gather(reason[s:e])),
                                   value=_where(gone, pl.Series("value", size[s:e], dtype=pl.Float64)),
                                   ref_uid=_where(gone, uid.gather(ref[s:e])).alias("ref_uid"),
                                   ).with_columns(_where(gone, pl.Series(REF_ROW, ref[s:e], dtype=pl.Int64)))
        return StageResult(None, {}, stats, chunks=in_chunks(n, build))
