"""Property-based tests (hypothesis) of the invariants the docs promise:

1. uids (curate/uids.py, docs/workspace.md "uids"): the DataComp pair form round-trips and keeps
   the order; `normalise_uid` accepts exactly "32 hex characters, any case, surrounding white
   space"; the DataComp submission file (curate/export/datacomp.py) holds exactly the selected
   uids, as DataComp's resharder looks them up.
2. DBP quotas (curate/stages/dbp.py `dbp_allocate`, docs/pruning.md "Density-Based Pruning"):
   Σ = min(budget, pool), 0 <= quota <= |C_j|, the documented floor, the documented continuous
   solution and its largest-remainder rounding, determinism; and the stage keeps exactly them.
3. SemDeDup (curate/stages/semdedup.py, docs/pruning.md "SemDeDup"): no two kept samples of a
   cluster are duplicates (cos >= 1 - eps), every dropped sample names an earlier sample of its
   cluster at or above the threshold (a kept one under the greedy rule, a chain that ends in a
   kept one under the paper rule), the paper rule is the definition, decisions are
   deterministic and independent of input order; through the frame path and the cluster-index
   path the runner uses.
4. Export (curate/export/, docs/export.md): a webdataset export of any selection of a real pool
   holds every selected sample's members byte for byte under unique keys, in shards of the
   requested size, with matching sizes.json; parquet and DataComp exports hold exactly the
   selected uids. One real pool (tars with JPEGs, ingested with the real CLI) is built per
   module; hypothesis picks selections, shard sizes and seeds.

Example counts keep the file under about a minute on two shared cores;
`HYPOTHESIS_PROFILE=thorough` multiplies them (about 20x).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st

from curate.cli.main import main as curate_main
from curate.uids import UID_SPACE, is_uid, normalise_uid, pair_to_uid, uid_to_pair, url_uid, wds_uid

# ---------------------------------------------------------------------------------------------
# Settings: a fast default, and `HYPOTHESIS_PROFILE=thorough` for many more examples.
# No example database (it would live in the working tree); failures print their falsifying
# example and a @reproduce_failure blob instead.
# ---------------------------------------------------------------------------------------------

# Hypothesis keeps a cache directory (.hypothesis/) in the current directory: put it in the
# temporary directory instead, unless the caller chose one.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "curate-hypothesis")

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("thorough", deadline=None, database=None, print_blob=True, max_examples=2000,
                          suppress_health_check=_SUPPRESS)
if THOROUGH:
    settings.load_profile("thorough")


def props(n: int, thorough: int | None = None) -> settings:
    """Settings for one property: n examples by default, `thorough` (default 20·n) under the
    thorough profile. The default run is derandomised (the same examples every run, so
    `make test` and CI see one result); the thorough profile explores afresh each time, and
    what it finds becomes an @example."""
    return settings(max_examples=(thorough or 20 * n) if THOROUGH else n, deadline=None, database=None,
                    print_blob=True, suppress_health_check=_SUPPRESS, derandomize=not THOROUGH)


HEX = "0123456789abcdef"
# Every character Python's str.isspace() calls white space (what `normalise_uid` strips).
# docs/workspace.md: the space around a uid that every source strips is ASCII white space
WHITESPACE = " \t\n\r\f\v"
OTHER_SPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace() and chr(c) not in WHITESPACE)
EDGE_UIDS = [
    "0" * 32, "f" * 32, "0" * 31 + "1", "1" + "0" * 31, "8" + "0" * 31, "7" + "f" * 31,
    "0" * 16 + "f" * 16, "f" * 16 + "0" * 16, "0" * 15 + "1" + "0" * 16, "0" * 16 + "8" + "0" * 15,
    "0" * 16 + "7" + "f" * 15, "8" + "0" * 15 + "7" + "f" * 15, "7" + "f" * 15 + "8" + "0" * 15,
    "f" * 16 + "0" * 15 + "1", "0" * 15 + "1" + "f" * 16,
]

uid32 = st.one_of(st.sampled_from(EDGE_UIDS), st.integers(0, 2**128 - 1).map(lambda i: f"{i:032x}"))
u64 = st.integers(0, 2**64 - 1)


def cli(*args) -> dict:
    """The real `curate` command in this process (as tests/test_export.py runs it); its --json summary."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = curate_main([*map(str, args), "--json"])
    if rc != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} exited {rc}\n{err.getvalue()}")
    lines = out.getvalue().strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


# =============================================================================================
# 1. uids
# =============================================================================================

@props(200, 5000)
@given(uid32)
def test_uid_pair_round_trip(u):
    hi, lo = uid_to_pair(u)
    assert 0 <= hi < 2**64 and 0 <= lo < 2**64
    assert pair_to_uid(hi, lo) == u
    # the high half is the first 16 hex digits, the low half the last 16 (DataComp's resharder
    # and curate's DuckDB conversion both split the string this way)
    assert (hi, lo) == (int(u[:16], 16), int(u[16:], 16))


@props(200, 5000)
@given(u64, u64)
def test_pair_uid_round_trip(hi, lo):
    u = pair_to_uid(hi, lo)
    assert is_uid(u) and uid_to_pair(u) == (hi, lo)
    # numpy's uint64 scalars (what np.load gives back) convert alike
    assert pair_to_uid(np.uint64(hi), np.uint64(lo)) == u


@props(200, 5000)
@given(uid32, uid32)
def test_pair_order_is_uid_order(a, b):
    """Sorting the (high, low) pairs sorts the uids: what makes a sorted submission findable."""
    assert (a < b) == (uid_to_pair(a) < uid_to_pair(b))
    assert (a == b) == (uid_to_pair(a) == uid_to_pair(b))


@st.composite
def uid_spellings(draw):
    """A valid uid in random case with random surrounding white space; and the uid."""
    u = draw(uid32)
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in u)
    pad = st.text(st.sampled_from(WHITESPACE), max_size=4)
    return draw(pad) + cased + draw(pad), u


@props(200, 5000)
@given(uid_spellings())
def test_normalise_uid_accepts_any_case_and_surrounding_space(spelled):
    s, u = spelled
    assert normalise_uid(s) == u
    assert normalise_uid(u) == u and is_uid(u)


def _spec_normalise(s: str) -> str | None:
    """docs/workspace.md: 32 hex characters in any case, surrounding white space allowed."""
    core = s.strip(WHITESPACE)
    if len(core) == 32 and all(c in HEX + HEX.upper() for c in core):
        return core.lower()
    return None


@st.composite
def near_uids(draw):
    """Strings close to a uid: one character replaced, inserted or deleted, inner white space,
    look-alike characters (fullwidth, Arabic-Indic digits, Kelvin sign), a trailing newline,
    Unicode spaces that are not ASCII white space (U+001C..U+001F, U+0085, U+00A0, ...)."""
    u = draw(uid32)
    i = draw(st.integers(0, 31))
    odd = st.sampled_from(list("gGxz-_ :\n\t\0") + ["\uff21", "\uff10", "\u0663", "\u212a", "\u0130", "\u00e9",
                                                     "0x", "\u200b", "\ufeff"] + list(OTHER_SPACE))
    kind = draw(st.sampled_from(["replace", "insert", "delete", "prefix", "suffix", "short", "long"]))
    if kind == "replace":
        return u[:i] + draw(odd) + u[i + 1:]
    if kind == "insert":
        return u[:i] + draw(odd) + u[i:]
    if kind == "delete":
        return u[:i] + u[i + 1:]
    if kind == "prefix":
        return draw(odd) + u
    if kind == "suffix":
        return u + draw(odd)
    if kind == "short":
        return u[:draw(st.integers(0, 31))]
    return u + draw(st.text(st.sampled_from(HEX), min_size=1, max_size=3))


@props(300, 8000)
@given(st.one_of(st.text(max_size=40), near_uids(), uid_spellings().map(lambda t: t[0])))
def test_normalise_uid_rejects_everything_else(s):
    assert normalise_uid(s) == _spec_normalise(s)


@props(100, 2000)
@given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(min_size=32, max_size=32),
                 uid32.map(str.encode), uid32.map(lambda u: [u]), uid32.map(lambda u: int(u, 16)),
                 uid32.map(bytearray.fromhex)))
def test_normalise_uid_rejects_non_strings(v):
    assert normalise_uid(v) is None
    assert not is_uid(v)


@props(200, 5000)
@given(st.one_of(st.text(max_size=40), near_uids(), uid32))
@example("0" * 32 + "\n")  # `$` in `^[0-9a-f]{32}$` also matches before a final newline
def test_is_uid_is_exactly_32_lowercase_hex(s):
    """`is_uid`: "True for a DataComp-style uid: 32 lowercase hex characters"."""
    assert is_uid(s) == (len(s) == 32 and all(c in HEX for c in s))


@props(40, 800)
@given(st.lists(st.one_of(uid_spellings().map(lambda t: t[0]), near_uids()), min_size=1, max_size=8))
@example(["0" * 32 + "\x1f"])  # Python's str.strip() strips U+001C..U+001F; polars' strip_chars() does not
@example(["g" + "0" * 31, ""])  # a blank uid is no uid (CI found it)
def test_url_table_uids_are_judged_like_normalise_uid(given_uids):
    """docs/workspace.md states one rule for every source ("case and surrounding space are
    normalised; anything else is recorded as bad_uid"). A URL table's given uid
    (`read_url_table`, what `curate ingest` and `curate download` use; DataComp metadata goes
    through the same polars expression in curate/sources/ingest.py) and a webdataset json uid
    (`normalise_uid`, curate/sources/wds.py) must be judged alike."""
    from curate.sources.urls import read_url_table

    n = len(given_uids)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "urls.parquet"
        pl.DataFrame({"url": [f"http://example.com/{i}.jpg" for i in range(n)], "caption": ["c"] * n,
                      "uid": given_uids}).write_parquet(p)
        table = read_url_table(p)
    accepted = dict(zip(table.frame["key"].to_list(), table.frame["uid"].to_list()))
    reasons = dict(table.issues_df.select("key", "reason").rows())
    seen = set()
    for i, s in enumerate(given_uids):
        want = normalise_uid(s)
        got = accepted.get(str(i))
        note(f"row {i} uid {s!r}: url table -> {got!r} / {reasons.get(str(i))}; normalise_uid -> {want!r}")
        if not s.strip(UID_SPACE):  # blank: no uid given, one is derived (as for a json uid)
            assert reasons.get(str(i)) is None and is_uid(got)
        elif want is None:
            assert reasons.get(str(i)) == "bad_uid"
        elif want in seen:
            assert reasons.get(str(i)) == "duplicate_uid"
        else:
            assert got == want
        if want is not None:
            seen.add(want)


@props(100, 2000)
@given(st.text(), st.text(), st.integers(0, 10**6), st.text(min_size=1))
def test_derived_uids_are_uids_and_deterministic(url, caption, k, key):
    u = url_uid(url, caption, k)
    assert is_uid(u) and u == url_uid(url, caption, k)
    assert u != url_uid(url, caption, k + 1)  # repeated rows stay distinct samples
    w = wds_uid("ab" * 32, key)
    assert is_uid(w) and w == wds_uid("ab" * 32, key)


# =============================================================================================
# 1b. The DataComp submission file (curate/export/datacomp.py)
# =============================================================================================

U16 = np.dtype("u8,u8")  # DataComp resharder's `u16`


def resharder_count(subset: np.ndarray, uid: str) -> int:
    """How often DataComp's resharder writes the sample `uid` for this subset file
    (mlfoundations/datacomp resharder.py: `key_u16 = np.array([divmod(int(key_str, 16), 2**64)], u16)[0]`,
    `count = searchsorted(subset, key_u16, "right") - searchsorted(subset, key_u16, "left")`)."""
    key = np.array([divmod(int(uid, 16), 2**64)], U16)[0]
    return int(np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left"))


def check_submission_file(path: Path, selected: set[str], pool: list[str]) -> None:
    raw = path.read_bytes()
    assert raw[:6] == b"\x93NUMPY"  # the resharder's own test for a NumPy file
    arr = np.load(path, allow_pickle=False)
    assert arr.dtype == U16 and arr.dtype.descr == [("f0", "<u8"), ("f1", "<u8")] and arr.ndim == 1
    pairs = arr.tolist()
    assert [pair_to_uid(h, lo) for h, lo in pairs] == sorted(selected)  # exactly the set, ascending
    assert all(a < b for a, b in zip(pairs, pairs[1:]))  # strictly ascending (f0, f1): no repeats
    mm = np.load(path, mmap_mode="r")  # how the resharder opens it
    for u in pool:
        assert resharder_count(mm, u) == (1 if u in selected else 0), u


@props(100, 2000)
@given(st.lists(uid32, min_size=1, max_size=40, unique=True))
def test_submission_array_round_trips_through_npy(uids):
    """The submission form built with `uid_to_pair`, sorted, saved as .npy: `verify_submission`
    accepts it and it reads back to the same uids, each found once by the resharder's lookup."""
    from curate.export.datacomp import SUBMISSION_DTYPE, verify_submission

    arr = np.array(sorted(uid_to_pair(u) for u in uids), dtype=SUBMISSION_DTYPE)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "uids.npy"
        np.save(p, arr, allow_pickle=False)
        rep = verify_submission(p, None, strict=True)
        assert rep["ok"], rep
        assert rep["samples"] == rep["unique"] == len(uids) and rep["sorted"]
        check_submission_file(p, set(uids), uids)
        # a descent anywhere is caught (DataComp would silently pick wrong samples)
        if len(uids) > 1:
            bad = arr[::-1].copy()
            np.save(p, bad, allow_pickle=False)
            assert not verify_submission(p, None)["ok"]


@pytest.fixture(scope="module")
def metadata_pool(tmp_path_factory):
    """A DataComp-metadata pool (synth parquet + npz, ingested with the real CLI) whose uids are
    the edge values of the 128-bit range and random ones, written in mixed case with surrounding
    space in the parquet (ingest normalises them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("props_meta")
    cli("synth", d / "meta", "--layout", "datacomp", "--n", 80, "--seed", 3, "--dims", "8,8",
        "--shard-size", 40, "--no-defects")
    rng = np.random.default_rng(7)
    uids = EDGE_UIDS + ["".join(rng.choice(list(HEX), 32)) for _ in range(80 - len(EDGE_UIDS))]
    assert len(set(uids)) == 80
    spelled = [(" " if i % 3 == 0 else "") + (u.upper() if i % 2 else u) + ("\t" if i % 5 == 0 else "")
               for i, u in enumerate(uids)]
    at = 0
    for p in sorted((d / "meta").glob("*.parquet")):
        if p.name.startswith("_"):
            continue
        t = pq.read_table(p)
        n = t.num_rows
        t = t.set_column(t.schema.get_field_index("uid"), "uid", pa.array(spelled[at:at + n], pa.string()))
        pq.write_table(t, p)
        at += n
    assert at == 80
    ws = d / "ws"
    res = cli("ingest", d / "meta", "-w", ws)
    assert res["samples_added"] == 80, res
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        got = sorted(r[0] for r in con.execute("SELECT uid FROM samples").fetchall())
    finally:
        con.close()
    assert got == sorted(uids)  # ingest normalised case and space
    return {"dir": d, "ws": ws, "uids": uids}


def read_only_manifest(ws: Path):
    from curate.manifest import Manifest

    return Manifest(ws / "manifest.duckdb", read_only=True)


def selection_of(uids):
    """A selection of these uids, as a prune run's result (the run id only names it)."""
    from curate.export.select import Selection

    return Selection(run_id=0, stage_idx=0, stage="props",
                     uids=pl.DataFrame({"uid": pl.Series(list(uids), dtype=pl.Utf8)}))


@props(25, 400)
@given(data=st.data())
def test_write_submission_round_trips_the_selected_uids(metadata_pool, data):
    """`write_submission` (what `curate export --format datacomp` runs): the .npy holds exactly the
    selection, sorted as DataComp's resharder needs, in any selection order; it verifies."""
    from curate.export.datacomp import verify_submission, write_submission

    pool = metadata_pool["uids"]
    chosen = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool), unique=True), "selection")
    with tempfile.TemporaryDirectory(dir=metadata_pool["dir"]) as d, read_only_manifest(metadata_pool["ws"]) as m:
        out = Path(d) / "uids.npy"
        res = write_submission(m, selection_of(chosen), out)
        assert res["samples"] == len(chosen) and res["verified"] and res["bytes"] == out.stat().st_size
        check_submission_file(out, set(chosen), pool)
        rep = verify_submission(out, m, strict=True)
        assert rep["ok"] and rep["in_pool"] == len(chosen) and rep["not_in_pool"] == 0
        assert not list(Path(d).glob(".*partial*"))


# =============================================================================================
# 2. DBP quotas (curate/stages/dbp.py)
# =============================================================================================

@st.composite
def cluster_sizes_st(draw):
    shape = draw(st.sampled_from(["any", "tiny", "one_huge", "one", "empties", "all_empty"]))
    if shape == "one":
        return [draw(st.integers(0, 10**6))]
    if shape == "all_empty":
        return [0] * draw(st.integers(1, 5))
    if shape == "tiny":
        return draw(st.lists(st.integers(0, 3), min_size=1, max_size=200))
    if shape == "one_huge":
        small = draw(st.lists(st.integers(0, 5), min_size=0, max_size=30))
        i = draw(st.integers(0, len(small)))
        return small[:i] + [draw(st.integers(10**4, 10**9))] + small[i:]
    if shape == "empties":
        return draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 7, 50]), min_size=1, max_size=40))
    return draw(st.lists(st.integers(0, 2000), min_size=1, max_size=60))


@st.composite
def dbp_case(draw):
    from curate.stages.dbp import softmax_shares

    sizes = np.array(draw(cluster_sizes_st()), dtype=np.int64)
    k = len(sizes)
    active = sizes > 0
    total = int(sizes.sum())
    k_active = int(active.sum())
    how = draw(st.sampled_from(["softmax", "softmax", "equal", "one_hot", "raw"]))
    if how == "softmax":
        comp = np.array(draw(st.lists(st.floats(0, 2, allow_nan=False), min_size=k, max_size=k)))
        tau = draw(st.sampled_from([1e-3, 0.01, 0.1, 0.5, 1.0, 10.0]))
        shares = softmax_shares(comp, tau, active)
    elif how == "equal":
        shares = softmax_shares(np.zeros(k), 0.1, active)
    elif how == "one_hot":
        shares = np.zeros(k)
        if k_active:
            shares[np.flatnonzero(active)[draw(st.integers(0, k_active - 1))]] = 1.0
    else:  # any non-negative weights over the active clusters, normalised
        w = np.array(draw(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=k, max_size=k))) * active
        shares = w / w.sum() if w.sum() > 0 else softmax_shares(np.zeros(k), 0.1, active)
    budget = draw(st.one_of(
        st.sampled_from(sorted({0, 1, max(0, k_active - 1), k_active, max(0, total - 1), total, total + 1,
                                total * 2 + 3})),
        st.integers(0, total + 5)))
    lb_ratio = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0]), st.floats(0, 5, allow_nan=False)))
    return sizes, shares, int(budget), float(lb_ratio)


def _documented_floor(sizes, budget, lb_ratio) -> int:
    """docs/pruning.md: lb = floor(lb_ratio · N / k_active); if Σ min(lb, |C_j|) > N it is lowered
    to floor(N / k_active)."""
    active = sizes > 0
    k_active = int(active.sum())
    lb = int(math.floor(lb_ratio * budget / k_active))
    if int(np.minimum(lb, sizes[active]).sum()) > budget:
        lb = budget // k_active
    return lb


@props(300, 10000)
@given(dbp_case())
def test_dbp_allocate_quotas(case):
    from curate.stages.dbp import dbp_allocate

    sizes, shares, budget, lb_ratio = case
    note(f"sizes={sizes.tolist()} shares={shares.tolist()} budget={budget} lb_ratio={lb_ratio}")
    total = int(sizes.sum())
    alloc = dbp_allocate(sizes, shares, budget, lb_ratio)
    q = np.asarray(alloc.quota)
    assert q.shape == sizes.shape and np.issubdtype(q.dtype, np.integer)
    # Σ = min(budget, pool) exactly; 0 <= q_j <= |C_j| (so empty clusters get nothing)
    assert int(q.sum()) == min(budget, total)
    assert (q >= 0).all() and (q <= sizes).all()
    # budget >= pool keeps everything, with a warning when it exceeds it
    if budget >= total:
        assert np.array_equal(q, sizes)
        assert bool(alloc.notes) == (budget > total)
        return
    if budget == 0:
        assert not q.any()
        return
    # the per-cluster floor, as documented
    lb = _documented_floor(sizes, budget, lb_ratio)
    assert alloc.lb == lb
    active = sizes > 0
    lower = np.where(active, np.minimum(lb, sizes), 0)
    assert (q >= lower).all(), (q[q < lower], lower[q < lower])
    if lb_ratio <= 1:
        assert not alloc.notes  # "only when lb_ratio > 1" is the floor lowered
    # the continuous solution: x = clip(P·N + λ, lb, |C_j|), Σx = N
    x = np.asarray(alloc.real, dtype=np.float64)
    tol = 1e-9 * max(1.0, budget)
    assert (x >= lower - tol).all() and (x <= sizes + tol).all()
    assert abs(x.sum() - budget) <= 1e-6 * max(1.0, budget)
    assert np.allclose(x, np.clip(shares * budget + alloc.lam, lower, sizes), rtol=1e-9, atol=1e-6 * max(1, budget))
    # largest-remainder rounding: each quota is floor(x_j) or floor(x_j) + 1 ...
    fl = np.floor(x + 1e-9)
    assert ((q == fl) | (q == fl + 1) | (np.abs(q - x) < 1e-6)).all(), (q, x)
    # ... and no cluster left at its floor has a larger fractional part than one rounded up
    frac = x - np.floor(x)
    up = (q > np.floor(x)) & (q > x - 1e-9)
    could = (q == np.floor(x)) & (q < sizes) & (frac > 1e-9)
    if up.any() and could.any():
        assert frac[could].max() <= frac[up].min() + 1e-9
    # deterministic
    again = dbp_allocate(sizes.copy(), shares.copy(), budget, lb_ratio)
    assert np.array_equal(again.quota, q) and np.array_equal(again.real, alloc.real)
    assert again.lam == alloc.lam and again.lb == alloc.lb


@props(100, 3000)
@given(dbp_case(), st.randoms(use_true_random=False))
def test_dbp_continuous_solution_is_permutation_equivariant(case, rnd):
    """The continuous quotas solve a strictly convex problem, so permuting the clusters permutes
    them (up to rounding); the integer quotas only differ where fractional parts tie (ties go to
    the lower cluster id, as documented) -- so of those only the sum and bounds are compared."""
    from curate.stages.dbp import dbp_allocate

    sizes, shares, budget, lb_ratio = case
    perm = list(range(len(sizes)))
    rnd.shuffle(perm)
    perm = np.array(perm)
    a = dbp_allocate(sizes, shares, budget, lb_ratio)
    b = dbp_allocate(sizes[perm], shares[perm], budget, lb_ratio)
    assert np.allclose(np.asarray(a.real)[perm], b.real, rtol=1e-9, atol=1e-6 * max(1, budget))
    assert a.lb == b.lb and int(a.quota.sum()) == int(b.quota.sum())
    assert (np.abs(np.asarray(a.quota)[perm] - b.quota) <= 1).all()


@st.composite
def dbp_pool(draw):
    """A small clustered pool for the DBP stage: embeddings around k centres, a provided clustering
    with possibly empty clusters and tied distances."""
    n = draw(st.integers(1, 80))
    k = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    d = 6
    cluster = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)), dtype=np.int32)
    centres = rng.normal(size=(k, d))
    x = (centres[cluster] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    dist = np.array(draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]) | st.floats(0, 2, width=32),
                                  min_size=n, max_size=n)), dtype=np.float32)
    budget = draw(st.integers(0, n + 3))
    return x, cluster, dist, budget, seed


@props(40, 1000)
@given(dbp_pool(), st.sampled_from(["hard", "easy", "random"]), st.sampled_from([0.0, 0.5, 2.0]))
def test_dbp_stage_keeps_exactly_its_quotas(pool, keep, lb_ratio):
    """`dbp` keeps exactly min(budget, n) samples, each cluster exactly its quota in the
    `dbp_clusters` artefact, and for `hard` / `easy` the farthest / closest samples of the cluster."""
    from curate.stages.base import ArrayEmbeddings, StageInput, get_stage

    x, cluster, dist, budget, seed = pool
    n = len(x)
    uids = [f"{(i * 2654435761) % 2**128:032x}" for i in range(n)]
    frame = pl.DataFrame({"uid": uids, "cluster": cluster, "centroid_dist": dist})
    stage = get_stage("dbp")(k=8, keep=keep, lb_ratio=lb_ratio, seed=1)
    res = stage.apply(StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, budget=budget, seed=seed))
    dec = res.decisions
    assert dec["uid"].to_list() == uids
    kept = dec["keep"].to_numpy()
    assert int(kept.sum()) == min(budget, n) == res.stats["n_kept"]
    per = res.artefacts["dbp_clusters"]
    quota = dict(zip(per["cluster"].to_list(), per["quota"].to_list()))
    sizes = np.bincount(cluster, minlength=8)
    assert dict(zip(per["cluster"].to_list(), per["size"].to_list())) == {c: int(s) for c, s in enumerate(sizes) if s}
    # docs: value = centroid distance; threshold = the cluster's boundary (smallest kept distance
    # for hard, largest for easy); detail = cluster=<c>
    assert np.allclose(dec["value"].to_numpy(), dist.astype(np.float64))
    assert dec["detail"].to_list() == [f"cluster={c}" for c in cluster]
    thr = dec["threshold"].to_numpy()
    for c in np.unique(cluster):
        m = cluster == c
        assert int(kept[m].sum()) == quota[int(c)]
        if keep in ("hard", "easy") and 0 < kept[m].sum() < m.sum():
            kd, dd = dist[m & kept], dist[m & ~kept]
            assert (kd.min() >= dd.max()) if keep == "hard" else (kd.max() <= dd.min())
        if keep in ("hard", "easy") and kept[m].any():
            boundary = dist[m & kept].min() if keep == "hard" else dist[m & kept].max()
            assert (thr[m] == np.float64(boundary)).all(), (c, thr[m], boundary)
    assert (dec.filter(~pl.col("keep"))["reason"].cast(pl.Utf8) == "dbp_over_quota").all()
    assert dec.filter(pl.col("keep"))["reason"].is_null().all()
    again = stage.apply(StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, budget=budget, seed=seed))
    assert again.decisions.equals(dec)


# =============================================================================================
# 3. SemDeDup (curate/stages/semdedup.py)
# =============================================================================================

# Float32 similarities (blocked sgemm) against a float64 reference of the same unit rows.
SIM_TOL = 2e-5


@st.composite
def semdedup_case(draw):
    """Unit embeddings with planted exact and near duplicates (and chains of them), a provided
    clustering (copies mostly share their source's cluster), distances with ties, distinct uids."""
    d = draw(st.integers(2, 6), "dim")
    n_base = draw(st.integers(1, 10), "n_base")
    seed = draw(st.integers(0, 2**32 - 1), "noise seed")
    rng = np.random.default_rng(seed)
    x = list(rng.normal(size=(n_base, d)))
    k = draw(st.integers(1, 4), "clusters")
    cluster = [draw(st.integers(0, k - 1)) for _ in range(n_base)]
    scales = st.sampled_from([0.0, 0.0, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3])
    copies = draw(st.lists(st.tuples(st.integers(0, 10**6), scales, st.booleans()), max_size=20), "copies")
    for src, scale, same_cluster in copies:
        i = src % len(x)  # copies of copies make chains A ~ B ~ C
        x.append(x[i] + scale * np.linalg.norm(x[i]) * rng.normal(size=d) / np.sqrt(d))
        cluster.append(cluster[i] if same_cluster else draw(st.integers(0, k - 1)))
    x = np.array(x)
    assume(np.linalg.norm(x, axis=1).min() > 1e-3)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(draw(st.sampled_from([np.float32, np.float16])))
    n = len(x)
    dist = np.array(draw(st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.3, 0.7]) | st.floats(0, 2, width=32),
                                  min_size=n, max_size=n), "dist"), dtype=np.float32)
    uids = draw(st.lists(uid32, min_size=n, max_size=n, unique=True), "uids")
    eps = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.01, 0.05, 0.07, 0.2, 0.5, 0.9]) | st.floats(0, 1), "eps")
    return x, np.array(cluster, dtype=np.int32), dist, uids, float(eps)


def keep_order(cluster, dist, uids, keep: str, seed: int, ranks=None):
    """Each cluster's rows in the documented keep order: `farthest` (distance descending),
    `closest` (ascending), `random` (a seeded hash of the uid's integer form,
    `curate.clustered.seeded_keys`: the rank among the input's uids for string uids, the pool
    rank the runner passes otherwise); ties by uid."""
    from curate.clustered import seeded_keys

    if ranks is None:
        rank = {u: r for r, u in enumerate(sorted(uids))}
        ranks = np.array([rank[u] for u in uids])
    out = {}
    for c in np.unique(cluster):
        rows = np.flatnonzero(cluster == c).tolist()
        if keep == "farthest":
            rows.sort(key=lambda i: (-float(dist[i]), uids[i]))
        elif keep == "closest":
            rows.sort(key=lambda i: (float(dist[i]), uids[i]))
        else:
            key = seeded_keys(np.asarray(ranks), seed)
            rows.sort(key=lambda i: (int(key[i]), uids[i]))
        out[int(c)] = rows
    return out


def check_semdedup(x, cluster, keep, ref, value, thr, rule, order=None):
    """The documented invariants of one SemDeDup outcome (rows in input order; ref = input row
    of the duplicated sample or -1; value = cosine to ref when dropped, nn_sim when kept).
    `order`, when given, is each cluster's keep order (then the definitions are checked too)."""
    from curate.cluster import normalise_rows

    xs = normalise_rows(np.asarray(x, dtype=np.float32)).astype(np.float64)
    sim = xs @ xs.T
    n = len(x)
    # no two kept samples of a cluster are duplicates: cos < 1 - eps
    for c in np.unique(cluster):
        kept = np.flatnonzero((cluster == c) & keep)
        assert len(kept) >= 1, f"cluster {c} lost every sample"
        s = sim[np.ix_(kept, kept)] - 2 * np.eye(len(kept))
        assert s.max(initial=-np.inf) < thr + SIM_TOL, (c, kept, s.max())
    for j in np.flatnonzero(~keep):
        r = int(ref[j])
        assert r >= 0 and r != j, f"dropped row {j} names no sample"
        assert cluster[r] == cluster[j], f"row {j} names row {r} of another cluster"
        assert value[j] >= thr, (j, value[j], thr)  # the recorded cosine is at the threshold or above
        assert abs(value[j] - sim[j, r]) <= SIM_TOL, (j, r, value[j], sim[j, r])
        if rule == "greedy":
            assert keep[r], f"greedy: row {j} names the dropped row {r}"
        else:
            # paper rule: ref is the nearest earlier sample, which may itself be dropped ("A~B~C
            # keeps only A": C names B; tests/test_semdedup.py pins this). What must hold is a
            # chain of duplicates that ends in a kept sample.
            seen, i = set(), j
            while not keep[i]:
                assert i not in seen, "ref cycle"
                seen.add(i)
                i = int(ref[i])
    assert (ref[keep] == -1).all()
    if order is None:
        return
    for c, rows in order.items():
        place = {i: t for t, i in enumerate(rows)}
        assert keep[rows[0]] and np.isnan(value[rows[0]]), "the first of a cluster stays, without nn_sim"
        for t, j in enumerate(rows[1:], 1):
            earlier = rows[:t]
            nn = sim[j, earlier].max()
            if not keep[j]:
                assert place[int(ref[j])] < t, f"row {j} names a later row {ref[j]}"
            if rule == "paper":
                # the definition: drop j iff max over earlier i of cos(x_i, x_j) >= 1 - eps
                if nn >= thr + SIM_TOL:
                    assert not keep[j], (j, nn, thr)
                elif nn < thr - SIM_TOL:
                    assert keep[j], (j, nn, thr)
                if keep[j]:
                    assert abs(value[j] - nn) <= SIM_TOL
                else:
                    assert sim[j, int(ref[j])] >= nn - SIM_TOL  # the nearest earlier sample
            else:
                kept_earlier = [i for i in earlier if keep[i]]
                nk = sim[j, kept_earlier].max()
                if nk >= thr + SIM_TOL:
                    assert not keep[j], (j, nk, thr)
                elif nk < thr - SIM_TOL:
                    assert keep[j], (j, nk, thr)
    assert n == len(keep)


def semdedup_decisions(frame, x, **params):
    from curate.stages.base import REF_ROW, ArrayEmbeddings, StageInput, get_stage

    res = get_stage("semdedup")(**params).apply(StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}))
    dec = res.decisions
    assert dec["uid"].to_list() == frame["uid"].to_list()
    ref = np.full(len(dec), -1, dtype=np.int64)
    if REF_ROW in dec.columns:
        has = dec[REF_ROW].is_not_null().to_numpy()
        ref[has] = dec[REF_ROW].drop_nulls().to_numpy()
        # ref_uid and the ref row name the same sample
        assert dec["ref_uid"].is_null().to_list() == (~has).tolist()
        assert dec["ref_uid"].filter(pl.Series(has)).to_list() == [frame["uid"][int(i)] for i in ref[has]]
    else:
        assert dec["ref_uid"].is_null().all()
    return res, dec, ref


@props(80, 3000)
@given(semdedup_case(), st.sampled_from(["paper", "greedy"]), st.sampled_from(["farthest", "closest", "random"]),
       st.integers(0, 2**31 - 1))
def test_semdedup_invariants(case, rule, keep_by, seed):
    x, cluster, dist, uids, eps = case
    frame = pl.DataFrame({"uid": uids, "cluster": cluster, "centroid_dist": dist})
    params = dict(eps=eps, rule=rule, keep=keep_by, seed=seed)
    res, dec, ref = semdedup_decisions(frame, x, **params)
    keep = dec["keep"].to_numpy()
    value = dec["value"].fill_null(np.nan).to_numpy().astype(np.float64)
    thr = 1.0 - eps
    assert (dec["threshold"] == thr).all()  # threshold = 1 - eps on every row
    assert (dec.filter(~pl.col("keep"))["reason"].cast(pl.Utf8) == "semantic_duplicate").all()
    assert dec.filter(pl.col("keep"))["reason"].is_null().all()
    check_semdedup(x, cluster, keep, ref, value, thr, rule, keep_order(cluster, dist, uids, keep_by, seed))
    assert res.stats["n_kept"] == int(keep.sum())
    # deterministic, and independent of the input order
    _, again, _ = semdedup_decisions(frame, x, **params)
    assert again.equals(dec)
    perm = np.random.default_rng(seed).permutation(len(x))
    _, shuffled, _ = semdedup_decisions(frame[perm], x[perm], **params)
    from curate.stages.base import REF_ROW

    def by_uid(d):
        return d.drop(REF_ROW, strict=False).sort("uid")
    assert by_uid(shuffled).equals(by_uid(dec))


@props(40, 1200)
@given(semdedup_case(), st.sampled_from(["farthest", "closest", "random"]), st.floats(0, 1))
def test_semdedup_paper_rule_is_monotone_in_eps(case, keep_by, eps2):
    """Paper rule: kept iff nn_sim < 1 - eps, so a larger eps keeps a subset."""
    x, cluster, dist, uids, eps = case
    lo, hi = sorted((eps, eps2))
    frame = pl.DataFrame({"uid": uids, "cluster": cluster, "centroid_dist": dist})
    _, a, _ = semdedup_decisions(frame, x, eps=lo, keep=keep_by, seed=3)
    _, b, _ = semdedup_decisions(frame, x, eps=hi, keep=keep_by, seed=3)
    ka, kb = a["keep"].to_numpy(), b["keep"].to_numpy()
    assert not (kb & ~ka).any()


@props(20, 800)
@given(semdedup_case(), st.sampled_from(["paper", "greedy"]), st.sampled_from(["farthest", "closest", "random"]),
       st.data())
def test_semdedup_through_the_runner_cluster_index(case, rule, keep_by, data):
    """`curate prune` feeds SemDeDup (and DBP) from the pool's on-disk cluster index, filtered to
    the samples that survive earlier stages (tests/test_clustered.py builds it the same way).
    That path decides exactly as the in-memory listing does, and its decisions keep the invariants."""
    from curate.clustered import BitSet, ClusteredInput, ClusterIndex
    from curate.stages.base import ArrayEmbeddings
    from curate.stages.dbp import DensityBasedPruning
    from curate.stages.semdedup import SemanticDedup

    x, cluster, dist, uids, eps = case
    n = len(x)
    alive = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), "survivors"), dtype=bool)
    assume(alive.any())
    rank = np.argsort(np.argsort(np.array(uids)))  # each position's uid rank
    k = int(cluster.max()) + 1
    cent = np.stack([x[cluster == c].astype(np.float64).mean(0) if (cluster == c).any() else np.eye(x.shape[1])[0]
                     for c in range(k)])
    cent = (cent / np.linalg.norm(cent, axis=1, keepdims=True)).astype(np.float32)
    seed = data.draw(st.integers(0, 1000), "seed")
    with tempfile.TemporaryDirectory() as d:
        pos_of_rank = np.argsort(rank)
        con = duckdb.connect()
        step = data.draw(st.integers(1, 7), "chunk rows")
        chunks = ((cluster[pos_of_rank[s:s + step]], dist[pos_of_rank[s:s + step]],
                   np.arange(s, min(s + step, n)), pos_of_rank[s:s + step]) for s in range(0, n, step))
        idx = ClusterIndex.build(Path(d) / "idx", con, k, n, chunks)
        con.close()
        sub = np.flatnonzero(alive)
        files = ClusteredInput(n=len(sub), k=k, centroids=cent, bounds=idx.bounds, read=idx.read,
                               uid_of=lambda p: rank[p], uid_series=lambda p, u: pl.Series("uid", u),
                               embed=lambda p: np.asarray(x[p], dtype=np.float32), wanted=BitSet.of(alive),
                               identity="props")
        mem = ClusteredInput.from_arrays(cluster[sub], dist[sub], rank[sub], k=k, centroids=cent,
                                         embed=ArrayEmbeddings(x[sub]).take, identity="props")
        batch = data.draw(st.integers(1, 50), "batch rows")
        stage = SemanticDedup(scorer="e", eps=eps, rule=rule, keep=keep_by, batch_rows=batch,
                              block_rows=data.draw(st.sampled_from([1, 2, 3, 512]), "block rows"),
                              tile_cols=data.draw(st.sampled_from([1, 2, 5, 8192]), "tile cols"))
        a = pl.concat(list(stage.run_clustered(files, None, seed).decision_chunks()))
        b = pl.concat(list(stage.run_clustered(mem, None, seed).decision_chunks()))
        budget = data.draw(st.integers(0, len(sub) + 2), "dbp budget")
        dbp = DensityBasedPruning(scorer="e", k=k, keep=data.draw(st.sampled_from(["hard", "easy", "random"])))
        da = pl.concat(list(dbp.run_clustered(files, budget, seed).decision_chunks()))
        db = pl.concat(list(dbp.run_clustered(mem, budget, seed).decision_chunks()))

    def to_pool(dec):  # in-memory positions are rows of `sub`: map them to pool positions
        r = dec["_ref_pos"]
        return dec.with_columns(pl.Series("_pos", sub[dec["_pos"].to_numpy()]),
                                pl.Series("_ref_pos", np.where(r.is_null().to_numpy(), -1,
                                                               sub[r.fill_null(0).cast(pl.Int64).to_numpy()])))

    a = a.with_columns(pl.col("_ref_pos").fill_null(-1).cast(pl.Int64)).sort("_pos")
    assert a.equals(to_pool(b).sort("_pos"))
    assert a["_pos"].to_list() == sub.tolist()
    keep = np.ones(n, dtype=bool)
    ref = np.full(n, -1, dtype=np.int64)
    value = np.full(n, np.nan)
    keep[sub] = a["keep"].to_numpy()
    ref[sub] = a["_ref_pos"].to_numpy()
    value[sub] = a["value"].fill_null(np.nan).to_numpy()
    assert (a["uid"].to_numpy() == rank[sub]).all()
    sub_order = {c: [int(sub[i]) for i in rows] for c, rows in
                 keep_order(cluster[sub], dist[sub], [uids[i] for i in sub], keep_by, seed, rank[sub]).items()}
    sel = np.zeros(n, dtype=bool)
    sel[sub] = True
    # the invariants over the survivors (rows of `sub`)
    ref_row = np.where(ref[sel] >= 0, np.searchsorted(sub, ref[sel]), -1)
    check_semdedup(x[sel], cluster[sel], keep[sel], ref_row, value[sel], 1.0 - eps, rule,
                   {c: [int(np.searchsorted(sub, i)) for i in rows] for c, rows in sub_order.items()})
    # DBP over the same two listings: the same decisions, exactly min(budget, n) kept
    da = da.sort("_pos")
    assert da.drop("_ref_pos").equals(to_pool(db).sort("_pos").drop("_ref_pos"))
    assert int(da["keep"].sum()) == min(budget, len(sub))


# =============================================================================================
# 4. Export (curate/export/)
# =============================================================================================

def _split(name: str) -> tuple[str, str]:
    """(key, extension as written) the webdataset way: the key runs to the first dot of the
    file name (webdataset.tariterators.base_plus_ext; what ingest uses)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def tar_records(path: Path) -> dict[str, list[tuple[str, bytes]]]:
    """key -> [(extension, bytes)] of the regular members of a (possibly gzipped) tar, read with
    tarfile; a second member with an extension already seen (case-insensitive) is left out, as
    ingest leaves it out."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            key, ext = _split(ti.name)
            rec = out.setdefault(key, [])
            if ext.lower() in {e.lower() for e, _ in rec}:
                continue
            rec.append((ext, tf.extractfile(ti).read()))
    return out


def _hostile_tar(path: Path, salt: str, fmt: int = tarfile.PAX_FORMAT) -> None:
    """A directory entry, a long key in a directory with a dot (a pax header, a GNU long-name
    entry or a ustar prefix, by `fmt`), a repeated member, an upper-case extension, an empty
    caption: the awkward parts of real tars. Keys are the same for every salt (they collide)."""
    from PIL import Image

    img = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 120, len(salt) * 30 % 256)).save(img, "JPEG")
    # over 100 characters: a pax header, a GNU long-name entry, or a ustar prefix
    long_key = "v1.2/" + "d" * 60 + "/" + "k" * 90 if fmt == tarfile.USTAR_FORMAT else "v1.2/" + "k" * 140
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("v1.2")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        recs = [(long_key, [("jpg", img.getvalue()), ("txt", f"long {salt}".encode())]),
                ("0000001", [("JPG", img.getvalue()), ("txt", b"upper"), ("txt", b"second txt, ignored")]),
                ("plain", [("jpg", img.getvalue()), ("txt", b""), ("json", json.dumps({"note": salt}).encode())])]
        for key, members in recs:
            for ext, data in members:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode = len(data), 1_600_000_000, 0o640
                tf.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def wds_pool(tmp_path_factory):
    """A small real pool: synthetic img2dataset tars with JPEGs (one pool with uids in its json,
    one without, whose keys collide with the first's), a hand-made tar with pax headers, a
    directory entry and a repeated member, and a gzipped tar; ingested with the real CLI."""
    import gzip

    d = tmp_path_factory.mktemp("props_wds")
    cli("synth", d / "a", "--layout", "wds", "--n", 50, "--seed", 0, "--shard-size", 20)
    cli("synth", d / "b", "--layout", "wds", "--n", 25, "--seed", 1, "--shard-size", 20, "--no-uid")
    (d / "c").mkdir()
    for i, fmt in enumerate((tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT)):
        _hostile_tar(d / "c" / f"0000{i}.tar", f"c{i}", fmt)
    cli("synth", d / "g0", "--layout", "wds", "--n", 12, "--seed", 2, "--shard-size", 12, "--no-uid")
    (d / "g").mkdir()
    with open(d / "g0" / "00000.tar", "rb") as src, gzip.open(d / "g" / "00007.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    ws = d / "ws"
    cli("ingest", d / "a", d / "b", d / "c", d / "g", "-w", ws)
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        samples = pl.from_arrow(con.sql(
            "SELECT s.uid, s.key, s.shard_id, s.row_idx, sh.path FROM samples s JOIN shards sh USING (shard_id) "
            "WHERE s.status = 'ok' ORDER BY s.shard_id, s.row_idx").to_arrow_table())
    finally:
        con.close()
    records = {p: tar_records(Path(p)) for p in samples["path"].unique().to_list()}
    src = {u: (k, records[p][k]) for u, k, p in samples.select("uid", "key", "path").rows()}
    assert samples.height > 70 and samples["key"].n_unique() < samples.height  # key collisions to rename
    return {"dir": d, "ws": ws, "samples": samples, "canonical": samples["uid"].to_list(), "src": src}


def expected_keys(canonical_selected: list[str], src: dict) -> dict[str, str]:
    """docs/export.md: a key already used by an earlier sample in canonical order becomes
    `<key>_<first 8 hex of the uid>` (longer if that is taken too); keys do not depend on the shuffle."""
    keys = [src[u][0] for u in canonical_selected]
    taken = set(keys)
    first_seen: set[str] = set()
    out = {}
    for u, k in zip(canonical_selected, keys):
        if k not in first_seen:
            first_seen.add(k)
            out[u] = k
            continue
        cands = [f"{k}_{u[:8]}", f"{k}_{u}"] + [f"{k}_{u}_{j}" for j in range(1, 100)]
        out[u] = next(c for c in cands if c not in taken)
        taken.add(out[u])
    return out


def read_export(out: Path) -> tuple[list[str], list[tuple[str, list[tuple[str, bytes]]]], dict]:
    """(shard names, [(shard, [(key, ext, bytes)...])...] in file order, sizes.json)."""
    names = sorted(p.name for p in out.glob("*.tar"))
    shards = []
    for name in names:
        rows = []
        with tarfile.open(out / name) as tf:  # a truncated or malformed shard raises here
            for ti in tf:
                if ti.isfile():
                    rows.append((*_split(ti.name), tf.extractfile(ti).read()))
        shards.append((name, rows))
    sizes = json.loads((out / "sizes.json").read_text())
    return names, shards, sizes


def check_wds_export(out: Path, selected: set[str], pool: dict, shard_size: int, shuffled: bool) -> dict[str, str]:
    """The documented properties of a webdataset export of `selected`; returns uid -> output key."""
    canonical = [u for u in pool["canonical"] if u in selected]
    n = len(canonical)
    names, shards, sizes = read_export(out)
    n_shards = -(-n // shard_size)
    assert names == [f"{i:08d}.tar" for i in range(n_shards)]  # contiguous names from 00000000
    want_counts = [min(shard_size, n - i * shard_size) for i in range(n_shards)]
    assert sizes == dict(zip(names, want_counts))  # what open_clip reads
    keys = expected_keys(canonical, pool["src"])
    by_key = {keys[u]: u for u in canonical}
    assert len(by_key) == n  # unique keys
    order = []
    for (name, rows), count in zip(shards, want_counts):
        in_shard = []
        for key, ext, data in rows:
            if not in_shard or in_shard[-1] != key:
                in_shard.append(key)
        assert len(in_shard) == count == len(set(in_shard)), (name, in_shard)
        order += in_shard
        stats = json.loads((out / name.replace(".tar", "_stats.json")).read_text())
        assert stats["count"] == count and stats["bytes"] == (out / name).stat().st_size
        assert (out / name).stat().st_size % 10240 == 0  # whole tar records
    assert len(order) == len(set(order)) == n  # each sample once, its members together
    # every selected sample's members, byte for byte, under its key; nothing else
    got = collections.Counter((k, e, hashlib_sha(b)) for _, rows in shards for k, e, b in rows)
    want = collections.Counter((keys[u], e, hashlib_sha(b)) for u in canonical for e, b in pool["src"][u][1])
    missing, extra = want - got, got - want
    assert not missing and not extra, (sorted(missing)[:3], sorted(extra)[:3])
    if not shuffled:
        assert [by_key[k] for k in order] == canonical  # canonical order: source shard, then row
    return {u: keys[u] for u in canonical}


def hashlib_sha(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@st.composite
def export_params(draw, pool_size: int):
    shard_size = draw(st.one_of(st.integers(1, 8), st.integers(1, pool_size + 5), st.just(10_000)), "shard size")
    shuffle = draw(st.booleans(), "shuffle")
    seed = draw(st.integers(0, 2**63 - 1) | st.integers(0, 3), "seed")
    return shard_size, shuffle, seed


@props(8, 200)
@given(data=st.data())
def test_wds_export_copies_the_selection_byte_for_byte(wds_pool, data):
    """`export_wds` (what `curate export --format wds` runs) on a selection hypothesis picks."""
    from curate.export.wds import WdsOptions, export_wds
    from curate.workspace import Workspace

    pool = wds_pool
    uids = pool["canonical"]
    chosen = data.draw(st.lists(st.sampled_from(uids), min_size=1, max_size=len(uids), unique=True), "selection")
    shard_size, shuffle, seed = data.draw(export_params(len(uids)))
    with tempfile.TemporaryDirectory(dir=pool["dir"]) as d, read_only_manifest(pool["ws"]) as m:
        ws = Workspace(pool["ws"])
        opts = WdsOptions(out=Path(d) / "out", shard_size=shard_size, shuffle=shuffle, seed=seed, workers=1)
        res = export_wds(ws, m, selection_of(chosen), opts)
        assert res["samples"] == len(chosen) and res["shards"] == -(-len(chosen) // shard_size)
        keys = check_wds_export(Path(d) / "out", set(chosen), pool, shard_size, shuffle)
        # the same export again: byte-identical (and a finished export rerun writes nothing)
        again = export_wds(ws, m, selection_of(list(reversed(chosen))),
                           WdsOptions(out=Path(d) / "again", shard_size=shard_size, shuffle=shuffle, seed=seed,
                                      workers=1))
        assert again["shards_written"] == res["shards"]
        assert files_of(Path(d) / "out") == files_of(Path(d) / "again")
        rerun = export_wds(ws, m, selection_of(chosen), opts)
        assert rerun["shards_written"] == 0 and rerun["resumed"]
        # keys do not depend on the shuffle
        other = export_wds(ws, m, selection_of(chosen), WdsOptions(out=Path(d) / "other", shard_size=shard_size,
                                                                    shuffle=not shuffle, seed=seed + 1, workers=1))
        assert other["samples"] == len(chosen)
        assert check_wds_export(Path(d) / "other", set(chosen), pool, shard_size, not shuffle) == keys
        # training reads it: webdataset over the printed brace pattern yields every sample once
        import webdataset as wds

        seen = [s["__key__"] for s in wds.WebDataset(res["pattern"], shardshuffle=False)]
        assert sorted(seen) == sorted(keys.values())


@props(10, 300)
@given(data=st.data())
def test_parquet_and_datacomp_exports_round_trip_the_selection(wds_pool, data):
    from curate.export.datacomp import write_submission
    from curate.export.parquet import export_parquet, read_export_metadata

    pool = wds_pool
    uids = pool["canonical"]
    chosen = data.draw(st.lists(st.sampled_from(uids), min_size=1, max_size=len(uids), unique=True), "selection")
    canonical = [u for u in uids if u in set(chosen)]
    with tempfile.TemporaryDirectory(dir=pool["dir"]) as d, read_only_manifest(pool["ws"]) as m:
        out = Path(d) / "kept.parquet"
        res = export_parquet(m, selection_of(chosen), out, params={"props": True})
        frame = pl.read_parquet(out)
        assert res["samples"] == frame.height == len(chosen)
        assert frame["uid"].to_list() == canonical  # one row per sample, source order
        src = {u: k for u, k in pool["samples"].select("uid", "key").rows()}
        assert frame["key"].to_list() == [src[u] for u in canonical]
        assert read_export_metadata(out)["samples"] == len(chosen)
        npy = Path(d) / "uids.npy"
        write_submission(m, selection_of(chosen), npy)
        check_submission_file(npy, set(chosen), uids)


@props(4, 60)
@given(budget=st.integers(1, 80), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_cli_export_of_a_prune_run(wds_pool, budget, seed, data):
    """Through the real CLI: `curate prune` with a seeded random subset, then `curate export` in
    all three formats of that run; each holds exactly the run's kept samples."""
    pool = wds_pool
    ws = pool["ws"]
    shard_size, shuffle, xseed = data.draw(export_params(budget))
    workers = data.draw(st.sampled_from([1, 2]), "workers")
    with tempfile.TemporaryDirectory(dir=pool["dir"]) as d:
        d = Path(d)
        (d / "r.toml").write_text(f'name = "props"\n[[stages]]\nstage = "random"\nseed = {seed}\n')
        run = cli("prune", "-w", ws, "--pipeline", d / "r.toml", "--budget", budget)["run_id"]
        con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
        try:
            kept = {r[0] for r in con.execute("SELECT uid FROM decisions WHERE run_id = ? AND keep", [run]).fetchall()}
        finally:
            con.close()
        assert len(kept) == min(budget, len(pool["canonical"]))
        args = ["--shard-size", shard_size, "--workers", workers] + (["--shuffle", "--seed", xseed] if shuffle else [])
        res = cli("export", "-w", ws, "--run", run, "--out", d / "out", *args)
        assert res["samples"] == len(kept) and res["prune_run"] == run
        check_wds_export(d / "out", kept, pool, shard_size, shuffle)
        cli("export", "-w", ws, "--run", run, "--format", "datacomp", "--out", d / "uids.npy")
        check_submission_file(d / "uids.npy", kept, pool["canonical"])
        cli("export", "-w", ws, "--run", run, "--format", "parquet", "--out", d / "kept.parquet")
        assert pl.read_parquet(d / "kept.parquet")["uid"].to_list() == [u for u in pool["canonical"] if u in kept]
        cli("runs", "-w", ws, "--drop", run)


@props(40, 1200)
@given(semdedup_case(), st.sampled_from(["farthest", "closest", "random"]),
       st.sampled_from([0.0, 1.0, 0.5]) | st.floats(0, 1))
def test_semdedup_target_keep_is_the_exact_quantile(case, keep_by, target):
    """docs/pruning.md, calibration under the paper rule: the kept count is the first of each
    cluster plus the samples with nn_sim below the threshold, so the target is hit exactly
    unless ties make it unreachable, then the nearer reachable count is taken; the reported eps
    reproduces the decisions."""
    x, cluster, dist, uids, _ = case
    n = len(x)
    frame = pl.DataFrame({"uid": uids, "cluster": cluster, "centroid_dist": dist})
    res, dec, ref = semdedup_decisions(frame, x, target_keep=target, keep=keep_by, seed=5)
    k = int(dec["keep"].sum())
    nn_sim = dec["value"].drop_nulls().to_numpy()  # paper rule: nn_sim of every sample but the firsts
    firsts = n - len(nn_sim)
    assert firsts == len(np.unique(cluster))
    reachable = {firsts + int((nn_sim < v).sum()) for v in np.unique(nn_sim)} | {n}
    want = target * n

    def nearest(r):
        return abs(k - r) == min(abs(c - r) for c in reachable)
    assert k in reachable and (nearest(round(want)) or nearest(math.floor(want + 0.5))), (k, want, sorted(reachable))
    eps = res.stats["eps"]
    assert 1.0 - eps == res.stats["threshold"]
    _, again, _ = semdedup_decisions(frame, x, eps=eps, keep=keep_by, seed=5)
    assert again["keep"].equals(dec["keep"])


@props(20, 600)
@given(semdedup_case(), st.sampled_from(["paper", "greedy"]), st.sampled_from(["farthest", "random"]), st.floats(0, 1))
def test_semdedup_new_eps_from_the_cache_equals_a_fresh_run(case, rule, keep_by, eps2):
    """docs/pruning.md "What is cached": a rerun with another eps reads the similarities from the
    cache and decides exactly as a run without it."""
    from curate.executors.local import ArrayCache
    from curate.stages.base import ArrayEmbeddings, StageInput, get_stage

    x, cluster, dist, uids, eps = case
    frame = pl.DataFrame({"uid": uids, "cluster": cluster, "centroid_dist": dist})
    with tempfile.TemporaryDirectory() as d:
        cache = ArrayCache(Path(d) / "cache")

        def run(e, c):
            return get_stage("semdedup")(eps=e, rule=rule, keep=keep_by, seed=9).apply(
                StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, cache=c))
        first = run(eps, cache)
        assert first.stats["similarities"] == "computed"
        cached = run(eps2, cache)
        assert cached.stats["similarities"] == "cache"
        assert cached.decisions.equals(run(eps2, None).decisions)
