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

# open_clip_train's main takes model names only: register the config directory, then hand over.
WRAPPER = """
import sys
import open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.data import get_dataset_size
print("DATASET_SIZE", *get_dataset_size(sys.argv[2]), flush=True)
from open_clip_train.main import main
main(sys.argv[3:])
"""


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

    cfg = tmp_path / "model_configs"
    cfg.mkdir()
    (cfg / "curate-export-tiny.json").write_text(json.dumps(TINY))
    (tmp_path / "train.py").write_text(WRAPPER)
    logs = tmp_path / "logs"
    args = [sys.executable, str(tmp_path / "train.py"), str(cfg), pattern,
            "--train-data", pattern, "--train-num-samples", str(n), "--dataset-type", "webdataset",
            "--model", "curate-export-tiny", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
            "--workers", "0", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32", "--seed", "0",
            "--logs", str(logs), "--name", "tiny", "--report-to", "", "--save-frequency", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert f"DATASET_SIZE {n} {last + 1}" in proc.stdout  # open_clip read our sizes.json

    log = (logs / "tiny" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Loss" in log
    ckpt = logs / "tiny" / "checkpoints" / "epoch_1.pt"
    assert ckpt.exists() and ckpt.stat().st_size > 100_000
