"""curate score on synthetic pools with a tiny local open_clip checkpoint: outputs for every
decodable sample, recorded reasons for the rest, flip scores, and kill -9 + resume giving
outputs identical to an uninterrupted run without recomputing finished shards."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from conftest import CURATE, ROOT, run_cli, run_json

SCORER = "tiny"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("pool") / "pool"
    run_cli("synth", p, "--layout", "wds", "--n", "400", "--seed", "5", "--shard-size", "100")
    return p


def _ingest(pool: Path, ws: Path) -> None:
    run_json("ingest", pool, "-w", ws)


def _q(ws: Path, sql: str):
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        return pl.from_arrow(con.sql(sql).to_arrow_table())
    finally:
        con.close()


def _score_args(ws, ckpt, *extra):
    return ["score", "-w", ws, "--model", f"curate-tiny-vit@{ckpt},name={SCORER}", "--device", "cpu",
            "--batch-size", "16", "--workers", "0", *extra]


def test_every_sample_scored_or_explained(tmp_path, pool, tiny_ckpt):
    ws = tmp_path / "ws"
    _ingest(pool, ws)
    out = run_json(*_score_args(ws, tiny_ckpt, "--flip"))
    assert out["shards_scored"] == 4 and out["samples_scored"] > 0
    samples = _q(ws, "SELECT uid, shard_id, row_idx FROM samples WHERE image_ext IS NOT NULL")
    scores = _q(ws, f"SELECT uid, score FROM scores WHERE scorer = '{SCORER}'")
    flips = _q(ws, f"SELECT uid, score FROM scores WHERE scorer = '{SCORER}:flip'")
    assert scores.height == samples.height == flips.height
    issues = _q(ws, "SELECT uid, reason, detail FROM sample_issues WHERE action = 'unscored'")
    null_scores = set(scores.filter(pl.col("score").is_null())["uid"].to_list())
    assert null_scores == set(issues["uid"].to_list()), "every missing score has a recorded reason"
    truth = pl.read_parquet(pool / "_truth.parquet")
    undecodable = issues.filter(pl.col("reason") == "undecodable").join(truth, on="uid")
    assert set(undecodable["image_kind"].to_list()) <= {"truncated", "corrupt", "non_image"}
    assert (undecodable["image_kind"] == "truncated").sum() >= 1
    # ingest kept every truncated JPEG (its header is fine); score found each one
    truncated = set(truth.filter(pl.col("image_kind") == "truncated")["uid"].to_list()) & set(samples["uid"].to_list())
    assert truncated <= set(undecodable["uid"].to_list())
    # embeddings: row-aligned, unit norm where decodable, and their cosine is the stored score
    refs = _q(ws, f"SELECT shard_id, kind, path FROM embeddings WHERE scorer = '{SCORER}'")
    assert set(refs["kind"].to_list()) == {"img", "txt", "img_flip"}
    ok = scores.join(samples, on="uid").filter(pl.col("score").is_not_null())
    for sid in ok["shard_id"].unique().to_list():
        paths = {k: p for s, k, p in refs.rows() if s == sid}
        img, txt = np.load(ws / paths["img"]).astype(np.float32), np.load(ws / paths["txt"]).astype(np.float32)
        part = ok.filter(pl.col("shard_id") == sid)
        rows = part["row_idx"].to_numpy()
        np.testing.assert_allclose(np.linalg.norm(img[rows], axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose((img[rows] * txt[rows]).sum(1), part["score"].to_numpy(), atol=2e-3)


def test_offline_pretrained_name_is_one_clear_line(tmp_path, pool):
    ws = tmp_path / "ws"
    _ingest(pool, ws)
    t0 = time.perf_counter()
    proc = run_cli("score", "-w", ws, "--model", "ViT-B-32:laion2b_s34b_b79k", "--device", "cpu",
                   check=False, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "hf") in proc.stderr
    assert time.perf_counter() - t0 < 60


def _arrays(ws: Path) -> dict:
    refs = _q(ws, f"SELECT shard_id, kind, path FROM embeddings WHERE scorer = '{SCORER}' ORDER BY ALL")
    return {(s, k): np.load(Path(ws) / p) for s, k, p in refs.rows()}  # workspace files: relative paths


def test_kill_and_resume_identical(tmp_path, pool, tiny_ckpt):
    ref_ws, ws = tmp_path / "ref", tmp_path / "ws"
    _ingest(pool, ref_ws)
    _ingest(pool, ws)
    run_json(*_score_args(ref_ws, tiny_ckpt))

    emb_dir = ws / "embeddings" / SCORER
    proc = subprocess.Popen([*CURATE, *map(str, _score_args(ws, tiny_ckpt, "--quiet"))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Kill once the second shard's arrays appear: the first shard is finished by then.
    while time.time() < deadline and len(list(emb_dir.glob("*.txt.npy"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(emb_dir.glob("*.npy"))[0].name.split(".")[0]
    finished_before = {p.name: p.stat().st_mtime_ns for p in emb_dir.glob(f"{first}.*.npy")}
    assert len(finished_before) == 2, "the first shard's arrays were complete when the kill came"

    out = run_json(*_score_args(ws, tiny_ckpt))
    assert out["shards_already_done"] + out["shards_recovered"] + out["shards_scored"] == 4
    assert out["shards_scored"] <= 3, "finished shards are not recomputed"
    for name, mtime in finished_before.items():
        assert (emb_dir / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    a, b = _arrays(ref_ws), _arrays(ws)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    sa = _q(ref_ws, "SELECT uid, score FROM scores ORDER BY uid")
    sb = _q(ws, "SELECT uid, score FROM scores ORDER BY uid")
    assert sa.equals(sb)
    runs = _q(ws, "SELECT status FROM runs WHERE command = 'score' ORDER BY run_id")["status"].to_list()
    assert runs == ["interrupted", "ok"], "the next writer marks the killed run interrupted (its process is gone)"
