"""Bad embeddings and scores never reach a stage: real DataComp parquet + npz pairs (stored and
compressed) with NaN, ±Inf and all-zero rows, non-finite and mistyped scores, wrong dtypes and
widths, ingested and pruned with the real CLI; and `curate score` with a tiny model that makes a
NaN text embedding for every caption holding one token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, run_json

NONFINITE, ZERO = "non-finite values", "zero vector"
L14, B32 = "clip_l14_similarity_score", "clip_b32_similarity_score"


def make_pair(folder: Path, stem: str, n: int, seed: int, *, compressed=False, arrays=None, scores=None,
              edit=None):
    """A DataComp pair `<stem>.parquet` + `<stem>.npz`: unit fp16 embeddings (b32 512 wide, l14 768),
    random scores; `arrays` replaces / adds npz members, `scores` the score columns, `edit(arrays)`
    plants bad rows. Returns (uids, arrays, score columns)."""
    rng = np.random.default_rng(seed)
    uids = [f"{x:032x}" for x in rng.integers(0, 2**63, n, dtype=np.int64)]

    def emb(d):
        e = rng.standard_normal((n, d)).astype(np.float32)
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)

    a = dict(b32_img=emb(512), b32_txt=emb(512), l14_img=emb(768), l14_txt=emb(768))
    a.update(arrays or {})
    a = {k: v for k, v in a.items() if v is not None}
    if edit:
        edit(a)
    cols = {B32: rng.random(n).astype(np.float32), L14: rng.random(n).astype(np.float32)}
    cols.update(scores or {})
    (np.savez_compressed if compressed else np.savez)(folder / f"{stem}.npz", **a)
    pq.write_table(pa.table({
        "uid": uids, "url": [f"http://x.test/{stem}/{i}" for i in range(n)],
        "text": [f"caption {stem} {i}" for i in range(n)],
        "original_width": rng.integers(200, 600, n), "original_height": rng.integers(200, 600, n),
        "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uids],
        **cols,
    }), folder / f"{stem}.parquet")
    return uids, a, cols


def q(ws: Path, sql: str, params=None) -> pl.DataFrame:
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        rel = con.sql(sql, params=params) if params is not None else con.sql(sql)
        return pl.from_arrow(rel.to_arrow_table())
    finally:
        con.close()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- a pool with bad rows in both files (stored and compressed) ---------------------------------

# (member, row) -> what is planted; rows 40 and 41 have two problems each
BAD_ROWS = {
    ("l14_img", 3): "nan", ("l14_img", 5): "+inf", ("l14_img", 6): "-inf", ("l14_img", 10): "zero",
    ("l14_img", 11): "zero", ("l14_img", 12): "zero", ("l14_txt", 20): "nan", ("l14_txt", 21): "zero",
    ("b32_img", 30): "nan", ("b32_img", 31): "zero", ("b32_txt", 32): "+inf", ("b32_txt", 33): "zero",
    ("l14_img", 40): "nan", ("b32_txt", 40): "zero", ("l14_txt", 41): "-inf", ("b32_img", 41): "nan",
}
# (column, row) -> value; all these rows have good embeddings
BAD_SCORES = {(L14, 50): np.inf, (L14, 51): np.inf, (L14, 52): np.inf, (L14, 53): np.nan, (L14, 54): -np.inf,
              (B32, 55): np.inf, (B32, 56): np.nan}
N = 1500


def plant(a):
    for (member, row), what in BAD_ROWS.items():
        if what == "zero":
            a[member][row] = 0
        elif what == "nan":
            a[member][row] = np.nan
        else:  # one infinite value in an otherwise fine row
            a[member][row, 7] = np.inf if what == "+inf" else -np.inf


def expected_details() -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for (member, row), what in BAD_ROWS.items():
        prefix, kind = member.split("_")
        out.setdefault(row, set()).add(f"datacomp-{prefix} {kind}: {ZERO if what == 'zero' else NONFINITE}")
    return out


def bad_scores(n: int, seed: int):
    cols = {B32: np.random.default_rng(seed + 100).random(n).astype(np.float32),
            L14: np.random.default_rng(seed + 200).random(n).astype(np.float32)}
    for (c, row), v in BAD_SCORES.items():
        cols[c][row] = v
    return cols


@pytest.fixture(scope="module")
def bad_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("badpool")
    src, ws = root / "meta", root / "ws"
    src.mkdir()
    files = {}
    for stem, seed, compressed in (("0000000000", 1, False), ("0000000001", 2, True)):
        uids, arrays, cols = make_pair(src, stem, N, seed, compressed=compressed, edit=plant,
                                       scores=bad_scores(N, seed))
        files[stem] = (uids, arrays, cols)
    proc = run_cli("ingest", src, "-w", ws, "--json")
    out = json.loads(proc.stdout)
    bad = {files[stem][0][row] for stem in files for row in expected_details()}
    good = {u for stem in files for u in files[stem][0]} - bad
    return src, ws, files, out, bad, good


def test_bad_rows_become_issues_and_null_scores(bad_pool):
    src, ws, files, out, bad, good = bad_pool
    n_bad_rows = len(expected_details())
    assert out["shards_ingested"] == 2 and out["shards_failed"] == 0
    assert out["samples_added"] == 2 * N, "a sample with a bad embedding stays a sample"
    assert out["bad_embeddings"] == 2 * n_bad_rows and out["bad_scores"] == 2 * len(BAD_SCORES)
    issues = q(ws, "SELECT sh.path, i.key, i.uid, i.reason, i.action, i.detail FROM sample_issues i "
                   "JOIN shards sh USING (shard_id)")
    emb = issues.filter(pl.col("reason") == "bad_embedding")
    assert emb.height == 2 * n_bad_rows, "one issue per sample"
    assert set(emb["action"]) == {"unscored"}
    for stem, (uids, _, _) in files.items():
        got = {int(k): (u, set(d.split("; "))) for p, k, u, d in
               emb.filter(pl.col("path").str.ends_with(f"{stem}.parquet")).select("path", "key", "uid", "detail").rows()}
        assert got == {row: (uids[row], parts) for row, parts in expected_details().items()}
    sc = issues.filter(pl.col("reason") == "bad_score")
    assert set(sc["action"]) == {"warning"} and sc.height == 2 * len(BAD_SCORES)
    for stem, (uids, _, _) in files.items():
        got = {(int(k), d) for p, k, d in sc.filter(pl.col("path").str.ends_with(f"{stem}.parquet"))
               .select("path", "key", "detail").rows()}
        assert got == {(row, f"{c} = {v} is not a finite number") for (c, row), v in BAD_SCORES.items()}
    assert set(issues["reason"]) == {"bad_embedding", "bad_score"}

    # scores: NULL where that scorer's embedding or the value is bad, the parquet's value elsewhere
    scores = q(ws, "SELECT scorer, uid, score FROM scores")
    got = {(s, u): v for s, u, v in scores.rows()}
    assert len(got) == 2 * 2 * N
    for stem, (uids, _, cols) in files.items():
        for scorer, col in (("datacomp-l14", L14), ("datacomp-b32", B32)):
            prefix = scorer.split("-")[1]
            null_rows = ({row for (m, row) in BAD_ROWS if m.startswith(prefix)}
                         | {row for (c, row) in BAD_SCORES if c == col})
            for i, u in enumerate(uids):
                if i in null_rows:
                    assert got[(scorer, u)] is None, (stem, scorer, i)
                else:
                    assert got[(scorer, u)] == pytest.approx(float(cols[col][i]), abs=1e-7)
    assert max(v for v in scores["score"].drop_nulls()) < 1.0, "no +Inf stored"

    # the arrays are registered as they are (stored: in place; compressed: copied out, bytes unchanged)
    refs = q(ws, "SELECT e.scorer, e.kind, e.path, e.member, e.byte_offset, e.dtype, e.n_rows, e.dim, s.path AS src "
                 "FROM embeddings e JOIN shards s USING (shard_id)")
    assert refs.height == 8
    from curate.embeddings import EmbeddingRef

    for r in refs.iter_rows(named=True):
        stem = Path(r["src"]).stem
        ref = EmbeddingRef(r["scorer"], 0, r["kind"], str(ws / r["path"]), r["member"], r["byte_offset"], r["dtype"],
                           r["n_rows"], r["dim"])
        key = r["scorer"].split("-")[1] + "_" + r["kind"]
        assert np.array_equal(np.asarray(ref.open()), files[stem][1][key], equal_nan=True)
        assert (r["member"] is not None) == (stem == "0000000000")

    status = run_json("status", "-w", ws)
    counts = {(i["reason"], i["action"]): i["count"] for i in status["issues"]}
    assert counts == {("bad_embedding", "unscored"): 2 * n_bad_rows, ("bad_score", "warning"): 2 * len(BAD_SCORES)}


@pytest.mark.parametrize("scorer", ["datacomp-b32", "datacomp-l14"])
def test_embedding_stages_refuse_bad_embeddings_without_decode_failures(bad_pool, scorer):
    src, ws, files, out, bad, good = bad_pool
    n_runs = q(ws, "SELECT count(*) AS n FROM runs WHERE command = 'prune' AND status = 'ok'")["n"][0]
    proc = run_cli("prune", "-w", ws, "-p", "semdedup", "--set", f"*.scorer={scorer}", "--set", "semdedup.k=10",
                   check=False)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"{len(bad):,} of its samples have no usable embedding" in line
    assert "bad embeddings" in line and "put a decode_failures stage before it" in line
    assert q(ws, "SELECT count(*) AS n FROM runs WHERE command = 'prune' AND status = 'ok'")["n"][0] == n_runs


def _decisions(ws, run_id) -> pl.DataFrame:
    return q(ws, "SELECT stage_idx, stage, uid, keep, reason, detail FROM decisions WHERE run_id = ?", [run_id])


def _kept_after(dec: pl.DataFrame, stage_idx: int) -> set[str]:
    return set(dec.filter((pl.col("stage_idx") == stage_idx) & pl.col("keep"))["uid"].to_list())


def test_decode_failures_drops_bad_embeddings_before_dedup_and_budget(bad_pool, tmp_path):
    src, ws, files, out, bad, good = bad_pool
    issue_detail = dict(q(ws, "SELECT uid, detail FROM sample_issues WHERE reason = 'bad_embedding'").rows())
    recipe = tmp_path / "dedup.toml"
    recipe.write_text('name = "dedup"\nseed = 0\n'
                      '[[stages]]\nstage = "decode_failures"\n'
                      '[[stages]]\nstage = "exact_dedup"\nkeys = ["uid", "sha256", "url"]\n'
                      '[[stages]]\nstage = "semdedup"\nscorer = "datacomp-b32"\neps = 0.07\nk = 10\n')
    res = run_json("prune", "-w", ws, "-p", recipe)
    dec = _decisions(ws, res["run_id"])
    first = dec.filter(pl.col("stage_idx") == 0)
    dropped = first.filter(~pl.col("keep"))
    assert set(dropped["uid"]) == bad and set(dropped["reason"]) == {"bad_embedding"}
    assert dict(dropped.select("uid", "detail").rows()) == issue_detail
    assert _kept_after(dec, 0) == good, "nothing good is lost"
    assert set(dec.filter(pl.col("stage_idx") > 0)["uid"]) == good, "later stages never see a bad sample"
    # random unit vectors have no near duplicates: every good sample survives the dedup stages
    assert _kept_after(dec, 2) == good and res["kept"] == len(good)

    # a budget stage (DBP over the pool clustering of the decodable samples)
    recipe = tmp_path / "budget.toml"
    recipe.write_text('name = "budget"\nseed = 0\n'
                      '[[stages]]\nstage = "decode_failures"\n'
                      '[[stages]]\nstage = "semdedup"\nscorer = "datacomp-l14"\neps = 0.07\nk = 10\n'
                      '[[stages]]\nstage = "dbp"\nscorer = "datacomp-l14"\nk = 10\n')
    res = run_json("prune", "-w", ws, "-p", recipe, "--budget", "1000")
    dec = _decisions(ws, res["run_id"])
    assert set(dec.filter((pl.col("stage_idx") == 0) & ~pl.col("keep"))["uid"]) == bad
    kept = _kept_after(dec, 2)
    assert res["kept"] == len(kept) == 1000 and kept <= good
    assert set(dec.filter(pl.col("stage_idx") > 0)["uid"]) == good


@pytest.mark.parametrize("scorer,col", [("datacomp-l14", L14), ("datacomp-b32", B32)])
def test_clip_score_fraction_never_keeps_inf_scores(bad_pool, scorer, col):
    src, ws, files, out, bad, good = bad_pool
    res = run_json("prune", "-w", ws, "-p", "datacomp_clip_l14_30", "--set", f"clip_score.scorer={scorer}")
    dec = _decisions(ws, res["run_id"])
    # DataComp's fraction rule over the scores that are finite numbers with a usable embedding
    prefix = scorer.split("-")[1]
    uids, vals = [], []
    for stem, (u, _, cols) in files.items():
        x = cols[col].astype(np.float64).copy()
        for (m, row) in BAD_ROWS:
            if m.startswith(prefix):
                x[row] = np.nan
        x[~np.isfinite(x)] = np.nan
        uids += u
        vals.append(x)
    x = np.concatenate(vals)
    valid = ~np.isnan(x)
    t = -np.sort(-x[valid])[int(len(x) * 0.3)]
    expected = {u for u, v, ok in zip(uids, x, valid) if ok and v >= t}
    assert _kept_after(dec, 0) == expected
    inf_uids = {files[stem][0][row] for stem in files for (c, row), v in BAD_SCORES.items() if c == col}
    assert not inf_uids & _kept_after(dec, 0)
    missing = set(dec.filter(pl.col("reason") == "missing_score")["uid"])
    assert inf_uids <= missing and missing == {u for u, ok in zip(uids, valid) if not ok}


def test_stored_non_finite_scores_count_as_missing_in_prune(tmp_path):
    """A workspace written before ingest cleaned scores may hold +Inf or NaN in `scores`: prune
    treats them as missing, so +Inf never ranks first."""
    src, ws = tmp_path / "meta", tmp_path / "ws"
    src.mkdir()
    uids, _, cols = make_pair(src, "0000000000", 400, 7)
    run_json("ingest", src, "-w", ws)
    planted = {uids[3]: "inf", uids[4]: "inf", uids[5]: "nan", uids[6]: "-inf"}
    con = duckdb.connect(str(ws / "manifest.duckdb"))
    try:
        for u, v in planted.items():
            con.execute(f"UPDATE scores SET score = '{v}'::FLOAT WHERE scorer = 'datacomp-l14' AND uid = ?", [u])
    finally:
        con.close()
    res = run_json("prune", "-w", ws, "-p", "datacomp_clip_l14_30")
    dec = _decisions(ws, res["run_id"])
    assert set(dec.filter(pl.col("reason") == "missing_score")["uid"]) == set(planted)
    x = cols[L14].astype(np.float64).copy()
    x[[3, 4, 5, 6]] = np.nan
    valid = ~np.isnan(x)
    t = -np.sort(-x[valid])[int(len(x) * 0.3)]
    assert _kept_after(dec, 0) == {u for u, v, ok in zip(uids, x, valid) if ok and v >= t}


def test_mistyped_score_columns_lose_only_the_values_that_are_not_numbers(tmp_path):
    src, ws = tmp_path / "meta", tmp_path / "ws"
    src.mkdir()
    n = 8
    texts = ["0.25", " 0.5 ", "abc", "", None, "inf", "1e400", "-0.125"]
    uids, _, _ = make_pair(src, "0000000000", n, 3, scores={L14: pa.array(texts, pa.string()),
                                                              B32: pa.array([True, False] * 4)})
    out = run_json("ingest", src, "-w", ws)
    assert out["shards_ingested"] == 1 and out["samples_added"] == n
    l14 = dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'datacomp-l14'").rows())
    assert [l14[u] for u in uids] == [0.25, 0.5, None, None, None, None, None, -0.125]
    b32 = q(ws, "SELECT score FROM scores WHERE scorer = 'datacomp-b32'")
    assert b32.height == n and b32["score"].null_count() == n
    issues = q(ws, "SELECT key, detail FROM sample_issues WHERE reason = 'bad_score' AND detail LIKE 'clip_l14%'")
    assert dict((int(k), d) for k, d in issues.rows()) == {
        2: f"{L14} = 'abc' is not a finite number", 3: f"{L14} = '' is not a finite number",
        5: f"{L14} = 'inf' is not a finite number", 6: f"{L14} = '1e400' is not a finite number"}
    assert q(ws, "SELECT count(*) AS n FROM sample_issues WHERE reason = 'bad_score' "
                 "AND detail LIKE 'clip_b32%'")["n"][0] == n
    assert out["bad_scores"] == 4 + n


# ---- wrong dtype or width: the pair fails, nothing ingested from it ---------------------------------


def test_wrong_dtype_or_width_fails_the_pair(tmp_path):
    src, ws = tmp_path / "meta", tmp_path / "ws"
    src.mkdir()
    rng = np.random.default_rng(0)
    good, _, _ = make_pair(src, "a_good", 50, 1)
    cases = {
        "b_int8": ({"b32_img": rng.integers(-100, 100, (50, 512)).astype(np.int8)},
                   ["b_int8.npz:b32_img", "int8", "float16, float32 or float64"]),
        "c_b32_768": ({"b32_img": np.ones((50, 768), np.float16), "b32_txt": np.ones((50, 768), np.float16)},
                      ["c_b32_768.npz:b32_img is 768 wide, expected 512", "datacomp-b32 embeddings are 512 wide"]),
        "d_txt_256": ({"b32_txt": np.ones((50, 256), np.float16)},
                      ["d_txt_256.npz:b32_txt is 256 wide, expected 512"]),
        "e_l14_512": ({"l14_img": np.ones((50, 512), np.float16), "l14_txt": np.ones((50, 512), np.float16)},
                      ["e_l14_512.npz:l14_img is 512 wide, expected 768", "datacomp-l14 embeddings are 768 wide"]),
        "f_sibling": ({"vitx_img": np.ones((50, 64), np.float16), "vitx_txt": np.ones((50, 32), np.float16)},
                      ["f_sibling.npz:vitx_txt is 32 wide, expected 64", "its sibling vitx_img is 64 wide"]),
        "g_float_obj": ({"l14_txt": np.ones((50, 768), np.complex64)}, ["g_float_obj.npz:l14_txt", "complex64"]),
    }
    bad_uids = set()
    for i, (stem, (arrays, _)) in enumerate(cases.items()):
        u, _, _ = make_pair(src, stem, 50, 10 + i, arrays=arrays, compressed=i % 2 == 1)
        bad_uids |= set(u)
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["shards_failed"] == len(cases) and out["shards_ingested"] == 1 and out["samples_added"] == 50
    errors = {Path(f["path"]).stem: f["error"] for f in out["failures"]}
    assert set(errors) == set(cases)
    for stem, (_, fragments) in cases.items():
        assert "\n" not in errors[stem]
        for frag in fragments:
            assert frag in errors[stem], (stem, errors[stem])
    shards = q(ws, "SELECT path, status, error, shard_id FROM shards")
    failed = shards.filter(pl.col("status") == "failed")
    assert failed.height == len(cases) and failed["error"].null_count() == 0
    ids = failed["shard_id"].to_list()
    for table in ("samples", "embeddings", "sample_issues"):
        assert q(ws, f"SELECT count(*) AS n FROM {table} WHERE list_contains(?, shard_id)", [ids])["n"][0] == 0
    assert set(q(ws, "SELECT uid FROM samples")["uid"]) == set(good)
    assert not set(q(ws, "SELECT uid FROM scores")["uid"]) & bad_uids
    assert dict(q(ws, "SELECT name, dim FROM scorers").rows()) == {"datacomp-b32": 512, "datacomp-l14": 768}


def test_a_second_file_of_another_width_fails_and_the_first_stays(tmp_path):
    first, second, ws = tmp_path / "one", tmp_path / "two", tmp_path / "ws"
    first.mkdir()
    second.mkdir()
    u1, a1, _ = make_pair(first, "0000000000", 60, 1, arrays={"vitx_img": np.eye(60, 64, dtype=np.float16),
                                                              "vitx_txt": np.eye(60, 64, dtype=np.float16)})
    run_json("ingest", first, "-w", ws)
    make_pair(second, "0000000001", 60, 2, arrays={"vitx_img": np.eye(60, 96, dtype=np.float16),
                                                   "vitx_txt": np.eye(60, 96, dtype=np.float16)})
    proc = run_cli("ingest", second, "-w", ws, "--json", check=False)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["shards_failed"] == 1 and out["samples_added"] == 0
    err = out["failures"][0]["error"]
    assert "0000000001.npz:vitx_img is 96 wide, expected 64" in err
    assert "datacomp-vitx is 64 wide in this workspace" in err and "\n" not in err
    # the first file is intact
    assert set(q(ws, "SELECT uid FROM samples")["uid"]) == set(u1)
    emb = q(ws, "SELECT scorer, kind, dim, n_rows FROM embeddings WHERE scorer = 'datacomp-vitx' ORDER BY kind")
    assert emb.rows() == [("datacomp-vitx", "img", 64, 60), ("datacomp-vitx", "txt", 64, 60)]
    assert q(ws, "SELECT dim FROM scorers WHERE name = 'datacomp-vitx'")["dim"].to_list() == [64]
    assert q(ws, "SELECT status FROM shards ORDER BY shard_id")["status"].to_list() == ["ok", "failed"]


def test_prune_refuses_embeddings_of_one_scorer_with_different_widths(tmp_path):
    """A workspace an older version wrote may hold arrays of one scorer with different widths:
    the stage that reads them gets one line naming the scorer, the widths and the shards."""
    from curate.embeddings import EmbeddingRef, register
    from curate.manifest import Manifest

    src, ws = tmp_path / "meta", tmp_path / "ws"
    src.mkdir()
    make_pair(src, "0000000000", 100, 1)
    make_pair(src, "0000000001", 100, 2)
    run_json("ingest", src, "-w", ws)
    wide = tmp_path / "wide.npy"
    e = np.random.default_rng(0).standard_normal((100, 768)).astype(np.float32)
    np.save(wide, (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16))
    m = Manifest(ws / "manifest.duckdb")
    try:
        register(m, EmbeddingRef("datacomp-b32", 1, "img", str(wide), None, None, "<f2", 100, 768))
    finally:
        m.close()
    proc = run_cli("prune", "-w", ws, "-p", "semdedup", "--set", "*.scorer=datacomp-b32", "--set", "semdedup.k=4",
                   check=False)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "img embeddings of scorer 'datacomp-b32' differ in width" in line
    assert "512 wide in shard 0" in line and "768 wide in shard 1" in line


# ---- lower-level pieces ----------------------------------------------------------------------------


def test_scan_rows_finds_what_float32_cannot_use(tmp_path):
    from curate.sources.datacomp import npy_location, scan_rows

    x = np.random.default_rng(0).standard_normal((300, 16))
    x[[5, 100]] = 0
    x[7, 3] = np.nan
    x[8] = 1e-30    # squares underflow in float32: a zero norm
    x[9] = 1e20     # squares overflow in float32
    x[10, 0] = 1e300  # not a float32 at all
    for dtype in (np.float64, np.float32):
        with np.errstate(over="ignore"):
            y = x.astype(dtype)
        for fortran in (False, True):
            path = tmp_path / f"{np.dtype(dtype).name}-{fortran}.npy"
            np.save(path, np.asfortranarray(y) if fortran else y)
            offset, shape, dt, fo = npy_location(path)
            assert fo == fortran
            rows, codes = scan_rows(path, offset, dt, shape, fo, chunk_bytes=16 * 4 * 7)  # 7 rows a chunk
            # 1: a value not finite in float32, 2: a zero norm, 3: a norm that overflows
            assert dict(zip(rows.tolist(), codes.tolist())) == {5: 2, 7: 1, 8: 2, 9: 3, 10: 1, 100: 2}
    # fp16 (either byte order): the bits decide; -0.0 is zero, a subnormal row is not
    h = np.random.default_rng(1).standard_normal((50, 16)).astype(np.float16)
    h[3] = np.nan
    h[4, 2] = -np.inf
    h[5] = -0.0
    h[6] = np.float16(6e-8)
    h[49] = 0
    for dtype in ("<f2", ">f2"):
        path = tmp_path / f"half{dtype[0] == '>'}.npy"
        np.save(path, h.astype(dtype))
        offset, shape, dt, fo = npy_location(path)
        assert dt == np.dtype(dtype)
        rows, codes = scan_rows(path, offset, dt, shape, fo, chunk_bytes=16 * 4 * 7)
        assert dict(zip(rows.tolist(), codes.tolist())) == {3: 1, 4: 1, 5: 2, 49: 2}


def test_fortran_order_members_are_read_back_row_for_row(tmp_path):
    """A Fortran-order member (np.save of a transposed array) is copied out byte for byte and
    keeps its order, so row i is still row i (it used to be read as C order: scrambled)."""
    src, ws = tmp_path / "meta", tmp_path / "ws"
    src.mkdir()
    for stem, compressed in (("0000000000", False), ("0000000001", True)):
        def edit(a):
            a["b32_img"] = np.asfortranarray(a["b32_img"])
            a["b32_img"][4] = 0
        make_pair(src, stem, 40, int(stem[-1]), compressed=compressed, edit=edit)
    run_json("ingest", src, "-w", ws)
    from curate.embeddings import EmbeddingRef

    for r in q(ws, "SELECT e.*, s.path AS src FROM embeddings e JOIN shards s USING (shard_id) "
                   "WHERE e.scorer = 'datacomp-b32' AND e.kind = 'img'").iter_rows(named=True):
        with np.load(Path(r["src"]).with_suffix(".npz")) as z:
            want = z["b32_img"]
        ref = EmbeddingRef(r["scorer"], r["shard_id"], r["kind"], str(ws / r["path"]), r["member"], r["byte_offset"],
                           r["dtype"], r["n_rows"], r["dim"])
        assert np.array_equal(np.asarray(ref.open()), want)
    got = q(ws, "SELECT s.path, i.key, i.detail FROM sample_issues i JOIN shards s USING (shard_id)")
    assert sorted((Path(p).stem, k, d) for p, k, d in got.rows()) == [
        ("0000000000", "4", "datacomp-b32 img: zero vector"), ("0000000001", "4", "datacomp-b32 img: zero vector")]


def test_decode_failures_names_bad_embeddings_and_undecodable_images():
    from curate.stages import get_stage
    from curate.stages.base import StageInput

    f = pl.DataFrame({"uid": [f"{i:032x}" for i in range(4)],
                      "decode_error": [None, "truncated: image file is truncated",
                                       "bad_embedding: datacomp-l14 img: zero vector", "not_an_image"]})
    dec = get_stage("decode_failures")().apply(StageInput(f, {}, 0, None, None)).decisions
    assert dec["keep"].to_list() == [True, False, False, False]
    assert dec["reason"].to_list() == [None, "undecodable", "bad_embedding", "undecodable"]
    assert dec["detail"].to_list() == [None, "truncated: image file is truncated", "datacomp-l14 img: zero vector",
                                       "not_an_image"]


# ---- curate score ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_token_model(tmp_path_factory):
    """A tiny open_clip checkpoint whose embedding of one BPE token is NaN, and a wds pool in
    which some captions hold that token: their text embeddings are NaN."""
    import open_clip
    import torch

    from curate.models.specs import ensure_configs_registered

    root = tmp_path_factory.mktemp("nanscore")
    pool, ws = root / "pool", root / "ws"
    run_cli("synth", pool, "--layout", "wds", "--n", "80", "--seed", "3", "--shard-size", "40")
    run_json("ingest", pool, "-w", ws)
    caps = q(ws, "SELECT uid, caption FROM samples WHERE image_ext IS NOT NULL")
    ensure_configs_registered()
    tok = open_clip.get_tokenizer("curate-tiny-vit")
    tokens = tok([c or "" for c in caps["caption"].to_list()]).numpy()
    special = {int(tokens[0, 0])} | {int(t.max()) for t in tokens}  # start and end of text
    ids, counts = np.unique(np.concatenate([np.unique(t[t > 0]) for t in tokens]), return_counts=True)
    pick = [(abs(c - len(tokens) * 0.3), int(i)) for i, c in zip(ids, counts) if int(i) not in special and c >= 3]
    token = min(pick)[1]
    holders = {u for u, t in zip(caps["uid"].to_list(), tokens) if token in t}
    assert 3 <= len(holders) < len(tokens)
    torch.manual_seed(0)
    model = open_clip.create_model("curate-tiny-vit")
    with torch.no_grad():
        model.token_embedding.weight[token] = float("nan")
    ckpt = root / "nan.pt"
    torch.save(model.state_dict(), ckpt)
    return pool, ws, ckpt, holders


def test_score_records_non_finite_model_embeddings(nan_token_model):
    pool, ws, ckpt, holders = nan_token_model
    run_json("score", "-w", ws, "--model", f"curate-tiny-vit@{ckpt},name=tiny", "--device", "cpu",
             "--batch-size", "16", "--workers", "0", "--flip")
    issues = q(ws, "SELECT uid, reason, detail FROM sample_issues WHERE action = 'unscored'")
    undecodable = set(issues.filter(pl.col("reason") == "undecodable")["uid"])
    emb = issues.filter(pl.col("reason") == "bad_embedding")
    assert set(emb["uid"]) == holders - undecodable and emb.height == len(set(emb["uid"]))
    assert set(emb["detail"]) == {"tiny txt: non-finite values"}
    scores = dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'tiny'").rows())
    flips = dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'tiny:flip'").rows())
    for u in holders:
        assert scores[u] is None and flips[u] is None
    empty = set(issues.filter(pl.col("reason") == "empty_caption")["uid"])
    assert {u for u, s in scores.items() if s is None} == holders | undecodable | empty
    assert all(np.isfinite(s) for s in scores.values() if s is not None)
    # arrays: zeros where unusable, finite everywhere
    rows = q(ws, "SELECT s.uid, s.row_idx, e.path FROM samples s JOIN embeddings e USING (shard_id) "
                 "WHERE e.scorer = 'tiny' AND e.kind = 'txt'")
    arrays = {p: np.load(ws / p) for p in set(rows["path"])}  # workspace files: relative
    for u, r, p in rows.rows():
        assert np.isfinite(arrays[p][r]).all()
        assert (not arrays[p][r].any()) == (u in holders)
    # prune: the bad samples have no usable embedding, decode_failures names them
    proc = run_cli("prune", "-w", ws, "-p", "semdedup", "--set", "*.scorer=tiny", "--set", "semdedup.k=4",
                   check=False)
    assert proc.returncode == 2 and "no usable embedding" in one_line(proc.stderr)
    res = run_json("prune", "-w", ws, "-p", "decontaminate", "--set", "decontaminate.scorer=tiny",
                   "--set", f"decontaminate.eval_embeddings={_eval_npy(ws)}")
    dec = _decisions(ws, res["run_id"]).filter(pl.col("stage_idx") == 0)
    dropped = dec.filter(~pl.col("keep"))
    assert set(dropped.filter(pl.col("reason") == "bad_embedding")["uid"]) == holders - undecodable
    assert set(dropped.filter(pl.col("reason") == "undecodable")["uid"]) == undecodable
    # scoring another model keeps this one's bad_embedding rows (each scorer replaces only its own)
    before = q(ws, "SELECT uid, detail FROM sample_issues WHERE reason = 'bad_embedding' ORDER BY uid")
    ok_ckpt = ws.parent / "ok.pt"
    import open_clip
    import torch

    torch.save(open_clip.create_model("curate-tiny-vit").state_dict(), ok_ckpt)
    run_json("score", "-w", ws, "--model", f"curate-tiny-vit@{ok_ckpt},name=other", "--device", "cpu",
             "--batch-size", "16")
    assert q(ws, "SELECT uid, detail FROM sample_issues WHERE reason = 'bad_embedding' ORDER BY uid").equals(before)
    # and scoring this one again replaces its rows, not adds to them
    run_json("score", "-w", ws, "--model", f"curate-tiny-vit@{ckpt},name=tiny", "--device", "cpu",
             "--batch-size", "16", "--flip", "--force")
    assert q(ws, "SELECT uid, detail FROM sample_issues WHERE reason = 'bad_embedding' ORDER BY uid").equals(before)


def _eval_npy(ws: Path) -> Path:
    path = ws.parent / "eval.npy"
    e = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    np.save(path, e / np.linalg.norm(e, axis=1, keepdims=True))
    return path


def test_write_and_register_shard_outputs_with_unusable_rows(tmp_path):
    """`write_shard_outputs` + `register_shard` on real arrays: NaN, Inf and zero rows of a
    decoded sample become `bad_embedding` issues with NULL scores (flip included); undecodable
    rows keep their own reason; the arrays on disk hold zeros wherever a row is unusable."""
    from types import SimpleNamespace

    from curate.manifest import Manifest
    from curate.score.runner import _new_acc, plan_jobs, register_shard, write_shard_outputs
    from curate.workspace import Workspace

    pool, ws_dir = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "wds", "--n", "20", "--seed", "2", "--no-defects")
    run_json("ingest", pool, "-w", ws_dir)
    ws = Workspace(ws_dir)
    m = Manifest(ws_dir / "manifest.duckdb")
    try:
        jobs, _ = plan_jobs(m, ["fake"], flip=True, force=False)
        job = jobs[0]
        n = len(job.rows)
        model = SimpleNamespace(name="fake", embed_dim=8)
        acc = _new_acc(job, [model], flip=True)
        rng = np.random.default_rng(0)
        for kind in ("img", "txt", "img_flip"):
            e = rng.standard_normal((job.n_rows, 8)).astype(np.float32)
            acc.arrays[("fake", kind)][:] = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)
        acc.scores["fake"][:] = rng.random(n)
        acc.scores["fake:flip"][:] = rng.random(n)
        r = job.rows
        acc.arrays[("fake", "img")][r[1]] = np.nan
        acc.arrays[("fake", "img")][r[2], 0] = np.inf
        acc.arrays[("fake", "txt")][r[3]] = 0
        acc.arrays[("fake", "img_flip")][r[4]] = 0
        acc.arrays[("fake", "img")][r[5]] = np.nan  # and its image did not decode
        acc.reasons[5] = ("truncated", "image file is truncated")
        acc.scores["fake"][5] = np.nan
        acc.scores["fake:flip"][5] = np.nan
        acc.filled = n
        write_shard_outputs(ws, acc, flip=True)
        counts = register_shard(m, ws, job.shard_id, 1, [{"name": "fake", "kind": "open_clip", "spec": "fake",
                                                           "dim": 8, "params": "{}"}])
    finally:
        m.close()
    assert counts["bad_embedding"] == 4 and counts["failed"] == 1
    u = job.uids
    issues = {(a, b): c for a, b, c in q(ws_dir, "SELECT uid, reason, detail FROM sample_issues").rows()}
    assert issues == {(u[1], "bad_embedding"): "fake img: non-finite values",
                      (u[2], "bad_embedding"): "fake img: non-finite values",
                      (u[3], "bad_embedding"): "fake txt: zero vector",
                      (u[4], "bad_embedding"): "fake img_flip: zero vector",
                      (u[5], "undecodable"): "truncated: image file is truncated"}
    s = dict(q(ws_dir, "SELECT uid, score FROM scores WHERE scorer = 'fake'").rows())
    f = dict(q(ws_dir, "SELECT uid, score FROM scores WHERE scorer = 'fake:flip'").rows())
    assert [s[x] is None for x in u[:6]] == [False, True, True, True, False, True]
    assert [f[x] is None for x in u[:6]] == [False, False, False, True, True, True]
    assert all(s[x] is not None and f[x] is not None for x in u[6:])
    img = np.load(ws.embedding_path("fake", job.shard_id, "img"))
    assert np.isfinite(img).all()
    assert not img[[r[1], r[2], r[5]]].any() and img[r[0]].any() and img[r[3]].any()
