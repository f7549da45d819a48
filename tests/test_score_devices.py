"""`curate score` over several devices, with its defaults (DataLoader workers in every device
worker): two `cpu` devices stand in for two GPUs. The outputs equal a one-device run; a worker
killed mid-run (SIGKILL) is started again on its unfinished shards; a worker that cannot finish
makes the command exit 1 naming the shards, and a rerun completes them, equal to the one-device
run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import add_member, jpeg_bytes, run_cli
from conftest import manifest_rows as q

N_SHARDS, PER_SHARD = 6, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("devices") / "src"
    d.mkdir()
    rng = np.random.default_rng(3)
    for s in range(N_SHARDS):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tf:
            for i in range(PER_SHARD):
                color = tuple(int(x) for x in rng.integers(0, 255, 3))
                add_member(tf, f"{s:02d}{i:03d}.jpg", jpeg_bytes(40 + 7 * i, 30 + 5 * s, color))
                add_member(tf, f"{s:02d}{i:03d}.txt", f"a photo number {i} of shard {s}".encode())
    return d


def scored(tmp_path: Path, shards: Path, name: str, tiny_ckpt, *extra, env=None, check=True):
    ws = tmp_path / name
    if not (ws / "manifest.duckdb").exists():
        run_cli("ingest", shards, "-w", ws)
    proc = run_cli("score", "-w", ws, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", *extra, "--json",
                   env=env, check=check)
    return ws, proc


def outputs(ws: Path) -> tuple[dict, dict]:
    scores = dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'tiny'"))
    arrays = {(sid, kind): np.load(ws / path) for sid, kind, path in
              q(ws, "SELECT shard_id, kind, path FROM embeddings WHERE scorer = 'tiny'")}
    return scores, arrays


def same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return (a[0] == b[0] and a[1].keys() == b[1].keys()
            and all(np.array_equal(a[1][k], b[1][k]) for k in a[1]))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, shards, tiny_ckpt):
    ws, _ = scored(tmp_path_factory.mktemp("one"), shards, "ws", tiny_ckpt, "--device", "cpu")
    out = outputs(ws)
    assert len(out[0]) == N_SHARDS * PER_SHARD and len(out[1]) == 2 * N_SHARDS
    return out


def test_two_devices_with_default_workers_equal_one_a_killed_worker_restarts(tmp_path, shards, tiny_ckpt,
                                                                             one_device):
    # device worker 1 SIGKILLs itself after its first finished shard, on its first attempt
    ws, proc = scored(tmp_path, shards, "ws", tiny_ckpt, "--device", "cpu,cpu",
                      env={"CURATE_SCORE_WORKER_CRASH": "1:1"})
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["device"] == ["cpu", "cpu"] and summary["shards_scored"] == N_SHARDS
    assert summary["samples_scored"] >= N_SHARDS * PER_SHARD
    assert len(summary["workers_restarted"]) == 1 and "signal 9" in summary["workers_restarted"][0]
    assert same(outputs(ws), one_device)
    assert q(ws, "SELECT status FROM runs WHERE command = 'score'") == [("ok",)]


def test_a_worker_that_cannot_finish_fails_the_run_then_a_rerun_completes(tmp_path, shards, tiny_ckpt, one_device):
    ws, proc = scored(tmp_path, shards, "ws", tiny_ckpt, "--device", "cpu,cpu", "--retries", "1",
                      env={"CURATE_SCORE_WORKER_CRASH": "1:1:always"}, check=False)
    assert proc.returncode == 1, proc.stderr
    # killed (SIGKILL) after its first shard, started again on the rest, killed again: the run fails
    assert "score worker on cpu ended (killed by signal 9); starting it again" in proc.stderr
    assert "not scored after 1 retries" in proc.stderr and "shard ids" in proc.stderr
    assert q(ws, "SELECT status FROM runs WHERE command = 'score'") == [("failed",)]
    # what finished is registered, and only that: every registered shard has all its scores
    done = {sid for (sid,) in q(ws, "SELECT DISTINCT shard_id FROM embeddings WHERE scorer = 'tiny'")}
    assert 0 < len(done) < N_SHARDS
    assert q(ws, "SELECT count(*) FROM scores WHERE scorer = 'tiny'")[0][0] == len(done) * PER_SHARD
    _, proc = scored(tmp_path, shards, "ws", tiny_ckpt, "--device", "cpu,cpu")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["shards_scored"] == N_SHARDS - len(done)
    assert same(outputs(ws), one_device)
