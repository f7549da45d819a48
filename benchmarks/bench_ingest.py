"""Ingest of a DataComp-layout metadata pool: wall time and peak resident memory.

Generates N rows (default 1,000,000) as DataComp lays them out (`<stem>.parquet` + `<stem>.npz`
with b32_img/b32_txt 512-d and l14_img/l14_txt 768-d fp16, uncompressed like DataComp's), then
runs `curate ingest` in a subprocess and reads its peak RSS. As a baseline in the same run it
measures the naive approach (read every parquet and np.load every npz array into memory).

    python benchmarks/bench_ingest.py --rows 1000000 --shard-rows 100000 --out benchmarks/out/ingest

Target (issue #2): 1M rows ingest with peak memory under 1.5 GB.

`--layout wds` ingests webdataset tars made by `curate synth` instead (`--compressed`: .tar.gz).
`--baseline DIR` also times the curate package of another checkout (e.g. a `git worktree` of an
older commit) on the same pool in the same run, for a ratio that the machine's noise does not
decide.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq



def write_datacomp_npz(stem, rng, n: int) -> None:
    """DataComp's npz beside a parquet: b32 (512) and l14 (768) img/txt unit rows in fp16."""
    arrays = {}
    for name, d in (("b32", 512), ("l14", 768)):
        for kind in ("img", "txt"):
            e = rng.standard_normal((n, d), dtype=np.float32)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            arrays[f"{name}_{kind}"] = e.astype(np.float16)
    np.savez(str(stem) + ".npz", **arrays)

def generate(out: Path, rows: int, shard_rows: int, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        stem = out / f"{s:010d}"
        if stem.with_suffix(".npz").exists():
            continue
        hi = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        lo = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        uids = [f"{a:016x}{b:016x}" for a, b in zip(hi.tolist(), lo.tolist())]
        write_datacomp_npz(stem, rng, n)
        words = np.array(["a", "photo", "of", "red", "blue", "dog", "cat", "on", "the", "beach", "house", "car"])
        idx = rng.integers(0, len(words), (n, 6))
        text = [" ".join(r) for r in words[idx].tolist()]
        pq.write_table(pa.table({
            "uid": uids, "url": [f"http://example.test/{start + i}.jpg" for i in range(n)], "text": text,
            "original_width": rng.integers(64, 4000, n), "original_height": rng.integers(64, 4000, n),
            "sha256": [f"{h:016x}" * 4 for h in hi.tolist()],
            "clip_b32_similarity_score": rng.random(n, dtype=np.float32) * 0.4,
            "clip_l14_similarity_score": rng.random(n, dtype=np.float32) * 0.4,
            "face_bboxes": [[] for _ in range(n)],
        }), str(stem) + ".parquet")


def generate_wds(out: Path, rows: int, shard_rows: int, compressed: bool) -> None:
    if out.exists():
        return
    cmd = [sys.executable, "-m", "curate", "synth", str(out), "--layout", "wds", "--n", str(rows),
           "--shard-size", str(shard_rows), "--seed", "0", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True)
    if compressed:  # gzip each tar (level 6, as `gzip` does), keep the sidecars
        import gzip

        for tar in sorted(out.glob("*.tar")):
            with open(tar, "rb") as src, gzip.open(str(tar) + ".gz", "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tar.unlink()


def run_child(code: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


# VmHWM (peak RSS of this address space): ru_maxrss would carry the parent's peak across fork+exec.
PEAK = ("import json; hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "print(json.dumps({'peak_mb': int(hwm.split()[1]) / 1024}))")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/ingest"))
    ap.add_argument("--keep", action="store_true", help="keep the generated pool and workspace")
    ap.add_argument("--layout", choices=("datacomp", "wds"), default="datacomp")
    ap.add_argument("--compressed", action="store_true", help="wds: gzip the tars")
    ap.add_argument("--baseline", type=Path, help="a checkout whose curate to time on the same pool too")
    args = ap.parse_args()
    pool = args.out / f"pool-{args.layout}{'-gz' if args.compressed else ''}-{args.rows}"
    t0 = time.perf_counter()
    if args.layout == "wds":
        generate_wds(pool, args.rows, args.shard_rows, args.compressed)
    else:
        generate(pool, args.rows, args.shard_rows)
    gen_s = time.perf_counter() - t0
    ws = args.out / "ws"
    shutil.rmtree(ws, ignore_errors=True)

    def ingest_code(checkout: Path | None) -> str:
        path = f"sys.path.insert(0, {str(checkout.resolve())!r});" if checkout else ""
        return (f"import sys; {path} sys.argv=['curate','ingest',{str(pool)!r},'-w',{str(ws)!r},'--quiet','--json'];"
                "from curate.cli.main import main; rc=main(); assert rc==0, rc;" + PEAK)

    baseline = {}
    if args.baseline:
        base_s, base_mb = run_child(ingest_code(args.baseline))
        shutil.rmtree(ws, ignore_errors=True)
        baseline = {"baseline": str(args.baseline), "baseline_ingest_s": round(base_s, 2),
                    "baseline_peak_rss_mb": round(base_mb)}
    ingest_s, ingest_mb = run_child(ingest_code(None))
    again_s, again_mb = run_child(ingest_code(None))
    naive_code = (f"import glob, numpy as np, pyarrow.parquet as pq; keep=[];"  # DataComp layout only
                  f"[keep.append((pq.read_table(p), {{k: np.asarray(v) for k, v in np.load(p[:-8]+'.npz').items()}}))"
                  f" for p in sorted(glob.glob({str(pool)!r}+'/*.parquet'))];" + PEAK)
    naive_s, naive_mb = run_child(naive_code) if args.layout == "datacomp" else (None, None)
    import duckdb
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    n = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    nscores = con.execute("SELECT count(*) FROM scores").fetchone()[0]
    con.close()
    result = {
        "rows": args.rows, "generated_s": round(gen_s, 1), "samples_ingested": n, "scores": nscores,
        "ingest_s": round(ingest_s, 2), "ingest_rows_per_s": round(n / ingest_s),
        "ingest_peak_rss_mb": round(ingest_mb), "reingest_s": round(again_s, 2), "reingest_peak_rss_mb": round(again_mb),
        **({"naive_load_s": round(naive_s, 2), "naive_load_peak_rss_mb": round(naive_mb)} if naive_s else {}),
        "pool_bytes_mb": round(sum(f.stat().st_size for f in pool.iterdir()) / 2**20), **baseline,
    }
    if baseline:
        result["ratio_to_baseline_s"] = round(ingest_s / baseline["baseline_ingest_s"], 3)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
