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
n²/2^129 (~1e-25 at 10M rows), which is negligible. The groups are found by DuckDB over the
condensed rows (`run_keyed` over a `curate.keyed.KeyedTable`: the prune runner's Parquet file of
the streamed batches, or the frame itself on a private connection).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from ..clustered import POS as CPOS
from ..clustered import REF_POS as CREF
from ..clustered import in_input_order
from ..errors import UsageError
from ..keyed import POS, KeyedTable
from .base import DECISION_CHUNK, DECISION_COLUMNS, REF_ROW, Stage, StageInput, StageResult, decisions_frame, register_stage

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

    def _priority(self, cols: list[str]) -> str:
        """SQL for the key DuckDB's arg_min takes as "the copy that stays first": the policy's
        values (descending, nulls last), then (shard_id, row_idx), then input order (`_pos`)."""
        parts: list[str] = []
        if self.policy == "highest_score":
            col = f"score__{self.score}"
            if col not in cols:
                raise UsageError(f"exact_dedup: policy 'highest_score' needs column {col!r}")
            parts.append(f"coalesce(-(CASE WHEN isnan(\"{col}\") THEN NULL ELSE \"{col}\" END)::DOUBLE, 'inf'::DOUBLE)")
        elif self.policy == "largest_image":
            if not {"width", "height"} <= set(cols):
                raise UsageError("exact_dedup: policy 'largest_image' needs width and height columns")
            parts.append("coalesce(-(width::BIGINT * height::BIGINT)::DOUBLE, 'inf'::DOUBLE)")
            if "image_bytes" in cols:
                parts.append("coalesce(-(image_bytes::BIGINT)::DOUBLE, 'inf'::DOUBLE)")
        parts += [f"coalesce({c}::BIGINT, 9223372036854775807)" for c in ("shard_id", "row_idx") if c in cols]
        parts.append(POS)
        return "{" + ", ".join(f"'k{i}': {p}" for i, p in enumerate(parts)) + "}"

    def apply(self, inp: StageInput) -> StageResult:
        df = self.condense(inp.frame)
        n = df.height
        if n == 0:
            return StageResult(decisions_frame(df["uid"], pl.Series([], dtype=pl.Boolean)), {}, {"n_in": 0, "n_kept": 0})
        res = self.run_keyed(KeyedTable.of_frame(df))
        return StageResult(in_input_order(res.decision_chunks(), n, REF_ROW), res.artefacts, res.stats)

    def run_keyed(self, kt: KeyedTable) -> StageResult:
        """Each key in turn among the rows earlier keys kept: DuckDB groups the candidates by the
        key (a hash aggregate: it spills rather than growing), keeps each group's first copy by
        the policy and records the others; then decisions for every row in input order, a chunk
        at a time, with `POS` and the kept copy's `REF_POS`."""
        con, src, n = kt.con, kt.source, kt.n
        cols = kt.columns
        prio = self._priority(cols)
        dropped = "_curate_exact_dropped"
        con.execute(f"CREATE OR REPLACE TEMP TABLE {dropped} (_pos BIGINT, k TINYINT, ref BIGINT, size BIGINT)")
        stats = {"n_in": n}
        for i, key in enumerate(self.keys):
            if key == "uid":
                by = ["uid"]
                text = str(con.sql(f"SELECT uid FROM {src} LIMIT 0").types[0]) == "VARCHAR"
                valid = "uid IS NOT NULL" + (" AND uid <> ''" if text else "")
            else:
                by = list(hash_columns(key))
                missing = [c for c in by if c not in cols]
                if missing:
                    raise UsageError(f"exact_dedup: key {key!r} needs column(s) {missing}")
                valid = f"{by[0]} IS NOT NULL"
            keys = ", ".join(by)
            inserted = con.execute(
                f"INSERT INTO {dropped} "
                f"WITH c AS (SELECT {keys}, {POS}, {prio} AS _prio FROM {src} WHERE {valid} "
                f"           AND {POS} NOT IN (SELECT _pos FROM {dropped})), "
                f"     g AS (SELECT {keys}, arg_min({POS}, _prio) AS ref, count(*) AS size FROM c "
                f"           GROUP BY {keys} HAVING count(*) > 1) "
                f"SELECT c.{POS}, {i}, g.ref, g.size FROM c JOIN g USING ({keys}) WHERE c.{POS} <> g.ref").fetchall()
            stats[f"dropped_{key}"] = int(inserted[0][0])
        stats["n_kept"] = n - sum(stats[f"dropped_{k}"] for k in self.keys)
        names = pl.Series("reason", [f"duplicate_{k}" for k in self.keys], dtype=DECISION_COLUMNS["reason"])

        # the kept copies' uids, looked up for the dropped rows only (a small build side)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {dropped}_ref AS SELECT d.*, r.uid AS ref_uid FROM {dropped} d "
                    f"JOIN {src} r ON r.{POS} = d.ref")

        def chunks():
            reader = con.sql(
                f"SELECT t.{POS}, t.uid, d.k, d.ref, d.size, d.ref_uid FROM {src} t "
                f"LEFT JOIN {dropped}_ref d ON d._pos = t.{POS} ORDER BY t.{POS}").to_arrow_reader(DECISION_CHUNK)
            try:
                for rb in reader:
                    f = pl.from_arrow(rb)
                    gone = f["k"].is_not_null().to_numpy()
                    yield decisions_frame(
                        f["uid"], pl.Series(~gone),
                        reason=_where(gone, names.gather(f["k"].fill_null(0).cast(pl.UInt32))),
                        value=f["size"].cast(pl.Float64), ref_uid=f["ref_uid"].alias("ref_uid"),
                    ).with_columns(f[POS].cast(pl.Int64).alias(CPOS), f["ref"].cast(pl.Int64).alias(CREF))
            finally:
                con.execute(f"DROP TABLE IF EXISTS {dropped}; DROP TABLE IF EXISTS {dropped}_ref")
        return StageResult(None, {}, stats, chunks=chunks)
