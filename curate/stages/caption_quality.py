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
from .base import DECISION_COLUMNS, Stage, StageInput, StageResult, decisions_frame, register_stage
from .dedup_exact import group_runs, hash128, hash_columns, lexsort_keys
from .filters_datacomp import (Rule, at_least_words, char_count, empty_decisions, fails_above, fails_below,
                               first_failure, python_whitespace, require_columns, whitespace_class, word_count)
from .langid import LANG, LANG_CONF, identify, map_distinct, warm_language_workers

# Specific reasons before generic ones (a file name is also "few letters"), expensive checks last.
# Distinct texts above which token counting is shared with worker processes: ours start in well
# under a second; workers that need open_clip's own tokenizer pay ~3-7 s to import torch first.
TOKEN_PARALLEL_MIN = 20_000  # distinct pre-tokens (~10 µs each)
TOKEN_TEXTS_PARALLEL_MIN = 2_000  # whole captions through the cleaning (~80 µs each, mostly ftfy)
TOKEN_PARALLEL_MIN_OPEN_CLIP = 100_000

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


# ---- token counting ---------------------------------------------------------------------------------
#
# open_clip's SimpleTokenizer (clean="lower", what `open_clip.get_tokenizer` returns for the OpenAI
# CLIP configs such as ViT-B-32) cleans a caption with ftfy.fix_text, html.unescape twice,
# " ".join(text.split()) and lower(); cuts it into pre-tokens (its two special tokens, the
# contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of other non-space
# characters); maps each pre-token's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode
# table) with "</w>" on the last one; and applies the ranked merges of bpe_simple_vocab_16e6.txt.gz
# (lowest rank first, every non-overlapping occurrence left to right) until none applies. A caption
# has as many tokens as the symbols left in all its pre-tokens.
#
# `_ClipBpe` counts exactly that from open_clip's own vocabulary file, without importing open_clip
# (which imports torch, torchvision and timm: 3-7 s here, and again in every worker process). It is
# used only when the tokenizer name resolves to that SimpleTokenizer (`_simple_bpe_path`); any other
# tokenizer goes through open_clip itself. The tests compare the counts with open_clip's encode().

_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_CLIP_PATTERN = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte → printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for U+0100 onwards, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


class _ClipBpe:
    """Token counts of open_clip's SimpleTokenizer (clean="lower"), from its vocabulary file."""

    def __init__(self, bpe_path: str):
        import gzip

        import regex

        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = lines[1:49152 - 256 - 2 + 1]  # the first line is a header; SimpleTokenizer's vocabulary size
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.symbols = _byte_symbols()
        self.known: dict[str, int] = {t: 1 for t in _SPECIAL_TOKENS}  # pre-token -> count
        self.pattern = regex.compile(_CLIP_PATTERN, regex.IGNORECASE)
        import html

        import ftfy

        self._fix_text, self._unescape = ftfy.fix_text, html.unescape

    def pretoken(self, token: str) -> int:
        """Symbols left after the merges, for one pre-token of cleaned text."""
        n = self.known.get(token)
        if n is not None:
            return n
        chars = "".join(self.symbols[b] for b in token.encode("utf-8"))
        word = list(chars[:-1]) + [chars[-1] + "</w>"]
        ranks = self.ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged, out, i, n_sym = a + b, [], 0, len(word)
            while i < n_sym:
                if i + 1 < n_sym and word[i] == a and word[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        self.known[token] = len(word)
        return len(word)

    def count(self, text: str) -> int:
        """len(SimpleTokenizer().encode(text))."""
        text = self._unescape(self._unescape(self._fix_text(text))).strip()
        text = " ".join(text.split()).strip().lower()
        return sum(self.pretoken(t) for t in self.pattern.findall(text))


@functools.lru_cache(maxsize=2)
def _bpe(path: str) -> _ClipBpe:
    return _ClipBpe(path)


@functools.lru_cache(maxsize=8)
def _simple_bpe_path(name: str) -> str | None:
    """The vocabulary file when `open_clip.get_tokenizer(name)` is the plain SimpleTokenizer
    (a built-in config without `hf_tokenizer_name` or `tokenizer_kwargs`, not a SigLIP name), else None."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    if not name or ":" in name or "siglip" in name.lower():
        return None
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(list(spec.submodule_search_locations)[0])
    cfg_path, bpe_path = pkg / "model_configs" / f"{name}.json", pkg / "bpe_simple_vocab_16e6.txt.gz"
    if not cfg_path.is_file() or not bpe_path.is_file():
        return None
    try:
        text_cfg = json.loads(cfg_path.read_text()).get("text_cfg", {})
    except (OSError, ValueError):
        return None
    if "hf_tokenizer_name" in text_cfg or text_cfg.get("tokenizer_kwargs"):
        return None
    if "open_clip" in sys.modules:  # already imported (configs may have been added): ask it
        tok = _tokenizer(name)
        if (type(tok).__name__ != "SimpleTokenizer" or getattr(tok, "reduction_fn", None) is not None
                or getattr(getattr(tok, "clean_fn", None), "__name__", "") != "_clean_lower"):
            return None
    return str(bpe_path)


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer(name)


def _token_chunk(args: tuple[str, list[str]]) -> tuple[np.ndarray]:
    """len(open_clip.get_tokenizer(name).encode(t)) for each text (a worker function)."""
    name, texts = args
    path = _simple_bpe_path(name)
    count = _bpe(path).count if path else (lambda t, enc=_tokenizer(name).encode: len(enc(t)))
    return (np.fromiter((count(t) for t in texts), dtype=np.int64, count=len(texts)),)


def _pretoken_chunk(args: tuple[str, list[str]]) -> tuple[np.ndarray]:
    """Token counts of pre-tokens of cleaned text (a worker function)."""
    path, tokens = args
    count = _bpe(path).pretoken
    return (np.fromiter((count(t) for t in tokens), dtype=np.int64, count=len(tokens)),)


# On printable ASCII without '&' and '<' the cleaning is just whitespace collapsing and
# lowercasing, so a caption's token count is the sum of its pre-tokens' counts: those captions are
# counted by exploding pre-tokens and counting each distinct one once. Every token covers at least
# one character of a pre-token and pre-tokens hold no spaces, so such a caption has at most as many
# tokens as non-space characters.
_SIMPLE_ASCII = r"^[\x20-\x25\x27-\x3b\x3d-\x7e]*$"
_CLIP_PRETOKEN = r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"


def clip_token_counts(texts: pl.Series, tokenizer: str = "ViT-B-32", processes: int | None = None) -> np.ndarray:
    """`len(open_clip.get_tokenizer(tokenizer).encode(text))` for each text (without start/end tokens)."""
    texts = texts.cast(pl.Utf8).fill_null("")
    out = np.zeros(len(texts), dtype=np.int64)
    path = _simple_bpe_path(tokenizer)
    # Workers that need open_clip pay ~3-7 s to import it; ours start in well under a second.
    parallel_min = TOKEN_PARALLEL_MIN if path else TOKEN_PARALLEL_MIN_OPEN_CLIP
    simple = texts.str.contains(_SIMPLE_ASCII).to_numpy() if path else np.zeros(len(texts), dtype=bool)
    if simple.any():
        idx = np.flatnonzero(simple)
        pieces = (pl.DataFrame({"_i": idx, "_t": texts.gather(idx)})
                  .select("_i", p=pl.col("_t").str.to_lowercase().str.extract_all(_CLIP_PRETOKEN))
                  .explode("p").drop_nulls("p"))
        if pieces.height:
            distinct = pieces["p"].unique()
            n = map_distinct(distinct, _pretoken_chunk, path, {"n": pl.Int64}, processes=processes,
                             parallel_min=parallel_min, description="CLIP tokens")
            table = pl.DataFrame({"p": distinct, "n": n["n"]})
            per = pieces.join(table, on="p", how="left").group_by("_i").agg(pl.col("n").sum())
            out[per["_i"].to_numpy()] = per["n"].to_numpy()
    rest = np.flatnonzero(~simple)
    if len(rest):
        n = map_distinct(texts.gather(rest), _token_chunk, tokenizer, {"n": pl.Int64}, processes=processes,
                         parallel_min=TOKEN_TEXTS_PARALLEL_MIN if path else parallel_min, description="CLIP tokens")
        out[rest] = n["n"].to_numpy()
    return out


# ---- byte-level measures of ASCII captions (numpy over the Arrow buffers) ---------------------------
#
# Most captions are plain ASCII, where a character is a byte: letters are [A-Za-z] (all of \p{L} in
# ASCII), decimal digits [0-9] (\p{Nd}), whitespace the ten bytes str.isspace() accepts (\t \n \v \f
# \r, \x1c-\x1f, space). Their counts come from one table lookup per byte and a running sum over the
# whole buffer; captions with any other character go through the regex/code-point versions.

_ASCII_WS = (9, 10, 11, 12, 13, 28, 29, 30, 31, 32)
_FIELD = 21  # bits per packed count: captions of up to 2 MiB (longer ones take the regex path)
_BLOCK_BYTES = 1 << 22


def _utf8_buffers(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(offsets: int64[n + 1] into data, data: uint8) of the texts' UTF-8 bytes; nulls are empty."""
    import pyarrow as pa

    arr = texts.cast(pl.Utf8).fill_null("").rechunk().to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    _, off, data = arr.buffers()
    offsets = np.frombuffer(off, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    return offsets, values


def _blocks(offsets: np.ndarray):
    """(first row, end row) ranges of about _BLOCK_BYTES bytes each."""
    n = len(offsets) - 1
    i = 0
    while i < n:
        j = int(np.searchsorted(offsets, offsets[i] + _BLOCK_BYTES, side="right")) - 1
        j = min(max(j, i + 1), n)
        yield i, j
        i = j


def _ascii_class_counts(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Letters, decimal digits and whitespace per text, exact for ASCII texts shorter than 2 MiB
    (meaningless for others)."""
    lut = np.zeros(256, dtype=np.uint64)
    for c in range(ord("a"), ord("z") + 1):
        lut[c] = lut[c - 32] = 1
    lut[ord("0"):ord("9") + 1] = 1 << _FIELD
    lut[list(_ASCII_WS)] = 1 << (2 * _FIELD)
    n = len(offsets) - 1
    packed = np.zeros(n, dtype=np.uint64)
    for i, j in _blocks(offsets):
        lo, hi = int(offsets[i]), int(offsets[j])
        cs = np.zeros(hi - lo + 1, dtype=np.uint64)
        np.cumsum(lut[data[lo:hi]], out=cs[1:])  # wraps modulo 2**64; the differences stay exact
        packed[i:j] = cs[offsets[i + 1:j + 1] - lo] - cs[offsets[i:j] - lo]
    mask = np.uint64((1 << _FIELD) - 1)
    return ((packed & mask).astype(np.int64), ((packed >> np.uint64(_FIELD)) & mask).astype(np.int64),
            (packed >> np.uint64(2 * _FIELD)).astype(np.int64))


def _ascii_rows(texts: pl.Series) -> np.ndarray:
    """True for texts that are ASCII (one byte per character) and shorter than 2 MiB."""
    t = texts.cast(pl.Utf8).fill_null("")
    b = t.str.len_bytes()
    return ((b == t.str.len_chars()) & (b < (1 << _FIELD))).to_numpy()


# ---- character runs ---------------------------------------------------------------------------------


def _runs_from_repeats(idx: np.ndarray, ends: np.ndarray, out: np.ndarray, base: int) -> None:
    """idx: sorted positions p whose character repeats the one before it (p + 1 repeats p, same
    text, not whitespace); updates out[base + row] with the longest run of each row."""
    if len(idx) == 0:
        return
    # Consecutive repeat positions form one run; a run of r repeats is r + 1 characters.
    new_run = np.ones(len(idx), dtype=bool)
    new_run[1:] = np.diff(idx) != 1
    run_first = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_first, len(idx))) + 1
    row = np.searchsorted(ends, idx[run_first], side="right")
    np.maximum.at(out, base + row, run_len)


def _longest_run_codepoints(texts: pl.Series, out: np.ndarray, chunk: int = 200_000) -> None:
    """Longest runs over the texts' code points (any text)."""
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
        c = cps[idx]
        idx = idx[~((c < len(is_ws)) & is_ws[np.minimum(c, len(is_ws) - 1)])]
        _runs_from_repeats(idx, ends, out, start)


def longest_char_run(texts: pl.Series, chunk: int = 200_000) -> np.ndarray:
    """Length of the longest run of one repeated non-whitespace character in each text.

    Only positions equal to their predecessor (inside one text, not whitespace) are looked at, so
    the cost is one comparison per character plus the handful of repeats: over the UTF-8 bytes for
    ASCII texts (straight from the Arrow buffer), over code points for the others.
    """
    texts = texts.cast(pl.Utf8).fill_null("")
    # 1 for texts with any non-whitespace character (their longest run is at least 1), else 0.
    out = texts.str.contains(f"[^{whitespace_class()}]").cast(pl.Int64).to_numpy().copy()
    if len(texts) == 0:
        return out
    any_char = out.copy()
    ascii_rows = _ascii_rows(texts)
    offsets, data = _utf8_buffers(texts)
    is_ws = np.zeros(256, dtype=bool)
    is_ws[list(_ASCII_WS)] = True
    for i, j in _blocks(offsets):
        lo, hi = int(offsets[i]), int(offsets[j])
        if hi - lo < 2:
            continue
        seg = data[lo:hi]
        same = seg[1:] == seg[:-1]
        starts = offsets[i + 1:j] - lo
        starts = starts[(starts > 0) & (starts < hi - lo)]
        same[starts - 1] = False  # never across two texts
        same &= ~is_ws[seg[:-1]]
        idx = np.flatnonzero(same)
        # Runs in non-ASCII texts are recomputed over code points below.
        _runs_from_repeats(idx, offsets[i + 1:j + 1] - lo, out, i)
    other = np.flatnonzero(~ascii_rows)
    if len(other):
        sub = any_char[other].copy()
        _longest_run_codepoints(texts.gather(other), sub, chunk)
        out[other] = sub
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
    remembers_languages = True
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

    def needs_columns(self) -> list[str]:
        # The language check reuses `lang`/`lang_conf` when the frame has them (and no lid_model is set).
        lang = "language" in self.checks and self.lid_model is None
        return [self.column] + ([LANG, LANG_CONF] if lang else [])

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
        if "language" in self.checks and not have_lang:
            warm_language_workers(f.height, model_path=self.lid_model, processes=self.processes)
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
        # Only failing captions are joined back (kept ones have no reason, value or detail).
        per_caption = distinct.select("_i", "_t").join(fails.frame(), on="_i", how="inner").drop("_i")
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
        w, c = word_count(t), char_count(t)  # values: computed for the dropped rows only
        rules = []
        if self.min_words is not None:
            rules.append(Rule("caption_too_few_words", ~at_least_words(t, self.min_words), w, float(self.min_words)))
        if self.max_words is not None:
            rules.append(Rule("caption_too_many_words", at_least_words(t, self.max_words + 1), w,
                              float(self.max_words)))
        if self.min_chars is not None:
            rules.append(Rule("caption_too_short", c < self.min_chars, c, float(self.min_chars)))
        if self.max_chars is not None:
            rules.append(Rule("caption_too_long", c > self.max_chars, c, float(self.max_chars)))
        return self._rules(a, rules)

    @staticmethod
    def _charset_counts(texts: pl.Series) -> pl.DataFrame:
        """Per text: characters, whitespace (str.isspace), letters (\\p{L}), decimal digits (\\p{Nd}).
        Bytes for ASCII texts, regexes ("length minus the text without them") for the others."""
        total = texts.str.len_chars().cast(pl.Int64).to_numpy().copy()
        letters, digits, spaces = _ascii_class_counts(*_utf8_buffers(texts))
        other = np.flatnonzero(~_ascii_rows(texts))
        if len(other):
            sub = texts.gather(other).to_frame("_t")
            t = pl.col("_t")

            def count(cls: str) -> pl.Expr:
                return (t.str.len_chars() - t.str.replace_all(f"{cls}+", "").str.len_chars()).cast(pl.Int64)

            c = sub.select(ws=count(f"[{whitespace_class()}]"), l=count(r"\p{L}"), d=count(r"\p{Nd}"))
            spaces[other], letters[other], digits[other] = c["ws"].to_numpy(), c["l"].to_numpy(), c["d"].to_numpy()
        return pl.DataFrame({"_total": total, "_ws": spaces, "_alpha": letters, "_digit": digits})

    def _check_charset(self, a: pl.DataFrame) -> pl.DataFrame:
        counts = self._charset_counts(a["_t"])
        total = pl.col("_total").cast(pl.Float64)
        nonspace = total - pl.col("_ws").cast(pl.Float64)
        alpha = pl.when(nonspace > 0).then(pl.col("_alpha").cast(pl.Float64) / nonspace).otherwise(0.0)
        digit = pl.when(nonspace > 0).then(pl.col("_digit").cast(pl.Float64) / nonspace).otherwise(0.0)
        b = pl.concat([a.select("_i"), counts], how="horizontal").select(
            "_i", _a=alpha.cast(pl.Float64), _d=digit.cast(pl.Float64))
        alpha, digit = pl.col("_a"), pl.col("_d")
        rules = []
        if self.min_alpha_ratio is not None:
            rules.append(Rule("caption_low_alpha_ratio", fails_below(alpha, self.min_alpha_ratio), alpha,
                              float(self.min_alpha_ratio)))
        if self.max_digit_ratio is not None:
            rules.append(Rule("caption_high_digit_ratio", fails_above(digit, self.max_digit_ratio), digit,
                              float(self.max_digit_ratio)))
        return self._rules(b, rules)

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
        top = pl.DataFrame(schema={"_i": pl.UInt32, "top": pl.Float64})
        dup = pl.DataFrame(schema={"_i": pl.UInt32, "dup": pl.Float64})
        if self.max_top_word_ratio is not None or self.max_dup_ngram_frac is not None:
            toks = a.select("_i", w=pl.col("_t").str.to_lowercase().str.extract_all(r"[\p{L}\p{N}]+"))
            toks = toks.with_columns(n=pl.col("w").list.len()).filter(pl.col("n") >= self.rep_min_words)
            toks = toks.filter(self._may_repeat(pl.col("n").cast(pl.Float64),
                                                pl.col("w").list.n_unique().cast(pl.Float64)))
            if toks.height and self.max_top_word_ratio is not None:
                top = toks.select("_i", top=(pl.col("w").list.eval(pl.element().unique_counts().max()).list.first()
                                             / pl.col("n")).cast(pl.Float64))
            if toks.height and self.max_dup_ngram_frac is not None:
                # Word n-grams over the exploded words, kept only while all n words are in one caption.
                ex = toks.select("_i", "w").explode("w")
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

    def _may_repeat(self, n: pl.Expr, u: pl.Expr) -> pl.Expr:
        """False only for captions (n words, u distinct) that can fail neither ratio, so the exact
        ratios are computed for the rest only.

        The most common word occurs at most n - u + 1 times. At most 2(n - u) word occurrences
        belong to words that occur more than once (each such word takes two or more of the n - u
        occurrences beyond the first u). Every word of an n-gram that occurs more than once is such
        an occurrence, and m >= 1 such n-grams cover at least m + ngram - 1 positions, so a
        duplicated share above f of the n - ngram + 1 n-grams needs 2(n - u) > f(n - ngram + 1) + ngram - 1.
        """
        slack = 1e-9
        cond = pl.lit(False)
        t = self.max_top_word_ratio
        if t is not None:
            cond = cond | ((n - u + 1) > t * n - slack) if t >= 0 else pl.lit(True)
        f = self.max_dup_ngram_frac
        if f is not None:
            k = self.ngram
            cond = cond | (2 * (n - u) > f * (n - k + 1) + k - 1 - slack) if f >= 0 else pl.lit(True)
        return cond

    def _check_tokens(self, a: pl.DataFrame) -> pl.DataFrame:
        if self.max_tokens is None:
            return a.select("_i", reason=pl.lit(None, pl.Utf8), value=pl.lit(None, pl.Float64),
                            threshold=pl.lit(None, pl.Float64), detail=pl.lit(None, pl.Utf8))
        t = pl.col("_t")
        # A plain-ASCII caption (see _SIMPLE_ASCII) has at most one token per non-space character,
        # so one with at most max_tokens - 2 of them cannot overflow; every other caption is counted.
        if _simple_bpe_path(self.tokenizer):
            nonspace = t.str.len_bytes() - t.str.count_matches(" ", literal=True)
            sure = t.str.contains(_SIMPLE_ASCII) & (nonspace <= self.max_tokens - 2)
        else:
            sure = pl.lit(False)
        need = a.filter(~sure)
        if need.height == 0:
            return a.select("_i", reason=pl.lit(None, pl.Utf8), value=pl.lit(None, pl.Float64),
                            threshold=pl.lit(None, pl.Float64), detail=pl.lit(None, pl.Utf8)).clear()
        counts = clip_token_counts(need["_t"], self.tokenizer, processes=self.processes)
        need = need.with_columns(tokens=pl.Series(counts + 2, dtype=pl.Float64))  # + start and end tokens
        tok = pl.col("tokens")
        return self._rules(need, [Rule("caption_token_overflow", tok > self.max_tokens, tok,
                                       float(self.max_tokens))])

    def _check_language(self, a: pl.DataFrame) -> pl.DataFrame:
        if LANG in a.columns:
            ids = a.select(LANG, LANG_CONF)
        else:
            ids = identify(a["_t"], model_path=self.lid_model, processes=self.processes, memo=True)
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
    kept sample, detail = "rank r of n". Input columns: `uid`, `caption` (+ the score column), or
    their condensed form: captions are compared through 128-bit hashes of their grouping keys
    (see `exact_dedup` for the collision odds).
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

    def needs_columns(self) -> list[str]:
        return [self.column]

    def _hashed(self) -> tuple[str, str]:
        return hash_columns(self.column)

    def _score(self) -> list[str]:
        return [f"score__{self.prefer_scorer}"] if self.prefer_scorer else []

    def condense(self, frame: pl.DataFrame) -> pl.DataFrame:
        """uid, the score column and a 128-bit hash (`_h_<column>_0`, `_h_<column>_1`) of the
        grouping key (the caption, normalised when `normalize`; null counts as empty) instead of it."""
        if all(c in frame.columns for c in ("uid",) + self._hashed()):
            return frame.select(["uid"] + [c for c in self._score() if c in frame.columns] + list(self._hashed()))
        require_columns(frame, self.name, ["uid", self.column])
        key = frame[self.column].cast(pl.Utf8).fill_null("")
        if self.normalize:
            key = key.str.to_lowercase().str.replace_all(f"[{whitespace_class()}]+", " ").str.strip_chars()
        return frame.select(["uid"] + [c for c in self._score() if c in frame.columns]).with_columns(
            hash128(key, self._hashed()))

    def apply(self, inp: StageInput) -> StageResult:
        f = self.condense(inp.frame)
        require_columns(f, self.name, ["uid"] + self._score())
        if f.height == 0:
            return StageResult(decisions_frame(f["uid"], pl.Series("keep", [], dtype=pl.Boolean)))
        n = f.height
        perm, start = group_runs([f[c].to_numpy() for c in self._hashed()])
        group = np.cumsum(start) - 1
        sizes = np.diff(np.append(np.flatnonzero(start), n))[group]
        size = np.empty(n, dtype=np.float64)
        size[perm] = sizes
        # Only captions with more than max_repeats samples need an order: best score first (nulls
        # last), then ascending uid, then input order.
        capped = np.zeros(n, dtype=bool)
        capped[perm[sizes > self.max_repeats]] = True
        rows = np.flatnonzero(capped)  # ascending: the sorts below are stable, so input order breaks ties
        gid = np.empty(n, dtype=np.int64)
        gid[perm] = group
        group = gid[rows]
        uid = f["uid"]
        u = uid.gather(rows)
        if not self.prefer_scorer and u.dtype in (pl.UInt8, pl.UInt16, pl.UInt32) and not u.null_count():
            order = np.argsort((group << 32) | u.to_numpy().astype(np.int64), kind="stable")  # one key: faster
        else:
            keys = lexsort_keys(u)
            if self.prefer_scorer:
                keys += lexsort_keys(f[self._score()[0]].gather(rows).cast(pl.Float64).fill_nan(None), descending=True)
            order = np.lexsort(keys + [group])
        rows, group = rows[order], group[order]
        new = np.ones(len(rows), dtype=bool)
        new[1:] = group[1:] != group[:-1]
        firsts = np.flatnonzero(new)
        at = np.cumsum(new) - 1
        rank = np.arange(len(rows)) - firsts[at]
        over = rank >= self.max_repeats
        dropped = rows[over]
        keep = np.ones(n, dtype=bool)
        keep[dropped] = False
        reason = pl.select(pl.when(pl.lit(pl.Series(keep))).then(None)
                           .otherwise(pl.lit("caption_repeated", DECISION_COLUMNS["reason"]))).to_series()
        detail = pl.repeat(None, n, dtype=pl.Utf8, eager=True).scatter(dropped, pl.select(pl.format(
            "rank {} of {}", pl.lit(pl.Series(rank[over] + 1)), pl.lit(pl.Series(size[dropped].astype(np.int64))))
        ).to_series())
        ref = uid.clear(n).scatter(dropped, uid.gather(rows[firsts[at[over]]])).alias("ref_uid")
        stats = {"groups_over_cap": len(firsts), "dropped": len(dropped)}
        return StageResult(decisions_frame(uid, pl.Series(keep), reason, pl.Series(size), float(self.max_repeats), ref,
                                           detail), stats=stats)


__all__ = ["CHECKS", "CaptionQuality", "MaxCaptionRepeats", "longest_char_run", "mojibake_pattern"]
