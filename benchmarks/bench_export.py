"""Export throughput against a plain copy of the same bytes, measured in the same run.

Builds (once, cached under --dir) a pool of img2dataset-style tars, 10,000 samples per shard:
real JPEGs of about 35 KB on average (256 distinct noise images, so building is fast; 512-px
img2dataset JPEGs are typically 20-60 KB) with txt and json members, ingests it, then times

* `copy`: `shutil.copyfile` of every source shard plus fsync, the floor any exporter pays
  (the export fsyncs every shard too);
* `export`: `curate export --all --format wds` of the whole pool (every byte of every shard
  is copied, in 10,000-sample output shards), with 1 and 2 workers, shuffled, and with
  `--add-json` (every json member parsed and rewritten).

Sources are read once before timing, so every variant reads from the page cache. The export
time is the command's own `seconds` (manifest queries, plan, writing, sizes.json), without the
Python start-up. Each repetition times the plain copy and then every export variant; the ratio
"vs plain copy" is throughput over the same repetition's copy throughput (this cancels drifts
in load on a shared machine), and the table gives medians over --repeat repetitions.

    .venv/bin/python benchmarks/bench_export.py --samples 60000 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = int(rng.integers(240, 384))
        arr = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        arr = (arr // 3 + np.linspace(0, 180, side, dtype=np.uint8)[None, :, None]).astype(np.uint8)
        b = io.BytesIO()
        Image.fromarray(arr).save(b, "JPEG", quality=int(rng.integers(60, 90)))
        out.append(b.getvalue())
    return out


POOL_VERSION = 2  # bump when the generated pool changes


def build_pool(pool: Path, ws: Path, samples: int, shard_size: int = 10_000) -> None:
    marker = pool.with_name(pool.name + ".built.json")
    want = {"samples": samples, "version": POOL_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want and (ws / "manifest.duckdb").exists():
        return
    shutil.rmtree(pool, ignore_errors=True)
    shutil.rmtree(ws, ignore_errors=True)
    pool.mkdir(parents=True)
    imgs = _jpegs(256)
    shas = [hashlib.sha256(b).hexdigest() for b in imgs]
    for s in range(-(-samples // shard_size)):
        with tarfile.open(pool / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for r in range(min(shard_size, samples - s * shard_size)):
                i = s * shard_size + r
                key = f"{s:05d}{r:04d}"
                k = (i * 7919) % len(imgs)
                uid = hashlib.md5(f"bench{i}".encode()).hexdigest()
                meta = {"url": f"http://example.test/{i}.jpg", "caption": f"noise picture number {i}", "uid": uid,
                        "key": key, "status": "success", "width": 256, "height": 256, "original_width": 512,
                        "original_height": 512, "sha256": shas[k]}
                for ext, data in (("jpg", imgs[k]), ("json", json.dumps(meta, indent=4).encode()),
                                  ("txt", meta["caption"].encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mode, ti.uname, ti.gname = len(data), 0o444, "bigdata", "bigdata"
                    tf.addfile(ti, io.BytesIO(data))
    curate("ingest", pool, "-w", ws)
    marker.write_text(json.dumps(want))


def curate(*args) -> dict:
    env = {**os.environ, "CURATE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "curate", *map(str, args), "--json"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"curate {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plain_copy(srcs: list[Path], dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    for s in srcs:
        shutil.copyfile(s, dst / s.name)
        with open(dst / s.name, "rb+") as fh:
            os.fsync(fh.fileno())
    return time.perf_counter() - t0


def warm(srcs: list[Path]) -> None:
    for s in srcs:
        with open(s, "rb") as fh:
            while fh.read(1 << 24):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/curate-bench-export"))
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pool, ws, out = args.dir / "pool", args.dir / "ws", args.dir / "out"
    t0 = time.perf_counter()
    build_pool(pool, ws, args.samples)
    srcs = sorted(pool.glob("*.tar"))
    nbytes = sum(s.stat().st_size for s in srcs)
    print(f"pool: {args.samples:,} samples, {len(srcs)} shards, {nbytes / 1e9:.2f} GB (ready in "
          f"{time.perf_counter() - t0:.0f} s); {os.cpu_count()} cores", flush=True)
    variants = {
        "export, 1 worker": ["--workers", "1"],
        "export, 2 workers": ["--workers", "2"],
        "export --shuffle, 2 workers": ["--workers", "2", "--shuffle", "--seed", "1"],
        "export --add-json, 2 workers": ["--workers", "2", "--add-json"],
    }
    copy_name = "plain copy (copyfile + fsync)"
    times: dict[str, list[float]] = {copy_name: []}
    ratios: dict[str, list[float]] = {copy_name: []}
    written: dict[str, int] = {copy_name: nbytes}
    warm(srcs)
    for _ in range(args.repeat):
        copy_s = plain_copy(srcs, args.dir / "copy")
        shutil.rmtree(args.dir / "copy")
        times[copy_name].append(copy_s)
        ratios[copy_name].append(1.0)
        for name, extra in variants.items():
            res = curate("export", "-w", ws, "--all", "--out", out, "--overwrite", *extra)
            if res["samples"] != args.samples or res["shards_written"] != res["shards"]:
                raise SystemExit(f"unexpected export summary: {res}")
            times.setdefault(name, []).append(res["seconds"])
            ratios.setdefault(name, []).append((res["bytes_written"] / res["seconds"]) / (nbytes / copy_s))
            written[name] = res["bytes_written"]
            shutil.rmtree(out)
    print("\n| variant | median s | MB/s | samples/s | vs plain copy |\n|---|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {written[name] / t / 1e6:,.0f} | {args.samples / t:,.0f} | "
              f"{statistics.median(ratios[name]):.0%} |")
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
