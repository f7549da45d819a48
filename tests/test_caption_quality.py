"""Caption quality stages: each reason fires where it should, the vectorised measures equal their
plain-Python definitions, and per-distinct-caption evaluation equals per-row evaluation."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import numpy as np
import polars as pl
import pytest

from curate.errors import UsageError
from curate.stages import StageInput, get_stage
from curate.stages.caption_quality import CHECKS, longest_char_run, mojibake_pattern
from curate.stages.langid import identify


def decide(stage, captions, **cols):
    f = pl.DataFrame({"uid": [f"{i:032x}" for i in range(len(captions))], "caption": captions, **cols})
    return stage.apply(StageInput(f)).decisions


def reasons_of(stage, captions):
    return decide(stage, captions)["reason"].to_list()


def assert_every_drop_explained(dec: pl.DataFrame) -> None:
    dropped = dec.filter(~pl.col("keep"))
    assert dropped["reason"].null_count() == 0
    assert dropped["value"].null_count() == 0


GOOD = ["A brown dog running on the beach at sunset", "this is a nice photo of my garden",
        "Portrait of a smiling woman in a red dress", "Smiling woman on a beach stock photo",
        "Vintage car parked in front of an old house"]


def test_each_reason_fires_and_clean_captions_pass():
    st = get_stage("caption_quality")()
    cases = {
        "caption_too_few_words": "Sunset",
        "caption_too_short": "a b",
        "caption_mojibake": "cafÃ© au lait with friends",
        "caption_is_filename": "IMG 20190312 1234.jpg",
        "caption_has_url": "Visit https://example.com for more",
        "caption_has_email": "contact me at bob@example.com today",
        "caption_has_html": "<b>Bold</b> caption text here",
        "caption_placeholder": "No image available",
        "caption_stock_phrase": "Stock Photo - 12345678 | Alamy",
        "caption_low_alpha_ratio": "2019-05-12 14:33:21 #0034",
        "caption_char_run": "so cute zzzzzzzzzzzzzz right now",
        "caption_top_word_ratio": "dog dog dog dog dog cat",
        "caption_dup_ngram_frac": "buy it now buy it now buy it now",
        "caption_token_overflow": " ".join(f"word{i}" for i in range(80)),
        "lang_not_allowed": "Ein schöner Hund läuft am Strand entlang",
    }
    dec = decide(st, list(cases.values()) + GOOD)
    got = dec["reason"].to_list()
    assert got[:len(cases)] == list(cases)
    assert got[len(cases):] == [None] * len(GOOD)
    assert_every_drop_explained(dec)
    more = get_stage("caption_quality")(max_words=5, max_chars=30, max_digit_ratio=0.2, min_alpha_ratio=0.1)
    assert reasons_of(more, ["one two three four five six", "incomprehensibilities notwithstanding",
                             "model 12345 67890 abc"]) == [
        "caption_too_many_words", "caption_too_long", "caption_high_digit_ratio"]
    low = get_stage("caption_quality")(min_lang_conf=0.99)
    assert reasons_of(low, ["a dog on a beach"]) == ["lang_low_confidence"]


def test_first_failing_check_in_documented_order_and_single_stages():
    # Fails mojibake (check 2) and repetition (check 5): the earlier one is recorded.
    caps = ["Ã© Ã© Ã© Ã© Ã© word", "dog dog dog dog dog cat"] + GOOD
    assert reasons_of(get_stage("caption_quality")(), caps)[0] == "caption_mojibake"
    assert reasons_of(get_stage("caption_repetition")(), caps)[:2] == ["caption_top_word_ratio", "caption_top_word_ratio"]
    assert reasons_of(get_stage("caption_mojibake")(), caps)[:2] == ["caption_mojibake", None]
    # A single-check stage equals the composite restricted to that check.
    for check in CHECKS:
        single = get_stage(f"caption_{check}")()
        comp = get_stage("caption_quality")(checks=[check])
        caps2 = caps + ["Stock Photo 1234", "http://x.org", "x" * 90]
        assert decide(single, caps2).equals(decide(comp, caps2))
        assert set(single.params()) >= {"checks", "column"}
    with pytest.raises(UsageError):
        get_stage("caption_quality")(checks=["nope"])
    with pytest.raises(UsageError):
        get_stage("caption_length")(checks=["language"])


def random_captions(n: int, seed: int = 0) -> list[str | None]:
    rng = random.Random(seed)
    vocab = ["dog", "cat", "the", "a", "beach", "Sunset", "photo", "stock", "image", "free", "123", "2019",
             "café", "Ã©", "â€™", "!!!", "www.site.com", "<br>", "IMG_0001.jpg", "zzzzzzzzzzzz", "犬", "собака",
             "Hund", "und", "le", "chien", "&amp;", "a@b.co", "...", "—", "\n", "\t", "\u3000"]
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 2, 3, 5, 8, 12, 40])
        out.append(" ".join(rng.choice(vocab) for _ in range(k)) if rng.random() > 0.02 else None)
    return out


def test_distinct_evaluation_equals_row_evaluation():
    caps = random_captions(1500, seed=1)
    caps = caps + caps[:700]  # heavy repetition
    st = get_stage("caption_quality")()
    dec = decide(st, caps)
    assert_every_drop_explained(dec)
    assert dec.height == len(caps) and dec["uid"].to_list() == [f"{i:032x}" for i in range(len(caps))]
    # Identical captions get identical decisions, and evaluating one caption alone gives the same.
    by_caption = {}
    for cap, row in zip(caps, dec.drop("uid").iter_rows()):
        by_caption.setdefault(cap, set()).add(row)
    assert all(len(v) == 1 for v in by_caption.values())
    rng = random.Random(2)
    for cap in rng.sample(caps, 40):
        alone = decide(st, [cap]).drop("uid").row(0)
        assert alone in by_caption[cap]
    assert len({r for r in dec["reason"].to_list()}) > 8


def test_precomputed_language_columns_are_used():
    caps = GOOD + ["Ein schöner Hund läuft am Strand entlang"]
    lid = identify(pl.Series(caps))
    st = get_stage("caption_language")()
    assert decide(st, caps).equals(decide(st, caps, **{c: lid[c].to_list() for c in lid.columns}))
    forced = decide(st, caps, lang=["de"] * len(caps), lang_conf=[0.9] * len(caps))
    assert forced["reason"].to_list() == ["lang_not_allowed"] * len(caps)
    assert decide(get_stage("caption_language")(langs=["en", "de"], min_lang_conf=0.0), caps)["keep"].all()


# ---- measures against plain Python -----------------------------------------------------------------


def py_longest_run(s: str) -> int:
    best = 0
    for ch, grp in itertools.groupby(s):
        if not ch.isspace():
            best = max(best, sum(1 for _ in grp))
    return best


def test_longest_char_run_matches_python():
    rng = random.Random(3)
    alphabet = ["a", "b", "!", " ", "\u3000", "é", "e\u0301", "😀", "犬", "\n"]
    texts = ["", "a", "aa", "  ", "ab", "😀😀😀", "a a a", "aaa   bbbb"] + [
        "".join(rng.choice(alphabet) * rng.choice([1, 1, 2, 5, 12]) for _ in range(rng.randint(0, 12)))
        for _ in range(3000)]
    got = longest_char_run(pl.Series(texts), chunk=257)
    assert got.tolist() == [py_longest_run(t) for t in texts]


def test_repetition_ratios_match_python():
    import re

    caps = [c for c in random_captions(2000, seed=4) if c is not None]
    st = get_stage("caption_repetition")(max_char_run=None, max_dup_ngram_frac=None, max_top_word_ratio=0.0)
    dec = decide(st, caps)
    for cap, value, reason in zip(caps, dec["value"].to_list(), dec["reason"].to_list()):
        words = re.findall(r"[^\W_]+", cap.lower())
        if len(words) < 4:
            assert reason is None
            continue
        assert value == pytest.approx(Counter(words).most_common(1)[0][1] / len(words))
    st = get_stage("caption_repetition")(max_char_run=None, max_top_word_ratio=None, max_dup_ngram_frac=0.0)
    dec = decide(st, caps)
    for cap, value, reason in zip(caps, dec["value"].to_list(), dec["reason"].to_list()):
        words = re.findall(r"[^\W_]+", cap.lower())
        grams = Counter(tuple(words[i:i + 3]) for i in range(len(words) - 2))
        frac = sum(c for c in grams.values() if c > 1) / sum(grams.values()) if len(words) >= 4 else 0.0
        if frac > 0:
            assert reason == "caption_dup_ngram_frac" and value == pytest.approx(frac)
        else:
            assert reason is None


def test_token_overflow_matches_open_clip_tokenizer():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    rng = random.Random(5)
    words = ["photo", "of", "a", "Ünïcödé", "dog", "über", "naïve", "犬の写真", "😀", "co-operate", "&amp;", "x" * 30]
    caps = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(600)]
    caps += ["a" * 75, "a " * 37 + "a", "é" * 76, "word " * 75]
    st = get_stage("caption_tokens")(processes=1)
    dec = decide(st, caps)
    for cap, reason, value in zip(caps, dec["reason"].to_list(), dec["value"].to_list()):
        n = len(tok.encode(cap)) + 2
        assert (reason == "caption_token_overflow") == (n > 77), cap
        if reason:
            assert value == n
    assert 0 < (dec["reason"] == "caption_token_overflow").sum() < len(caps)
    # The vectorised count (pre-tokens of plain-ASCII captions, each distinct one BPE-encoded once)
    # equals the tokenizer on adversarial text: every printable ASCII character, contractions,
    # entities, special-token look-alikes, non-ASCII.
    from curate.stages.caption_quality import _token_chunk, clip_token_counts
    from curate.stages.langid import map_distinct

    chars = [chr(c) for c in range(0x20, 0x7F)] + ["é", "\t", "\n", "😀", "\u3000"]
    pieces = ["photo", "it's", "DON'T", "''s", "x" * 30, "abc123def", "!!!", "a.b.c", "co-op", "HELLO",
              "<start_of_text>", "&amp;", "99.5%", '"quoted"', "'ll've'd"]
    adv = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 120))) for _ in range(1500)]
    adv += [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(1500)]
    assert clip_token_counts(pl.Series(adv + caps), processes=1).tolist() == [len(tok.encode(c)) for c in adv + caps]
    # The parallel path (worker processes over distinct texts) counts the same.
    counts = map_distinct(pl.Series(caps), _token_chunk, "ViT-B-32", {"tokens": pl.Int64}, processes=2,
                          parallel_min=10)
    assert counts["tokens"].to_list() == [len(tok.encode(c)) for c in caps]


LANG_SAMPLES = [
    "Le café est très bon à Paris, n'est-ce pas ?", "Schöne Grüße aus München, Straße über Brücke",
    "El niño comió piñones en la montaña", "São Paulo à noite, coração e ação", "Tiếng Việt có dấu: Hà Nội, Đà Nẵng",
    "Привет, как дела? Ёлка и щука", "中文字符测试，你好世界", "日本語のテキスト、ありがとう", "한국어 텍스트 안녕하세요",
    "Ελληνικά γράμματα και λέξεις", "עברית טקסט שלום", "العربية نص تجريبي", "Æble, øl og på Ålborg", "Ça va? Œuvre, Ÿ",
    "İstanbul'da güzel bir gün, ığdır", "Zażółć gęślą jaźń", "Příliš žluťoučký kůň", "naïve coöperation résumé",
    "© 2020 ® ™ ° ± ½ ¼ « guillemets » ¿qué? ¡sí!", "“Curly quotes” and ‘single’ — dashes – and … ellipsis",
    "MÜNCHEN — DÜSSELDORF “ÖL”", "ÀÉÎÕÜ àéîõü", "Ñandú Ñoño", "ÐÞ Icelandic Ðað Þetta",
]


def test_mojibake_detects_real_mojibake_without_false_positives():
    assert "FFFD" in mojibake_pattern()
    broken = []
    for s in LANG_SAMPLES:
        for codec in ("cp1252", "latin-1"):
            b = s.encode("utf-8").decode(codec, errors="replace")
            if b != s:
                broken.append(b)
    st = get_stage("caption_mojibake")()
    clean = decide(st, LANG_SAMPLES)
    assert clean["keep"].all(), clean.filter(~pl.col("keep"))
    bad = decide(st, broken)
    missed = [c for c, k in zip(broken, bad["keep"].to_list()) if k]
    assert not missed, missed
    assert (bad["detail"].null_count() == 0) and (bad["value"] >= 1).all()


# ---- max_caption_repeats -------------------------------------------------------------------------------


def test_max_caption_repeats():
    rng = random.Random(6)
    caps = [rng.choice(["A dog", "a  DOG", "a cat", "unique %d" % i, None]) for i in range(3000)]
    uids = [f"{rng.getrandbits(128):032x}" for _ in caps]
    score = np.array([rng.random() for _ in caps])
    f = pl.DataFrame({"uid": uids, "caption": caps, "score__x": score})
    st = get_stage("max_caption_repeats")(max_repeats=5)
    assert st.scope == "global"
    dec = st.apply(StageInput(f)).decisions
    assert_every_drop_explained(dec)

    def key(c):
        return " ".join((c or "").lower().split())

    groups = {}
    for u, c, s in zip(uids, caps, score):
        groups.setdefault(key(c), []).append((u, s))
    want_keep = {u for g in groups.values() for u, _ in sorted(g)[:5]}
    assert set(dec.filter(pl.col("keep"))["uid"]) == want_keep
    rows = {r["uid"]: r for r in dec.iter_rows(named=True)}
    for g in groups.values():
        first = sorted(g)[0][0]
        for u, _ in sorted(g)[5:]:
            assert rows[u]["reason"] == "caption_repeated" and rows[u]["value"] == len(g) and rows[u]["ref_uid"] == first
    # Prefer the best-scoring images of each caption.
    st = get_stage("max_caption_repeats")(max_repeats=3, prefer_scorer="x")
    assert st.needs_scores() == ["x"]
    dec = st.apply(StageInput(f)).decisions
    want_keep = {u for g in groups.values() for u, _ in sorted(g, key=lambda t: (-t[1], t[0]))[:3]}
    assert set(dec.filter(pl.col("keep"))["uid"]) == want_keep
    # Exact grouping keeps case and spacing variants apart.
    dec = get_stage("max_caption_repeats")(max_repeats=1, normalize=False).apply(StageInput(f)).decisions
    assert dec["keep"].sum() == len({c or "" for c in caps})
    with pytest.raises(UsageError):
        get_stage("max_caption_repeats")(max_repeats=0)


def repeated_captions_frame(n=3000, seed=7):
    rng = random.Random(seed)
    caps = [rng.choice(["A dog", "a  DOG", " a dog\t", "a cat", "", None, "A Cat", "unique %d" % i]) for i in range(n)]
    uids = [f"{rng.getrandbits(120):032x}" for _ in caps]
    for i in rng.sample(range(n), n // 50):  # repeated uids
        uids[i] = uids[rng.randrange(n)]
    score = [None if rng.random() < 0.05 else float("nan") if rng.random() < 0.05 else rng.randrange(5) / 4
             for _ in caps]
    return pl.DataFrame({"uid": uids, "caption": caps, "score__x": score, "shard_id": [0] * n,
                         "row_idx": list(range(n))})


REPEAT_CONFIGS = [dict(max_repeats=5), dict(max_repeats=1, normalize=False), dict(max_repeats=3, prefer_scorer="x")]


@pytest.mark.parametrize("cfg", REPEAT_CONFIGS)
def test_max_caption_repeats_condensed_batches_and_uid_ranks(cfg):
    f = repeated_captions_frame()
    st = get_stage("max_caption_repeats")(**cfg)
    assert st.needs_columns() == ["caption"]
    want = st.apply(StageInput(f))
    assert (~want.decisions["keep"]).sum() > 0
    assert pl.concat([st.condense(f.slice(i, 1)) for i in range(40)]).equals(st.condense(f.head(40)))
    for size in (7, 500, len(f)):
        parts = [st.condense(f.slice(s, size)) for s in range(0, len(f), size)]
        assert [c for c, t in parts[0].schema.items() if t == pl.Utf8] == ["uid"]
        got = st.apply(StageInput(pl.concat(parts)))
        assert got.decisions.equals(want.decisions) and got.stats == want.stats
    # UInt32 ranks of the uid strings (what the runner passes) give the same decisions.
    ranked = f.with_columns(pl.col("uid").rank("dense").cast(pl.UInt32) - 1)
    back = dict(zip(ranked["uid"].to_list(), f["uid"].to_list()))
    for frame in (ranked, pl.concat([st.condense(ranked.slice(s, 400)) for s in range(0, len(f), 400)])):
        got = st.apply(StageInput(frame)).decisions
        assert got["uid"].dtype == got["ref_uid"].dtype == pl.UInt32
        got = got.with_columns(pl.col("uid").replace_strict(back, return_dtype=pl.Utf8),
                               pl.col("ref_uid").replace_strict(back, default=None, return_dtype=pl.Utf8))
        assert got.equals(want.decisions)


def test_caption_quality_needs_columns():
    assert get_stage("caption_quality")().needs_columns() == ["caption", "lang", "lang_conf"]
    assert get_stage("caption_quality")(lid_model="m.bin").needs_columns() == ["caption"]
    assert get_stage("caption_length")(column="alt").needs_columns() == ["alt"]
