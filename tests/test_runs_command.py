"""`curate runs`: list prune runs and drop the decisions of old ones, keeping the history."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli, run_json
from curate.manifest import Manifest


@pytest.fixture()
def ws_with_runs(tmp_path):
    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "1500", "--seed", "4", "--shard-size", "500")
    run_json("ingest", pool, "-w", ws)
    ids = [run_json("prune", "-w", ws, "-p", "random", "--budget", str(b))["run_id"] for b in (100, 200, 300)]
    return ws, ids


def _table(ws, sql, params=None):
    m = Manifest(ws / "manifest.duckdb", read_only=True)
    try:
        return m.execute(sql, params).fetchall() if params else m.execute(sql).fetchall()
    finally:
        m.close()


def test_list_and_keep_last(ws_with_runs):
    ws, ids = ws_with_runs
    listed = run_json("runs", "-w", ws)["runs"]
    assert [r["run_id"] for r in listed] == ids[::-1]  # newest first
    assert [r["kept"] for r in listed] == [300, 200, 100]
    n_pool = listed[0]["pool"]
    assert all(r["decisions"] == n_pool and r["recipe"] == "random" and r["status"] == "ok" for r in listed)

    dry = run_json("runs", "-w", ws, "--keep-last", "1", "--dry-run")
    assert dry["dropped"] == ids[:2] and dry["decision_rows_dropped"] == 2 * n_pool
    assert _table(ws, "SELECT count(*) FROM decisions")[0][0] == 3 * n_pool  # dry run: nothing changed

    out = run_json("runs", "-w", ws, "--keep-last", "1")
    assert out["dropped"] == ids[:2]
    assert {r["run_id"]: r["status"] for r in out["runs"]} == {ids[0]: "dropped", ids[1]: "dropped", ids[2]: "ok"}
    assert _table(ws, "SELECT DISTINCT run_id FROM decisions") == [(ids[2],)]
    assert _table(ws, "SELECT DISTINCT run_id FROM stage_stats") == [(ids[2],)]
    assert not (ws / "runs" / f"{ids[0]:06d}").exists() and (ws / "runs" / f"{ids[2]:06d}").exists()
    # history stays: the runs rows, with their parameters and summaries
    assert _table(ws, "SELECT count(*) FROM runs WHERE command = 'prune'")[0][0] == 3

    # what reads decisions takes the kept run, and refuses a dropped one by name
    uids = ws.parent / "uids.npy"
    run_json("export", "-w", ws, "--format", "datacomp", "--out", uids)
    assert len(np.load(uids)) == 300  # the newest run's kept set
    r = run_cli("export", "-w", ws, "--format", "datacomp", "--out", ws.parent / "u2.npy", "--run", ids[0], check=False)
    assert r.returncode == 2 and "dropped" in r.stderr

    again = run_json("runs", "-w", ws, "--drop", str(ids[0]))  # already dropped: nothing to do
    assert again["dropped"] == [] and again["decision_rows_dropped"] == 0
    # a new run after dropping is recorded as usual
    new = run_json("prune", "-w", ws, "-p", "random", "--budget", "50")
    assert _table(ws, "SELECT count(*) FROM decisions WHERE run_id = ?", [new["run_id"]])[0][0] == n_pool


def test_drop_by_id_and_bad_ids(ws_with_runs):
    ws, ids = ws_with_runs
    out = run_json("runs", "-w", ws, "--drop", str(ids[1]))
    assert out["dropped"] == [ids[1]]
    assert sorted(r for (r,) in _table(ws, "SELECT DISTINCT run_id FROM decisions")) == [ids[0], ids[2]]
    bad = run_cli("runs", "-w", ws, "--drop", "999", check=False)
    assert bad.returncode == 2 and "no prune run 999" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    ingest_run = _table(ws, "SELECT min(run_id) FROM runs WHERE command = 'ingest'")[0][0]
    bad = run_cli("runs", "-w", ws, "--drop", str(ingest_run), check=False)
    assert bad.returncode == 2 and f"no prune run {ingest_run}" in bad.stderr
