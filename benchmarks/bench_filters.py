"""Filter path end to end (the real runner, manifest writes included) vs DataComp's per-row pandas
approach to the same rules, measured in the same run.

    .venv/bin/python benchmarks/bench_filters.py --rows 2000000            # realistic caption repetition
    .venv/bin/python benchmarks/bench_filters.py --rows 2000000 --unique   # every caption distinct

Setup (timed apart, not counted): a DataComp-layout pool is generated in memory (uid, url, text,
original_width, original_height, sha256, clip_b32/l14_similarity_score), written as parquet files
of 100k rows (what the baseline reads, as DataComp's tooling reads its metadata files), and loaded
into a fresh workspace: `samples` (as `curate ingest` lays out a DataComp pool, one insert per
65,536 rows) and `scores` (datacomp-b32, datacomp-l14).

ours: `curate.executors.local.run_pipeline` on the recipe

    [[stages]] stage = "basic"
    [[stages]] stage = "caption_quality"          # defaults: every check, language conf >= 0.5
    [[stages]] stage = "clip_score"  scorer = "datacomp-l14"  fraction = 0.3  apply_to = "pool"

inside `Manifest.run` exactly as `curate prune` runs it: the pool's spine from DuckDB, every
stage, every decision row and stage_stats row written (committed chunk by chunk). Each run starts
like a fresh `curate prune` (no remembered languages, no worker processes, no loaded models).
The wall time is split (by timing the runner's own functions) into load_pool (the spine), global
stages' input frames (`stage_frame`), the runner's checks of each stage's decisions
(`_check_decisions`), decision writes (`_record_decisions`), the rest (the stages' own work, the
row stages' streamed reads, funnel counts) and the `runs` row.
CPU seconds are this process's plus its worker processes'.

baseline: DataComp's own approach to the same rules, one worker process per core, each handling
whole parquet files as DataComp's `apply_filter.py` does: `pd.read_parquet`, `df.text.apply(...)`
per row for language, word and character counts, per-row Python for every caption heuristic and
the tokenizer, numpy for sizes; then the pool-wide top-30% L/14 threshold
`-np.sort(-x)[int(N * 0.3)]`, the intersection, and the uid array DataComp saves
(`np.dtype("u8,u8")`, sorted). Timed from starting the pool to the saved array.

Both must keep identical uid sets after `basic` and at the end (checked; the run fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from itertools import groupby
from pathlib import Path

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
        "sha256": [f"{u}{u[::-1]}" for u in uid],
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


def _baseline_file(path: str):
    """Steps 1-2 on one metadata file, per row (DataComp's load_uids_with_basic_filter_helper style)."""
    import pandas as pd

    from curate.stages.caption_quality import DEFAULT_PLACEHOLDERS, DEFAULT_STOCK_PHRASES, STOCK_FILLER

    t0 = time.perf_counter()
    df = pd.read_parquet(path, columns=["uid", "text", "original_width", "original_height",
                                        "clip_l14_similarity_score"])
    lang = df.text.apply(lambda x: _py_lang(x)[0])
    n_words = df.text.apply(lambda x: len(x.split()))
    n_chars = df.text.apply(len)
    small = np.minimum(df.original_width, df.original_height)
    large = np.maximum(df.original_width, df.original_height)
    basic = (lang == "en") & (n_words > 2) & (n_chars > 5) & (small >= 200) & (large / small <= 3.0)
    scored = df[["uid", "clip_l14_similarity_score"]]
    df = df[basic]
    t1 = time.perf_counter()

    def alt(ps):
        return r"(?i)(?:^|[^\w])(" + "|".join(re.escape(p) for p in sorted(ps, key=len, reverse=True)) + r")(?:$|[^\w])"

    placeholders = frozenset(" ".join("".join(c if c.isalpha() else " " for c in p.lower()).split())
                             for p in DEFAULT_PLACEHOLDERS)
    stock, strip = re.compile(alt(DEFAULT_STOCK_PHRASES)), re.compile(alt(DEFAULT_STOCK_PHRASES + STOCK_FILLER))
    ok = df.text.apply(lambda x: _py_caption_ok(x, placeholders, stock, strip))
    t2 = time.perf_counter()
    return df.uid.values[ok.values], df.uid.values, scored, t1 - t0, t2 - t1


def run_baseline(files: list[str], workers: int, out_dir: Path):
    import pandas as pd

    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_baseline_init) as pool:
        res = pool.map(_baseline_file, files, chunksize=1)
    caption_kept = np.concatenate([r[0] for r in res])
    basic_uids = np.concatenate([r[1] for r in res])
    scored = pd.concat([r[2] for r in res], ignore_index=True)
    # clip_score over the whole pool (DataComp's get_threshold), then the intersection.
    key = "clip_l14_similarity_score"
    x = scored[key].values
    threshold = -np.sort(-x)[int(len(x) * 0.3)]
    clip_uids = scored.uid.values[x >= threshold]
    final = np.intersect1d(caption_kept, clip_uids)
    # The uid file DataComp's tooling writes.
    arr = np.array([divmod(int(u, 16), 2**64) for u in final], np.dtype("u8,u8"))
    arr.sort()
    np.save(out_dir / "baseline_uids.npy", arr)
    total = time.perf_counter() - t0
    return {"seconds": total, "worker_basic_s": sum(r[3] for r in res),
            "worker_caption_s": sum(r[4] for r in res), "basic": set(basic_uids.tolist()),
            "final": set(final.tolist()), "threshold": float(threshold)}


# ---- ours: the real runner ---------------------------------------------------------------------------

RECIPE = """
name = "bench_filters"
seed = 0

[[stages]]
stage = "basic"

[[stages]]
stage = "caption_quality"

[[stages]]
stage = "clip_score"
scorer = "datacomp-l14"
fraction = 0.3
apply_to = "pool"
"""

SHARD_ROWS = 100_000


def write_parquet_files(pdf, out_dir: Path) -> list[str]:
    """The pool as DataComp metadata files (what the baseline reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for i, start in enumerate(range(0, len(pdf), SHARD_ROWS)):
        path = out_dir / f"{i:08d}.parquet"
        pq.write_table(pa.Table.from_pandas(pdf.iloc[start:start + SHARD_ROWS], preserve_index=False), path)
        files.append(str(path))
    return files


def build_workspace(pdf, root: Path):
    """A workspace holding the pool as `curate ingest` records a DataComp pool: samples + scores."""
    import polars as pl

    from curate.manifest import Manifest
    from curate.workspace import Workspace

    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    m = Manifest(ws.manifest_path)
    df = pl.from_pandas(pdf)
    n = df.height
    samples = df.select(
        pl.col("uid"), (pl.int_range(n, dtype=pl.Int64) // SHARD_ROWS).alias("shard_id"),
        (pl.int_range(n, dtype=pl.Int64) % SHARD_ROWS).cast(pl.Utf8).alias("key"),
        (pl.int_range(n, dtype=pl.Int64) % SHARD_ROWS).alias("row_idx"), pl.col("url"),
        pl.col("text").alias("caption"), pl.col("original_width").cast(pl.Int32).alias("width"),
        pl.col("original_height").cast(pl.Int32).alias("height"), pl.col("sha256"),
        pl.lit("datacomp").alias("source"), pl.lit(None, pl.Utf8).alias("image_ext"),
        pl.lit(None, pl.Int64).alias("image_bytes"), pl.lit(None, pl.Utf8).alias("members"),
        pl.lit(None, pl.Int64).alias("tar_offset"), pl.lit(None, pl.Int64).alias("tar_end"),
        pl.lit("ok").alias("status"))
    with m.transaction():
        for start in range(0, n, 65536):
            part = samples.slice(start, 65536)
            m.insert_arrow("samples", part.to_arrow())
            for col, scorer in (("clip_b32_similarity_score", "datacomp-b32"),
                                ("clip_l14_similarity_score", "datacomp-l14")):
                m.insert_arrow("scores", df.slice(start, 65536).select(
                    pl.lit(scorer).alias("scorer"), "uid", pl.col(col).cast(pl.Float32).alias("score")).to_arrow())
    m.execute("CHECKPOINT")
    return ws, m


class _Timer:
    """Wall time spent inside wrapped callables (instrumentation only: the real functions run)."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.calls.setdefault(name, []).append(time.perf_counter() - t)
        return timed

    def total(self, name: str) -> float:
        return sum(self.calls.get(name, []))


def _cpu() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_ours(ws, m, profile: str | None = None):
    import curate.executors.local as local
    from curate.recipes import parse_recipe
    from curate.stages import caption_quality, langid

    recipe = parse_recipe(RECIPE, "bench_filters.toml")
    # Every run starts as a fresh `curate prune` would: no remembered languages, no worker
    # processes, no loaded models (imports stay done).
    langid.clear_memo()
    langid._shutdown_pool()
    langid._model.cache_clear()
    caption_quality._bpe.cache_clear()
    timer = _Timer()
    wrapped = {"load_pool": (local, "load_pool"), "stage_frames": (local, "stage_frame"),
               "checks": (local, "_check_decisions"), "decision_writes": (local, "_record_decisions")}
    originals = {k: getattr(obj, attr) for k, (obj, attr) in wrapped.items()}
    for k, (obj, attr) in wrapped.items():
        setattr(obj, attr, timer.wrap(k, originals[k]))
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    try:
        cpu0 = _cpu()
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        with m.run("prune", {"recipe": recipe.as_dict(), "bench": True}, seed=recipe.seed) as rec:
            timer.calls.clear()
            t1 = time.perf_counter()
            summary = local.run_pipeline(ws, m, recipe, rec.run_id)
            t2 = time.perf_counter()
            inside = {k: list(v) for k, v in timer.calls.items()}
            t3 = time.perf_counter()
            rec.summary = summary
        total = time.perf_counter() - t0
        if prof:
            prof.disable()
        langid._shutdown_pool()  # so that the workers' CPU time is counted (after the wall time)
        cpu = _cpu() - cpu0
        if prof:
            prof.dump_stats(profile)
    finally:
        for k, (obj, attr) in wrapped.items():
            if obj is local:
                setattr(obj, attr, originals[k])
            else:
                delattr(obj, attr)  # back to the class's method
    run_id = rec.run_id
    last = len(recipe.stages) - 1
    final = {r[0] for r in m.execute("SELECT uid FROM decisions WHERE run_id = ? AND stage_idx = ? AND keep",
                                     [run_id, last]).fetchall()}
    basic = {r[0] for r in m.execute("SELECT uid FROM decisions WHERE run_id = ? AND stage_idx = 0 AND keep",
                                     [run_id]).fetchall()}
    n_dec = m.scalar("SELECT count(*) FROM decisions WHERE run_id = ?", [run_id])
    steps = {"load_pool": sum(inside.get("load_pool", []))}  # the spine: uid ranks, positions, scores
    # Global stages' inputs (columns streamed from the manifest and condensed); row stages stream
    # theirs inside the stage step.
    steps["stage_frames"] = sum(inside.get("stage_frames", []))
    steps["runner_checks"] = sum(inside.get("checks", []))  # _check_decisions on every stage's output
    steps["decision_writes"] = sum(inside.get("decision_writes", []))  # committed chunk by chunk
    # The stages' own work (apply over their partitions), row-stage streaming and funnel counts.
    steps["stages_and_streaming"] = (t2 - t1) - sum(steps.values())
    steps["finish"] = t3 - t2
    steps["run_rows"] = total - (t3 - t1)  # the `runs` row before and after
    return {"seconds": total, "cpu_s": cpu, "steps": steps, "basic": basic, "final": final, "decision_rows": n_dec,
            "funnel": [(f["stage"], f["in"], f["kept"], f["seconds"]) for f in summary["funnel"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--unique", action="store_true", help="every caption distinct (no repetition)")
    ap.add_argument("--workers", type=int, default=None, help="baseline process pool size (default: cores)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of ours (fresh run ids, same workspace)")
    ap.add_argument("--profile", default=None, help="write a cProfile of ours (first run) here")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("CURATE_NO_PROGRESS", "1")
    from curate.stages.langid import available_cores

    workers = args.workers or available_cores()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_filters_"))
    if work.exists() and args.dir:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        pdf = make_pool(args.rows, args.unique)
        gen_s = time.perf_counter() - t
        distinct = pdf.text.nunique()
        t = time.perf_counter()
        (work / "pool").mkdir()
        files = write_parquet_files(pdf, work / "pool")
        ws, m = build_workspace(pdf, work / "ws")
        setup_s = time.perf_counter() - t
        del pdf
        runs = [run_ours(ws, m, args.profile if i == 0 else None) for i in range(args.repeat)]
        ours = min(runs, key=lambda r: r["seconds"])
        for r in runs:
            assert r["final"] == ours["final"]
        out = {"rows": args.rows, "unique": args.unique, "distinct_captions": int(distinct),
               "generate_s": round(gen_s, 1), "setup_s": round(setup_s, 1), "cores": available_cores(),
               "load_avg_1m_before": round(os.getloadavg()[0], 1),
               "ours_s": round(ours["seconds"], 2), "ours_samples_per_s": round(args.rows / ours["seconds"]),
               "ours_all_runs_s": [round(r["seconds"], 2) for r in runs],
               "ours_cpu_s": round(ours["cpu_s"], 2),
               "ours_steps_s": {k: round(v, 2) for k, v in ours["steps"].items()},
               "ours_decision_rows": ours["decision_rows"], "ours_funnel": ours["funnel"],
               "ours_basic_kept": len(ours["basic"]), "ours_final_kept": len(ours["final"])}
        if not args.skip_baseline:
            base = run_baseline(files, workers, work)
            out.update({
                "load_avg_1m_after": round(os.getloadavg()[0], 1),
                "baseline_s": round(base["seconds"], 2),
                "baseline_samples_per_s": round(args.rows / base["seconds"]),
                "baseline_workers": workers,
                "baseline_cpu_s": {"basic": round(base["worker_basic_s"], 1),
                                   "caption": round(base["worker_caption_s"], 1)},
                "speedup": round(base["seconds"] / ours["seconds"], 2),
                "basic_kept_sets_equal": base["basic"] == ours["basic"],
                "final_kept_sets_equal": base["final"] == ours["final"],
                "final_only_ours": len(ours["final"] - base["final"]),
                "final_only_baseline": len(base["final"] - ours["final"]),
                "baseline_final_kept": len(base["final"]),
            })
        m.close()
        if args.json:
            print(json.dumps(out))
        else:
            for k, v in out.items():
                print(f"{k:>26}: {v}")
        if not args.skip_baseline and not (out["basic_kept_sets_equal"] and out["final_kept_sets_equal"]):
            sys.exit("kept sets differ between ours and the baseline")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
