"""curate prune --budget end to end on a DataComp-layout pool with planted duplicates and
long-tailed clusters: exact budgets, recorded quotas within bounds, determinism, dedup recall
against the truth, better cluster balance than random, and cache reuse on reruns."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from conftest import run_cli, run_json
from curate.evaluate import cluster_balance, dedup_report, load_truth
from curate.manifest import Manifest


def _M(ws) -> Manifest:
    return Manifest(ws / "manifest.duckdb", read_only=True)


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcb")
    pool, ws = root / "pool", root / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "12000", "--seed", "9", "--shard-size", "4000",
            "--clusters", "120")
    run_json("ingest", pool, "-w", ws)
    return pool, ws


def _kept(ws, run_id):
    m = _M(ws)
    try:
        last = m.scalar("SELECT max(stage_idx) FROM stage_stats WHERE run_id = ?", [run_id])
        return set(m.frame("SELECT uid FROM decisions WHERE run_id = ? AND stage_idx = ? AND keep",
                           [run_id, last])["uid"].to_list())
    finally:
        m.close()


def _stats(ws, run_id, stage):
    m = _M(ws)
    try:
        return json.loads(m.scalar("SELECT params FROM stage_stats WHERE run_id = ? AND stage = ?", [run_id, stage]))
    finally:
        m.close()


def test_dbp_budget_exact_deterministic_and_balanced(dc):
    pool, ws = dc
    a = run_json("prune", "-w", ws, "-p", "dbp", "--budget", "3000")
    assert a["kept"] == 3000 and a["funnel"][-1]["kept"] == 3000
    b = run_json("prune", "-w", ws, "-p", "dbp", "--budget", "3000")
    assert _kept(ws, a["run_id"]) == _kept(ws, b["run_id"]), "deterministic for a seed"
    quotas = pl.read_parquet(next((ws / "runs" / f"{a['run_id']:06d}").glob("dbp.*clusters*.parquet")))
    assert quotas["quota"].sum() == 3000
    assert abs(quotas["quota_real"].sum() - 3000) < 1e-6
    assert (quotas["quota"] <= quotas["size"]).all() and (quotas["quota"] >= 0).all()
    assert ((quotas["quota"] - quotas["quota_real"]).abs() < 1).all(), "largest-remainder rounding"

    frac = run_json("prune", "-w", ws, "-p", "dbp", "--budget", "0.25")
    assert frac["kept"] == round(0.25 * frac["funnel"][-1]["in"])

    rnd = run_json("prune", "-w", ws, "-p", "random", "--budget", "3000")
    assert rnd["kept"] == 3000
    truth = load_truth(pool)
    m = _M(ws)
    try:
        bal_dbp, bal_rnd = cluster_balance(m, truth, a["run_id"]), cluster_balance(m, truth, rnd["run_id"])
        dd = dedup_report(m, truth, a["run_id"], ("exact_dedup", "semdedup"))
    finally:
        m.close()
    print("balance dbp", bal_dbp, "random", bal_rnd, "dedup", dd)
    assert bal_dbp["max_share"] < bal_rnd["max_share"]
    assert bal_dbp["entropy"] > bal_rnd["entropy"]
    assert dd["recall"] > 0.9 and dd["false_removal_rate"] < 0.01 and dd["ref_in_same_group"] > 0.95


def test_reruns_reuse_clustering_and_similarities(dc):
    pool, ws = dc
    run_json("prune", "-w", ws, "-p", "dbp", "--budget", "2000")
    again = run_json("prune", "-w", ws, "-p", "dbp", "--budget", "1500", "--set", "semdedup.eps=0.05")
    assert again["kept"] == 1500
    sem = _stats(ws, again["run_id"], "semdedup")["stats"]
    dbp = _stats(ws, again["run_id"], "dbp")["stats"]
    assert sem["clustering"] == "cache" and sem["similarities"] == "cache"
    assert dbp["clustering"] == "cache"


def test_budget_larger_than_what_remains(dc):
    pool, ws = dc
    proc = run_cli("prune", "-w", ws, "-p", "random", "--budget", "999999", "--json")
    out = json.loads(proc.stdout)
    assert out["kept"] == out["pool"] and out["warnings"] and "exceeds" in proc.stderr
    proc = run_cli("prune", "-w", ws, "-p", "dbp", check=False)
    assert proc.returncode == 2 and "budget" in proc.stderr


def test_pool_clustering_leaves_out_undecodable_samples(tmp_path):
    """Samples whose images did not decode have no embeddings: the runner's pool clustering
    covers the others only, stages after decode_failures get it restricted to their input, and a
    clustered stage that is handed undecodable samples refuses them."""
    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "4000", "--seed", "5", "--shard-size", "1500",
            "--clusters", "40")
    run_json("ingest", pool, "-w", ws)
    m = Manifest(ws / "manifest.duckdb")
    try:
        bad = sorted(r[0] for r in m.execute("SELECT uid FROM samples ORDER BY hash(uid) LIMIT 150").fetchall())
        m.execute("INSERT INTO sample_issues SELECT NULL, shard_id, key, uid, 'undecodable', 'unscored', "
                  "'cannot identify image file' FROM samples WHERE list_contains(?, uid)", [bad])
    finally:
        m.close()
    args = ["prune", "-w", ws, "-p", "dbp", "--budget", "1000", "--set", "semdedup.k=20", "--set", "dbp.k=20"]
    a = run_json(*args)
    assert a["kept"] == 1000
    m = _M(ws)
    try:
        dropped = m.frame("SELECT uid, reason FROM decisions WHERE run_id = ? AND stage = 'decode_failures' "
                          "AND NOT keep", [a["run_id"]])
    finally:
        m.close()
    assert sorted(dropped["uid"].to_list()) == bad and (dropped["reason"] == "undecodable").all()
    assert _stats(ws, a["run_id"], "semdedup")["stats"]["clustering"] == "computed"
    pool_clusterings = [d for d in (ws / "cache").iterdir() if d.name.startswith("clustering-")]
    assert len(pool_clusterings) == 1  # one spec (k = 20, same seed) shared by both stages
    cluster = np.load(pool_clusterings[0] / "cluster.npy")  # in uid order over the decodable samples
    m = _M(ws)
    try:
        good = sorted(set(m.frame("SELECT uid FROM samples")["uid"].to_list()) - set(bad))
        dbp = m.frame("SELECT uid, detail FROM decisions WHERE run_id = ? AND stage = 'dbp'", [a["run_id"]])
    finally:
        m.close()
    assert len(cluster) == len(good) == 4000 - len(bad)
    # DBP's clusters are the pool clustering's, looked up through each sample's place in uid order
    at = {u: i for i, u in enumerate(good)}
    assert dbp["detail"].to_list() == [f"cluster={cluster[at[u]]}" for u in dbp["uid"].to_list()]
    again = run_json(*args, "--set", "semdedup.eps=0.05")
    assert _stats(ws, again["run_id"], "semdedup")["stats"]["clustering"] == "cache"
    assert _stats(ws, again["run_id"], "dbp")["stats"]["clustering"] == "cache"
    proc = run_cli("prune", "-w", ws, "-p", "semdedup", "--set", "semdedup.k=20", check=False)
    assert proc.returncode == 2 and "decode_failures" in proc.stderr
