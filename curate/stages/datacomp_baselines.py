"""DataComp's `text_based` and `image_based` baselines, rule for rule.

Source: Gadre et al. 2023 (DataComp), Table 3 baselines, and the `mlfoundations/datacomp` tooling
(`baselines/apply_filter.py`, `baselines/image_based_clustering.py`, `baselines/utils.py`).

text_based (`text_based` stage):
  keep a caption when fastText lid.176's top-1 label of `text.replace("\\n", " ")` is `en` and
  some word of `text.split()` (Python's split: every Unicode whitespace) has a first WordNet synset
  (`wordnet.synsets(word)[0]`, NLTK 3.8.1: word lowercased, morphy lemmatisation, noun before verb
  before adjective before adverb) whose offset is one of the ImageNet-21k synsets' (`n02084071`
  -> 2084071; only the number is compared, so a verb or adjective synset with the same offset as
  an ImageNet noun counts, as in DataComp). The WordNet look-up is `curate.stages.wordnet30`; the
  synset list defaults to timm's `imagenet21k_goog_synsets.txt`, byte for byte DataComp's
  `imagenet21k_wordnet_ids.txt` (same sha256).

image_based (`image_based` stage), DataComp's `image_filter_helper`:
  1. caption filter (`caption_filter`): fastText top-1 `en` (same call as above), more than one
     fastText token (`len(fasttext.tokenize(text)) > 1`) and more than 5 characters
     (`len(text) > 5`). fastText's tokenizer splits on the bytes space, \\n, \\r, \\t, \\v, \\f and
     NUL only, and every newline is a token of its own (`</s>`): tokens = runs of other characters
     + newlines. (Other Unicode spaces such as U+00A0 or U+3000 do not split.)
  2. each surviving image embedding (ViT-L/14 `l14_img`, as float32) goes to the pool centroid
     with the largest dot product (`argmax(x @ centroids.T)`, no normalisation, first index on ties);
  3. the target centroids are the distinct nearest centroids (same rule) of the ImageNet-1k
     training images' embeddings; a sample is kept when its centroid is one of them.
  Centroids: DataComp's `{small,medium,large,xlarge}_centroids_l14.pt` (a float32 array
  (100000, 768) saved with torch.save) or any .npy; without them, curate trains them as
  `image_based_clustering.py` does: L2 k-means (faiss `Clustering`, k = 100,000, 20 iterations,
  seed 0, no subsampling) on the caption-filtered pool embeddings (CPU here, GPU there: the same
  algorithm, not the same floating-point results, so not DataComp's published centroids).
  Targets: DataComp's `in1k_clip_vit_l14_{0..4}.pt` (dicts whose `image_features` are the
  ImageNet-1k train embeddings; give all five, as a list or a glob) or a .npy from
  `curate embed-images IMAGENET_TRAIN --model ...`.
  image_based ∩ CLIP score is DataComp's `image_based_intersect_clip_score`: DataComp applies the
  score threshold (computed over the whole pool) before the caption filter in the same worker;
  as sets the order does not matter, and the shipped recipe runs clip_score first.

Decisions. text_based: no_in21k_synset (value = number of words), lang_not_en (value = top-1
probability, detail = label); kept rows: value = probability, detail = `word=n########` (the
first matching word and the ImageNet id its first synset's offset equals; ` (v)`, ` (a)` or ` (r)`
follows when that synset is a verb, adjective or adverb whose offset happens to equal a noun's).
image_based: caption_too_few_tokens (value = fastText tokens, threshold 2), caption_too_short
(value = characters, threshold 6), lang_not_en, not_target_cluster (value = the nearest centroid);
kept rows: value = nearest centroid, detail = `cluster=ID`.
"""

from __future__ import annotations

import glob as _glob
import io
import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .base import Stage, StageInput, StageResult, register_stage
from .filters_datacomp import (Rule, _apply_lang, char_count, decisions_from, empty_decisions,
                               first_failure_frame, require_columns)
from .langid import PARALLEL_MIN, map_distinct, warm_language_workers
from .wordnet30 import DATACOMP_IN21K_SHA256, default_dir, load_wordnet, read_synsets

# ---- fastText's tokenizer ------------------------------------------------------------------------

# fastText's Dictionary::readWord separators (fasttext/src/dictionary.cc); '\n' also ends a line,
# which readWord returns as the token "</s>".
FASTTEXT_SEPARATORS = " \n\r\t\v\f\x00"


def fasttext_tokens(text: str) -> list[str]:
    """`fasttext.tokenize(text)`, for reference: fastText's readWord loop over the characters."""
    out: list[str] = []
    word = ""
    for ch in text:
        if ch in FASTTEXT_SEPARATORS:
            if word:
                out.append(word)
                word = ""
            if ch == "\n":
                out.append("</s>")
        else:
            word += ch
    if word:
        out.append(word)
    return out


def fasttext_token_count(expr: pl.Expr) -> pl.Expr:
    """`len(fasttext.tokenize(text))` (null: 0): runs of non-separators plus one per newline."""
    text = expr.fill_null("")
    return (text.str.count_matches(r"[^ \n\r\t\x0B\x0C\x00]+")
            + text.str.count_matches("\n", literal=True)).cast(pl.Int64)


# ---- text_based ------------------------------------------------------------------------------------


def _in21k_chunk(args: tuple[tuple[str, str], list[str]]) -> tuple[list[str | None], list[int]]:
    """For each caption: `word=n########` for the first word whose first synset's offset is in the
    list (None if none), and the number of words (module level: worker processes run it)."""
    (root, synsets_path), texts = args
    wn = load_wordnet(root)
    ids = _synset_ids(synsets_path)
    cache = _word_cache(root, synsets_path)
    hits: list[str | None] = [None] * len(texts)
    counts = [0] * len(texts)
    for i, text in enumerate(texts):
        words = text.split()
        counts[i] = len(words)
        for word in words:
            got = cache.get(word, 0)
            if got == 0:
                first = wn.first_synset(word)
                got = cache[word] = (None if first is None or first[1] not in ids
                                     else f"n{first[1]:08d}" + ("" if first[0] == "n" else f" ({first[0]})"))
            if got is not None:
                hits[i] = f"{word}={got}"
                break
    return hits, counts


_IDS: dict[str, frozenset[int]] = {}
_CACHES: dict[tuple[str, str], dict] = {}


def _synset_ids(path: str) -> frozenset[int]:
    if path not in _IDS:
        _IDS[path] = read_synsets(path)[0]
    return _IDS[path]


def _word_cache(root: str, path: str) -> dict:
    cache = _CACHES.setdefault((root, path), {})
    if len(cache) > 2_000_000:
        cache.clear()
    return cache


@register_stage
class TextBased(Stage):
    """DataComp's text-based filter: English caption with a word naming an ImageNet-21k synset.

    Parameters: synsets (default timm's ImageNet-21k list = DataComp's), wordnet_dir (default
    /usr/share/wordnet from Debian's wordnet-base, or $CURATE_WORDNET_DIR), lang, column,
    lid_model (fastText model file; default the shipped lid.176.ftz), processes.
    """

    name = "text_based"
    scope = "row"
    remembers_languages = True

    def needs_columns(self):
        return [self.column]

    def __init__(self, synsets: str | None = None, wordnet_dir: str | None = None, lang: str = "en",
                 column: str = "caption", lid_model: str | None = None, processes: int | None = None):
        ids, path, sha = read_synsets(synsets)
        wn = load_wordnet(wordnet_dir or default_dir())
        self.synsets = path
        self.synsets_sha256 = sha
        self.synsets_are_datacomps = sha == DATACOMP_IN21K_SHA256
        self.n_synsets = len(ids)
        self.wordnet_dir = wn.root
        self.wordnet_corrections = {k: list(v) for k, v in wn.corrections.items()}
        self.lang = lang
        self.column = column
        self.lid_model = lid_model
        self.processes = processes
        _IDS[path] = ids

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", self.column])
        if f.height == 0:
            return StageResult(empty_decisions())
        warm_language_workers(f.height, model_path=self.lid_model, processes=self.processes)
        found = map_distinct(f[self.column], _in21k_chunk, (self.wordnet_dir, self.synsets),
                             {"_hit": pl.Utf8, "_words": pl.Int64}, processes=self.processes,
                             parallel_min=PARALLEL_MIN, description="WordNet look-up")
        frame = f.select("uid", self.column).with_columns(found)
        pre = first_failure_frame(frame, [Rule("no_in21k_synset", pl.col("_hit").is_null(),
                                               pl.col("_words").cast(pl.Float64))])
        reason, value, threshold, detail = _apply_lang(
            frame, pre["reason"], pre["value"], pre["threshold"], pre["detail"], column=self.column,
            lang=self.lang, lid_model=self.lid_model, processes=self.processes)
        kept = reason.is_null()
        detail = pl.select(pl.when(kept).then(frame["_hit"]).otherwise(detail)).to_series()
        return StageResult(decisions_from(f["uid"], reason, value, threshold, detail),
                           stats={"synsets": self.n_synsets, "matched": int(frame["_hit"].is_not_null().sum())})


# ---- image_based -----------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (DataComp's centroid files are `torch.save` of a
    numpy array with pickle protocol 4, which torch's weights-only loader refuses)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_matrix(path: str | Path, what: str) -> np.ndarray:
    """A 2-D float32 array from .npy, .npz (first array), or a torch file holding a tensor, a numpy
    array, or a dict with `image_features` (DataComp's ImageNet-1k embedding shards)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{what} {p} not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arr = z[z.files[0]]
        else:
            arr = _load_torch_file(p)
    except UsageError:
        raise
    except Exception as exc:  # unreadable: one line, not a traceback
        raise UsageError(f"cannot read {what} {p}: {exc}") from None
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise UsageError(f"{what} {p} must be a non-empty 2-D array, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _load_torch_file(p: Path):
    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as first:
        if not zipfile.is_zipfile(p):
            raise UsageError(f"cannot read {p}: {first}") from None
        with zipfile.ZipFile(p) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not pkl:
                raise UsageError(f"cannot read {p}: {first}") from None
            try:
                obj = _NumpyOnlyUnpickler(io.BytesIO(zf.read(pkl[0]))).load()
            except Exception:
                raise UsageError(f"cannot read {p}: {first}") from None
    if isinstance(obj, dict):
        if "image_features" in obj:
            obj = obj["image_features"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise UsageError(f"{p} holds a dict without `image_features` (keys: {', '.join(map(str, obj))})")
    if hasattr(obj, "detach"):
        obj = obj.detach().float().cpu().numpy()
    return obj


def _expand(paths: str | Sequence[str]) -> list[str]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[str] = []
    for item in items:
        item = str(Path(str(item)).expanduser())
        if any(c in item for c in "*?["):
            hits = sorted(_glob.glob(item))
            if not hits:
                raise UsageError(f"no file matches {item}")
            out.extend(hits)
        else:
            out.append(item)
    if not out:
        raise UsageError("image_based needs target embeddings (targets=PATH or a list of paths)")
    return out


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, rows: int | None = None) -> np.ndarray:
    """argmax over centroids of the dot product, per row (float32, first index on ties)."""
    k = centroids.shape[0]
    rows = rows or max(1, min(65_536, (1 << 24) // max(k, 1)))
    ct = np.ascontiguousarray(centroids.T, dtype=np.float32)
    out = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), rows):
        block = np.asarray(x[start:start + rows], dtype=np.float32)
        out[start:start + len(block)] = np.argmax(block @ ct, axis=1)
    return out


def train_centroids(x: np.ndarray, k: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """DataComp's `train_kmeans`: faiss Clustering, L2, `niter` iterations, `seed`, every point
    used (max_points_per_centroid = 10,000,000); on CPU."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    cl = faiss.Clustering(d, int(k))
    cl.niter = int(niter)
    cl.seed = int(seed)
    cl.max_points_per_centroid = 10_000_000
    cl.verbose = False
    index = faiss.IndexFlatL2(d)
    cl.train(x, index)
    return faiss.vector_float_to_array(cl.centroids).reshape(int(k), d).astype(np.float32)


@register_stage
class ImageBased(Stage):
    """DataComp's image-based filter (caption filter, then nearest pool centroid must be the
    nearest centroid of some ImageNet-1k training image); see the module docstring.

    Parameters: targets (ImageNet-1k embeddings: path, glob or list; required), centroids
    (DataComp's centroid file or .npy; omitted: k-means on the caption-filtered pool with k, niter,
    seed, sample_ratio), scorer (whose `img` embeddings; datacomp-l14), caption_filter (DataComp
    always applies it), lang, column, lid_model, processes.
    """

    name = "image_based"
    remembers_languages = True

    def needs_columns(self):
        return [self.column]

    def __init__(self, targets: str | list[str] | None = None, centroids: str | None = None,
                 scorer: str = "datacomp-l14", k: int = 100_000, niter: int = 20, seed: int = 0,
                 sample_ratio: float = -1.0, caption_filter: bool = True, lang: str = "en",
                 column: str = "caption", lid_model: str | None = None, processes: int | None = None):
        if targets is None or targets == "" or targets == []:
            raise UsageError("image_based needs the ImageNet-1k target embeddings: --set image_based.targets=PATH "
                             "(DataComp's in1k_clip_vit_l14_*.pt, a glob or list of them, or a .npy made with "
                             "`curate embed-images`)")
        self.targets = [str(Path(p).absolute()) for p in _expand(targets)]
        parts = [load_matrix(p, "target embeddings") for p in self.targets]
        if len({a.shape[1] for a in parts}) != 1:
            raise UsageError("target embedding files differ in width")
        self._targets = np.concatenate(parts)
        self.centroids = None if centroids in (None, "") else str(Path(str(centroids)).expanduser().absolute())
        self._centroids = None if self.centroids is None else load_matrix(self.centroids, "centroids")
        if self._centroids is not None and self._centroids.shape[1] != self._targets.shape[1]:
            raise UsageError(f"centroids are {self._centroids.shape[1]} wide, target embeddings "
                             f"{self._targets.shape[1]}")
        if int(k) < 1 or int(niter) < 1:
            raise UsageError("image_based needs k >= 1 and niter >= 1")
        self.scorer = scorer
        self.k = int(k)
        self.niter = int(niter)
        self.seed = int(seed)
        self.sample_ratio = float(sample_ratio)
        self.caption_filter = bool(caption_filter)
        self.lang = lang
        self.column = column
        self.lid_model = lid_model
        self.processes = processes
        self._target_ids: np.ndarray | None = None

    @property
    def scope(self) -> str:  # type: ignore[override]
        # With given centroids each sample is decided alone; training them needs the whole pool.
        return "row" if self._centroids is not None else "global"

    def needs_embeddings(self) -> list[tuple[str, str]]:
        return [(self.scorer, "img")]

    def _caption_rules(self) -> list[Rule]:
        if not self.caption_filter:
            return []
        toks = fasttext_token_count(pl.col(self.column))
        chars = char_count(pl.col(self.column))
        return [Rule("caption_too_few_tokens", toks <= 1, toks, 2.0),
                Rule("caption_too_short", chars <= 5, chars, 6.0)]

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", self.column])
        view = inp.embedding(self.scorer, "img")
        if view.n != f.height:
            raise UsageError(f"image_based: {view.n} embeddings for {f.height} rows")
        if f.height == 0:
            return StageResult(empty_decisions())
        if view.dim != self._targets.shape[1]:
            raise UsageError(f"target embeddings are {self._targets.shape[1]} wide, {self.scorer} image "
                             f"embeddings {view.dim}")
        if self.caption_filter:
            warm_language_workers(f.height, model_path=self.lid_model, processes=self.processes)
        pre = first_failure_frame(f, self._caption_rules())
        reason, value, threshold, detail = pre["reason"], pre["value"], pre["threshold"], pre["detail"]
        if self.caption_filter:
            reason, value, threshold, detail = _apply_lang(
                f, reason, value, threshold, detail, column=self.column, lang=self.lang,
                lid_model=self.lid_model, processes=self.processes)
        alive = np.flatnonzero(reason.is_null().to_numpy())
        stats: dict = {"caption_filtered": int(len(alive))}
        centroids = self._centroids
        if centroids is None:
            if len(alive) == 0:
                return StageResult(decisions_from(f["uid"], reason, value, threshold, detail), stats=stats)
            pos = alive
            if self.sample_ratio > 0:
                rng = np.random.default_rng(self.seed)
                pos = np.sort(rng.choice(alive, size=max(1, int(len(alive) * self.sample_ratio))))
            k = min(self.k, len(pos))
            centroids = train_centroids(view.take(pos), k, self.niter, self.seed)
            stats.update(k=k, n_train=int(len(pos)), trained=True)
        if self._target_ids is None or self._centroids is None:
            self._target_ids = np.unique(nearest_centroid(self._targets, centroids))
        targets = self._target_ids
        labels = np.full(f.height, -1, dtype=np.int64)
        if len(alive):
            labels[alive] = nearest_centroid(view.take(alive), centroids)
        hit = np.zeros(f.height, dtype=bool)
        hit[alive] = np.isin(labels[alive], targets)
        idx = pl.Series(alive)
        lab = pl.Series(labels[alive].astype(np.float64))
        miss = pl.select(pl.when(pl.Series(hit[alive])).then(pl.lit(None, pl.Utf8))
                         .otherwise(pl.lit("not_target_cluster"))).to_series()
        reason = reason.clone().scatter(idx, miss)
        value = value.clone().scatter(idx, lab)
        threshold = threshold.clone().scatter(idx, pl.repeat(None, len(alive), dtype=pl.Float64, eager=True))
        detail = detail.clone().scatter(idx, pl.Series([f"cluster={int(c)}" for c in labels[alive]], dtype=pl.Utf8))
        stats.update(centroids=int(centroids.shape[0]), target_clusters=int(len(targets)),
                     kept=int(hit.sum()))
        artefacts = {"target_centroid_ids": targets}
        if self._centroids is None:
            artefacts["centroids"] = centroids
        return StageResult(decisions_from(f["uid"], reason, value, threshold, detail), artefacts=artefacts,
                           stats=stats)


__all__ = ["TextBased", "ImageBased", "fasttext_tokens", "fasttext_token_count", "load_matrix",
           "nearest_centroid", "train_centroids"]
