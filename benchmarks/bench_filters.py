"""Filter stages vs a straightforward per-row pandas implementation, measured in the same run.

    python benchmarks/bench_filters.py --rows 2000000            # realistic caption repetition
    python benchmarks/bench_filters.py --rows 2000000 --unique   # every caption distinct

Generates a DataComp-layout metadata frame in memory (uid, url, text, original_width,
original_height, clip_b32/l14_similarity_score), then runs the same three steps both ways:

  1. DataComp `basic` (fastText lid.176 top-1 == en, > 2 words, > 5 chars, min side >= 200, aspect <= 3)
  2. caption quality (curate's `caption_quality` defaults: length, mojibake, boilerplate, charset,
     repetition, CLIP 77-token overflow, language with confidence >= 0.5)
  3. `clip_score` on ViT-L/14, top 30% of what is left (DataComp's threshold rule)

ours:     curate's stages on polars columns (distinct captions once, vectorised rules, the language
          model and tokenizer spread over every core).
baseline: DataComp's own approach: pandas `df.text.apply(...)` per row for language, word and
          character counts (per-row Python for every caption heuristic, the tokenizer on every
          caption), numpy for sizes and `-np.sort(-x)[int(N * f)]` for the threshold; rows split
          over a process pool of the same size, as DataComp's tooling does per parquet file.

Prints samples/s for each and the ratio, and how far the kept sets agree. "ours_lang_once" is the
same run with languages identified once up front and passed to both language-aware stages as
`lang`/`lang_conf` columns (what a runner can do).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import Counter
from itertools import groupby

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# ---- synthetic pool ---------------------------------------------------------------------------------

EN = ("the a of and in on with for at by from to my our your this that new old big small red blue green black "
      "white yellow dog cat car house tree beach sunset mountain lake river city street road garden flower "
      "woman man girl boy child family friends people portrait wedding party dinner food cake pizza coffee "
      "table chair room kitchen bedroom bathroom window door wall floor office desk computer phone book "
      "shoes dress shirt jacket hat bag watch ring necklace logo design pattern vector illustration photo "
      "picture image background texture wallpaper art painting drawing sketch poster card vintage modern "
      "beautiful happy cute funny young smiling walking running sitting standing playing holding wearing "
      "looking view summer winter spring autumn snow rain sky clouds sea ocean water boat ship train plane "
      "bike bicycle bus truck sale price buy best top free shipping size color black silver gold wood metal "
      "glass plastic leather cotton handmade custom gift idea ideas home decor interior exterior living").split()
OTHER = ("le la les des une est dans sur avec pour der die das und mit von ein eine ist auf el los las una con "
         "por para del il della che di per uma com não são 中文 图片 高清 日本語 写真 фото красивый дом "
         "أجمل صور 사진 예쁜").split()
BOILER = ["image", "No image available", "Untitled", "IMG_0001.jpg", "DSC01234", "photo", "Stock Photo - 123456",
          "click to enlarge", "placeholder", "logo", "thumbnail", "Image not found", "<br>", "null", "banner",
          "Product image 1", "default image", "download", "icon", "cover"]
EXTRAS = ["https://www.example.com/page", "contact@shop.com", "&amp;", "<b>new</b>", "Ã©", "â€™", "!!!!!!!!!!!!",
          "2019-05-12", "#1234567", "…", "—", "(c) 2020"]


def _caption(rng: np.random.Generator) -> str:
    r = rng.random()
    k = int(np.clip(rng.lognormal(2.1, 0.6), 1, 120 if r < 0.03 else 40))
    pool = OTHER if rng.random() < 0.12 else EN
    words = [pool[i] for i in rng.integers(0, len(pool), k)]
    if rng.random() < 0.06:
        words.insert(int(rng.integers(0, len(words) + 1)), EXTRAS[int(rng.integers(0, len(EXTRAS)))])
    if rng.random() < 0.02:
        words = words[:2] * 4
    s = " ".join(words)
    return s.capitalize() if rng.random() < 0.5 else s


def make_pool(n: int, unique: bool, seed: int = 0):
    """A DataComp-layout pandas frame; with repetition, ~45% of rows reuse a caption."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    if unique:
        seen: set = set()
        caps = []
        while len(caps) < n:
            c = _caption(rng)
            if c in seen:
                c = f"{c} {len(caps)}"
            seen.add(c)
            caps.append(c)
    else:
        n_unique = int(n * 0.55)
        common = [_caption(rng) for _ in range(50_000)]
        caps = [_caption(rng) for _ in range(n_unique)]
        # Zipf-distributed reuse of common captions and of a handful of boilerplate ones.
        n_common = int(n * 0.35)
        idx = np.minimum(rng.zipf(1.3, n_common) - 1, len(common) - 1)
        caps += [common[i] for i in idx]
        idx = np.minimum(rng.zipf(1.5, n - len(caps)) - 1, len(BOILER) - 1)
        caps += [BOILER[i] for i in idx]
        caps = [caps[i] for i in rng.permutation(n)]
    w = np.maximum(1, rng.lognormal(6.2, 0.6, n)).astype(np.int64)
    h = np.maximum(1, (w * rng.choice([0.3, 0.5, 0.66, 0.75, 1.0, 1.33, 1.5, 2.0, 4.0], n))).astype(np.int64)
    uid = [f"{x:032x}" for x in (rng.integers(0, 2**63, n, dtype=np.int64).astype(object) * (2**65) +
                                   rng.integers(0, 2**63, n, dtype=np.int64).astype(object))]
    return pd.DataFrame({
        "uid": uid, "url": [f"http://img.example/{i}.jpg" for i in range(n)], "text": caps,
        "original_width": w, "original_height": h,
        "clip_b32_similarity_score": rng.normal(0.31, 0.045, n).astype(np.float32),
        "clip_l14_similarity_score": rng.normal(0.27, 0.05, n).astype(np.float32),
    })


# ---- baseline: per-row pandas, DataComp style --------------------------------------------------------

_B: dict = {}


def _baseline_init():
    import fasttext
    import open_clip

    from curate.stages.langid import default_model_path

    _B["lid"] = fasttext.load_model(default_model_path())
    _B["tok"] = open_clip.get_tokenizer("ViT-B-32")


FILENAME_PY = re.compile(
    r"(?i)^\s*(?:[^/\\<>|]*\.(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|svg|avif|ico)"
    r"|(?:img|dsc|dscn|dscf|dcim|pxl|pict|mvimg|wp|gopr|sam|photo|image|screenshot|scan)[ _-]?\d{3,}[\w-]*"
    r"|[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}|[0-9a-f]{16,})\s*$")
URL_PY = re.compile(r"(?i)(?:\b(?:https?|ftp)://\S+|\bwww\.[a-z0-9-]+\.\S+|^\s*[a-z0-9-]+(?:\.[a-z0-9-]+)*\."
                    r"(?:com|net|org|io|co|info|biz|ru|de|uk|fr|jp|cn|nl|it|es|pl|br|in|au)(?:/\S*)?\s*$)")
EMAIL_PY = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
HTML_PY = re.compile(r"<\s*/?\s*[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?\s*>|&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z]{2,8});")
_CONT = "".join(sorted({chr(b) for b in range(0x80, 0xC0)} |
                       {bytes([b]).decode("cp1252", errors="ignore") for b in range(0x80, 0xC0)} - {""}))
MOJI_PY = re.compile("[\u00c2-\u00df][" + re.escape(_CONT) + "]|[\u00e0-\u00ef][" + re.escape(_CONT) + "]{2}|\u00e2\u20ac|\ufffd")


def _py_lang(text: str) -> tuple[str, float]:
    labels, probs = _B["lid"].predict(text.replace("\n", " "))
    return labels[0].split("__label__")[1], float(probs[0])


def _py_caption_ok(text: str, placeholders: frozenset, stock: re.Pattern, strip: re.Pattern) -> bool:
    words = text.split()
    if len(words) < 2 or len(text) < 5:
        return False
    if MOJI_PY.search(text):
        return False
    if FILENAME_PY.search(text) or URL_PY.search(text) or EMAIL_PY.search(text) or HTML_PY.search(text):
        return False
    if " ".join("".join(c if c.isalpha() else " " for c in text.lower()).split()) in placeholders:
        return False
    if stock.search(text):
        rest = text.lower()
        for _ in range(3):
            rest = strip.sub(" ", rest)
        if len("".join(c if c.isalpha() else " " for c in rest).split()) < 2:
            return False
    nonspace = sum(1 for c in text if not c.isspace())
    if nonspace == 0 or sum(c.isalpha() for c in text) / nonspace < 0.5 or sum(c.isdigit() for c in text) / nonspace > 0.5:
        return False
    if max((len(list(g)) for ch, g in groupby(text) if not ch.isspace()), default=0) > 10:
        return False
    toks = re.findall(r"[^\W_]+", text.lower())
    if len(toks) >= 4:
        if Counter(toks).most_common(1)[0][1] / len(toks) > 0.5:
            return False
        grams = Counter(tuple(toks[i:i + 3]) for i in range(len(toks) - 2))
        if grams and sum(c for c in grams.values() if c > 1) / sum(grams.values()) > 0.5:
            return False
    if len(_B["tok"].encode(text)) + 2 > 77:
        return False
    lang, conf = _py_lang(text)
    return lang == "en" and conf >= 0.5


def _baseline_shard(df):
    """Steps 1-2 on one shard, per row (DataComp's load_uids_with_basic_filter_helper style)."""
    from curate.stages.caption_quality import DEFAULT_PLACEHOLDERS, DEFAULT_STOCK_PHRASES, STOCK_FILLER

    t0 = time.perf_counter()
    lang = df.text.apply(lambda x: _py_lang(x)[0])
    n_words = df.text.apply(lambda x: len(x.split()))
    n_chars = df.text.apply(len)
    small = np.minimum(df.original_width, df.original_height)
    large = np.maximum(df.original_width, df.original_height)
    basic = (lang == "en") & (n_words > 2) & (n_chars > 5) & (small >= 200) & (large / small <= 3.0)
    df = df[basic]
    t1 = time.perf_counter()

    def alt(ps):
        return r"(?i)(?:^|[^\w])(" + "|".join(re.escape(p) for p in sorted(ps, key=len, reverse=True)) + r")(?:$|[^\w])"

    placeholders = frozenset(" ".join("".join(c if c.isalpha() else " " for c in p.lower()).split())
                             for p in DEFAULT_PLACEHOLDERS)
    stock, strip = re.compile(alt(DEFAULT_STOCK_PHRASES)), re.compile(alt(DEFAULT_STOCK_PHRASES + STOCK_FILLER))
    ok = df.text.apply(lambda x: _py_caption_ok(x, placeholders, stock, strip))
    t2 = time.perf_counter()
    return df[ok][["uid", "clip_l14_similarity_score"]], df.uid.values, t1 - t0, t2 - t1


def run_baseline(pdf, workers: int):
    t0 = time.perf_counter()
    shards = np.array_split(np.arange(len(pdf)), workers)
    parts = [pdf.iloc[s][["uid", "text", "original_width", "original_height", "clip_l14_similarity_score"]]
             for s in shards]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_baseline_init) as pool:
        t_start = time.perf_counter()
        res = pool.map(_baseline_shard, parts)
    import pandas as pd

    kept = pd.concat([r[0] for r in res])
    basic_uids = np.concatenate([r[1] for r in res])
    t_pool = time.perf_counter() - t_start
    key = "clip_l14_similarity_score"
    n = int(len(kept) * 0.3)
    threshold = -np.sort(-kept[key].values)[n]
    final = kept[kept[key] >= threshold].uid.values
    total = time.perf_counter() - t0
    return {"seconds": total, "pool_seconds": t_pool, "worker_basic_s": sum(r[2] for r in res),
            "worker_caption_s": sum(r[3] for r in res), "basic": set(basic_uids), "final": set(final),
            "threshold": float(threshold)}


# ---- ours ------------------------------------------------------------------------------------------


def run_ours(pdf, lang_once: bool = False):
    """The three stages in sequence. lang_once: identify languages once up front and hand the stages
    `lang`/`lang_conf` columns, as a runner can (else `basic` and `caption_quality` each identify)."""
    import polars as pl

    from curate.stages import StageInput, get_stage
    from curate.stages.langid import identify

    t0 = time.perf_counter()
    # What the runner hands a stage (its column names); not timed as stage work.
    frame = pl.from_pandas(pdf[["uid", "text", "original_width", "original_height", "clip_l14_similarity_score"]])
    frame = frame.rename({"text": "caption", "original_width": "width", "original_height": "height",
                          "clip_l14_similarity_score": "score__datacomp-l14"})
    t_conv = time.perf_counter() - t0
    times = {}
    if lang_once:
        t = time.perf_counter()
        frame = frame.with_columns(identify(frame["caption"]))
        times["language_id"] = time.perf_counter() - t
    basic_kept = None
    for name, kw in [("basic", {}), ("caption_quality", {}),
                     ("clip_score", {"scorer": "datacomp-l14", "fraction": 0.3})]:
        t = time.perf_counter()
        res = get_stage(name)(**kw).apply(StageInput(frame))
        # TODO(runner): the runner records res.decisions / res.stats in the manifest here
        # (decisions + stage_stats tables); this benchmark measures the stages alone.
        frame = frame.filter(res.decisions["keep"])
        times[name] = time.perf_counter() - t
        if name == "basic":
            basic_kept = set(frame["uid"].to_list())
    return {"seconds": sum(times.values()), "convert_s": t_conv, "stage_s": times, "basic": basic_kept,
            "final": set(frame["uid"].to_list()), "threshold": res.stats["threshold"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--unique", action="store_true", help="every caption distinct (no repetition)")
    ap.add_argument("--workers", type=int, default=None, help="baseline process pool size (default: cores)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("CURATE_NO_PROGRESS", "1")
    from curate.stages.langid import available_cores

    workers = args.workers or available_cores()
    t = time.perf_counter()
    pdf = make_pool(args.rows, args.unique)
    gen_s = time.perf_counter() - t
    distinct = pdf.text.nunique()
    # One-time import of open_clip/torch for the tokenizer, reported apart from both of our runs
    # (the baseline's workers import it inside their timed pool).
    t = time.perf_counter()
    from curate.stages.caption_quality import _tokenizer

    _tokenizer("ViT-B-32")
    import_s = time.perf_counter() - t
    ours = run_ours(pdf)
    once = run_ours(pdf, lang_once=True)
    assert once["final"] == ours["final"]
    out = {"rows": args.rows, "distinct_captions": int(distinct), "generate_s": round(gen_s, 1),
           "cores": available_cores(), "load_avg_1m": round(os.getloadavg()[0], 1),
           "tokenizer_import_s": round(import_s, 1),
           "ours_s": round(ours["seconds"], 2), "ours_samples_per_s": round(args.rows / ours["seconds"]),
           "ours_stage_s": {k: round(v, 2) for k, v in ours["stage_s"].items()},
           "ours_lang_once_s": round(once["seconds"], 2),
           "ours_lang_once_samples_per_s": round(args.rows / once["seconds"]),
           "ours_lang_once_stage_s": {k: round(v, 2) for k, v in once["stage_s"].items()},
           "ours_basic_kept": len(ours["basic"]), "ours_final_kept": len(ours["final"])}
    if not args.skip_baseline:
        base = run_baseline(pdf, workers)
        inter = len(base["final"] & ours["final"])
        union = len(base["final"] | ours["final"]) or 1
        out.update({
            "baseline_s": round(base["seconds"], 2), "baseline_samples_per_s": round(args.rows / base["seconds"]),
            "baseline_workers": workers, "baseline_cpu_s": {"basic": round(base["worker_basic_s"], 1),
                                                            "caption": round(base["worker_caption_s"], 1)},
            "speedup": round(base["seconds"] / ours["seconds"], 1),
            "basic_kept_sets_equal": base["basic"] == ours["basic"],
            "final_kept_jaccard": round(inter / union, 5), "baseline_final_kept": len(base["final"]),
        })
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
