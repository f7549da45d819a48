"""`curate prune` end to end at scale: wall time and peak resident memory of the real command.

    .venv/bin/python benchmarks/bench_prune_cli.py --rows 2000000 --dims 16,512 --k 2000 --fresh
    .venv/bin/python benchmarks/bench_prune_cli.py --rows 10000000 --dims 16,512 --k 5000 --fresh

Synthesises a DataComp-layout pool (parquet + npz; the L/14 embedding size is the second of
--dims), ingests it, then runs `curate prune` in a subprocess with each recipe:

    cluster_semdedup_dbp   exact dedup off: SemDeDup (eps 0.07) then DBP to half of what remains,
                           both on the L/14 image embeddings with k clusters (issue #5's scale
                           target: clustering + SemDeDup + DBP)
    dbp                    the shipped pipelines/dbp.toml (decode failures, DataComp basic, exact
                           dedup, SemDeDup, DBP), with k clusters

Peak RSS is the prune process's `ru_maxrss` (RUSAGE_CHILDREN after it exits: the largest single
process, i.e. the prune itself; its fastText workers are smaller). It counts DuckDB's buffer
pool, which a prune holds to CURATE_DUCKDB_WORKING_MEMORY (default 128MB). Each recipe runs twice: the first run
computes the pool clustering and SemDeDup's similarities, the second (`rerun`) finds them in the
workspace cache, as a rerun with a new eps or budget does. Pools and workspaces are kept under
--root so later invocations reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURATE = [sys.executable, "-m", "curate"]

SEMDEDUP_DBP = """name = "cluster_semdedup_dbp"
seed = 0
[[stages]]
stage = "semdedup"
scorer = "datacomp-l14"
eps = 0.07
k = {k}
[[stages]]
stage = "dbp"
scorer = "datacomp-l14"
k = {k}
"""


def measure(args: list, env: dict | None = None) -> tuple[float, float, str]:
    """Run in a fresh Python so the running maximum starts from zero for each measurement."""
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps({'rc': p.returncode, 's': time.perf_counter() - t, "
            "'mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
            "'out': p.stdout, 'err': p.stderr[-3000:]}))\n")
    proc = subprocess.run([sys.executable, "-c", code, *CURATE, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "CURATE_NO_PROGRESS": "1", **(env or {})})
    res = json.loads(proc.stdout)
    if res["rc"]:
        raise SystemExit(f"curate {' '.join(map(str, args))} failed:\n{res['err']}")
    return res["s"], res["mb"], res["out"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dims", default="16,512", help="B32,L14 embedding sizes of the synthetic pool")
    ap.add_argument("--k", type=int, default=2000)
    ap.add_argument("--recipes", default="cluster_semdedup_dbp,dbp")
    ap.add_argument("--root", type=Path, default=Path("/tmp/curate-bench-prune-cli"))
    ap.add_argument("--duckdb-memory", default=None, help="CURATE_DUCKDB_MEMORY for the prune runs")
    ap.add_argument("--fresh", action="store_true",
                    help="empty the workspace cache first, so the first recipe's first run computes everything")
    a = ap.parse_args()
    tag = f"{a.rows}-{a.dims.replace(',', 'x')}"
    pool, ws = a.root / f"pool-{tag}", a.root / f"ws-{tag}"
    a.root.mkdir(parents=True, exist_ok=True)
    out = {"rows": a.rows, "dims": a.dims, "k": a.k, "load": os.getloadavg()[0]}
    if not (pool / "_truth.parquet").exists():
        s, mb, _ = measure(["synth", pool, "--layout", "datacomp", "--n", a.rows, "--dims", a.dims,
                            "--clusters", 1000, "--overwrite", "-q"])
        out["synth"] = {"seconds": round(s, 1), "peak_mb": round(mb)}
    if not (ws / "manifest.duckdb").exists():
        s, mb, _ = measure(["ingest", pool, "-w", ws, "-q"])
        out["ingest"] = {"seconds": round(s, 1), "peak_mb": round(mb)}
    env = {"CURATE_DUCKDB_MEMORY": a.duckdb_memory} if a.duckdb_memory else {}
    if a.fresh and (ws / "cache").exists():
        import shutil

        shutil.rmtree(ws / "cache")
    for name in a.recipes.split(","):
        if name == "cluster_semdedup_dbp":
            recipe = a.root / f"{name}-{a.k}.toml"
            recipe.write_text(SEMDEDUP_DBP.format(k=a.k))
            args = ["prune", "-w", ws, "-p", recipe, "--budget", "0.5", "--json"]
        else:
            args = ["prune", "-w", ws, "-p", name, "--budget", "0.5", "--set", f"semdedup.k={a.k}",
                    "--set", f"dbp.k={a.k}", "--json"]
        for attempt in ("first", "rerun"):
            s, mb, stdout = measure(args, env)
            summary = json.loads(stdout)
            out[f"{name}:{attempt}"] = {
                "seconds": round(s, 1), "peak_mb": round(mb), "kept": summary["kept"],
                "stages": {f["stage"]: [f["in"], f["kept"], f["seconds"]] for f in summary["funnel"]}}
            print(json.dumps({name: attempt, **out[f"{name}:{attempt}"]}), flush=True)
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
