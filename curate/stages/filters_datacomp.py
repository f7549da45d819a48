"""DataComp's baseline filters, exactly as its tooling applies them, plus the shared rule helpers.

Source: Gadre et al. 2023, "DataComp: In search of the next generation of multimodal datasets",
Section 3.4 / Appendix on baselines, and the `mlfoundations/datacomp` tooling
(`baselines/apply_filter.py`):

- basic filtering: "English captions (fastText lid.176 top-1 == 'en'), captions with more than two
  words and more than five characters, images whose smaller side is at least 200 pixels and whose
  aspect ratio is at most 3". In code: `len(text.split()) > 2`, `len(text) > 5`,
  `min(w, h) >= 200`, `max(w, h) / min(w, h) <= 3.0`, language of `text.replace("\\n", " ")`.
- CLIP score filtering: keep `score >= t`; a fraction f is turned into
  `t = -np.sort(-scores)[int(len(scores) * f)]` over the whole pool (the (n+1)-th largest score),
  then `>=`, so ties at t are kept. Best small/medium/large setting: ViT-L/14 top 30%.
- LAION-2B reproduction: ViT-B/32 score >= 0.28 and English. DataComp's tooling used Google's
  gcld3 for the English test here (`gcld3_en_filter=True`), and so does the `laion2b` stage by
  default (the `datacomp` extra installs gcld3); `lang_model="fasttext"` uses fastText lid.176
  top-1 == 'en' like `basic`.

Word and character counts follow Python exactly: `str.split()` with no argument splits on runs of
every code point for which `str.isspace()` is true (including U+001C..U+001F, U+0085, U+00A0,
U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000), and `len()` counts code points.
The vectorised versions below build that exact character class from the running Python, so a
caption has the same word count here as under DataComp's `len(text.split())`.

Decision conventions shared by every filter module here: a dropped row records the first rule that
fails (in the documented order), its `value`, and its `threshold`. For `*_too_few_*`, `*_too_short`,
`*_too_small`, `*_below` reasons the threshold is the smallest value kept; for `*_too_many_*`,
`*_too_long`, `*_too_high`, `*_too_large` reasons it is the largest value kept. Rows whose deciding
value is missing get value NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .base import Stage, StageInput, StageResult, decisions_frame, register_stage
from .langid import LANG, LANG_CONF, languages_for, warm_language_workers

# ---- Python-exact text measures -----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def python_whitespace() -> tuple[int, ...]:
    """Code points for which `str.isspace()` is true in this Python (what `str.split()` splits on)."""
    import re

    # Every code point but the surrogates (none is whitespace); `re`'s \s on str is exactly
    # str.isspace() (both are Py_UNICODE_ISSPACE), and scans in C.
    cps = np.concatenate([np.arange(0xD800, dtype=np.uint32), np.arange(0xE000, 0x110000, dtype=np.uint32)])
    every = cps.tobytes().decode("utf-32-le")
    return tuple(sorted(ord(c) for c in re.findall(r"\s", every)))


def _char_class(cps: Sequence[int]) -> str:
    """A regex character-class body (Rust regex syntax) matching exactly these code points."""
    parts = []
    cps = sorted(cps)
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:X}}}" if i == j else f"\\x{{{cps[i]:X}}}-\\x{{{cps[j]:X}}}")
        i = j + 1
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def whitespace_class() -> str:
    return _char_class(python_whitespace())


@functools.lru_cache(maxsize=1)
def word_pattern() -> str:
    """Regex matching one word of `str.split()`: a maximal run of non-whitespace code points."""
    return f"[^{whitespace_class()}]+"


def word_count(expr: pl.Expr) -> pl.Expr:
    """`len(text.split())` for each string (null counts as the empty string: 0 words)."""
    return expr.fill_null("").str.count_matches(word_pattern()).cast(pl.Int64)


def char_count(expr: pl.Expr) -> pl.Expr:
    """`len(text)` in code points (null: 0)."""
    return expr.fill_null("").str.len_chars().cast(pl.Int64)


_AT_LEAST_MAX = 64  # beyond this many words the anchored pattern gets large: count instead


def at_least_words(expr: pl.Expr, k: int) -> pl.Expr:
    """`len(text.split()) >= k` (null: 0 words), without counting every word: an anchored match
    of k - 1 words and their separators followed by the first character of a k-th word stops
    after the k-th word starts."""
    if k <= 0:
        return pl.lit(True)
    if k > _AT_LEAST_MAX:
        return word_count(expr) >= k
    ws = whitespace_class()
    rest = f"(?:[^{ws}]+[{ws}]+){{{k - 1}}}" if k > 1 else ""
    return expr.fill_null("").str.contains(f"^[{ws}]*{rest}[^{ws}]")


# ---- rules → decisions --------------------------------------------------------------------------


@dataclass
class Rule:
    """One keep-or-drop test: rows where `fails` is true are dropped with `reason`."""

    reason: str
    fails: pl.Expr
    value: pl.Expr
    threshold: float | None = None
    detail: pl.Expr | None = None


def fails_below(x: pl.Expr, minimum: float) -> pl.Expr:
    """Fails unless x >= minimum (NaN fails, as in numpy; polars orders NaN above everything)."""
    return (x.is_nan() | ~(x >= minimum)).fill_null(True)


def fails_above(x: pl.Expr, maximum: float) -> pl.Expr:
    """Fails unless x <= maximum (NaN fails)."""
    return (~(x <= maximum)).fill_null(True)


def first_failure(rules: Sequence[Rule]) -> list[pl.Expr]:
    """Expressions `reason`, `value`, `threshold`, `detail`: the first failing rule of each row."""
    if not rules:
        return [pl.lit(None, pl.Utf8).alias("reason"), pl.lit(None, pl.Float64).alias("value"),
                pl.lit(None, pl.Float64).alias("threshold"), pl.lit(None, pl.Utf8).alias("detail")]

    def chain(pick, dtype, name):
        expr = pl.when(rules[0].fails).then(pick(rules[0]))
        for r in rules[1:]:
            expr = expr.when(r.fails).then(pick(r))
        return expr.otherwise(pl.lit(None, dtype)).cast(dtype).alias(name)

    return [
        chain(lambda r: pl.lit(r.reason, pl.Utf8), pl.Utf8, "reason"),
        chain(lambda r: r.value.cast(pl.Float64), pl.Float64, "value"),
        chain(lambda r: pl.lit(r.threshold, pl.Float64), pl.Float64, "threshold"),
        chain(lambda r: r.detail if r.detail is not None else pl.lit(None, pl.Utf8), pl.Utf8, "detail"),
    ]


def first_failure_frame(frame: pl.DataFrame, rules: Sequence[Rule]) -> pl.DataFrame:
    """`first_failure` evaluated on `frame`, with each rule's value and detail computed only on the
    rows that rule decides (a costly value such as a word count is then paid for the few rows that
    fail on it, not for every row; values and details must be row-wise expressions). Columns
    `reason`, `value`, `threshold`, `detail`, row-aligned."""
    if not rules or frame.height == 0:
        return frame.with_columns(first_failure(rules)).select("reason", "value", "threshold", "detail")
    # The first failing rule as a small integer (cheaper to build and compare than the strings).
    code = pl.when(rules[0].fails).then(pl.lit(0, pl.UInt8))
    for i, r in enumerate(rules[1:], 1):
        code = code.when(r.fails).then(pl.lit(i, pl.UInt8))
    code = frame.select(code.otherwise(pl.lit(None, pl.UInt8))).to_series()
    reason = code.replace_strict(list(range(len(rules))), [r.reason for r in rules], default=None,
                                 return_dtype=pl.Utf8)
    n = frame.height
    value = pl.repeat(None, n, dtype=pl.Float64, eager=True).alias("value")
    threshold = pl.repeat(None, n, dtype=pl.Float64, eager=True).alias("threshold")
    detail = pl.repeat(None, n, dtype=pl.Utf8, eager=True).alias("detail")
    for i, r in enumerate(rules):
        idx = (code == i).fill_null(False).arg_true()
        if len(idx) == 0:
            continue
        exprs = [r.value] + ([r.detail] if r.detail is not None else [])
        cols = sorted({c for e in exprs for c in e.meta.root_names()})
        # with_columns broadcasts literal values to the rows; the frame holds only what they read.
        sub = frame.select(cols)[idx] if cols else pl.DataFrame({"_row": idx})
        value = value.scatter(idx, sub.with_columns(r.value.cast(pl.Float64).alias("_v"))["_v"])
        if r.threshold is not None:
            threshold = threshold.scatter(idx, pl.repeat(float(r.threshold), len(idx), dtype=pl.Float64, eager=True))
        if r.detail is not None:
            detail = detail.scatter(idx, sub.with_columns(r.detail.cast(pl.Utf8).alias("_d"))["_d"])
    return pl.DataFrame([reason.alias("reason"), value, threshold, detail])


def decisions_from(uid: pl.Series, reason: pl.Series, value: pl.Series, threshold: pl.Series,
                   detail: pl.Series | None = None, ref_uid: pl.Series | None = None) -> pl.DataFrame:
    return decisions_frame(uid, reason.is_null(), reason, value, threshold, ref_uid, detail)


def empty_decisions() -> pl.DataFrame:
    return decisions_frame(pl.Series("uid", [], dtype=pl.Utf8), pl.Series("keep", [], dtype=pl.Boolean))


def require_columns(frame: pl.DataFrame, stage: str, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise UsageError(f"stage {stage!r} needs column(s) {', '.join(missing)}; the frame has "
                         f"{', '.join(frame.columns)}")


# ---- image size (shared with curate.stages.image_rules) ------------------------------------------


def size_rules(min_side: float | None, max_aspect: float | None, width: str = "width",
               height: str = "height") -> list[Rule]:
    """DataComp's image rules, in this order: image_size_missing, image_too_small, aspect_ratio_too_high."""
    w = pl.col(width).cast(pl.Float64)
    h = pl.col(height).cast(pl.Float64)
    small = pl.min_horizontal(w, h)
    large = pl.max_horizontal(w, h)
    rules = [Rule("image_size_missing", w.is_null() | h.is_null() | w.is_nan() | h.is_nan(),
                  pl.lit(math.nan, pl.Float64))]
    if min_side is not None:
        rules.append(Rule("image_too_small", fails_below(small, min_side), small, float(min_side)))
    if max_aspect is not None:
        aspect = large / small  # float64 true division, as numpy/pandas compute it for DataComp
        rules.append(Rule("aspect_ratio_too_high", fails_above(aspect, max_aspect), aspect, float(max_aspect)))
    return rules


def _apply_lang(frame: pl.DataFrame, reason: pl.Series, value: pl.Series, threshold: pl.Series,
                detail: pl.Series, *, column: str, lang: str, lid_model: str | None, processes: int | None,
                lang_model: str = "fasttext"):
    """Language test on the rows still alive: top-1 label must equal `lang` (no confidence cut).

    lang_model "fasttext": fastText lid.176 (`lid_model`, default the shipped lid.176.ftz);
    "gcld3": Google's CLD3 as DataComp's laion2b runs it (`curate.stages.gcld3_lang`).
    Dropped rows: reason `lang_not_<lang>`, value = top-1 probability, detail = top-1 label.
    Kept rows: value = probability of `lang`'s top-1 label, detail = the label.
    """
    alive = np.flatnonzero(reason.is_null().to_numpy())
    if len(alive):
        if lang_model == "gcld3":
            from .gcld3_lang import identify_gcld3

            ids = identify_gcld3(frame[column].gather(alive), processes=processes)
        else:
            cols = [column] + [c for c in (LANG, LANG_CONF) if c in frame.columns]
            sub = frame.select(cols)[alive]
            ids = languages_for(sub, column, model_path=lid_model, processes=processes)
        got = ids[LANG]
        bad = (got != lang).fill_null(True)
        lang_reason = pl.select(pl.when(bad).then(pl.lit(f"lang_not_{lang}")).otherwise(pl.lit(None, pl.Utf8))
                                ).to_series()
        idx = pl.Series(alive)
        reason = reason.clone().scatter(idx, lang_reason)
        value = value.clone().scatter(idx, ids[LANG_CONF])
        threshold = threshold.clone().scatter(idx, pl.repeat(None, len(alive), dtype=pl.Float64, eager=True))
        detail = detail.clone().scatter(idx, got)
    return reason, value, threshold, detail


# ---- stages -------------------------------------------------------------------------------------


@register_stage
class DataCompBasic(Stage):
    """DataComp's `basic` filter.

    Rules, checked in this order (the first failing one is recorded):
      caption_too_few_words  value = len(text.split())    threshold = min_words (3: DataComp's "> 2")
      caption_too_short      value = len(text)            threshold = min_chars (6: DataComp's "> 5")
      image_size_missing     value = NaN                  (width or height unknown)
      image_too_small        value = min(w, h)            threshold = min_side (200)
      aspect_ratio_too_high  value = max(w, h)/min(w, h)  threshold = max_aspect (3.0)
      lang_not_en            value = top-1 probability    detail = top-1 label (no confidence cut)
    The language model runs last, only on captions that passed the other rules.
    Input columns: `caption` (or `column`), `width`, `height` (original image size); optional
    `lang`/`lang_conf` computed by the runner with the same model.
    """

    name = "basic"
    scope = "row"
    remembers_languages = True

    def needs_columns(self):
        return [self.column, "width", "height"]

    def __init__(self, min_words: int = 3, min_chars: int = 6, min_side: float = 200, max_aspect: float = 3.0,
                 lang: str = "en", column: str = "caption", lid_model: str | None = None,
                 processes: int | None = None):
        self.min_words = int(min_words)
        self.min_chars = int(min_chars)
        self.min_side = min_side
        self.max_aspect = float(max_aspect)
        self.lang = lang
        self.column = column
        self.lid_model = lid_model
        self.processes = processes

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", self.column, "width", "height"])
        if f.height == 0:
            return StageResult(empty_decisions())
        if not (LANG in f.columns and LANG_CONF in f.columns and self.lid_model is None):
            warm_language_workers(f.height, model_path=self.lid_model, processes=self.processes)
        words = word_count(pl.col(self.column))
        chars = char_count(pl.col(self.column))
        rules = [
            Rule("caption_too_few_words", ~at_least_words(pl.col(self.column), self.min_words), words,
                 float(self.min_words)),
            Rule("caption_too_short", chars < self.min_chars, chars, float(self.min_chars)),
            *size_rules(self.min_side, self.max_aspect),
        ]
        pre = first_failure_frame(f, rules)
        reason, value, threshold, detail = _apply_lang(
            f, pre["reason"], pre["value"], pre["threshold"], pre["detail"], column=self.column,
            lang=self.lang, lid_model=self.lid_model, processes=self.processes)
        return StageResult(decisions_from(f["uid"], reason, value, threshold, detail))


@register_stage
class ClipScore(Stage):
    """Keep samples whose CLIP score (`score__<scorer>`) is high enough.

    threshold=t: keep score >= t (row scope).
    fraction=f, mode="datacomp" (DataComp's own semantics, global scope): N = all input rows,
        n = int(N * f), t = the (n+1)-th largest score (NaN sorted last, as `-np.sort(-x)` does),
        keep score >= t: n + 1 rows plus every tie at t. If n reaches past the last valid score
        (f = 1, or NaN scores) every valid score is kept (t = -inf) where DataComp would fail.
    fraction=f, mode="exact": exactly min(round(N * f), valid rows) samples; ties at the cut are
        broken by ascending uid (reason `clip_score_tie` for the ones cut).
    Reasons: missing_score (value NaN), clip_score_below (value = score, threshold = t), clip_score_tie.
    Kept rows carry value = score and threshold = t.
    """

    name = "clip_score"
    exclusive_params = (("threshold", "fraction"),)

    def needs_columns(self):
        return []

    def __init__(self, scorer: str, threshold: float | None = None, fraction: float | None = None,
                 mode: str = "datacomp"):
        if (threshold is None) == (fraction is None):
            raise UsageError("clip_score needs exactly one of `threshold` or `fraction`")
        if fraction is not None and not 0.0 <= float(fraction) <= 1.0:
            raise UsageError(f"clip_score fraction must be within [0, 1], got {fraction}")
        if mode not in ("datacomp", "exact"):
            raise UsageError(f"clip_score mode must be 'datacomp' or 'exact', got {mode!r}")
        self.scorer = scorer
        self.threshold = None if threshold is None else float(threshold)
        self.fraction = None if fraction is None else float(fraction)
        self.mode = mode

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "row" if self.fraction is None else "global"

    def needs_scores(self) -> list[str]:
        return [self.scorer]

    @property
    def column(self) -> str:
        return f"score__{self.scorer}"

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", self.column])
        n_rows = f.height
        if n_rows == 0:
            return StageResult(empty_decisions(), stats={"threshold": self.threshold, "n_in": 0})
        scores = f[self.column].cast(pl.Float64).fill_null(math.nan).to_numpy()
        valid = ~np.isnan(scores)
        n_valid = int(valid.sum())
        stats: dict = {"n_in": n_rows, "n_valid": n_valid, "mode": self.mode if self.fraction is not None else "threshold"}
        tie_cut = np.zeros(n_rows, dtype=bool)
        if self.fraction is None:
            t = self.threshold
        elif self.mode == "datacomp":
            n = int(n_rows * self.fraction)
            t = _kth_largest(scores[valid], n)
            stats["n"] = n
        else:
            k = min(int(round(n_rows * self.fraction)), n_valid)
            t = _kth_largest(scores[valid], k - 1) if k > 0 else math.inf
            above = valid & (scores > t)
            at = np.flatnonzero(valid & (scores == t))
            room = k - int(above.sum())
            if len(at) > room:
                order = np.argsort(f["uid"].gather(at).to_numpy(), kind="stable")
                tie_cut[at[order[room:]]] = True
            stats["k"] = k
        keep = valid & (scores >= t) & ~tie_cut
        stats["threshold"] = t
        flags = pl.DataFrame({"valid": valid, "tie": tie_cut, "keep": keep})
        reason = flags.select(
            pl.when(~pl.col("valid")).then(pl.lit("missing_score"))
            .when(pl.col("tie")).then(pl.lit("clip_score_tie"))
            .when(~pl.col("keep")).then(pl.lit("clip_score_below"))
            .otherwise(pl.lit(None, pl.Utf8))).to_series()
        detail = flags.select(pl.when(pl.col("tie")).then(pl.lit("tie at threshold broken by uid"))
                              .otherwise(pl.lit(None, pl.Utf8))).to_series()
        return StageResult(decisions_frame(f["uid"], keep, reason, scores, t, None, detail), stats=stats)


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The (k+1)-th largest value (k = 0: the maximum); -inf when k is past the end."""
    if k < 0:
        return math.inf
    if k >= len(values):
        return -math.inf
    pos = len(values) - 1 - k
    return float(np.partition(values, pos)[pos])


@register_stage
class Laion2B(Stage):
    """DataComp's reproduction of LAION-2B's filter: ViT-B/32 score >= 0.28 and English.

    Order: missing_score, clip_score_below (value = score, threshold 0.28), lang_not_en (value =
    top-1 probability, detail = top-1 label). lang_model "gcld3" (default) is DataComp's rule:
    `gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)` and
    `FindLanguage(text=text.replace("\\n", " ")).language == "en"` (the `datacomp` extra installs
    gcld3); "fasttext" uses fastText lid.176 top-1 like `basic` (`lid_model` picks the model file;
    it is ignored under gcld3). Input: `uid`, `score__<scorer>`, `caption`.
    """

    name = "laion2b"
    scope = "row"
    LANG_MODELS = ("gcld3", "fasttext")

    def needs_columns(self):
        return [self.column]

    def __init__(self, scorer: str = "datacomp-b32", threshold: float = 0.28, lang: str = "en",
                 column: str = "caption", lang_model: str = "gcld3", lid_model: str | None = None,
                 processes: int | None = None):
        if lang_model not in self.LANG_MODELS:
            raise UsageError(f"laion2b lang_model must be one of {', '.join(self.LANG_MODELS)}, got {lang_model!r}")
        if lang_model == "gcld3":
            from .gcld3_lang import require_gcld3

            require_gcld3("laion2b")
        self.scorer = scorer
        self.threshold = float(threshold)
        self.lang = lang
        self.column = column
        self.lang_model = lang_model
        self.lid_model = lid_model
        self.processes = processes

    @property
    def remembers_languages(self) -> bool:  # type: ignore[override]
        return self.lang_model == "fasttext"  # gcld3's answers are not fastText's: nothing to share

    def needs_scores(self) -> list[str]:
        return [self.scorer]

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        col = f"score__{self.scorer}"
        require_columns(f, self.name, ["uid", col, self.column])
        if f.height == 0:
            return StageResult(empty_decisions())
        s = pl.col(col).cast(pl.Float64)
        rules = [Rule("missing_score", s.is_null() | s.is_nan(), pl.lit(math.nan, pl.Float64), self.threshold),
                 Rule("clip_score_below", fails_below(s, self.threshold), s, self.threshold)]
        pre = f.select(first_failure(rules))
        reason, value, threshold, detail = _apply_lang(
            f, pre["reason"], pre["value"], pre["threshold"], pre["detail"], column=self.column,
            lang=self.lang, lid_model=self.lid_model, processes=self.processes, lang_model=self.lang_model)
        # Kept rows record their score against 0.28 (the language label stays in `detail`).
        kept = reason.is_null()
        value = pl.select(pl.when(kept).then(f[col].cast(pl.Float64)).otherwise(value)).to_series()
        threshold = pl.select(pl.when(kept).then(pl.lit(self.threshold)).otherwise(threshold)).to_series()
        return StageResult(decisions_from(f["uid"], reason, value, threshold, detail))
