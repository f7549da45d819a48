"""A full disk, for real: a small tmpfs is mounted for the workspace or the export directory and
filled up while `ingest`, `score`, `prune` and `export` run. Each must stop with one line that
says the disk is full and where (exit 1), leave the workspace consistent, and, once space is
freed, resume to exactly what an uninterrupted run on a roomy disk produces."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest

from conftest import manifest_rows, run_cli, run_json

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI and this machine run as root)")

RECIPE = """name = "disk"
seed = 0

[[stages]]
stage = "decode_failures"

[[stages]]
stage = "semdedup"
scorer = "tiny"
eps = 0.05
k = 8
"""


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the file system holding `fs`."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as fh:
        if free > leave:
            os.posix_fallocate(fh.fileno(), 0, free - leave)
    return filler


def one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("WARNING:root:")]  # open_clip's log
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("diskfull")
    shutil.copy(tiny_ckpt, d / "tiny.pt")
    run_cli("synth", d / "pool", "--layout", "wds", "--n", "200", "--seed", "7", "--shard-size", "50")
    (d / "recipe.toml").write_text(RECIPE)
    ref = d / "ref"
    run_json("ingest", d / "pool", "-w", ref)
    run_json(*score_args(ref, d))
    run_json("prune", "-w", ref, "--pipeline", d / "recipe.toml")
    run_json("export", "-w", ref, "--run", "3", "--out", d / "ref-out", "--shard-size", "40")
    return d


def score_args(ws: Path, d: Path):
    return ["score", "-w", ws, "--model", f"curate-tiny-vit@{d / 'tiny.pt'},name=tiny", "--device", "cpu",
            "--batch-size", "16"]


SAMPLES = "SELECT uid, shard_id, key, row_idx, caption, tar_offset, tar_end FROM samples ORDER BY uid"
SCORES = "SELECT scorer, uid, score FROM scores ORDER BY ALL"
DECISIONS = ("SELECT stage_idx, stage, uid, keep, reason, nullif(value, 'nan'::DOUBLE), threshold, ref_uid FROM decisions d "
             "JOIN runs r USING (run_id) WHERE r.command = 'prune' AND r.status = 'ok' ORDER BY ALL")


def test_ingest_and_score_on_a_full_disk_resume_identically(tmp_path, setup):
    d = setup
    with tmpfs(tmp_path / "fs", "24m") as fs:
        ws = fs / "ws"
        filler = fill(fs, 64 << 10)
        line = one_error_line(run_cli("ingest", d / "pool", "-w", ws, check=False))
        assert "disk is full" in line and str(fs) in line
        filler.unlink()
        run_json("ingest", d / "pool", "-w", ws)
        assert manifest_rows(ws, SAMPLES) == manifest_rows(d / "ref", SAMPLES)

        filler = fill(fs, 48 << 10)
        line = one_error_line(run_cli(*score_args(ws, d), check=False))
        assert "disk is full" in line and str(ws) in line
        filler.unlink()
        run_json(*score_args(ws, d))
        assert manifest_rows(ws, SCORES) == manifest_rows(d / "ref", SCORES)
        ref_emb = d / "ref" / "embeddings" / "tiny"
        for f in ref_emb.iterdir():
            assert (ws / "embeddings" / "tiny" / f.name).read_bytes() == f.read_bytes(), f.name


def test_prune_and_export_on_a_full_disk_resume_identically(tmp_path, setup):
    d = setup
    with tmpfs(tmp_path / "fs", "32m") as fs:
        ws = fs / "ws"
        shutil.copytree(d / "ref", ws, ignore=shutil.ignore_patterns("cache", "runs", "tmp"))
        con = duckdb.connect(str(ws / "manifest.duckdb"))
        con.execute("DELETE FROM decisions")
        con.execute("DELETE FROM stage_stats")
        con.execute("DELETE FROM runs WHERE command IN ('prune', 'export')")
        con.close()
        filler = fill(fs, 8 << 10)
        line = one_error_line(run_cli("prune", "-w", ws, "--pipeline", d / "recipe.toml", check=False))
        assert "disk is full" in line
        filler.unlink()
        out = run_json("prune", "-w", ws, "--pipeline", d / "recipe.toml")
        assert manifest_rows(ws, DECISIONS) == manifest_rows(d / "ref", DECISIONS)

    with tmpfs(tmp_path / "small", "16m") as small:
        filler = fill(small, 96 << 10)
        proc = run_cli("export", "-w", ws_copy(d, tmp_path), "--run", "3", "--out", small / "out",
                       "--shard-size", "40", check=False)
        line = one_error_line(proc)
        assert "disk is full" in line and str(small / "out") in line
        filler.unlink()
        again = run_json("export", "-w", tmp_path / "wscopy", "--run", "3", "--out", small / "out", "--shard-size", "40")
        assert again["resumed"] is True
        ref = sorted(p.name for p in (d / "ref-out").iterdir())
        assert sorted(p.name for p in (small / "out").iterdir()) == ref  # no partial file left behind
        for name in ref:
            assert (small / "out" / name).read_bytes() == (d / "ref-out" / name).read_bytes(), name
    assert out["kept"] > 0


def ws_copy(d: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "wscopy"
    if not dst.exists():
        shutil.copytree(d / "ref", dst)
    return dst
