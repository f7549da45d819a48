"""Concept filters: keep samples whose caption or image is about a listed concept.

Sources: DataComp (Gadre et al. 2023), baselines "text-based" and "image-based"
(`mlfoundations/datacomp`, `baselines/apply_filter.py`, `baselines/image_based_clustering.py`):

- text-based: English captions in which some word names an ImageNet-21k synset (each word looked
  up with WordNet, its first synset compared with the 21k list). DataComp's exact rule is the
  `text_based` stage (`datacomp_baselines.py`); `text_concepts` is a looser cousin that matches
  caption words against a concept list: by default the
  1000 ImageNet-1k classes with all their WordNet synonyms (`curate/data/imagenet1k_classes.txt`),
  or any user file (one concept per line, synonyms comma-separated, multi-word concepts allowed).
  Put a language stage before it to reproduce "English and ..." .
- image-based: k-means with 100,000 centroids on the pool's ViT-L/14 image embeddings (faiss,
  20 iterations, seed 0, trained on a sample of the pool); keep samples whose nearest centroid is
  the nearest centroid of at least one ImageNet-1k training image. DataComp trained L2 k-means and
  assigned by the largest inner product; `image_concepts` uses spherical k-means (normalised
  embeddings and centroids, cosine assignment) by default, `spherical=False` for L2. DataComp
  also applied a caption pre-filter (English, > 1 fastText token, > 5 characters) first. DataComp's
  exact rule, caption filter included, is the `image_based` stage (`datacomp_baselines.py`).
  image_based ∩ clip_score (L/14 top 30%) built DataComp-1B.

faiss's own k-means silently trains on at most 256·k points and loads a memmap whole, so the
training sample is drawn here (seeded) and assignment streams over the embeddings in chunks.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .base import Stage, StageInput, StageResult, decisions_frame, register_stage
from .filters_datacomp import empty_decisions, require_columns

DEFAULT_CONCEPTS = "imagenet1k_classes.txt"
_LETTERS = r"\p{L}+"


def _read_concept_lines(path: str | None) -> tuple[list[str], str]:
    if path is None:
        text = resources.files("curate").joinpath("data", DEFAULT_CONCEPTS).read_text(encoding="utf-8")
        source = f"curate/data/{DEFAULT_CONCEPTS}"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"concept list {p} not found")
        text = p.read_text(encoding="utf-8")
        source = str(p.absolute())
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")], source


def _plural_forms(word: str) -> list[str]:
    """Regular English plurals of a (lowercase) word: cat → cats, box → boxes, puppy → puppies."""
    out = [word + "s"]
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        out.append(word + "es")
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        out.append(word[:-1] + "ies")
    return out


def concept_table(lines: Sequence[str], plurals: bool = True) -> pl.DataFrame:
    """(phrase, n_tokens, concept): every synonym of every line, tokenised like captions are.

    A line is "canonical name, synonym, ..."; `concept` is the canonical name. Phrases are lowercased
    and cut into letter runs, so "jack-o'-lantern" matches captions containing "jack o lantern".
    """
    syn, canon = [], []
    for line in lines:
        names = [n.strip() for n in line.split(",") if n.strip()]
        for n in names:
            syn.append(n)
            canon.append(names[0])
    t = pl.DataFrame({"syn": syn, "concept": canon}).with_columns(
        toks=pl.col("syn").str.to_lowercase().str.extract_all(_LETTERS)).filter(pl.col("toks").list.len() > 0)
    rows = []
    for toks, concept in zip(t["toks"].to_list(), t["concept"].to_list()):
        rows.append((" ".join(toks), len(toks), concept))
        if plurals:
            for form in _plural_forms(toks[-1]):
                rows.append((" ".join(toks[:-1] + [form]), len(toks), concept))
    table = pl.DataFrame(rows, schema={"phrase": pl.Utf8, "n": pl.Int64, "concept": pl.Utf8}, orient="row")
    # One concept per phrase (the first line that lists it), so matches are unambiguous.
    return table.unique(subset="phrase", keep="first", maintain_order=True)


@register_stage
class TextConcepts(Stage):
    """Keep samples whose caption mentions a concept from the list.

    Caption words: lowercased, cut into runs of letters. A concept matches when its tokens occur
    consecutively (multi-word concepts included); with `plurals`, regular plurals of a concept's
    last word match too. Dropped: `no_concept_match` (value = 0, threshold = min_matches). Kept:
    value = number of distinct concepts matched, detail = the first match in the caption (longest
    at that position), as its canonical name. Input columns: `uid`, `caption` (or `column`).
    """

    name = "text_concepts"
    scope = "row"

    def needs_columns(self):
        return [self.column]

    def __init__(self, concepts: str | None = None, column: str = "caption", plurals: bool = True,
                 min_matches: int = 1):
        lines, source = _read_concept_lines(concepts)
        if not lines:
            raise UsageError(f"concept list {source} is empty")
        self.concepts = source
        self.column = column
        self.plurals = bool(plurals)
        self.min_matches = int(min_matches)
        self.n_concepts = len(lines)
        self._table = concept_table(lines, self.plurals)

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", self.column])
        if f.height == 0:
            return StageResult(empty_decisions())
        text = f[self.column].cast(pl.Utf8).fill_null("").alias("_t")
        distinct = text.unique().to_frame().with_row_index("_i")
        found = match_concepts(distinct, self._table)
        per = distinct.join(found, on="_i", how="left").select(
            "_t", pl.col("n_concepts").fill_null(0), "first")
        d = text.to_frame().join(per, on="_t", how="left", maintain_order="left")
        keep = d["n_concepts"] >= self.min_matches
        reason = pl.select(pl.when(keep).then(pl.lit(None, pl.Utf8)).otherwise(pl.lit("no_concept_match"))).to_series()
        detail = pl.select(pl.when(keep).then(d["first"]).otherwise(pl.lit(None, pl.Utf8))).to_series()
        stats = {"n_concepts": self.n_concepts, "phrases": self._table.height,
                 "distinct_captions": distinct.height}
        return StageResult(decisions_frame(f["uid"], keep, reason, d["n_concepts"].cast(pl.Float64),
                                           float(self.min_matches), None, detail), stats=stats)


def match_concepts(captions: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """For captions (`_i`, `_t`): `_i`, n_concepts (distinct concepts matched), first (concept)."""
    words = (captions.select("_i", w=pl.col("_t").str.to_lowercase().str.extract_all(_LETTERS))
             .explode("w").drop_nulls("w").with_row_index("_p").with_columns(pl.col("_p").cast(pl.Int64)))
    # Only n-grams that start with a word some phrase starts with can match.
    first_words = table.select(pl.col("phrase").str.split(" ").list.first()).to_series().unique()
    starts = words.filter(pl.col("w").is_in(first_words.implode()))
    parts = []
    for n in sorted(table["n"].unique().to_list()):
        phrases = table.filter(pl.col("n") == n).select("phrase", "concept")
        grams = starts.select("_i", "_p", w0=pl.col("w"))
        for j in range(1, n):  # the j-th next word, kept only while still in the same caption
            nxt = words.select((pl.col("_p") - j).alias("_p"), pl.col("w").alias(f"w{j}"), pl.col("_i").alias("_ij"))
            grams = grams.join(nxt, on="_p", how="inner").filter(pl.col("_ij") == pl.col("_i")).drop("_ij")
        grams = grams.select("_i", "_p", phrase=pl.concat_str([pl.col(f"w{j}") for j in range(n)], separator=" "))
        m = grams.join(phrases, on="phrase", how="inner")
        if m.height:
            parts.append(m.select("_i", "_p", pl.lit(n, pl.Int64).alias("n"), "concept"))
    if not parts:
        return pl.DataFrame(schema={"_i": pl.UInt32, "n_concepts": pl.UInt32, "first": pl.Utf8})
    hits = pl.concat(parts)
    return (hits.sort(["_i", "_p", "n"], descending=[False, False, True])
            .group_by("_i", maintain_order=True)
            .agg(n_concepts=pl.col("concept").n_unique(), first=pl.col("concept").first()))


@register_stage
class ImageConcepts(Stage):
    """DataComp's image-based filter, generalised to any anchor set.

    Spherical k-means (faiss, seeded) on a seeded sample of the pool's image embeddings; every pool
    sample and every anchor goes to its nearest centroid; samples in a centroid that holds at least
    one anchor are kept. Dropped: `no_anchor_cluster` (value = the sample's cluster id). Kept:
    value = cluster id, detail = "anchors=N". Needs image embeddings of `scorer`; anchors must come
    from the same model (e.g. ImageNet-1k training images embedded with ViT-L/14 for
    `datacomp-l14`).
    """

    name = "image_concepts"
    scope = "global"

    def needs_columns(self):
        return []

    def __init__(self, anchors: str | np.ndarray, scorer: str = "datacomp-l14", k: int = 100_000,
                 niter: int = 20, points_per_centroid: int = 256, seed: int | None = None,
                 spherical: bool = True, chunk: int = 65_536):
        if isinstance(anchors, (str, Path)):
            p = Path(anchors).expanduser()
            if not p.is_file():
                raise UsageError(f"anchor embeddings {p} not found")
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise UsageError(f"cannot read anchor embeddings {p}: {exc}") from None
            self.anchors = str(p.absolute())
        else:
            arr = np.asarray(anchors)
            self.anchors = f"<array {arr.shape[0]}x{arr.shape[1] if arr.ndim == 2 else '?'}>"
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise UsageError(f"anchor embeddings must be a non-empty 2-D array, got shape {arr.shape}")
        self._anchors = np.ascontiguousarray(arr, dtype=np.float32)
        if int(k) < 1 or int(niter) < 1:
            raise UsageError("image_concepts needs k >= 1 and niter >= 1")
        self.scorer = scorer
        self.k = int(k)
        self.niter = int(niter)
        self.points_per_centroid = int(points_per_centroid)
        self.seed = seed
        self.spherical = bool(spherical)
        self.chunk = int(chunk)

    def needs_embeddings(self) -> list[tuple[str, str]]:
        return [(self.scorer, "img")]

    def apply(self, inp: StageInput) -> StageResult:
        import faiss

        f = inp.frame
        require_columns(f, self.name, ["uid"])
        view = inp.embedding(self.scorer, "img")
        if view.n != f.height:
            raise UsageError(f"image_concepts: {view.n} embeddings for {f.height} rows")
        if f.height == 0:
            return StageResult(empty_decisions())
        if self._anchors.shape[1] != view.dim:
            raise UsageError(f"anchor embeddings have dim {self._anchors.shape[1]}, "
                             f"{self.scorer} image embeddings have dim {view.dim}")
        n, dim = view.n, view.dim
        seed = int(self.seed if self.seed is not None else inp.seed) % (2 ** 31)
        n_train = min(n, self.k * self.points_per_centroid)
        k = min(self.k, n_train)
        rng = np.random.default_rng(seed)
        pos = np.arange(n) if n_train == n else np.sort(rng.choice(n, size=n_train, replace=False))
        x = self._prep(view.take(pos))
        km = faiss.Kmeans(dim, k, niter=self.niter, seed=seed, spherical=self.spherical, verbose=False,
                          max_points_per_centroid=max(1, -(-n_train // k)), min_points_per_centroid=1)
        km.train(x)
        del x
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        index = faiss.IndexFlatIP(dim) if self.spherical else faiss.IndexFlatL2(dim)
        index.add(centroids)
        labels = np.empty(n, dtype=np.int64)
        for start, block in view.chunks(self.chunk):
            _, ids = index.search(self._prep(block), 1)
            labels[start:start + len(block)] = ids[:, 0]
        _, a_ids = index.search(self._prep(self._anchors), 1)
        anchor_counts = np.bincount(a_ids[:, 0], minlength=k)
        keep = anchor_counts[labels] > 0
        reason = pl.select(pl.when(pl.Series(keep)).then(pl.lit(None, pl.Utf8))
                           .otherwise(pl.lit("no_anchor_cluster"))).to_series()
        detail = pl.select(pl.when(pl.Series(keep)).then(pl.format("anchors={}", pl.Series(anchor_counts[labels])))
                           .otherwise(pl.lit(None, pl.Utf8))).to_series()
        sizes = np.bincount(labels, minlength=k)
        clusters = pl.DataFrame({"cluster": np.arange(k), "n": sizes, "anchors": anchor_counts})
        stats = {"k": k, "n_train": n_train, "niter": self.niter, "seed": seed,
                 "anchor_clusters": int((anchor_counts > 0).sum()), "kept": int(keep.sum())}
        return StageResult(decisions_frame(f["uid"], keep, reason, labels.astype(np.float64), None, None, detail),
                           artefacts={"centroids": centroids, "clusters": clusters}, stats=stats)

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.spherical:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.maximum(norms, 1e-12)
        return x
