"""Pruning benchmark: streamed clustering + SemDeDup + DBP against a dense reference, and at scale.

    .venv/bin/python benchmarks/bench_prune.py                 # parts a and b (2M rows)
    .venv/bin/python benchmarks/bench_prune.py --part a        # 200k: streamed vs reference
    .venv/bin/python benchmarks/bench_prune.py --part b --rows 10000000

(a) 200k × 512 fp16 synthetic clustered embeddings with planted near-duplicates, on disk as one
    .npy. `streamed` (curate: seeded sample + streamed assignment, blocked SemDeDup through the
    stage API, DBP on the survivors with the cached clustering) and `reference` (the whole array
    in memory, faiss.Kmeans, one-call IndexFlatIP assignment, one similarity matrix per cluster,
    DBP written out plainly) each run in their own subprocess; their kept sets must be identical.
(b) an N × 512 fp16 memmap (default 2M) generated in chunks, through the streamed pipeline only:
    wall time per step, peak RSS, and the blocked similarity step's GFLOP/s against this
    machine's sgemm rate measured in the same process.

Peak RSS is the child's `ru_maxrss` (includes resident file pages of any memory map, so the
embedding view below re-opens its map per read and copies each block out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.stages.base import EmbeddingView  # noqa: E402

D = 512
CHUNK = 65536


# --------------------------------------------------------------------------------------------- data

def generate(path: Path, n: int, seed: int = 0, n_true: int | None = None, dim: int = D) -> None:
    """Clustered unit vectors (Zipf-like cluster sizes, per-cluster spread) with ~10% planted
    near-duplicates (cos ~0.995 to a source row of the same chunk), written chunk by chunk as fp16.
    Also writes <path>.group.npy: for a planted copy and its source the source's row, else -1."""
    from numpy.lib.format import open_memmap

    n_true = n_true or max(50, n // 1000)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_true, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    p = 1.0 / (np.arange(n_true) + 10.0) ** 0.9
    p /= p.sum()
    spread = rng.uniform(0.8, 1.6, n_true).astype(np.float32)
    out = open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    group = open_memmap(str(path) + ".group.npy", mode="w+", dtype=np.int64, shape=(n,))
    for ci, start in enumerate(range(0, n, CHUNK)):
        r = np.random.default_rng([seed, ci])
        m = min(CHUNK, n - start)
        lab = r.choice(n_true, size=m, p=p)
        x = centres[lab] + spread[lab, None] * r.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        n_copy = m // 10
        dst = r.choice(m, size=n_copy, replace=False)
        pool = np.setdiff1d(np.arange(m), dst)
        src = r.choice(pool, size=n_copy)
        x[dst] = x[src] + 0.1 * r.standard_normal((n_copy, dim), dtype=np.float32) / np.sqrt(dim) * \
            np.linalg.norm(x[src], axis=1, keepdims=True)
        g = np.full(m, -1, np.int64)
        g[src] = start + src
        g[dst] = start + src
        out[start:start + m] = x
        group[start:start + m] = g
    out.flush()
    group.flush()
    del out, group


class NpyView(EmbeddingView):
    """EmbeddingView over one fp16 .npy: the map is opened per read and dropped after copying the
    rows out, so file pages never accumulate in this process's RSS."""

    def __init__(self, path):
        self.path = str(path)
        arr = np.load(self.path, mmap_mode="r")
        self.n, self.dim = arr.shape
        del arr

    def chunks(self, rows=CHUNK):
        for start in range(0, self.n, rows):
            arr = np.load(self.path, mmap_mode="r")
            block = np.array(arr[start:start + rows], dtype=np.float32)
            del arr
            yield start, block

    def take(self, positions):
        # Sorted, then one file window of CHUNK rows at a time, each through its own short-lived
        # map: page-fault read-around would otherwise leave most of the file resident.
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        sp = positions[order]
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        cuts = np.searchsorted(sp, np.arange(0, self.n + CHUNK, CHUNK))
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:
                arr = np.load(self.path, mmap_mode="r")
                out[order[a:b]] = arr[sp[a:b]]
                del arr
        return out

    def to_numpy(self):
        raise AssertionError("the streamed pipeline must not materialise the pool")


def peak_mb() -> float:
    """Peak resident set of this process since start or the last `reset_peak()` (VmHWM, MB).

    Not ru_maxrss: on Linux that survives fork+exec, so a child reports its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> None:
    """Start a new peak-RSS window (writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def sgemm_rate() -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, D), dtype=np.float32)
    b = rng.standard_normal((8192, D), dtype=np.float32)
    best = 0.0
    for _ in range(4):
        t = time.perf_counter()
        a @ b.T
        best = max(best, 2.0 * 4096 * 8192 * D / (time.perf_counter() - t))
    return best / 1e9


# --------------------------------------------------------------------------------------------- children

def child_streamed(args) -> dict:
    """The runner's flow: cluster once and cache it, SemDeDup on the pool, DBP on the survivors
    with the pool clustering restricted to them (handed over through the same array cache)."""
    import polars as pl

    from curate.cluster import cache_clustering, spherical_kmeans
    from curate.executors.local import ArrayCache
    from curate.stages.base import StageInput, get_stage

    view = NpyView(args.data)
    n = view.n
    steps = {}
    cache = ArrayCache(Path(args.out + ".cache"))
    uids = pl.select(pl.int_range(0, n, dtype=pl.Int64).cast(pl.Utf8).str.zfill(32).alias("uid")).to_series()
    frame = pl.DataFrame({"uid": uids})
    del uids
    base = peak_mb()
    reset_peak()
    t = time.perf_counter()
    clu = spherical_kmeans(view, args.k, niter=args.niter, seed=args.seed, sample_size=args.sample)
    steps["cluster"] = {"s": time.perf_counter() - t, "peak_mb": peak_mb(),
                        "train_s": clu.params["seconds_train"], "assign_s": clu.params["seconds_assign"]}
    reset_peak()
    t = time.perf_counter()
    inp = StageInput(frame, {("bench", "img"): view}, seed=args.seed, cache=cache)
    sd_stage = get_stage("semdedup")(scorer="bench", eps=args.eps, k=args.k, niter=args.niter,
                                     sample_size=args.sample)
    cache_clustering(inp, sd_stage.cluster_spec(inp), clu.assignments, clu.distances, clu.centroids)
    sd = sd_stage.apply(inp)
    assert sd.stats["clustering"] == "cache"
    steps["semdedup"] = {"s": time.perf_counter() - t, "peak_mb": peak_mb(),
                         "pass_s": sd.stats["pass_seconds"], "compute_s": sd.stats["pass_compute_seconds"],
                         "flops": sd.stats["pass_flops"], "pairs": sd.stats["pass_pairs"]}
    keep1 = sd.decisions["keep"].to_numpy()
    del sd, inp  # a runner records the decisions, then lets them go
    kept1 = np.flatnonzero(keep1)
    survivors = frame.filter(pl.Series(keep1))
    del frame
    budget = len(kept1) // 2
    reset_peak()
    t = time.perf_counter()
    inp = StageInput(survivors, {("bench", "img"): view}, seed=args.seed, budget=budget, cache=cache)
    dbp_stage = get_stage("dbp")(scorer="bench", k=args.k, niter=args.niter, sample_size=args.sample,
                                 tau=0.1, lb_ratio=0.5)
    cache_clustering(inp, dbp_stage.cluster_spec(inp), clu.assignments[kept1], clu.distances[kept1], clu.centroids)
    dbp = dbp_stage.apply(inp)
    assert dbp.stats["clustering"] == "cache"
    steps["dbp"] = {"s": time.perf_counter() - t, "peak_mb": peak_mb()}
    kept2 = kept1[dbp.decisions["keep"].to_numpy()]
    np.save(args.out + ".semdedup.npy", kept1)
    np.save(args.out + ".dbp.npy", kept2)
    rate = sgemm_rate() if args.sgemm else None
    return {"impl": "streamed", "n": n, "base_mb": base, "steps": steps,
            "peak_mb": max([base] + [v["peak_mb"] for v in steps.values()]),
            "kept_semdedup": int(len(kept1)), "kept_dbp": int(len(kept2)), "budget": budget,
            "largest_cluster": int(np.bincount(clu.assignments).max()), "sgemm_gflops": rate,
            "lambda": dbp.stats["lambda"]}


def child_reference(args) -> dict:
    """Straightforward versions, as the public SemDeDup code does them: everything in memory."""
    import faiss

    steps = {}
    base = peak_mb()
    reset_peak()
    t = time.perf_counter()
    x = np.load(args.data).astype(np.float32)
    x /= np.where((nrm := np.linalg.norm(x, axis=1, keepdims=True)) == 0, 1, nrm)
    n = len(x)
    pos = np.arange(n) if args.sample >= n else np.sort(
        np.random.default_rng(args.seed).choice(n, size=args.sample, replace=False))
    d = x.shape[1]
    km = faiss.Kmeans(d, args.k, niter=args.niter, seed=args.seed, spherical=True, verbose=False,
                      max_points_per_centroid=-(-len(pos) // args.k) + 1, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x[pos]))
    index = faiss.IndexFlatIP(d)
    index.add(km.centroids)
    sims, ids = index.search(x, 1)
    assign, dist = ids[:, 0].astype(np.int64), (np.float32(1) - sims[:, 0])
    steps["cluster"] = {"s": time.perf_counter() - t, "peak_mb": peak_mb()}

    reset_peak()
    t = time.perf_counter()
    drop = np.zeros(n, bool)
    thr = 1.0 - args.eps
    for c in range(args.k):
        members = np.flatnonzero(assign == c)
        members = members[np.lexsort((members, -dist[members].astype(np.float64)))]
        if len(members) < 2:
            continue
        xc = x[members]
        s = xc @ xc.T  # the whole |C| x |C| matrix
        s[np.triu(np.ones(s.shape, dtype=bool))] = -np.inf
        drop[members[s.max(axis=1) >= thr]] = True
        del s
    keep1 = ~drop
    steps["semdedup"] = {"s": time.perf_counter() - t, "peak_mb": peak_mb()}

    reset_peak()
    t = time.perf_counter()
    kept1 = np.flatnonzero(keep1)
    budget = len(kept1) // 2
    a1, d1 = assign[kept1], dist[kept1].astype(np.float64)
    k = args.k
    sizes = np.array([np.sum(a1 == c) for c in range(k)])
    act = np.flatnonzero(sizes > 0)
    d_intra = np.array([d1[a1 == c].mean() for c in act])
    cs = km.centroids[act] @ km.centroids[act].T
    l = min(20, len(act) - 1)
    d_inter = np.array([np.mean(1.0 - np.sort(np.delete(cs[i].astype(np.float64), i))[-l:]) for i in range(len(act))])
    comp = d_inter * d_intra
    z = np.exp(comp / 0.1 - (comp / 0.1).max())
    share = z / z.sum()
    lb = int(np.floor(0.5 * budget / len(act)))
    lower = np.minimum(lb, sizes[act]).astype(float)
    upper = sizes[act].astype(float)
    target = share * budget
    lo, hi = float((lower - target).min()), float((upper - target).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(target + mid, lower, upper).sum() < budget:
            lo = mid
        else:
            hi = mid
    real = np.clip(target + hi, lower, upper)
    free = (real > lower) & (real < upper)
    lam = (budget - real[~free].sum() - target[free].sum()) / free.sum()
    real = np.clip(target + lam, lower, upper)
    q = np.floor(real).astype(int)
    rem = budget - q.sum()
    for i in sorted(range(len(act)), key=lambda i: (-(real[i] - np.floor(real[i])), i)):
        if rem <= 0:
            break
        if q[i] < upper[i]:
            q[i] += 1
            rem -= 1
    keep2 = np.zeros(len(kept1), bool)
    for i, c in enumerate(act):
        m = np.flatnonzero(a1 == c)
        m = m[np.lexsort((m, -d1[m]))]
        keep2[m[:q[i]]] = True
    kept2 = kept1[keep2]
    steps["dbp"] = {"s": time.perf_counter() - t, "peak_mb": peak_mb()}
    np.save(args.out + ".semdedup.npy", kept1)
    np.save(args.out + ".dbp.npy", kept2)
    return {"impl": "reference", "n": n, "base_mb": base, "steps": steps,
            "peak_mb": max([base] + [v["peak_mb"] for v in steps.values()]),
            "kept_semdedup": int(len(kept1)), "kept_dbp": int(len(kept2)), "budget": int(budget),
            "largest_cluster": int(np.bincount(assign).max())}


# --------------------------------------------------------------------------------------------- parent

def run_child(impl: str, data: Path, out: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--data", str(data), "--out", str(out),
           "--k", str(a.k), "--niter", str(a.niter), "--seed", str(a.seed), "--sample", str(a.sample),
           "--eps", str(a.eps)] + (["--sgemm"] if a.sgemm else [])
    t = time.perf_counter()
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    res["load"] = (load0, os.getloadavg()[0])  # other processes on the machine skew timings
    return res


def fmt_steps(r: dict) -> str:
    return ", ".join(f"{k} {v['s']:.1f} s" for k, v in r["steps"].items())


def planted_recall(group_path: str, kept: np.ndarray) -> tuple[float, float]:
    """(removed planted copies / (group sizes - 1), fraction of unplanted rows removed)."""
    group = np.load(group_path)
    removed = np.ones(len(group), bool)
    removed[kept] = False
    planted = group >= 0
    n_groups = len(np.unique(group[planted]))
    should = int(planted.sum()) - n_groups
    return float(removed[planted].sum() / should), float(removed[~planted].mean())


def part_a(work: Path, a) -> list[str]:
    n = 200_000
    data = work / "a.npy"
    t = time.perf_counter()
    generate(data, n, seed=a.seed)
    print(f"[a] generated {n:,} x {D} fp16 in {time.perf_counter() - t:.1f} s", flush=True)
    sa = argparse.Namespace(**{**vars(a), "k": 200, "sample": 51_200, "sgemm": False})
    res = {impl: run_child(impl, data, work / f"a_{impl}", sa) for impl in ("streamed", "reference")}
    same = {}
    for step in ("semdedup", "dbp"):
        s = np.load(work / f"a_streamed.{step}.npy")
        r = np.load(work / f"a_reference.{step}.npy")
        same[step] = bool(np.array_equal(s, r))
    recall, false_drop = planted_recall(str(data) + ".group.npy", np.load(work / "a_streamed.semdedup.npy"))
    print(json.dumps({"part": "a", "identical": same, "recall": recall, "results": res}, indent=1), flush=True)
    assert all(same.values()), f"streamed and reference kept sets differ: {same}"
    rows = [
        f"**(a) 200,000 × 512 fp16, k = 200, niter {a.niter}, sample 51,200, eps {a.eps}, DBP budget = half the "
        f"SemDeDup survivors** — kept sets identical after SemDeDup ({res['streamed']['kept_semdedup']:,}) and "
        f"after DBP ({res['streamed']['kept_dbp']:,}): {same['semdedup'] and same['dbp']}. Planted near-duplicates "
        f"removed (recall) {recall:.4f}; unplanted rows removed {false_drop:.4f}. Largest cluster {res['streamed']['largest_cluster']:,}.",
        "",
        "| implementation | cluster | SemDeDup | DBP | process wall | peak RSS: cluster / SemDeDup / DBP | load avg before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl, r in res.items():
        st = r["steps"]
        rows.append(f"| {impl} | {st['cluster']['s']:.1f} s | {st['semdedup']['s']:.1f} s | {st['dbp']['s']:.2f} s "
                    f"| {r['wall_s']:.1f} s | {st['cluster']['peak_mb']:,.0f} / {st['semdedup']['peak_mb']:,.0f} / "
                    f"{st['dbp']['peak_mb']:,.0f} MB | {r['load'][0]:.1f} → {r['load'][1]:.1f} |")
    return rows


def part_b(work: Path, a) -> list[str]:
    if a.existing:
        data = Path(a.existing)
        n = int(np.load(data, mmap_mode="r").shape[0])
        gen = float("nan")
    else:
        n = a.rows
        data = work / "b.npy"
        t = time.perf_counter()
        generate(data, n, seed=a.seed, dim=a.dim)
        gen = time.perf_counter() - t
        print(f"[b] generated {n:,} x {a.dim} fp16 ({n * a.dim * 2 / 2**30:.1f} GiB) in {gen:.1f} s", flush=True)
    sb = argparse.Namespace(**{**vars(a), "k": a.k_big, "sample": a.sample_big, "sgemm": True})
    r = run_child("streamed", data, work / "b_streamed", sb)
    print(json.dumps({"part": "b", "result": r}, indent=1), flush=True)
    recall, false_drop = planted_recall(str(data) + ".group.npy", np.load(work / "b_streamed.semdedup.npy"))
    st = r["steps"]
    gflops = st["semdedup"]["flops"] / st["semdedup"]["pass_s"] / 1e9
    gflops_c = st["semdedup"]["flops"] / st["semdedup"]["compute_s"] / 1e9
    total = sum(v["s"] for v in st.values())
    dim = int(np.load(data, mmap_mode="r").shape[1])
    rows = [
        f"**(b) {n:,} × {dim} fp16 memmap ({n * dim * 2 / 2**30:.1f} GiB), k = {a.k_big}, niter {a.niter}, sample "
        f"{a.sample_big:,}, eps {a.eps}** — generated in {gen:.0f} s (not counted).",
        "",
        "| step | wall | peak RSS during step |",
        "|---|---|---|",
        f"| imports + uid column | — | {r['base_mb']:,.0f} MB |",
        f"| clustering (train {st['cluster']['train_s']:.1f} s, assign {st['cluster']['assign_s']:.1f} s) "
        f"| {st['cluster']['s']:.1f} s | {st['cluster']['peak_mb']:,.0f} MB |",
        f"| SemDeDup (similarity pass {st['semdedup']['pass_s']:.1f} s) | {st['semdedup']['s']:.1f} s "
        f"| {st['semdedup']['peak_mb']:,.0f} MB |",
        f"| DBP (budget {r['budget']:,}) | {st['dbp']['s']:.1f} s | {st['dbp']['peak_mb']:,.0f} MB |",
        f"| **total** | **{total:.1f} s** | **{r['peak_mb']:,.0f} MB** |",
        "",
        f"Blocked similarity step: {st['semdedup']['flops'] / 1e12:.2f} TFLOP; {gflops_c:.0f} GFLOP/s in the "
        f"blocked kernel ({st['semdedup']['compute_s']:.1f} s: sgemm + masking + running max), {gflops:.0f} GFLOP/s "
        f"over the whole pass ({st['semdedup']['pass_s']:.1f} s, including reading and normalising the rows), "
        f"against {r['sgemm_gflops']:.0f} GFLOP/s for one 4096×8192×512 sgemm in the same process "
        f"({100 * gflops_c / r['sgemm_gflops']:.0f}% / {100 * gflops / r['sgemm_gflops']:.0f}%). Largest cluster {r['largest_cluster']:,}; kept after SemDeDup {r['kept_semdedup']:,}, after DBP "
        f"{r['kept_dbp']:,}; planted near-duplicates removed {recall:.4f}, unplanted rows removed {false_drop:.4f}. "
        f"Load average (1 min) before → after: {r['load'][0]:.1f} → {r['load'][1]:.1f}.",
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows for part b")
    ap.add_argument("--k-big", type=int, default=2000, help="clusters for part b")
    ap.add_argument("--sample-big", type=int, default=128_000, help="k-means training rows for part b")
    ap.add_argument("--dim", type=int, default=D, help="embedding width for part b (a low width isolates the "
                    "per-sample bookkeeping when checking how memory scales with rows)")
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--existing", default=None, help="part b: use this generated .npy instead of a new one")
    ap.add_argument("--workdir", default=None, help="where the .npy files go (default: a temp dir, removed)")
    # child mode
    ap.add_argument("--child", choices=["streamed", "reference"])
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--sample", type=int, default=51_200)
    ap.add_argument("--sgemm", action="store_true")
    a = ap.parse_args()
    if a.child:
        res = child_streamed(a) if a.child == "streamed" else child_reference(a)
        print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        lines = [f"### Pruning (`{' '.join(['python', 'benchmarks/bench_prune.py', *sys.argv[1:]])}`)", "",
                 f"{os.cpu_count()} cores; numpy {np.__version__}; sgemm via numpy `@`.", ""]
        if a.part in ("a", "all"):
            lines += part_a(work, a) + [""]
        if a.part in ("b", "all"):
            lines += part_b(work, a)
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
