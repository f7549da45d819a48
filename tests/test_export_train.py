"""A real consumer: open_clip's own training code trains a tiny CLIP for one epoch on CPU on
the shards `curate export` wrote, and its loader reads their size from `sizes.json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, run_cli, run_json

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

def test_open_clip_trains_one_epoch_on_the_export(tmp_path):
    run_cli("synth", tmp_path / "pool", "--layout", "wds", "--n", 300, "--seed", 0, "--shard-size", 100)
    ws = tmp_path / "ws"
    run_cli("ingest", tmp_path / "pool", "-w", ws)
    (tmp_path / "r.toml").write_text('name = "size"\n[[stages]]\nstage = "image_size"\n')
    run_json("prune", "-w", ws, "--pipeline", tmp_path / "r.toml")
    out = tmp_path / "shards"
    res = run_json("export", "-w", ws, "--out", out, "--shard-size", 100, "--shuffle", "--seed", 0)
    n, last = res["samples"], res["shards"] - 1
    assert last >= 1
    pattern = str(out / f"{{00000000..{last:08d}}}.tar")

    # open_clip 3.3's `local-dir:` schema: a model directory with its open_clip_config.json, no wrapper
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    logs = tmp_path / "logs"
    args = [sys.executable, "-m", "open_clip_train.main",
            "--train-data", pattern, "--train-num-samples", str(n), "--dataset-type", "webdataset",
            "--model", f"local-dir:{model_dir}", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
            "--workers", "0", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32", "--seed", "0",
            "--logs", str(logs), "--name", "tiny", "--report-to", "", "--save-frequency", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    from open_clip_train.data import get_dataset_size

    assert get_dataset_size(pattern) == (n, last + 1)  # open_clip reads our sizes.json

    log = (logs / "tiny" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Loss" in log
    ckpt = logs / "tiny" / "checkpoints" / "epoch_1.pt"
    assert ckpt.exists() and ckpt.stat().st_size > 100_000
