"""The stage interface.

A stage is a small class registered by name. Its constructor holds the parameters (with the
paper or tool they come from quoted in the module docstring); `apply(inp)` gets the surviving
samples as a polars DataFrame (+ embeddings through an `EmbeddingView`) and returns a
`StageResult` whose `decisions` frame has one row per input sample:

    uid | keep (bool) | reason (categorical str|null) | value (f64|null) | threshold (f64|null)
    | ref_uid (same type as uid, or str, or null) | detail (str|null)

`uid` is the sample's identity as the runner hands it over, and stages treat it as an opaque,
ordered key: they copy it into decisions and `ref_uid`, and break ties by its order. The
local runner passes each sample's rank in the pool's sorted uid order (UInt32), which orders
exactly like the uid strings and costs 4 bytes a sample; it writes the real uid strings into the
manifest. Tests and other callers may pass the strings themselves.

`reason` is a short stable name (`lang_not_en`, `clip_score_below`, `semantic_duplicate`);
kept rows may carry a reason too (e.g. `kept_hard`). Stages never do I/O: the runner reads
the manifest and the embedding files, feeds stages, and records what they return. Nothing in a
stage knows which executor runs it.

`scope = "row"` stages decide each sample from its own columns, so the runner may feed them
any partition of the pool (the local runner feeds them batches). `scope = "global"` stages (fraction
thresholds, dedup, clustering, budgets) see every surviving sample in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import polars as pl

# The decision columns and their types; None: the type of the input's `uid` (or str for
# ref_uid values that name something outside the pool, such as an evaluation image).
DECISION_COLUMNS = {
    "uid": None,
    "keep": pl.Boolean,
    "reason": pl.Categorical,  # a handful of distinct names: 4 bytes a row
    "value": pl.Float64,
    "threshold": pl.Float64,
    "ref_uid": None,
    "detail": pl.Utf8,
}


# Optional decisions column: the input row (0-based, in the stage's input frame) of the sample
# `ref_uid` names, null where there is none. The runner then finds that sample directly instead
# of mapping uids back to pool positions (an inverse of 4 bytes a pool sample).
REF_ROW = "_ref_row"


def decisions_frame(uid, keep, reason=None, value=None, threshold=None, ref_uid=None, detail=None) -> pl.DataFrame:
    """Build a decisions frame; scalars broadcast, Series/arrays are taken as columns.

    `uid` keeps its type (see the module docstring); so does a `ref_uid` Series, and a scalar
    `ref_uid` (normally None) takes uid's type."""
    uid = pl.Series("uid", uid, dtype=pl.Utf8) if not isinstance(uid, pl.Series) else uid.alias("uid")
    n = len(uid)
    cols: dict[str, Any] = {"uid": uid}
    for name, v in (("keep", keep), ("reason", reason), ("value", value), ("threshold", threshold),
                    ("ref_uid", ref_uid), ("detail", detail)):
        dtype = DECISION_COLUMNS[name] or uid.dtype
        if isinstance(v, pl.Series):
            cols[name] = v.alias(name) if DECISION_COLUMNS[name] is None else v.alias(name).cast(dtype)
        elif isinstance(v, (np.ndarray, list, tuple)):
            cols[name] = pl.Series(name, v).cast(dtype)
        else:  # a scalar: broadcast without building an n-element Python list
            cols[name] = pl.repeat(v, n, dtype=dtype, eager=True).alias(name)
    return pl.DataFrame(cols)


def reason_where(mask, reason: str) -> pl.Series:
    """The `reason` column: `reason` where mask is set, null elsewhere, built categorical (4 bytes
    a row; a string column would take 16+ a row before the cast)."""
    return pl.select(pl.when(pl.Series(np.asarray(mask, dtype=bool)))
                     .then(pl.lit(reason, dtype=DECISION_COLUMNS["reason"])).alias("reason")).to_series()


class EmbeddingView:
    """Embeddings of the input rows, in input-row order, read in float32 chunks.

    Implementations stream from the workspace's fp16 files (`curate.embeddings`) or wrap an
    in-memory array (`ArrayEmbeddings`, for tests and small pools).
    """

    n: int
    dim: int

    def chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, float32 array of shape (k, dim)) covering rows [start, start + k)."""
        raise NotImplementedError

    def take(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at the given input positions (sorted or not), shape (len(positions), dim)."""
        raise NotImplementedError

    def to_numpy(self) -> np.ndarray:
        out = np.empty((self.n, self.dim), dtype=np.float32)
        for start, block in self.chunks():
            out[start:start + len(block)] = block
        return out


class ArrayEmbeddings(EmbeddingView):
    def __init__(self, array: np.ndarray):
        self.array = array
        self.n, self.dim = array.shape

    def chunks(self, rows: int = 65536):
        for start in range(0, self.n, rows):
            yield start, np.asarray(self.array[start:start + rows], dtype=np.float32)

    def take(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[np.asarray(positions)], dtype=np.float32)


@dataclass
class StageInput:
    """What a stage sees.

    frame: surviving samples. Always has `uid` (an opaque ordered key, see the module docstring);
        the runner adds the sample columns the stage names in `needs_columns()` (`url`,
        `caption`, `width`, `height`, `sha256`, `image_bytes`, `decode_error`, `shard_id`,
        `row_idx`, ...; all of them when it names none) and one float column per score it
        needs, named `score__<scorer>` (e.g. `score__datacomp-l14`).
    embeddings: (scorer, kind) -> EmbeddingView, kind 'img' | 'txt' | 'img_flip'.
    seed: the run's seed.
    budget: for budget stages, the number of samples to keep (None elsewhere).
    cache: a key-value store of numpy arrays the runner keeps in the workspace between runs
        (`cache.get(key) -> dict[str, np.ndarray] | None`, `cache.put(key, arrays)`), so a stage can
        reuse clusterings and pairwise similarities without doing file I/O itself. Keys should
        include everything the cached value depends on (see `StageInput.fingerprint`).
    """

    frame: pl.DataFrame
    embeddings: dict[tuple[str, str], EmbeddingView] = field(default_factory=dict)
    seed: int = 0
    budget: int | None = None
    cache: Any = None
    # What integer uids are ranks in (the runner's hash of the pool's uid strings): part of the
    # fingerprint, so the same ranks of a different pool never share a cache entry.
    pool_key: str | None = None
    # Clusterings the runner already has for this input (the pool's, restricted to these rows),
    # by `ClusterSpec.key()`: `curate.cluster.clustering_for_stage` returns them before looking
    # in the cache, so a stage never re-reads or re-sorts what the runner holds.
    clusterings: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def fingerprint(self) -> str:
        """A short hash of the input uid set (order-independent), for cache keys; computed once.
        Integer uids (the runner's ranks) are hashed as a bitmap over the ranks: a bit a pool
        sample, no sort."""
        if self._fingerprint is None:
            self._fingerprint = set_fingerprint(self.frame["uid"], self.pool_key)
        return self._fingerprint

    def embedding(self, scorer: str, kind: str = "img") -> EmbeddingView:
        try:
            return self.embeddings[(scorer, kind)]
        except KeyError:
            have = ", ".join(f"{s}:{k}" for s, k in self.embeddings) or "none"
            from ..errors import UsageError
            raise UsageError(f"stage needs {kind} embeddings of scorer {scorer!r}; available: {have}") from None


def set_fingerprint(uids: pl.Series, pool_key: str | None = None) -> str:
    """A short order-independent hash of a set of uids (unique): integer ranks as a bitmap over
    0..max (with the `pool_key` they are ranks of), strings sorted and joined."""
    import hashlib

    if uids.dtype.is_integer() and (not len(uids) or uids.min() >= 0):
        bits = np.zeros(int(uids.max()) + 1 if len(uids) else 0, dtype=bool)
        bits[uids.to_numpy()] = True
        return bitmap_fingerprint(bits, pool_key)
    h = hashlib.sha256()
    if uids.dtype.is_integer():
        h.update(f"ranks of {pool_key}\n".encode())
        h.update(uids.sort().cast(pl.Int64).to_numpy().tobytes())
    else:
        uids = uids.sort()
        for start in range(0, len(uids), 1 << 20):
            h.update("\n".join(uids.slice(start, 1 << 20).cast(pl.Utf8).to_list()).encode())
    return h.hexdigest()[:16]


def bitmap_fingerprint(bits: np.ndarray, pool_key: str | None = None) -> str:
    """`set_fingerprint` of the ranks where `bits` is set (trailing unset bits do not count)."""
    import hashlib

    bits = bits[:len(bits) - int(np.argmax(bits[::-1]))] if bits.any() else bits[:0]
    h = hashlib.sha256()
    h.update(f"rank bitmap of {pool_key}\n".encode())
    h.update(np.packbits(bits).tobytes())
    return h.hexdigest()[:16]


DECISION_CHUNK = 1 << 20


def index_dtype(n: int):
    """The integer type for positions among n rows (and counts up to n): int32 while it fits."""
    return np.int32 if n < 2**31 else np.int64


class StageResult:
    """What `Stage.apply` returns.

    decisions: the decisions frame; or, for stages over millions of rows, `chunks` instead: a
        callable returning an iterator of frames that follow the input order and concatenate to
        the decisions (see `in_chunks`). The runner records chunk by chunk, so it never holds all
        of them; `.decisions` still gives the whole frame to callers that want it.
    artefacts: tables for the report and later reruns (cluster sizes, quotas, ...): name -> frame/array.
    stats: extra scalar facts (resolved thresholds, eps, λ) recorded with the stage.
    """

    def __init__(self, decisions: pl.DataFrame | None = None, artefacts: dict[str, Any] | None = None,
                 stats: dict[str, Any] | None = None, *, chunks: Callable[[], Iterator[pl.DataFrame]] | None = None):
        if (decisions is None) == (chunks is None):
            raise ValueError("StageResult needs decisions or chunks (one of them)")
        self._decisions, self._chunks = decisions, chunks
        self.artefacts = artefacts if artefacts is not None else {}
        self.stats = stats if stats is not None else {}

    @property
    def decisions(self) -> pl.DataFrame:
        if self._decisions is None:
            self._decisions = pl.concat(list(self._chunks()))
        return self._decisions

    def decision_chunks(self) -> Iterator[pl.DataFrame]:
        return iter([self._decisions]) if self._decisions is not None else self._chunks()


def in_chunks(n: int, build: Callable[[int, int], pl.DataFrame], rows: int = DECISION_CHUNK):
    """`chunks=` for a StageResult: build(start, stop) gives the decisions of input rows
    [start, stop); at least one chunk, even for no rows."""
    def chunks() -> Iterator[pl.DataFrame]:
        for start in range(0, max(n, 1), rows):
            yield build(start, min(n, start + rows))
    return chunks


class Stage:
    name: ClassVar[str] = ""
    scope: ClassVar[str] = "row"  # "row" | "global"
    uses_budget: ClassVar[bool] = False  # True: `curate prune --budget` sets inp.budget for this stage
    # True: the stage identifies caption languages through langid's memo (shared by the run's
    # language-aware stages); the runner forgets it after the last such stage.
    remembers_languages: ClassVar[bool] = False
    # True: the stage reads what `curate score` recorded about images (decode failures); the
    # runner refuses to run it over images no score run has decoded, unless `require_score` is off.
    needs_score_run: ClassVar[bool] = False
    # Groups of parameters of which a recipe sets one (e.g. clip_score's threshold or fraction):
    # `--set` of one clears the others of its group, so a recipe switches modes.
    exclusive_params: ClassVar[tuple[tuple[str, ...], ...]] = ()
    _apply_to: str = "survivors"  # set by the runner from the recipe ("survivors" | "pool")

    def params(self) -> dict:
        """The resolved parameters, recorded with the run."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def needs_embeddings(self) -> list[tuple[str, str]]:
        """(scorer, kind) pairs the runner must provide."""
        return []

    def needs_scores(self) -> list[str]:
        """Scorer names whose `score__<scorer>` columns the runner must provide."""
        return []

    def needs_columns(self) -> list[str] | None:
        """Sample columns (`caption`, `url`, `sha256`, `width`, `decode_error`, `shard_id`,
        `row_idx`, ...) the stage reads, besides `uid` and its scores, which it always gets. None
        (the default) means all of them; built-in stages name theirs, so the runner loads no more."""
        return None

    def condense(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Shrink one batch of a global stage's input before the runner concatenates the batches:
        keep `uid` and the rows in order, replace long columns by what `apply` actually needs
        (e.g. 128-bit hashes of URLs instead of the URLs). `apply` must accept both the condensed
        and the raw form. The default keeps the batch as it is."""
        return frame

    def apply(self, inp: StageInput) -> StageResult:
        raise NotImplementedError


_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"stage name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_stages() -> None:
    import importlib
    import pkgutil

    from . import __path__ as pkg_path

    for mod in pkgutil.iter_modules(pkg_path):
        if mod.name not in ("base", "__init__"):
            importlib.import_module(f"{__package__}.{mod.name}")


def get_stage(name: str) -> type[Stage]:
    _load_builtin_stages()
    if name not in _REGISTRY:
        from ..errors import UsageError
        raise UsageError(f"unknown stage {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def stage_names() -> list[str]:
    _load_builtin_stages()
    return sorted(_REGISTRY)
