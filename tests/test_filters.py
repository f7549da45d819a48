"""Filter stages against straightforward re-implementations of the rules they claim to follow.

Data is generated here (adversarial captions, boundary sizes, tied scores); the references are the
per-row Python that DataComp's tooling runs (`len(text.split())`, `len(text)`, fastText top-1 of
`text.replace("\\n", " ")`, `-np.sort(-x)[int(N * f)]`, ...).
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import polars as pl
import pytest

from curate.errors import UsageError
from curate.stages import ArrayEmbeddings, StageInput, get_stage, stage_names
from curate.stages.filters_datacomp import python_whitespace, word_count
from curate.stages.langid import _model, default_model_path, identify

# ---- data ---------------------------------------------------------------------------------------

EN = ["the", "dog", "runs", "on", "a", "beach", "photo", "of", "red", "car", "with", "my", "family", "summer",
      "house", "garden", "beautiful", "sunset", "over", "mountains", "and", "lake"]
OTHER = ["le", "chien", "sur", "la", "plage", "der", "Hund", "am", "Strand", "el", "perro", "en", "playa",
         "犬", "ビーチ", "собака", "пляж", "كلب", "😀", "Ã©", "ñ", "…", "—", "#1", "2019", "x"]
# Every code point Python's str.split() splits on, plus look-alikes it does not split on.
WS = [chr(c) for c in python_whitespace()]
NOT_WS = ["\u200b", "\u180e", "\ufeff", "\u2060", "\u00ad", "_", "\x00", "\x7f"]


def adversarial_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = ["", " ", "\n", "a b", "a b c", "ab cd", "abcdef", "abcde", "a\u3000b\u3000c", "a\x1cb\x1dc",
             "a\u200bb\u200bc", "one two\nthree", "  lead and trail  ", "x" * 6, "tab\tsep\tarated",
             "a\u00a0b\u00a0c d", "\u2028\u2029", "mixed \u2003 em space here", "é" * 6, "e\u0301" * 3,
             "\U0001F600 \U0001F600 \U0001F600", "nul\x00char in caption", "a\x85b\x85c"]
    out = list(fixed)
    while len(out) < n:
        k = rng.choice([0, 1, 2, 3, 3, 4, 6, 10])
        pool = EN if rng.random() < 0.7 else OTHER
        words = [rng.choice(pool) for _ in range(k)]
        seps = [rng.choice([" ", " ", " ", "  ", "\n", rng.choice(WS), rng.choice(NOT_WS)]) for _ in range(k)]
        s = "".join(w + sp for w, sp in zip(words, seps))
        if rng.random() < 0.3:
            s = rng.choice(WS) + s
        if rng.random() < 0.2:
            s = s.strip()
        out.append(s)
    return out[:n]


def boundary_sizes(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed + 1)
    sides = [0, 1, 150, 199, 200, 201, 300, 599, 600, 601, 602, 603, 1000, 4000]
    w, h = [], []
    for _ in range(n):
        a = rng.choice(sides)
        b = rng.choice(sides + [3 * a, 3 * a + 1, 3 * a - 1, max(a // 3, 0)])
        if rng.random() < 0.5:
            a, b = b, a
        w.append(a)
        h.append(b)
    return w, h


def uids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed + 2)
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


def run(stage, frame: pl.DataFrame, **kw):
    return stage.apply(StageInput(frame, **kw))


def assert_every_drop_explained(dec: pl.DataFrame) -> None:
    dropped = dec.filter(~pl.col("keep"))
    assert dropped["reason"].null_count() == 0
    assert dropped["value"].null_count() == 0
    assert dec.filter(pl.col("keep"))["reason"].null_count() == dec["keep"].sum()


# ---- reference implementations (per-row, DataComp's own expressions) -----------------------------


def ref_lang(text: str) -> str:
    model = _model(default_model_path())
    return model.predict(text.replace("\n", " "))[0][0].split("__label__")[1]


def ref_basic(rows) -> tuple[set, dict]:
    """DataComp basic filter; also the first failing rule in curate's documented order."""
    keep, first = set(), {}
    for uid, text, w, h in rows:
        checks = [("caption_too_few_words", len(text.split()) > 2, len(text.split())),
                  ("caption_too_short", len(text) > 5, len(text)),
                  ("image_too_small", min(w, h) >= 200, min(w, h))]
        if min(w, h) >= 200:  # DataComp computes the ratio with numpy (x/0 = inf); guard for Python
            checks.append(("aspect_ratio_too_high", max(w, h) / min(w, h) <= 3.0, max(w, h) / min(w, h)))
        lang = ref_lang(text)
        checks.append(("lang_not_en", lang == "en", None))
        failing = [c for c in checks if not c[1]]
        if failing:
            first[uid] = (failing[0][0], failing[0][2])
        else:
            keep.add(uid)
    return keep, first


def ref_threshold_fraction(scores: np.ndarray, f: float) -> float:
    return -np.sort(-scores)[int(len(scores) * f)]


# ---- Python-exact text measures -------------------------------------------------------------------


def test_word_count_matches_python_split_on_adversarial_text():
    caps = adversarial_captions(3000)
    # Every whitespace code point alone, between words, and doubled; and the look-alikes.
    caps += [f"a{c}b" for c in WS + NOT_WS] + [f"{c}{c}x{c}" for c in WS + NOT_WS] + ["".join(WS), "".join(NOT_WS)]
    s = pl.Series(caps)
    got = pl.select(word_count(pl.lit(s))).to_series().to_list()
    want = [len(c.split()) for c in caps]
    assert got == want
    chars = s.str.len_chars().to_list()
    assert chars == [len(c) for c in caps]
    assert python_whitespace() == tuple(c for c in range(0x110000) if chr(c).isspace())


# ---- basic ------------------------------------------------------------------------------------------


def basic_frame(n: int, seed: int = 0) -> pl.DataFrame:
    caps = adversarial_captions(n, seed)
    w, h = boundary_sizes(n, seed)
    return pl.DataFrame({"uid": uids(n, seed), "caption": caps, "width": w, "height": h})


def test_basic_equals_datacomp_rules_exactly():
    f = basic_frame(2500)
    dec = run(get_stage("basic")(), f).decisions
    assert dec.height == f.height and dec["uid"].to_list() == f["uid"].to_list()
    want_keep, want_first = ref_basic(f.iter_rows())
    got_keep = set(dec.filter(pl.col("keep"))["uid"].to_list())
    assert got_keep == want_keep
    assert 0 < len(got_keep) < f.height
    # Each drop names the first failing rule (documented order) and its value.
    for uid, reason, value in dec.filter(~pl.col("keep")).select("uid", "reason", "value").iter_rows():
        want_reason, want_value = want_first[uid]
        assert reason == want_reason, (uid, reason, want_reason)
        if want_value is not None:
            assert value == pytest.approx(want_value)
    assert_every_drop_explained(dec)
    reasons = set(dec["reason"].drop_nulls().to_list())
    assert {"caption_too_few_words", "caption_too_short", "image_too_small", "aspect_ratio_too_high",
            "lang_not_en"} <= reasons


def test_basic_thresholds_and_details():
    f = pl.DataFrame({"uid": ["a", "b", "c", "d", "e"],
                      "caption": ["a dog on the beach", "le chien sur la plage", None, "a dog on the beach", "a dog here"],
                      "width": [200, 300, 300, None, 600], "height": [600, 300, 300, 300, 200]})
    dec = run(get_stage("basic")(), f).decisions
    rows = {r["uid"]: r for r in dec.iter_rows(named=True)}
    assert rows["a"]["keep"] and rows["a"]["detail"] == "en"  # 600/200 == 3.0 is kept
    assert rows["b"]["reason"] == "lang_not_en" and rows["b"]["detail"] == "fr" and 0 < rows["b"]["value"] <= 1.01
    assert rows["c"]["reason"] == "caption_too_few_words" and rows["c"]["value"] == 0 and rows["c"]["threshold"] == 3
    assert rows["d"]["reason"] == "image_size_missing" and math.isnan(rows["d"]["value"])
    assert rows["e"]["keep"]


def test_basic_uses_runner_language_columns():
    f = basic_frame(300, seed=5)
    lid = identify(f["caption"])
    pre = f.with_columns(lid)
    a = run(get_stage("basic")(), f).decisions
    b = run(get_stage("basic")(), pre).decisions
    assert a.equals(b)
    # And it really reads them: claim everything is German.
    c = run(get_stage("basic")(), pre.with_columns(lang=pl.lit("de"))).decisions
    assert c["keep"].sum() == 0


def test_language_id_parallel_equals_serial_and_datacomp():
    caps = adversarial_captions(3000, seed=3)
    s = pl.Series(caps + caps[:500])  # repeated captions are identified once and joined back
    serial = identify(s, processes=1)
    parallel = identify(s, processes=2, parallel_min=100)
    assert serial.equals(parallel)
    assert serial["lang"].to_list() == [ref_lang(c) for c in s.to_list()]


# ---- clip_score ---------------------------------------------------------------------------------------


def tied_scores(n: int, seed: int = 0, nan_frac: float = 0.0, decimals: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.round(rng.normal(0.3, 0.05, n), decimals).astype(np.float32)  # two decimals: many ties
    if nan_frac:
        s[rng.random(n) < nan_frac] = np.nan
    return s


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.77, 0.999])
def test_clip_score_fraction_matches_datacomp(fraction):
    n = 5003
    s = tied_scores(n, seed=int(fraction * 100))
    f = pl.DataFrame({"uid": uids(n), "score__datacomp-l14": s})
    res = run(get_stage("clip_score")(scorer="datacomp-l14", fraction=fraction), f)
    t = ref_threshold_fraction(s, fraction)
    want = set(f.filter(pl.Series(s >= t))["uid"].to_list())
    got = set(res.decisions.filter(pl.col("keep"))["uid"].to_list())
    assert got == want
    assert len(got) >= int(n * fraction) + 1  # n+1 rows plus ties
    assert res.stats["threshold"] == pytest.approx(float(t))
    assert_every_drop_explained(res.decisions)
    assert set(res.decisions["reason"].drop_nulls().unique()) <= {"clip_score_below"}


def test_clip_score_threshold_and_missing_scores():
    n = 4000
    s = tied_scores(n, seed=7, nan_frac=0.05)
    f = pl.DataFrame({"uid": uids(n, 7), "score__x": s}).with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 0).then(None).otherwise(pl.col("score__x")).alias("score__x"))
    sv = f["score__x"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    st = get_stage("clip_score")(scorer="x", threshold=0.3)
    assert st.scope == "row" and st.needs_scores() == ["x"]
    dec = run(st, f).decisions
    assert set(dec.filter(pl.col("keep"))["uid"]) == set(f.filter(pl.Series(sv >= 0.3))["uid"])
    missing = dec.filter(pl.col("reason") == "missing_score")
    assert missing.height == int(np.isnan(sv).sum()) > 0
    assert missing["value"].is_nan().all()
    assert_every_drop_explained(dec)
    # Fraction: N counts every row (as DataComp's len(df)); NaN sorts last like -np.sort(-x).
    st = get_stage("clip_score")(scorer="x", fraction=0.4)
    assert st.scope == "global"
    dec = run(st, f).decisions
    t = -np.sort(-sv)[int(len(sv) * 0.4)]
    assert set(dec.filter(pl.col("keep"))["uid"]) == set(f.filter(pl.Series(sv >= t))["uid"])


def test_clip_score_exact_mode_breaks_ties_by_uid():
    n = 3001
    s = tied_scores(n, seed=11, nan_frac=0.02)
    u = uids(n, 11)
    f = pl.DataFrame({"uid": u, "score__x": s})
    for fraction in (0.1, 0.333, 0.5):
        res = run(get_stage("clip_score")(scorer="x", fraction=fraction, mode="exact"), f)
        k = round(n * fraction)
        order = sorted((i for i in range(n) if not np.isnan(s[i])), key=lambda i: (-float(s[i]), u[i]))
        want = {u[i] for i in order[:k]}
        got = set(res.decisions.filter(pl.col("keep"))["uid"])
        assert got == want and len(got) == k
        ties = res.decisions.filter(pl.col("reason") == "clip_score_tie")
        assert ties.height > 0 and (ties["value"] == res.stats["threshold"]).all()
        assert_every_drop_explained(res.decisions)


def test_clip_score_rejects_bad_params():
    with pytest.raises(UsageError):
        get_stage("clip_score")(scorer="x")
    with pytest.raises(UsageError):
        get_stage("clip_score")(scorer="x", threshold=0.2, fraction=0.3)
    with pytest.raises(UsageError):
        get_stage("clip_score")(scorer="x", fraction=1.5)
    with pytest.raises(UsageError):
        run(get_stage("clip_score")(scorer="missing", threshold=0.2), pl.DataFrame({"uid": ["a"]}))


# ---- intersections are stage sequences -------------------------------------------------------------


def run_sequence(stages, frame: pl.DataFrame) -> set:
    for st in stages:
        dec = st.apply(StageInput(frame)).decisions
        frame = frame.filter(dec["keep"])
    return set(frame["uid"].to_list())


def test_basic_then_clip_score_is_datacomp_intersection():
    n = 2000
    f = basic_frame(n, seed=9).with_columns(pl.Series("score__datacomp-l14", tied_scores(n, seed=9, decimals=4)))
    s = f["score__datacomp-l14"].to_numpy()
    basic_keep, _ = ref_basic(f.select("uid", "caption", "width", "height").iter_rows())
    # Threshold form: order does not matter.
    want = basic_keep & set(f.filter(pl.Series(s >= 0.3))["uid"])
    assert run_sequence([get_stage("basic")(), get_stage("clip_score")(scorer="datacomp-l14", threshold=0.3)], f) == want
    # Fraction form: DataComp computes the threshold over the whole pool, then intersects. In a
    # sequence that means the fraction stage goes first; after basic it would be a fraction of the
    # survivors instead.
    t = ref_threshold_fraction(s, 0.3)
    want = basic_keep & set(f.filter(pl.Series(s >= t))["uid"])
    clip = get_stage("clip_score")(scorer="datacomp-l14", fraction=0.3)
    assert run_sequence([clip, get_stage("basic")()], f) == want
    assert run_sequence([get_stage("basic")(), clip], f) != want


# ---- laion2b -------------------------------------------------------------------------------------------


def ref_gcld3(text: str) -> str:
    """DataComp's laion2b language test (gcld3, as apply_filter.py builds and calls it)."""
    import gcld3

    model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    return model.FindLanguage(text=text.replace("\n", " ")).language


@pytest.mark.parametrize("lang_model,ref", [("gcld3", ref_gcld3), ("fasttext", ref_lang)])
def test_laion2b_matches_reference(lang_model, ref):
    n = 1500
    caps = adversarial_captions(n, seed=13)
    s = tied_scores(n, seed=13, nan_frac=0.01) - 0.02
    f = pl.DataFrame({"uid": uids(n, 13), "caption": caps, "score__datacomp-b32": s})
    st = get_stage("laion2b")(lang_model=lang_model)
    assert st.remembers_languages == (lang_model == "fasttext")
    dec = run(st, f).decisions
    want = {u for u, c, x in zip(f["uid"], caps, s) if x >= 0.28 and ref(c) == "en"}
    assert set(dec.filter(pl.col("keep"))["uid"]) == want
    assert set(dec["reason"].drop_nulls().unique()) == {"missing_score", "clip_score_below", "lang_not_en"}
    assert_every_drop_explained(dec)
    # the deciding language is recorded for every row the language test saw
    langs = dict(zip(f["uid"], caps))
    for u, d in dec.filter(pl.col("reason") == "lang_not_en").select("uid", "detail").iter_rows():
        assert d == ref(langs[u])


# ---- image rules ---------------------------------------------------------------------------------------


def test_image_size_bytes_and_decode_failures():
    w, h = boundary_sizes(2000, seed=21)
    f = pl.DataFrame({"uid": uids(2000, 21), "width": w, "height": h,
                      "image_bytes": [(i * 7919) % 50_000 if i % 50 else None for i in range(2000)],
                      "decode_error": [None if i % 13 else "cannot identify image file" for i in range(2000)]})
    dec = run(get_stage("image_size")(), f).decisions
    want = {u for u, a, b in zip(f["uid"], w, h) if min(a, b) >= 200 and max(a, b) / min(a, b) <= 3}
    assert set(dec.filter(pl.col("keep"))["uid"]) == want
    assert_every_drop_explained(dec)
    dec = run(get_stage("image_size")(min_side=100, max_aspect=None, max_side=1000), f).decisions
    want = {u for u, a, b in zip(f["uid"], w, h) if min(a, b) >= 100 and max(a, b) <= 1000}
    assert set(dec.filter(pl.col("keep"))["uid"]) == want
    assert "image_too_large" in set(dec["reason"].drop_nulls())

    dec = run(get_stage("image_bytes")(min_bytes=1000, max_bytes=40_000), f).decisions
    b = f["image_bytes"].to_list()
    assert set(dec.filter(pl.col("keep"))["uid"]) == {u for u, x in zip(f["uid"], b) if x is not None and 1000 <= x <= 40_000}
    assert set(dec["reason"].drop_nulls()) == {"image_bytes_missing", "image_bytes_too_small", "image_bytes_too_large"}
    assert_every_drop_explained(dec)

    dec = run(get_stage("decode_failures")(), f).decisions
    bad = dec.filter(~pl.col("keep"))
    assert bad.height == sum(1 for i in range(2000) if i % 13 == 0)
    assert (bad["reason"] == "undecodable").all() and (bad["detail"] == "cannot identify image file").all()
    with pytest.raises(UsageError):
        run(get_stage("decode_failures")(), f.drop("decode_error"))


# ---- text concepts --------------------------------------------------------------------------------------


def test_default_concepts_are_imagenet_1k():
    st = get_stage("text_concepts")()
    assert st.n_concepts == 1000
    f = pl.DataFrame({"uid": list("abcdefg"), "caption": [
        "A Golden Retriever in the snow", "two tabby cats", "my jack-o'-lantern", "an old steam locomotive!",
        "nothing to see", None, "Great white sharks near the coast"]})
    dec = run(st, f).decisions
    got = dict(zip(dec["uid"], dec["detail"]))
    assert got["a"] == "golden retriever" and got["b"] == "tabby" and got["c"] == "jack-o'-lantern"
    assert got["d"] == "steam locomotive" and got["g"] == "great white shark"
    assert dec.filter(~pl.col("keep"))["uid"].to_list() == ["e", "f"]
    assert_every_drop_explained(dec)


def test_text_concepts_user_list_matches_python_reference(tmp_path):
    concepts = ["red panda, lesser panda", "fire truck, fire engine", "cat", "sea-lion", "ice cream cone"]
    path = tmp_path / "concepts.txt"
    path.write_text("# my list\n" + "\n".join(concepts) + "\n\n")
    vocab = ["red", "panda", "lesser", "fire", "truck", "engine", "cat", "cats", "sea", "lion", "ice", "cream",
             "cone", "cones", "dog", "the", "a", "Red", "PANDA", "fire-truck", "sea-lions", "catalog"]
    rng = random.Random(4)
    caps = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 6))) + rng.choice(["", ".", "!"])
            for _ in range(3000)]
    f = pl.DataFrame({"uid": uids(3000, 4), "caption": caps})
    dec = run(get_stage("text_concepts")(concepts=str(path)), f).decisions

    import re

    phrases = {}
    for line in concepts:
        names = [x.strip() for x in line.split(",")]
        for name in names:
            toks = re.findall(r"[a-z]+", name.lower())
            forms = [toks[-1], toks[-1] + "s"] + ([toks[-1] + "es"] if toks[-1].endswith(("s", "x", "z", "ch", "sh", "o")) else [])
            for form in forms:
                phrases.setdefault(tuple(toks[:-1] + [form]), names[0])

    def ref(text):
        toks = re.findall(r"[a-z]+", text.lower())
        hits = []
        for i in range(len(toks)):
            for p, c in sorted(phrases.items(), key=lambda kv: -len(kv[0])):
                if tuple(toks[i:i + len(p)]) == p:
                    hits.append((i, -len(p), c))
        return (len({c for _, _, c in hits}), min(hits)[2] if hits else None)

    for cap, n, first in zip(caps, dec["value"].to_list(), dec["detail"].to_list()):
        want_n, want_first = ref(cap)
        assert (n, first) == (want_n, want_first), cap
    assert 0 < dec["keep"].sum() < dec.height
    assert_every_drop_explained(dec)
    with pytest.raises(UsageError):
        get_stage("text_concepts")(concepts=str(tmp_path / "missing.txt"))


# ---- image concepts -------------------------------------------------------------------------------------


def clustered_embeddings(n: int, k: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = rng.integers(0, k, n)
    x = centres[lab] + 0.15 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), centres, lab


def test_image_concepts_keeps_anchor_clusters(tmp_path):
    n, k, dim = 6000, 24, 32
    x, centres, lab = clustered_embeddings(n, k, dim, seed=3)
    anchors = centres[[2, 7, 11]] + 0.02
    np.save(tmp_path / "anchors.npy", anchors.astype(np.float16))
    f = pl.DataFrame({"uid": uids(n, 3)})
    emb = {("datacomp-l14", "img"): ArrayEmbeddings(x)}
    st = get_stage("image_concepts")(anchors=str(tmp_path / "anchors.npy"), k=k, seed=0, points_per_centroid=100, chunk=1000)
    assert st.needs_embeddings() == [("datacomp-l14", "img")] and st.scope == "global"
    res = run(st, f, embeddings=emb, seed=0)
    assert res.stats["n_train"] == 2400  # trained on a seeded sample, not the whole pool
    # Reference: nearest centroid by cosine for pool and anchors, with the stage's centroids.
    c = res.artefacts["centroids"]
    xf = x.astype(np.float32)
    xf /= np.linalg.norm(xf, axis=1, keepdims=True)
    labels = np.argmax(xf @ c.T, axis=1)
    a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    target = set(np.argmax(a @ c.T, axis=1).tolist())
    want = np.isin(labels, list(target))
    got = res.decisions["keep"].to_numpy()
    assert np.array_equal(got, want)
    truth = np.isin(lab, [2, 7, 11])  # k-means may merge or split true clusters, so roughly:
    assert (got & truth).sum() > 0.8 * truth.sum() and got.sum() < 0.3 * n
    assert set(res.decisions["reason"].drop_nulls()) == {"no_anchor_cluster"}
    assert_every_drop_explained(res.decisions)
    again = run(get_stage("image_concepts")(anchors=anchors, k=k, seed=0, points_per_centroid=100), f,
                embeddings=emb, seed=0)
    assert again.decisions.equals(res.decisions)  # seeded: repeatable
    with pytest.raises(UsageError):
        run(get_stage("image_concepts")(anchors=np.ones((2, 8)), k=4), f, embeddings=emb)


# ---- classifier heads -----------------------------------------------------------------------------------


def _train_head(dim: int, sizes: list[int], act, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    mods = []
    for i in range(len(sizes) - 1):
        mods.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            if act is not None:
                mods.append(act())
            mods.append(torch.nn.Dropout(0.1))
    model = torch.nn.Sequential(*mods)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2000, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt)[:, 0], yt)
        loss.backward()
        opt.step()
    return model.eval(), x


def test_classifier_head_matches_torch_model(tmp_path):
    import torch
    from safetensors.torch import save_file

    dim = 24
    model, x = _train_head(dim, [dim, 32, 16, 1], torch.nn.ReLU)
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(x))[:, 0]).numpy()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "head.safetensors"))
    torch.save(model.state_dict(), tmp_path / "head.pt")
    f = pl.DataFrame({"uid": uids(len(x), 1)})
    emb = {("s", "img"): ArrayEmbeddings(x)}
    for path in ("head.safetensors", "head.pt"):
        st = get_stage("classifier_head")(weights=str(tmp_path / path), layers=[dim, 32, 16, 1], activation="relu",
                                          sigmoid=True, threshold=0.5, direction="keep_below", label="nsfw",
                                          scorer="s", chunk=300)
        res = run(st, f, embeddings=emb)
        got = res.decisions["value"].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(res.decisions["keep"].to_numpy(), want <= 0.5)
        assert set(res.decisions["reason"].drop_nulls()) == {"nsfw_too_high"}
        assert_every_drop_explained(res.decisions)
    # A linear stack without activations (LAION aesthetic layout: Linear/Dropout only), keep_above.
    model, _ = _train_head(dim, [dim, 20, 8, 1], None, seed=2)
    torch.save(model.state_dict(), tmp_path / "aes.pth")
    st = get_stage("classifier_head")(weights=str(tmp_path / "aes.pth"), layers=[dim, 20, 8, 1], threshold=0.0,
                                      label="aesthetic", scorer="s")
    res = run(st, f, embeddings=emb)
    with torch.no_grad():
        want = model(torch.from_numpy(x))[:, 0].numpy()
    np.testing.assert_allclose(res.decisions["value"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert set(res.decisions["reason"].drop_nulls()) == {"aesthetic_too_low"}
    with pytest.raises(UsageError):
        get_stage("classifier_head")(weights=str(tmp_path / "aes.pth"), layers=[dim, 32, 1], threshold=0)


def test_classifier_head_input_standardisation(tmp_path):
    """LAION's ported NSFW heads: norm.mean/norm.variance buffers, then linear_1..n with ReLU."""
    import torch

    dim = 16
    rng = np.random.default_rng(5)
    mean = rng.normal(size=dim).astype(np.float32) * 0.01
    var = rng.uniform(0.5, 2.0, size=dim).astype(np.float32) * 1e-3
    lin = [torch.nn.Linear(dim, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)]
    state = {"norm.mean": torch.from_numpy(mean), "norm.variance": torch.from_numpy(var)}
    for i, layer in enumerate(lin, 1):
        state[f"linear_{i}.weight"] = layer.weight.detach()
        state[f"linear_{i}.bias"] = layer.bias.detach()
    torch.save(state, tmp_path / "nsfw.pth")
    x = rng.normal(size=(500, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with torch.no_grad():
        h = (torch.from_numpy(x) - state["norm.mean"]) / (state["norm.variance"].sqrt() + 1e-10)
        h = torch.relu(lin[0](h))
        h = torch.relu(lin[1](h))
        want = torch.sigmoid(lin[2](h))[:, 0].numpy()
    st = get_stage("classifier_head")(weights=str(tmp_path / "nsfw.pth"), layers=[dim, 8, 4, 1], activation="relu",
                                      sigmoid=True, threshold=0.5, direction="keep_below", label="nsfw", scorer="s")
    res = run(st, pl.DataFrame({"uid": uids(500, 5)}), embeddings={("s", "img"): ArrayEmbeddings(x)})
    np.testing.assert_allclose(res.decisions["value"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    # Per-gap activations (LAION's H/14 head has none between its last two layers).
    with torch.no_grad():
        h = (torch.from_numpy(x) - state["norm.mean"]) / (state["norm.variance"].sqrt() + 1e-10)
        want = lin[2](lin[1](torch.relu(lin[0](h))))[:, 0].numpy()
    st = get_stage("classifier_head")(weights=str(tmp_path / "nsfw.pth"), layers=[dim, 8, 4, 1],
                                      activation=["relu", "none"], threshold=0.0, scorer="s")
    res = run(st, pl.DataFrame({"uid": uids(500, 5)}), embeddings={("s", "img"): ArrayEmbeddings(x)})
    np.testing.assert_allclose(res.decisions["value"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError):
        get_stage("classifier_head")(weights=str(tmp_path / "nsfw.pth"), layers=[dim, 8, 4, 1],
                                     activation=["relu"], threshold=0.0)


# ---- every stage: registered, params recordable, empty input ---------------------------------------------


def test_registry_params_and_empty_frames(tmp_path):
    names = set(stage_names())
    mine = {"basic", "clip_score", "laion2b", "text_based", "image_based", "text_concepts", "image_concepts",
            "caption_quality", "caption_length",
            "caption_charset", "caption_mojibake", "caption_boilerplate", "caption_repetition", "caption_tokens",
            "caption_language", "max_caption_repeats", "image_size", "image_bytes", "decode_failures",
            "classifier_head"}
    assert mine <= names
    empty = pl.DataFrame({"uid": [], "caption": [], "width": [], "height": [], "image_bytes": [], "decode_error": [],
                          "score__x": []}, schema={"uid": pl.Utf8, "caption": pl.Utf8, "width": pl.Int64,
                                                   "height": pl.Int64, "image_bytes": pl.Int64,
                                                   "decode_error": pl.Utf8, "score__x": pl.Float32})
    for name, kw in [("basic", {}), ("clip_score", {"scorer": "x", "fraction": 0.3}), ("laion2b", {"scorer": "x"}),
                     ("text_based", {}),
                     ("text_concepts", {}), ("caption_quality", {}), ("max_caption_repeats", {}),
                     ("image_size", {}), ("image_bytes", {"min_bytes": 1}), ("decode_failures", {})]:
        st = get_stage(name)(**kw)
        json.dumps(st.params())
        dec = run(st, empty).decisions
        assert dec.height == 0 and dec.columns == ["uid", "keep", "reason", "value", "threshold", "ref_uid", "detail"]


def test_language_memo_can_be_turned_off_for_a_last_stage():
    """The runner turns the language memo off for the last language-aware stage of a recipe:
    identify(memo=True) then remembers nothing (and gives the same answers)."""
    from curate.stages import langid

    s = pl.Series(["the cat sat on the mat", "le chat est sur le tapis", "der Hund schläft"])
    langid.clear_memo()
    try:
        langid.use_memo(False)
        off = langid.identify(s, processes=1, memo=True)
        assert not langid._MEMO
        langid.use_memo(True)
        on = langid.identify(s, processes=1, memo=True)
        assert sum(m.height for m in langid._MEMO.values()) == 3
        assert off.equals(on) and off["lang"].to_list()[:2] == ["en", "fr"]
    finally:
        langid.use_memo(True)
        langid.clear_memo()
