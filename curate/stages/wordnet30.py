"""WordNet 3.0 look-ups exactly as DataComp's `text_based` baseline makes them.

DataComp (`baselines/apply_filter.py`, NLTK 3.8.1 as pinned in its requirements) keeps a caption
when, for some word of `text.split()`, `wordnet.synsets(word)[0].offset()` is in the set of
ImageNet-21k synset offsets. `first_offset` below gives that first synset without NLTK:

- the word is lowercased (`str.lower()`);
- parts of speech are tried in NLTK's order noun, verb, adjective, adverb; for each, NLTK 3.8.1's
  `morphy`: a word listed in the part of speech's exception file (`noun.exc`, ...) gives the word
  and its listed base forms; otherwise the word and the forms made by applying each suffix rule
  once, and, if none of those is a lemma, the rules applied again and again to the forms until
  some are (NLTK 3.9 dropped this repetition: "catss" has no synset there, `cat` here and in
  DataComp's run);
- the first synset is the first offset listed in `index.<pos>` for the first form found.

Only the index and exception files are read (a few MB, about a second); NLTK's reader is not
used because from 3.9 on it changed `morphy`, and its constructor needs a `lexnames` file that
Debian's `wordnet-base` does not ship.

Offsets. DataComp's WordNet is Princeton's WordNet 3.0 release (NLTK's `wordnet` data). Debian's
`wordnet-base` rebuilds the database from the lexicographer files with two Debian patches, which
moves some synsets (measured against Princeton's release: nouns and adverbs are identical; every
adjective after `laid, set` 01681307 is 1 byte later; every verb after `suppress, repress`
00612841 up to `restrain, keep` 02422663 is 18 bytes later). `WordNet` detects each patch in the
files it reads and maps offsets back to Princeton's, so the ids are the ones DataComp compared.
A directory holding Princeton's own files (e.g. NLTK's `corpora/wordnet`) needs no correction.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..errors import UsageError

DEBIAN_DIR = "/usr/share/wordnet"
POS_ORDER = ("n", "v", "a", "r")  # NLTK's POS_LIST
_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

# NLTK's MORPHOLOGICAL_SUBSTITUTIONS (the WordNet morphy suffix rules), in its order.
SUFFIX_RULES = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}

# Debian's patches to the database (wordnet 1:3.0, debian/patches): their traces in the data files.
_ADJ_PATCHED_GLOSS = b'| set down according to a plan: "a carefully laid table'
_ADJ_UPSTREAM_GLOSS = b'| set down according to a plan:"a carefully laid table'


def default_dir() -> str:
    return os.environ.get("CURATE_WORDNET_DIR", DEBIAN_DIR)


class WordNet:
    """Lemma index and exception lists of a WordNet 3.0 `dict` directory."""

    def __init__(self, root: str | os.PathLike | None = None):
        root = Path(root or default_dir()).expanduser()
        missing = [f"index.{s}" for s in _FILES.values() if not (root / f"index.{s}").is_file()]
        missing += [f"{s}.exc" for s in _FILES.values() if not (root / f"{s}.exc").is_file()]
        if missing:
            raise UsageError(f"no WordNet 3.0 database at {root} (missing {', '.join(missing[:3])}); install "
                             "Debian's wordnet-base (apt-get install wordnet-base) or give the directory of "
                             "WordNet 3.0's dict files (wordnet_dir=PATH)")
        self.root = str(root.absolute())
        self.index: dict[str, dict[str, list[int]]] = {}
        for pos, suffix in _FILES.items():
            self._read_index(root / f"index.{suffix}", suffix)
        self.exceptions: dict[str, dict[str, list[str]]] = {}
        for pos, suffix in _FILES.items():
            table: dict[str, list[str]] = {}
            with open(root / f"{suffix}.exc", encoding="utf8") as fh:
                for line in fh:
                    terms = line.split()
                    if terms:
                        table[terms[0]] = terms[1:]
            self.exceptions[pos] = table
        self.corrections = self._find_corrections(root)

    def _read_index(self, path: Path, suffix: str) -> None:
        with open(path, encoding="utf8") as fh:
            for i, line in enumerate(fh, 1):
                if line.startswith(" "):
                    continue
                t = line.split()
                try:
                    lemma, pos, n_synsets, n_ptr = t[0], t[1], int(t[2]), int(t[3])
                    start = 4 + n_ptr + 2  # pointer symbols, sense_cnt, tagsense_cnt
                    offsets = [int(x) for x in t[start:start + n_synsets]]
                    if n_synsets < 1 or len(offsets) != n_synsets:
                        raise ValueError("bad synset count")
                except (IndexError, ValueError) as exc:
                    raise UsageError(f"{path}, line {i}: not a WordNet index line ({exc})") from None
                self.index.setdefault(lemma, {})[pos] = offsets

    # -- Debian's patches -------------------------------------------------------------------------

    def _data_line(self, root: Path, pos: str, offset: int) -> bytes:
        with open(root / f"data.{_FILES[pos]}", "rb") as fh:
            fh.seek(offset)
            return fh.readline()

    def _find_corrections(self, root: Path) -> dict[str, tuple[int, int, int]]:
        """pos -> (first, last, delta): offsets first..last (inclusive) of this database are
        Princeton's offset + delta. Empty for Princeton's own files."""
        out: dict[str, tuple[int, int, int]] = {}
        if not all((root / f"data.{s}").is_file() for s in ("adj", "verb")):
            return out
        # Adjectives: Debian's 20_adj.all_fix.patch adds a space to the gloss of `laid, set`.
        for off in self.index.get("laid", {}).get("a", []):
            line = self._data_line(root, "a", off)
            if _ADJ_PATCHED_GLOSS in line:
                out["a"] = (off + 1, 1 << 40, 1)
                break
            if _ADJ_UPSTREAM_GLOSS in line:
                break
        # Verbs: Debian's 20_verb.social_fix.patch moves `inhibit`'s hypernym from `restrain, keep`
        # to `suppress, repress`, so suppress's line gains a hyponym pointer and restrain's loses it:
        # the synsets after suppress up to restrain (inclusive) are that many bytes later.
        for off in self.index.get("inhibit", {}).get("v", []):
            line = self._data_line(root, "v", off)
            if b"control and refrain from showing" not in line:
                continue
            t = line.split()
            ptrs = _pointers(t)
            hyper = [p for s, p, kind in ptrs if s == b"@" and kind == b"v"]
            if len(hyper) != 1:
                break
            target = self._data_line(root, "v", hyper[0]).split()
            words = _words(target)
            if b"suppress" in words and b"repress" in words:
                restrain = [o for o in self.index.get("restrain", {}).get("v", [])
                            if b"keep_back" in _words(self._data_line(root, "v", o).split())]
                if restrain:
                    moved = len(b"~ %08d v 0000 " % off)
                    out["v"] = (hyper[0] + 1, restrain[0], moved)
            break
        return out

    def princeton_offset(self, pos: str, offset: int) -> int:
        c = self.corrections.get(pos)
        if c is not None and c[0] <= offset <= c[1]:
            return offset - c[2]
        return offset

    # -- look-up --------------------------------------------------------------------------------

    def morphy(self, form: str, pos: str) -> list[str]:
        """NLTK 3.8.1's `WordNetCorpusReader._morphy(form, pos)` (check_exceptions=True)."""
        index = self.index
        rules = SUFFIX_RULES[pos]

        def apply_rules(forms):
            return [f[: -len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

        def filter_forms(forms):
            result, seen = [], set()
            for f in forms:
                entry = index.get(f)
                if entry is not None and pos in entry and f not in seen:
                    result.append(f)
                    seen.add(f)
            return result

        exceptions = self.exceptions[pos]
        if form in exceptions:
            return filter_forms([form] + exceptions[form])
        forms = apply_rules([form])
        results = filter_forms([form] + forms)
        if results:
            return results
        while forms:
            forms = apply_rules(forms)
            results = filter_forms(forms)
            if results:
                return results
        return []

    def first_synset(self, word: str) -> tuple[str, int] | None:
        """(pos, Princeton offset) of `wordnet.synsets(word)[0]` as NLTK 3.8.1 orders them, or None."""
        lemma = word.lower()
        for pos in POS_ORDER:
            forms = self.morphy(lemma, pos)
            if forms:
                return pos, self.princeton_offset(pos, self.index[forms[0]][pos][0])
        return None


def _words(tokens: list[bytes]) -> set[bytes]:
    try:
        n = int(tokens[3], 16)
    except (IndexError, ValueError):
        return set()
    return {tokens[4 + 2 * i].lower() for i in range(n) if 4 + 2 * i < len(tokens)}


def _pointers(tokens: list[bytes]) -> list[tuple[bytes, int, bytes]]:
    try:
        i = 4 + 2 * int(tokens[3], 16)
        n = int(tokens[i])
        return [(tokens[i + 1 + 4 * k], int(tokens[i + 2 + 4 * k]), tokens[i + 3 + 4 * k]) for k in range(n)]
    except (IndexError, ValueError):
        return []


@functools.lru_cache(maxsize=2)
def load_wordnet(root: str | None = None) -> WordNet:
    return WordNet(root)


# ---- ImageNet-21k synsets ----------------------------------------------------------------------

# sha256 of DataComp's `imagenet21k_wordnet_ids.txt` (baselines/utils.py); timm's
# `imagenet21k_goog_synsets.txt` (Google's fall11 list, 21,843 synsets) has exactly this hash.
DATACOMP_IN21K_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"


def default_synsets_file() -> str:
    try:
        import timm
    except ImportError:
        raise UsageError("the ImageNet-21k synset list comes with timm (pip install timm), or give "
                         "synsets=PATH (one WordNet id such as n02084071 per line)") from None
    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    if not path.is_file():
        raise UsageError(f"timm has no ImageNet-21k synset list at {path}; give synsets=PATH")
    return str(path)


def read_synsets(path: str | None = None) -> tuple[frozenset[int], str, str]:
    """(offsets, absolute path, sha256) of a synset list: one id per line, `n` + 8 digits, read as
    DataComp does (`int(line.strip()[1:])`)."""
    import hashlib

    p = Path(path or default_synsets_file()).expanduser()
    if not p.is_file():
        raise UsageError(f"synset list {p} not found")
    raw = p.read_bytes()
    ids = set()
    for i, line in enumerate(raw.decode("utf8").splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        try:
            ids.add(int(s[1:]))
        except ValueError:
            raise UsageError(f"{p}, line {i}: {s[:40]!r} is not a WordNet id such as n02084071") from None
    if not ids:
        raise UsageError(f"synset list {p} is empty")
    return frozenset(ids), str(p.absolute()), hashlib.sha256(raw).hexdigest()
