"""curate train-filter: a tiny CLIP trained on a clean synthetic pool learns (loss falls, held-out
retrieval beats chance) and its checkpoint scores a noisy pool through `curate score --model PATH`,
separating matched from mismatched captions better than chance."""

from __future__ import annotations

import json

from conftest import run_cli, run_json
from curate.evaluate import caption_match_auc, load_truth, roc_auc
from curate.manifest import Manifest


def test_roc_auc_known_values():
    import numpy as np

    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0], bool)) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([1, 0, 1, 0], bool)) == 0.5


def test_train_then_score(tmp_path):
    trusted, noisy, ws, out = tmp_path / "trusted", tmp_path / "noisy", tmp_path / "ws", tmp_path / "filter"
    run_cli("synth", trusted, "--layout", "wds", "--n", "600", "--seed", "21", "--no-defects")
    run_cli("synth", noisy, "--layout", "wds", "--n", "500", "--seed", "22", "--rate", "mismatched=0.3")
    summary = run_json("train-filter", "--data", trusted, "--out", out, "--epochs", "25", "--batch-size", "32",
                       "--max-minutes", "1.2", "--lr", "2e-3", "--warmup", "10")
    assert (out / "filter.pt").exists() and "model: curate-tiny-vit" in (out / "params.txt").read_text()
    assert summary["last_loss"] < summary["first_loss"] * 0.8
    assert summary["val_image_to_text_top1"] > 3 / 32, "held-out retrieval beats chance (1/32) clearly"
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["history"]) == summary["epochs_done"]

    run_json("ingest", noisy, "-w", ws)
    run_json("score", "-w", ws, "--model", f"{out / 'filter.pt'},name=dfn", "--device", "cpu", "--workers", "0")
    with Manifest(ws / "manifest.duckdb", read_only=True) as m:
        auc = caption_match_auc(m, load_truth(noisy), "dfn")
    assert auc["mismatched"] > 50
    assert auc["auc_matched_vs_mismatched"] > 0.6


def test_bad_trusted_set_is_a_usage_error(tmp_path):
    tiny = tmp_path / "tiny"
    run_cli("synth", tiny, "--layout", "wds", "--n", "20", "--seed", "1", "--no-defects")
    proc = run_cli("train-filter", "--data", tiny, "--out", tmp_path / "o", "--batch-size", "64", check=False)
    assert proc.returncode == 2 and "at least two batches" in proc.stderr
    proc = run_cli("train-filter", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2
