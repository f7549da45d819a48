"""Caption text for a batch of records.

Random choices are drawn as numpy arrays for the whole batch; the per-row work is one string
format, so a 100k-row DataComp shard takes a fraction of a second. Besides the text, each row
gets its *content* (which concept, colour and background the caption names, its language, its
junk kind): the DataComp layout derives text embeddings from it.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from . import vocab as V

CAPTION_KINDS = ("clean", "mismatched", "non_english", "junk")
CLEAN, MISMATCHED, NON_ENGLISH, JUNK = range(4)

_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


@dataclass
class Captions:
    text: list[str]
    kind: list[str]            # truth caption_kind: clean | mismatched | non_english:<lang> | junk:<kind>
    lang: list[str | None]
    cap_concept: np.ndarray    # int16, concept the caption names (-1: none)
    cap_colour: np.ndarray     # int16, colour the caption names (-1: none)
    cap_bg: np.ndarray         # int16, background the caption names (-1: none)
    lang_idx: np.ndarray       # int16, index into ("en",) + LANGUAGES, -1: no language
    junk_idx: np.ndarray       # int16, index into JUNK_KINDS, -1: not junk

    def text_hash(self) -> np.ndarray:
        """A stable 32-bit hash per caption (identical text -> identical hash)."""
        return np.fromiter((zlib.crc32(t.encode("utf-8")) for t in self.text), dtype=np.uint32,
                           count=len(self.text))


def english(concept: int, colour: int, bg: int, texture: int, t: int, mod: int, suf: int,
            use_tex: bool, cap: bool) -> tuple[str, bool]:
    """One English caption; returns (text, names_background)."""
    tpl = V.EN_TEMPLATES[t]
    tex = V.TEXTURE_WORD[V.TEXTURES[texture]] if use_tex else ""
    col, obj = V.COLOURS[colour], V.CONCEPTS[concept]
    op = f"{V.EN_MODIFIERS[mod]}{tex}{col} {obj}"
    s = tpl.format(op=op, col=col, obj=obj, bg=V.BACKGROUNDS[bg], suf=V.EN_SUFFIXES[suf])
    s = _ARTICLE.sub(r"\1n ", s)
    if cap:
        s = s[0].upper() + s[1:]
    return s, V.EN_TEMPLATE_HAS_BG[t]


def foreign(lang: str, concept: int, colour: int, t: int) -> str:
    tpls = V.LANG_TEMPLATES[lang]
    return tpls[t % len(tpls)].format(obj=V.LANG_OBJECTS[lang][concept], col=V.LANG_COLOURS[lang][colour])


def junk(kind: str, r: np.random.Generator) -> str:
    """One junk caption of the given kind (uses a few draws from r)."""
    a, b, c = (int(x) for x in r.integers(0, 10**6, size=3))
    if kind == "filename":
        pat = a % 10
        if pat == 0:
            return f"IMG_{b % 10000:04d}.JPG"
        if pat == 1:
            return f"DSC{b % 100000:05d}.jpg"
        if pat == 2:
            return f"DSCN{b % 10000:04d}.JPG"
        if pat == 3:
            return f"image_{b % 500}.png"
        if pat == 4:
            return f"2019{1 + b % 12:02d}{1 + c % 28:02d}_{c % 240000:06d}.jpg"
        if pat == 5:
            return f"Screenshot_20{15 + b % 9}{1 + b % 12:02d}{1 + c % 28:02d}-{c % 235959:06d}.png"
        if pat == 6:
            return f"photo ({b % 40}).jpg"
        if pat == 7:
            return f"P{b:07d}.JPG"
        if pat == 8:
            return f"{(b * 2654435761 + c) % 16**12:012x}.jpeg"
        return f"WhatsApp Image 20{18 + b % 6}-{1 + b % 12:02d}-{1 + c % 28:02d} at {c % 24}.{b % 60:02d}.{c % 60:02d}"
    if kind == "url":
        site = V.JUNK_SITES[a % len(V.JUNK_SITES)]
        pat = b % 3
        if pat == 0:
            return f"https://www.{site}.test/products/item-{c}?ref=img"
        if pat == 1:
            return f"http://cdn.{site}.test/images/{(a * 7919 + c) % 16**10:010x}.jpg"
        return f"www.{site}.test"
    if kind == "one_word":
        return V.JUNK_ONE_WORD[a % len(V.JUNK_ONE_WORD)]
    if kind == "stock":
        return V.JUNK_STOCK[a % len(V.JUNK_STOCK)]
    if kind == "repeated":
        return " ".join([V.JUNK_REPEAT_WORDS[a % len(V.JUNK_REPEAT_WORDS)]] * (4 + b % 5))
    if kind == "empty":
        return V.JUNK_EMPTY[a % len(V.JUNK_EMPTY)]
    raise ValueError(kind)


def build(rng: np.random.Generator, kind: np.ndarray, concept: np.ndarray, colour: np.ndarray,
          bg: np.ndarray, texture: np.ndarray) -> Captions:
    """Captions for a batch: `kind` holds CAPTION_KINDS codes; the other arrays describe each image."""
    m = len(kind)
    n_c, n_col, n_bg = len(V.CONCEPTS), len(V.COLOURS), len(V.BACKGROUNDS)
    t = rng.integers(0, len(V.EN_TEMPLATES), m)
    mod = rng.integers(0, len(V.EN_MODIFIERS), m)
    suf = rng.integers(0, len(V.EN_SUFFIXES), m)
    use_tex = rng.random(m) < 0.5
    capit = rng.random(m) < 0.3
    lang_pick = rng.integers(0, len(V.LANGUAGES), m)
    junk_pick = rng.integers(0, len(V.JUNK_KINDS), m)
    # mismatched: 80% another concept (any colour), 20% the same concept in another colour
    other_c = (concept + rng.integers(1, n_c, m)) % n_c
    other_col = (colour + rng.integers(1, n_col, m)) % n_col
    any_col = rng.integers(0, n_col, m)
    swap_concept = rng.random(m) < 0.8
    mis_c = np.where(swap_concept, other_c, concept)
    mis_col = np.where(swap_concept, any_col, other_col)
    mis_bg = rng.integers(0, n_bg, m)
    junk_seed = rng.integers(0, 2**63 - 1)
    jr = np.random.default_rng(junk_seed)

    text: list[str] = []
    kinds: list[str] = []
    langs: list[str | None] = []
    cap_concept = np.full(m, -1, np.int16)
    cap_colour = np.full(m, -1, np.int16)
    cap_bg = np.full(m, -1, np.int16)
    lang_idx = np.full(m, -1, np.int16)
    junk_idx = np.full(m, -1, np.int16)
    for i in range(m):
        k = kind[i]
        if k == CLEAN or k == MISMATCHED:
            c, col, b = (int(concept[i]), int(colour[i]), int(bg[i])) if k == CLEAN else \
                (int(mis_c[i]), int(mis_col[i]), int(mis_bg[i]))
            s, has_bg = english(c, col, b, int(texture[i]), int(t[i]), int(mod[i]), int(suf[i]),
                                bool(use_tex[i]), bool(capit[i]))
            text.append(s)
            kinds.append(CAPTION_KINDS[k])
            langs.append("en")
            cap_concept[i], cap_colour[i], lang_idx[i] = c, col, 0
            if has_bg:
                cap_bg[i] = b
        elif k == NON_ENGLISH:
            lang = V.LANGUAGES[lang_pick[i]]
            text.append(foreign(lang, int(concept[i]), int(colour[i]), int(t[i])))
            kinds.append(f"non_english:{lang}")
            langs.append(lang)
            cap_concept[i], cap_colour[i], lang_idx[i] = concept[i], colour[i], 1 + lang_pick[i]
        else:
            jk = V.JUNK_KINDS[junk_pick[i]]
            text.append(junk(jk, jr))
            kinds.append(f"junk:{jk}")
            lang = V.JUNK_LANG[jk]
            langs.append(lang)
            junk_idx[i] = junk_pick[i]
            lang_idx[i] = 0 if lang == "en" else -1
    return Captions(text, kinds, langs, cap_concept, cap_colour, cap_bg, lang_idx, junk_idx)
