"""Caption quality heuristics, vectorised over the distinct captions of the input.

Sources and where each default comes from:
- Language id with a confidence: fastText lid.176 (Joulin et al. 2016). CCNet (Wenzek et al. 2020)
  keeps documents whose language score is >= 0.5; we use that as `min_lang_conf`.
- CLIP context: CLIP's text tower reads 77 BPE tokens including the start and end tokens
  (Radford et al. 2021; open_clip `SimpleTokenizer`, context_length 77). Longer captions are
  silently truncated, so their tail never reaches the model.
- Repetition: Gopher's quality filters (Rae et al. 2021, "Scaling Language Models", Appendix A,
  Table A1) drop documents whose top 2/3/4-gram covers more than 20/18/16% of characters and whose
  duplicated 5..10-grams cover more than 15..10%. Captions are ~10 words, so the same ideas are
  scaled down: the share of the most common word, the share of word 3-grams that occur more than
  once, and the longest run of one repeated character. The caption-sized thresholds are ours.
- Alphabetic ratio: Gopher keeps documents where >= 80% of words contain an alphabetic character;
  for captions we ask that >= 50% of non-space characters be letters (ours), and <= 50% digits.
- File names, URLs, e-mail addresses, HTML, placeholder and stock-phrase captions, mojibake, and
  captions shared by many images: the caption heuristics listed for LAION/DataComp-style pools in
  curate's REFERENCES ("Caption quality and enhancement"); the patterns and defaults are ours.

Every check records one reason per dropped row, with the value that decided it and its threshold:

  check        reasons (in order)
  length       caption_too_few_words, caption_too_many_words, caption_too_short, caption_too_long
  mojibake     caption_mojibake
  boilerplate  caption_is_filename, caption_has_url, caption_has_email, caption_has_html,
               caption_placeholder, caption_stock_phrase
  charset      caption_low_alpha_ratio, caption_high_digit_ratio
  repetition   caption_char_run, caption_top_word_ratio, caption_dup_ngram_frac
  tokens       caption_token_overflow
  language     lang_not_allowed, lang_low_confidence

`caption_quality` runs the checks listed in `checks` (default: all) in the order above (specific
before generic, cheap before expensive: the tokenizer and the language model only see captions
that passed everything before).
Each check is also its own stage (`caption_length`, `caption_charset`, ...). `max_caption_repeats`
(global) caps how many images may share one caption.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .base import Stage, StageInput, StageResult, decisions_frame, register_stage
from .filters_datacomp import (Rule, char_count, empty_decisions, fails_above, fails_below, first_failure,
                               python_whitespace, require_columns, whitespace_class, word_count)
from .langid import LANG, LANG_CONF, identify, map_distinct

# Specific reasons before generic ones (a file name is also "few letters"), expensive checks last.
# Worker processes pay ~3 s to import torch/open_clip, so the tokenizer goes parallel only for many texts.
TOKEN_PARALLEL_MIN = 100_000

CHECKS = ("length", "mojibake", "boilerplate", "charset", "repetition", "tokens", "language")

# Parameters each check reads (for params(): a stage records only what it uses).
CHECK_PARAMS = {
    "length": ("min_words", "max_words", "min_chars", "max_chars"),
    "charset": ("min_alpha_ratio", "max_digit_ratio"),
    "mojibake": ("max_mojibake",),
    "boilerplate": ("filename", "url", "email", "html", "placeholders", "stock_phrases", "stock_min_words"),
    "repetition": ("max_char_run", "rep_min_words", "max_top_word_ratio", "ngram", "max_dup_ngram_frac"),
    "tokens": ("max_tokens", "tokenizer"),
    "language": ("langs", "min_lang_conf", "lid_model"),
}

# ---- patterns -----------------------------------------------------------------------------------

IMAGE_EXT = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|svg|avif|ico)"
# A caption that is a file name ("IMG 2041.jpg", "my holiday pic.png"), a camera default name
# ("DSC01234", "PXL_20210101_123456"), or a bare hex/uuid id.
FILENAME_RE = (
    r"(?i)^\s*(?:"
    rf"[^/\\<>|]*\.{IMAGE_EXT}"
    r"|(?:img|dsc|dscn|dscf|dcim|pxl|pict|mvimg|wp|gopr|sam|photo|image|screenshot|scan)[ _-]?\d{3,}[\w-]*"
    r"|[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}"
    r"|[0-9a-f]{16,}"
    r")\s*$"
)
URL_RE = (
    r"(?i)(?:\b(?:https?|ftp)://\S+|\bwww\.[a-z0-9-]+\.\S+"
    r"|^\s*[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|net|org|io|co|info|biz|ru|de|uk|fr|jp|cn|nl|it|es|pl|br|in|au)"
    r"(?:/\S*)?\s*$)"
)
EMAIL_RE = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
HTML_RE = r"<\s*/?\s*[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?\s*>|&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z]{2,8});"

# Whole-caption placeholders, compared after lowercasing and turning every run of non-letters into
# one space (so "Photo 1", "IMAGE:" and "photo" all read "photo").
DEFAULT_PLACEHOLDERS = (
    "image", "images", "photo", "photos", "picture", "pictures", "img", "pic", "untitled", "untitled image",
    "no image", "no image available", "image not available", "image not found", "image unavailable",
    "no photo", "no photo available", "photo not available", "placeholder", "image placeholder", "thumbnail",
    "thumb", "default", "default image", "loading", "loading image", "logo", "icon", "banner", "click to enlarge",
    "click here", "click to zoom", "view image", "view larger", "view larger image", "enlarge", "zoom",
    "null", "none", "undefined", "nan", "n a", "alt", "alt text", "image description", "featured image",
    "product image", "main image", "preview", "cover", "cover image", "avatar", "profile picture", "image of",
    "photo of", "picture of", "a picture", "a photo", "an image", "this image", "see image", "download",
    "free download", "image result", "image may contain", "no description available", "description",
)
# Stock-agency and boilerplate phrases. A caption is a stock-phrase caption when it contains one
# and fewer than `stock_min_words` words remain once these phrases, the filler words below, digits
# and punctuation are removed ("Stock Photo - 12345678", "Royalty free image 4521 | Alamy");
# descriptive stock captions ("Smiling woman on a beach stock photo") stay.
DEFAULT_STOCK_PHRASES = (
    "stock photography", "stock photo", "stock photos", "stock image", "stock images", "stock picture",
    "stock pictures", "stock vector", "stock illustration", "stock footage", "royalty free", "royalty-free",
    "shutterstock", "alamy", "dreamstime", "depositphotos", "123rf", "istockphoto", "istock", "getty images",
    "gettyimages", "bigstock", "adobe stock", "fotolia", "vectorstock", "pixabay", "unsplash",
)
STOCK_FILLER = ("image", "images", "photo", "photos", "picture", "pictures", "vector", "vectors", "illustration",
                "illustrations", "free", "download", "hd", "id", "by", "from", "on", "and", "premium", "editorial",
                "high", "resolution", "res", "file", "no", "number")


def _cp1252_continuations() -> list[int]:
    """How UTF-8 continuation bytes 0x80..0xBF render when decoded as cp1252 or latin-1."""
    cps = set(range(0x80, 0xC0))
    for b in range(0x80, 0xC0):
        ch = bytes([b]).decode("cp1252", errors="ignore")
        if ch:
            cps.add(ord(ch))
    return sorted(cps)


@functools.lru_cache(maxsize=1)
def mojibake_pattern() -> str:
    """UTF-8 read as cp1252/latin-1: a 2-byte lead (Â..ß) or 3-byte lead (à..ï) followed by
    continuation renderings ("Ã©", "â€™", "Ð¿", "ä¸­", "ï»¿"), a lone "â€", or U+FFFD."""
    from .filters_datacomp import _char_class

    cont = f"[{_char_class(_cp1252_continuations())}]"
    return rf"[\x{{C2}}-\x{{DF}}]{cont}|[\x{{E0}}-\x{{EF}}]{cont}{{2}}|\x{{E2}}\x{{20AC}}|\x{{FFFD}}"


def _phrase_regex(phrases: Sequence[str]) -> str:
    import re

    alts = sorted({p.strip().lower() for p in phrases if p.strip()}, key=len, reverse=True)
    return r"(?i)(?:^|[^\p{L}\p{N}])(" + "|".join(re.escape(p) for p in alts) + r")(?:$|[^\p{L}\p{N}])"


# ---- token counting (run in worker processes for many captions) -----------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer(name)


def _token_chunk(args: tuple[str, list[str]]) -> tuple[np.ndarray]:
    name, texts = args
    encode = _tokenizer(name).encode
    return (np.fromiter((len(encode(t)) for t in texts), dtype=np.int64, count=len(texts)),)


# open_clip's SimpleTokenizer (clean="lower") cleans a caption with ftfy.fix_text, html.unescape
# twice, " ".join(text.split()) and lower(), cuts it into pre-tokens with the pattern below, and
# BPE-encodes each pre-token on its own. On printable ASCII without '&' and '<' the cleaning is just
# whitespace collapsing and lowercasing, so a caption's token count is the sum of its pre-tokens'
# counts: those captions are counted by exploding pre-tokens and BPE-encoding each distinct one once.
_SIMPLE_ASCII = r"^[\x20-\x25\x27-\x3b\x3d-\x7e]*$"
_CLIP_PRETOKEN = r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"


def clip_token_counts(texts: pl.Series, tokenizer: str = "ViT-B-32", processes: int | None = None) -> np.ndarray:
    """`len(open_clip.get_tokenizer(tokenizer).encode(text))` for each text (without start/end tokens)."""
    texts = texts.cast(pl.Utf8).fill_null("")
    out = np.zeros(len(texts), dtype=np.int64)
    simple = texts.str.contains(_SIMPLE_ASCII).to_numpy()
    tok = _tokenizer(tokenizer)
    if getattr(getattr(tok, "clean_fn", None), "__name__", "") != "_clean_lower":
        simple[:] = False  # not the BPE layout the fast path knows
    if simple.any():
        idx = np.flatnonzero(simple)
        pieces = (pl.DataFrame({"_i": idx, "_t": texts.gather(idx)})
                  .select("_i", p=pl.col("_t").str.to_lowercase().str.extract_all(_CLIP_PRETOKEN))
                  .explode("p").drop_nulls("p"))
        if pieces.height:
            distinct = pieces["p"].unique()
            n = map_distinct(distinct, _token_chunk, tokenizer, {"n": pl.Int64}, processes=processes,
                             parallel_min=TOKEN_PARALLEL_MIN, description="CLIP tokens")
            table = pl.DataFrame({"p": distinct, "n": n["n"]})
            per = pieces.join(table, on="p", how="left").group_by("_i").agg(pl.col("n").sum())
            out[per["_i"].to_numpy()] = per["n"].to_numpy()
    rest = np.flatnonzero(~simple)
    if len(rest):
        n = map_distinct(texts.gather(rest), _token_chunk, tokenizer, {"n": pl.Int64}, processes=processes,
                         parallel_min=TOKEN_PARALLEL_MIN, description="CLIP tokens")
        out[rest] = n["n"].to_numpy()
    return out


# ---- character runs (numpy over the concatenated code points) ------------------------------------


def longest_char_run(texts: pl.Series, chunk: int = 200_000) -> np.ndarray:
    """Length of the longest run of one repeated non-whitespace character in each text.

    Works on the concatenated code points of a chunk of texts: only positions equal to their
    predecessor (inside one text, not whitespace) are looked at, so the cost is one comparison per
    character plus the handful of repeats.
    """
    texts = texts.cast(pl.Utf8).fill_null("")
    # 1 for texts with any non-whitespace character (their longest run is at least 1), else 0.
    out = texts.str.contains(f"[^{whitespace_class()}]").cast(pl.Int64).to_numpy().copy()
    ws = np.array(python_whitespace(), dtype=np.int64)
    is_ws = np.zeros(int(ws.max()) + 1, dtype=bool)
    is_ws[ws] = True
    for start in range(0, len(texts), chunk):
        part = texts.slice(start, chunk)
        lens = part.str.len_chars().cast(pl.Int64).to_numpy()
        total = int(lens.sum())
        if total < 2:
            continue
        cps = np.frombuffer("".join(part.to_list()).encode("utf-32-le"), dtype=np.uint32)
        ends = np.cumsum(lens)
        same = cps[1:] == cps[:-1]  # same[i]: character i+1 repeats character i
        inner = ends[:-1][(ends[:-1] > 0) & (ends[:-1] < total)]
        same[inner - 1] = False  # never across two texts
        idx = np.flatnonzero(same)
        if len(idx) == 0:
            continue
        c = cps[idx]
        idx = idx[~((c < len(is_ws)) & is_ws[np.minimum(c, len(is_ws) - 1)])]
        if len(idx) == 0:
            continue
        # Consecutive repeat positions form one run; a run of r repeats is r + 1 characters.
        new_run = np.ones(len(idx), dtype=bool)
        new_run[1:] = np.diff(idx) != 1
        run_first = np.flatnonzero(new_run)
        run_len = np.diff(np.append(run_first, len(idx))) + 1
        row = np.searchsorted(ends, idx[run_first], side="right")
        np.maximum.at(out, start + row, run_len)
    return out


# ---- the composite stage ------------------------------------------------------------------------


class _Failures:
    """Collects (row-of-distinct-frame → reason/value/threshold/detail) for failing captions."""

    def __init__(self):
        self.parts: list[pl.DataFrame] = []

    def add(self, frame: pl.DataFrame) -> pl.DataFrame:
        """frame: `_i`, reason, value, threshold, detail; keeps the failing rows, returns them."""
        bad = frame.filter(pl.col("reason").is_not_null()).select(
            pl.col("_i"), pl.col("reason").cast(pl.Utf8), pl.col("value").cast(pl.Float64),
            pl.col("threshold").cast(pl.Float64), pl.col("detail").cast(pl.Utf8))
        self.parts.append(bad)
        return bad

    def frame(self) -> pl.DataFrame:
        if not self.parts:
            return pl.DataFrame(schema={"_i": pl.UInt32, "reason": pl.Utf8, "value": pl.Float64,
                                        "threshold": pl.Float64, "detail": pl.Utf8})
        return pl.concat(self.parts)


@register_stage
class CaptionQuality(Stage):
    """Caption heuristics; see the module docstring for the checks, their order and reasons.

    Input columns: `uid`, `caption` (or `column`); optional `lang`/`lang_conf` from the runner.
    Kept rows carry no reason. Each distinct caption is evaluated once.
    """

    name = "caption_quality"
    scope = "row"
    fixed_checks: tuple[str, ...] | None = None

    def __init__(self, checks: Sequence[str] | None = None, column: str = "caption",
                 # length (inclusive bounds; None = no bound)
                 min_words: int | None = 2, max_words: int | None = None,
                 min_chars: int | None = 5, max_chars: int | None = None,
                 # charset
                 min_alpha_ratio: float | None = 0.5, max_digit_ratio: float | None = 0.5,
                 # mojibake
                 max_mojibake: int = 0,
                 # boilerplate
                 filename: bool = True, url: bool = True, email: bool = True, html: bool = True,
                 placeholders: Sequence[str] | None = None, stock_phrases: Sequence[str] | None = None,
                 stock_min_words: int = 2,
                 # repetition
                 max_char_run: int | None = 10, rep_min_words: int = 4, max_top_word_ratio: float | None = 0.5,
                 ngram: int = 3, max_dup_ngram_frac: float | None = 0.5,
                 # tokens
                 max_tokens: int | None = 77, tokenizer: str = "ViT-B-32",
                 # language
                 langs: Sequence[str] | None = ("en",), min_lang_conf: float | None = 0.5,
                 lid_model: str | None = None, processes: int | None = None):
        if self.fixed_checks is not None:
            if checks is not None and tuple(checks) != self.fixed_checks:
                raise UsageError(f"stage {self.name!r} always runs {list(self.fixed_checks)}")
            checks = self.fixed_checks
        checks = CHECKS if checks is None else tuple(checks)
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            raise UsageError(f"unknown caption check(s) {unknown}; known: {list(CHECKS)}")
        self.checks = [c for c in CHECKS if c in checks]
        self.column = column
        self.min_words, self.max_words, self.min_chars, self.max_chars = min_words, max_words, min_chars, max_chars
        self.min_alpha_ratio, self.max_digit_ratio = min_alpha_ratio, max_digit_ratio
        self.max_mojibake = int(max_mojibake)
        self.filename, self.url, self.email, self.html = bool(filename), bool(url), bool(email), bool(html)
        self.placeholders = list(DEFAULT_PLACEHOLDERS if placeholders is None else placeholders)
        self.stock_phrases = list(DEFAULT_STOCK_PHRASES if stock_phrases is None else stock_phrases)
        self.stock_min_words = int(stock_min_words)
        self.max_char_run, self.rep_min_words = max_char_run, int(rep_min_words)
        self.max_top_word_ratio, self.ngram, self.max_dup_ngram_frac = max_top_word_ratio, int(ngram), max_dup_ngram_frac
        if self.ngram < 1:
            raise UsageError("caption ngram must be >= 1")
        self.max_tokens, self.tokenizer = max_tokens, tokenizer
        self.langs = None if langs is None else [str(x) for x in ([langs] if isinstance(langs, str) else langs)]
        self.min_lang_conf, self.lid_model = min_lang_conf, lid_model
        self.processes = processes

    def params(self) -> dict:
        keep = {"checks", "column", "processes"}
        for c in self.checks:
            keep.update(CHECK_PARAMS[c])
        return {k: v for k, v in vars(self).items() if k in keep}

    # -- driver --------------------------------------------------------------------------------
    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", self.column])
        if f.height == 0:
            return StageResult(empty_decisions())
        text = f[self.column].cast(pl.Utf8).fill_null("").alias("_t")
        have_lang = LANG in f.columns and LANG_CONF in f.columns and self.lid_model is None
        if have_lang:
            base = pl.DataFrame([text, f[LANG].cast(pl.Utf8), f[LANG_CONF].cast(pl.Float64)])
            distinct = base.unique(subset="_t", keep="first", maintain_order=False)
        else:
            distinct = text.unique().to_frame()
        distinct = distinct.with_row_index("_i")
        fails = _Failures()
        alive = distinct
        stats: dict = {"distinct_captions": distinct.height}
        for check in self.checks:
            if alive.height == 0:
                break
            bad = fails.add(getattr(self, f"_check_{check}")(alive))
            if bad.height:
                alive = alive.join(bad.select("_i"), on="_i", how="anti")
        per_caption = distinct.select("_i", "_t").join(fails.frame(), on="_i", how="left").drop("_i")
        d = text.to_frame().join(per_caption, on="_t", how="left", maintain_order="left")
        return StageResult(decisions_frame(f["uid"], d["reason"].is_null(), d["reason"], d["value"],
                                           d["threshold"], None, d["detail"]), stats=stats)

    @staticmethod
    def _rules(a: pl.DataFrame, rules: list[Rule]) -> pl.DataFrame:
        """The first failing rule per row; value and detail are computed for failing rows only."""
        if not rules:
            return a.select("_i").clear().with_columns(reason=pl.lit(None, pl.Utf8), value=pl.lit(None, pl.Float64),
                                                        threshold=pl.lit(None, pl.Float64), detail=pl.lit(None, pl.Utf8))
        reason = first_failure(rules)[0]
        bad = a.with_columns(reason).filter(pl.col("reason").is_not_null())
        r = pl.col("reason")

        def pick(get, dtype):
            expr = None
            for rule in rules:
                v = get(rule)
                if v is None:
                    continue
                expr = (pl.when(r == rule.reason) if expr is None else expr.when(r == rule.reason)).then(v)
            return pl.lit(None, dtype) if expr is None else expr.otherwise(pl.lit(None, dtype)).cast(dtype)

        return bad.select(pl.col("_i"), r,
                          pick(lambda x: x.value.cast(pl.Float64), pl.Float64).alias("value"),
                          pick(lambda x: None if x.threshold is None else pl.lit(x.threshold, pl.Float64),
                               pl.Float64).alias("threshold"),
                          pick(lambda x: x.detail, pl.Utf8).alias("detail"))

    @staticmethod
    def _on_subset(a: pl.DataFrame, where: pl.Expr, expr: pl.Expr, dtype) -> pl.Series:
        """`expr` evaluated only on the rows where `where` holds (null elsewhere), for costly columns."""
        idx = a.select(where.fill_null(False)).to_series().arg_true()
        full = pl.repeat(None, a.height, dtype=dtype, eager=True)
        if len(idx):
            full = full.scatter(idx, a[idx].select(expr.cast(dtype)).to_series())
        return full

    # -- checks (each gets the alive distinct captions `_i`, `_t` and returns rows with a reason) --
    def _check_length(self, a: pl.DataFrame) -> pl.DataFrame:
        t = pl.col("_t")
        w, c = word_count(t), char_count(t)
        rules = []
        if self.min_words is not None:
            rules.append(Rule("caption_too_few_words", w < self.min_words, w, float(self.min_words)))
        if self.max_words is not None:
            rules.append(Rule("caption_too_many_words", w > self.max_words, w, float(self.max_words)))
        if self.min_chars is not None:
            rules.append(Rule("caption_too_short", c < self.min_chars, c, float(self.min_chars)))
        if self.max_chars is not None:
            rules.append(Rule("caption_too_long", c > self.max_chars, c, float(self.max_chars)))
        return self._rules(a, rules)

    def _check_charset(self, a: pl.DataFrame) -> pl.DataFrame:
        t = pl.col("_t")
        total = t.str.len_chars().cast(pl.Float64)

        def count(cls: str) -> pl.Expr:  # characters of a class: cheaper as "length minus the rest"
            return total - t.str.replace_all(f"{cls}+", "").str.len_chars().cast(pl.Float64)

        nonspace = total - count(f"[{whitespace_class()}]")
        alpha = count(r"\p{L}") / nonspace
        digit = count(r"\p{Nd}") / nonspace
        alpha = pl.when(nonspace > 0).then(alpha).otherwise(0.0)
        digit = pl.when(nonspace > 0).then(digit).otherwise(0.0)
        rules = []
        if self.min_alpha_ratio is not None:
            rules.append(Rule("caption_low_alpha_ratio", fails_below(alpha, self.min_alpha_ratio), alpha,
                              float(self.min_alpha_ratio)))
        if self.max_digit_ratio is not None:
            rules.append(Rule("caption_high_digit_ratio", fails_above(digit, self.max_digit_ratio), digit,
                              float(self.max_digit_ratio)))
        return self._rules(a, rules)

    def _check_mojibake(self, a: pl.DataFrame) -> pl.DataFrame:
        t = pl.col("_t")
        n = t.str.count_matches(mojibake_pattern()).cast(pl.Float64)
        return self._rules(a, [Rule("caption_mojibake", n > self.max_mojibake, n, float(self.max_mojibake),
                                    t.str.extract(f"({mojibake_pattern()})", 1))])

    def _check_boilerplate(self, a: pl.DataFrame) -> pl.DataFrame:
        t = pl.col("_t")
        one = pl.lit(1.0)
        rules = []
        if self.filename:
            rules.append(Rule("caption_is_filename", t.str.contains(FILENAME_RE), one, None, t.str.strip_chars()))
        # value = the number of matches; detail = the first one (both computed for dropped rows only)
        if self.url:
            rules.append(Rule("caption_has_url", t.str.contains(URL_RE), t.str.count_matches(URL_RE), None,
                              t.str.extract(f"({URL_RE})", 1)))
        if self.email:
            rules.append(Rule("caption_has_email", t.str.contains(EMAIL_RE), t.str.count_matches(EMAIL_RE), None,
                              t.str.extract(f"({EMAIL_RE})", 1)))
        if self.html:
            rules.append(Rule("caption_has_html", t.str.contains(HTML_RE), t.str.count_matches(HTML_RE), None,
                              t.str.extract(f"({HTML_RE})", 1)))
        if self.placeholders:
            table = sorted({" ".join("".join(ch if ch.isalpha() else " " for ch in p.lower()).split())
                            for p in self.placeholders})
            # Only captions about as short as the longest placeholder can be one.
            longest = 2 * max(len(p) for p in table) + 16
            norm = t.str.to_lowercase().str.replace_all(r"[^\p{L}]+", " ").str.strip_chars()
            a = a.with_columns(_ph=self._on_subset(a, t.str.len_chars() <= longest, norm, pl.Utf8))
            rules.append(Rule("caption_placeholder", pl.col("_ph").is_in(table).fill_null(False), one, None,
                              pl.col("_ph")))
        if self.stock_phrases:
            pat = _phrase_regex(self.stock_phrases)
            strip = _phrase_regex(list(self.stock_phrases) + list(STOCK_FILLER))
            # Remove every phrase (repeated: neighbouring phrases share one separator), then non-letters,
            # and count the words left; only for captions that contain a stock phrase at all.
            rest = t.str.to_lowercase()
            for _ in range(3):
                rest = rest.str.replace_all(strip, " ")
            rest_words = word_count(rest.str.replace_all(r"[^\p{L}]+", " ")).cast(pl.Float64)
            a = a.with_columns(_rest=self._on_subset(a, t.str.contains(pat), rest_words, pl.Float64))
            rules.append(Rule("caption_stock_phrase", (pl.col("_rest") < self.stock_min_words).fill_null(False),
                              pl.col("_rest"), float(self.stock_min_words), t.str.extract(pat, 1)))
        return self._rules(a, rules)

    def _check_repetition(self, a: pl.DataFrame) -> pl.DataFrame:
        out = a.select("_i")
        if self.max_char_run is not None:
            out = out.with_columns(run=pl.Series(longest_char_run(a["_t"]), dtype=pl.Float64))
        toks = a.select("_i", w=pl.col("_t").str.to_lowercase().str.extract_all(r"[\p{L}\p{N}]+"))
        toks = toks.with_columns(n=pl.col("w").list.len()).filter(pl.col("n") >= self.rep_min_words)
        top = pl.DataFrame(schema={"_i": pl.UInt32, "top": pl.Float64})
        dup = pl.DataFrame(schema={"_i": pl.UInt32, "dup": pl.Float64})
        if toks.height and self.max_top_word_ratio is not None:
            top = toks.select("_i", top=(pl.col("w").list.eval(pl.element().unique_counts().max()).list.first()
                                         / pl.col("n")).cast(pl.Float64))
        if toks.height and self.max_dup_ngram_frac is not None:
            # Word n-grams over the exploded words, kept only while all n words are in one caption.
            ex = toks.explode("w")
            k = self.ngram
            same = [pl.col("_i").shift(-j) == pl.col("_i") for j in range(1, k)]
            gram = pl.concat_str([pl.col("w").shift(-j) for j in range(k)], separator=" ")
            ok = pl.all_horizontal(same) if same else pl.lit(True)
            grams = ex.select("_i", g=pl.when(ok).then(gram)).drop_nulls("g")
            dup = (grams.group_by("_i", "g").agg(c=pl.len())
                   .group_by("_i").agg(dup=(pl.col("c").filter(pl.col("c") > 1).sum()
                                            / pl.col("c").sum()).cast(pl.Float64)))
        out = out.join(top, on="_i", how="left").join(dup, on="_i", how="left")
        rules = []
        if self.max_char_run is not None:
            rules.append(Rule("caption_char_run", fails_above(pl.col("run"), self.max_char_run), pl.col("run"),
                              float(self.max_char_run)))
        if self.max_top_word_ratio is not None:
            rules.append(Rule("caption_top_word_ratio", pl.col("top").fill_null(0.0) > self.max_top_word_ratio,
                              pl.col("top"), float(self.max_top_word_ratio)))
        if self.max_dup_ngram_frac is not None:
            rules.append(Rule("caption_dup_ngram_frac", pl.col("dup").fill_null(0.0) > self.max_dup_ngram_frac,
                              pl.col("dup"), float(self.max_dup_ngram_frac)))
        return self._rules(out, rules)

    def _check_tokens(self, a: pl.DataFrame) -> pl.DataFrame:
        if self.max_tokens is None:
            return a.select("_i", reason=pl.lit(None, pl.Utf8), value=pl.lit(None, pl.Float64),
                            threshold=pl.lit(None, pl.Float64), detail=pl.lit(None, pl.Utf8))
        t = pl.col("_t")
        # An ASCII caption of L characters has at most L BPE tokens (cleaning never lengthens ASCII
        # and every token covers >= 1 byte), so short ASCII captions cannot overflow.
        sure = (t.str.len_bytes() == t.str.len_chars()) & (t.str.len_chars() <= self.max_tokens - 2)
        need = a.filter(~sure)
        if need.height == 0:
            return a.select("_i", reason=pl.lit(None, pl.Utf8), value=pl.lit(None, pl.Float64),
                            threshold=pl.lit(None, pl.Float64), detail=pl.lit(None, pl.Utf8))
        counts = clip_token_counts(need["_t"], self.tokenizer, processes=self.processes)
        need = need.with_columns(tokens=pl.Series(counts + 2, dtype=pl.Float64))  # + start and end tokens
        tok = pl.col("tokens")
        return self._rules(need, [Rule("caption_token_overflow", tok > self.max_tokens, tok,
                                       float(self.max_tokens))])

    def _check_language(self, a: pl.DataFrame) -> pl.DataFrame:
        if LANG in a.columns:
            ids = a.select(LANG, LANG_CONF)
        else:
            ids = identify(a["_t"], model_path=self.lid_model, processes=self.processes)
        b = pl.concat([a.select("_i"), ids], how="horizontal")
        lang, conf = pl.col(LANG), pl.col(LANG_CONF)
        rules = []
        if self.langs is not None:
            rules.append(Rule("lang_not_allowed", ~lang.is_in(self.langs), conf, None, lang))
        if self.min_lang_conf is not None:
            rules.append(Rule("lang_low_confidence", fails_below(conf, self.min_lang_conf), conf,
                              float(self.min_lang_conf), lang))
        return self._rules(b, rules)


def _single(check: str, stage_name: str, doc: str) -> type[CaptionQuality]:
    cls = type(f"Caption{check.title()}", (CaptionQuality,),
               {"name": stage_name, "fixed_checks": (check,), "__doc__": doc, "__module__": __name__})
    return register_stage(cls)


CaptionLength = _single("length", "caption_length", "Word/character bounds: caption_too_few_words, "
                        "caption_too_many_words, caption_too_short, caption_too_long.")
CaptionCharset = _single("charset", "caption_charset", "Letter and digit shares: caption_low_alpha_ratio, "
                         "caption_high_digit_ratio.")
CaptionMojibake = _single("mojibake", "caption_mojibake", "UTF-8 decoded as cp1252/latin-1: caption_mojibake.")
CaptionBoilerplate = _single("boilerplate", "caption_boilerplate", "caption_is_filename, caption_has_url, "
                             "caption_has_email, caption_has_html, caption_placeholder, caption_stock_phrase.")
CaptionRepetition = _single("repetition", "caption_repetition", "caption_char_run, caption_top_word_ratio, "
                            "caption_dup_ngram_frac.")
CaptionTokens = _single("tokens", "caption_tokens", "CLIP 77-token context: caption_token_overflow.")
CaptionLanguage = _single("language", "caption_language", "Allowed languages and a confidence floor: "
                          "lang_not_allowed, lang_low_confidence.")


@register_stage
class MaxCaptionRepeats(Stage):
    """Cap how many images may share one caption (global: it counts over every surviving sample).

    Captions are grouped exactly, or after lowercasing and collapsing whitespace (`normalize`).
    Within a group the first `max_repeats` samples are kept: highest `score__<prefer_scorer>` first
    when a scorer is given, then ascending uid. The rest are dropped with reason
    `caption_repeated`, value = group size, threshold = max_repeats, ref_uid = the group's first
    kept sample, detail = "rank r of n". Input columns: `uid`, `caption` (+ the score column).
    """

    name = "max_caption_repeats"
    scope = "global"

    def __init__(self, max_repeats: int = 10, normalize: bool = True, prefer_scorer: str | None = None,
                 column: str = "caption"):
        if int(max_repeats) < 1:
            raise UsageError("max_caption_repeats needs max_repeats >= 1")
        self.max_repeats = int(max_repeats)
        self.normalize = bool(normalize)
        self.prefer_scorer = prefer_scorer
        self.column = column

    def needs_scores(self) -> list[str]:
        return [self.prefer_scorer] if self.prefer_scorer else []

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        cols = ["uid", self.column] + ([f"score__{self.prefer_scorer}"] if self.prefer_scorer else [])
        require_columns(f, self.name, cols)
        if f.height == 0:
            return StageResult(empty_decisions())
        key = pl.col(self.column).cast(pl.Utf8).fill_null("")
        if self.normalize:
            key = key.str.to_lowercase().str.replace_all(f"[{whitespace_class()}]+", " ").str.strip_chars()
        d = f.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_r"), pl.col("uid").cast(pl.Utf8), key.alias("_k"))
        order, desc = ["_k"], [False]
        if self.prefer_scorer:
            s = f[f"score__{self.prefer_scorer}"].cast(pl.Float64).fill_nan(None)
            d = d.with_columns(_s=s)
            order, desc = ["_k", "_s"], [False, True]
        d = d.sort(order + ["uid"], descending=desc + [False], nulls_last=True)
        d = d.with_columns(_rank=pl.int_range(pl.len()).over("_k"), _n=pl.len().over("_k"),
                           _first=pl.col("uid").first().over("_k")).sort("_r")
        keep = d["_rank"] < self.max_repeats
        drop = ~keep
        reason = pl.select(pl.when(drop).then(pl.lit("caption_repeated")).otherwise(pl.lit(None, pl.Utf8))).to_series()
        detail = d.select(pl.when(drop).then(pl.format("rank {} of {}", pl.col("_rank") + 1, pl.col("_n")))
                          .otherwise(pl.lit(None, pl.Utf8))).to_series()
        ref = pl.select(pl.when(drop).then(d["_first"]).otherwise(pl.lit(None, pl.Utf8))).to_series()
        value = d["_n"].cast(pl.Float64)
        stats = {"groups_over_cap": int(d.filter(pl.col("_rank") == self.max_repeats).height),
                 "dropped": int(drop.sum())}
        return StageResult(decisions_frame(d["uid"], keep, reason, value, float(self.max_repeats), ref, detail),
                           stats=stats)


__all__ = ["CHECKS", "CaptionQuality", "MaxCaptionRepeats", "longest_char_run", "mojibake_pattern"]
