"""DBP quotas (property checks against an independent exact solver), budget stages end to end."""

import numpy as np
import polars as pl
import pytest

from curate.cluster import clustering_for_stage, normalise_rows
from curate.executors.local import ArrayCache
from curate.errors import UsageError
from curate.stages.base import ArrayEmbeddings, StageInput, get_stage
from curate.stages.dbp import (cluster_distances, complexity, dbp_allocate, round_quotas, softmax_shares,
                               solve_quotas)


def exact_continuous(target, upper, budget, lower):
    """min ||x - target||² s.t. Σx = budget, lower <= x <= upper, by walking the sorted breakpoints
    of the piecewise-linear Σ clip(target + λ, lower, upper) (no bisection)."""
    lower = np.minimum(lower, upper)
    bps = np.unique(np.r_[lower - target, upper - target])
    tot = np.array([np.clip(target + b, lower, upper).sum() for b in bps])
    i = int(np.searchsorted(tot, budget))
    if i == 0:
        lam = bps[0]
    elif tot[i - 1] == budget:
        lam = bps[i - 1]
    else:
        lam = bps[i - 1] + (budget - tot[i - 1]) * (bps[i] - bps[i - 1]) / (tot[i] - tot[i - 1])
    return np.clip(target + lam, lower, upper)


def random_case(rng):
    k = int(rng.integers(1, 40))
    kind = rng.integers(0, 4)
    if kind == 0:
        sizes = rng.integers(0, 50, k)
    elif kind == 1:
        sizes = rng.integers(1, 5, k) * 1000 ** rng.integers(0, 2, k)  # heavy imbalance
    elif kind == 2:
        sizes = np.zeros(k, int)
        sizes[rng.integers(0, k)] = rng.integers(1, 500)  # a single non-empty cluster
    else:
        sizes = rng.integers(1, 300, k)
    tau = float(rng.choice([1e-3, 0.05, 0.1, 0.5, 10.0]))
    active = sizes > 0
    shares = softmax_shares(rng.random(k), tau, active)
    total = int(sizes.sum())
    budget = int(rng.choice([0, 1, max(0, total - 1), total, total + 7, rng.integers(0, total + 2)]))
    ratio = float(rng.choice([0.0, 0.5, 1.0, 3.0, rng.random()]))
    return sizes, shares, budget, ratio


def test_quota_properties_over_many_random_cases():
    rng = np.random.default_rng(0)
    for case in range(600):
        sizes, shares, budget, ratio = random_case(rng)
        total = int(sizes.sum())
        alloc = dbp_allocate(sizes, shares, budget, ratio)
        q = alloc.quota
        assert q.dtype == np.int64
        assert q.sum() == min(budget, total), case
        assert (q >= 0).all() and (q <= sizes).all(), case
        if budget >= total:
            assert np.array_equal(q, sizes)
            assert bool(alloc.notes) == (budget > total)
            continue
        active = sizes > 0
        assert (q[active] >= np.minimum(alloc.lb, sizes[active])).all(), case
        assert (q[~active] == 0).all()
        if ratio <= 1:
            assert not alloc.notes
        assert np.all(np.abs(q - alloc.real) < 1.0 + 1e-9), case
        if budget > 0:
            lower = np.where(active, np.minimum(alloc.lb, sizes), 0)
            ref = exact_continuous(shares * budget, sizes.astype(float), budget, lower.astype(float))
            assert np.allclose(alloc.real, ref, atol=1e-7 * max(1, budget)), case


def test_solver_machine_precision_and_rounding_edges():
    target = np.array([0.3, 0.3, 0.4]) * 10
    x, lam = solve_quotas(target, np.array([10, 10, 10.0]), 10.0, 0.0)
    assert abs(x.sum() - 10) < 1e-12 and np.allclose(x, target)
    # ties in the fractional parts go to the lower cluster id
    q = round_quotas(np.array([1.5, 1.5, 1.0]), np.array([5, 5, 5]), np.zeros(3, int), 4)
    assert q.tolist() == [2, 1, 1]
    # a cluster at its upper bound never gets the extra unit
    q = round_quotas(np.array([2.0, 1.5, 1.5]), np.array([2, 5, 5]), np.zeros(3, int), 5)
    assert q.tolist() == [2, 2, 1]


def test_infeasible_budget_cases_are_reported():
    sizes = np.array([5, 5, 0, 5])
    p = softmax_shares(np.array([1.0, 2.0, 3.0, 4.0]), 0.1, sizes > 0)
    assert p[2] == 0 and abs(p.sum() - 1) < 1e-12
    a = dbp_allocate(sizes, p, 20)
    assert a.quota.tolist() == [5, 5, 0, 5] and "exceeds" in a.notes[0]
    b = dbp_allocate(sizes, p, 9, lb_ratio=5.0)  # lb = 15 > what 9 can give 3 clusters
    assert b.quota.sum() == 9 and b.lb == 3 and "lowered" in b.notes[0] and (b.quota[[0, 1, 3]] >= 3).all()


def test_complexity_formulas():
    c = normalise_rows(np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], np.float32))
    cluster = np.array([0, 0, 1, 2, 2, 2])
    dist = np.array([0.1, 0.3, 0.2, 0.4, 0.5, 0.6], np.float32)
    sizes, d_intra, d_inter = cluster_distances(cluster, dist, c, l_nearest=2)
    assert sizes.tolist() == [2, 1, 3, 0]
    assert np.allclose(d_intra[:3], [0.2, 0.2, 0.5]) and np.isnan(d_intra[3])
    sims = c[:3] @ c[:3].T
    for j in range(3):
        others = np.sort(np.delete(sims[j], j))[::-1][:2]
        assert d_inter[j] == pytest.approx((1 - others).mean())
    assert np.isnan(d_inter[3])  # empty cluster: no neighbours counted, none given
    comp = complexity(np.array([0.2, np.nan, 0.5, np.nan]), np.array([1.0, 1.0, 2.0, 1.0]),
                      np.array([True, True, True, False]))
    assert comp[:3].tolist() == pytest.approx([0.2, 0.6, 1.0]) and np.isnan(comp[3])


# --------------------------------------------------------------------------------------------- stages

def imbalanced_pool(seed=0, d=32):
    """One tight cluster holding 60% of the pool, and seven diffuse ones."""
    rng = np.random.default_rng(seed)
    centres = normalise_rows(rng.standard_normal((8, d)))
    sizes = [1800] + [170] * 7
    spread = [0.25] + [1.0] * 7
    parts = [centres[c] + spread[c] * rng.standard_normal((s, d)) / np.sqrt(d) for c, s in enumerate(sizes)]
    lab = np.repeat(np.arange(8), sizes)
    perm = rng.permutation(len(lab))
    x = np.vstack(parts)[perm].astype(np.float16)
    uids = pl.Series("uid", [f"{i:032x}" for i in range(len(lab))])
    return x, lab[perm], uids


def inp_for(x, uids, budget, seed=0, cache=None, **cols):
    return StageInput(pl.DataFrame({"uid": uids, **cols}), {("datacomp-l14", "img"): ArrayEmbeddings(x)}, seed=seed,
                      budget=budget, cache=cache)


def clusters_of(stage, inp):
    """uid | cluster | centroid_dist of the clustering the stage used (from the cache it filled)."""
    clu = clustering_for_stage(inp, stage.cluster_spec(inp))
    assert clu.source == "cache"
    return pl.DataFrame({"uid": inp.frame["uid"], "cluster": clu.cluster, "centroid_dist": clu.dist})


def entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_dbp_balances_an_imbalanced_pool_better_than_random():
    x, lab, uids = imbalanced_pool()
    budget = 600
    dbp = get_stage("dbp")(k=8, niter=20, lb_ratio=0.0).apply(inp_for(x, uids, budget))
    rnd = get_stage("random")().apply(inp_for(x, uids, budget))
    kd = np.bincount(lab[dbp.decisions["keep"].to_numpy()], minlength=8)
    kr = np.bincount(lab[rnd.decisions["keep"].to_numpy()], minlength=8)
    print(f"\nplanted-cluster max share: dbp {kd.max() / budget:.3f} random {kr.max() / budget:.3f}; "
          f"entropy dbp {entropy(kd):.3f} random {entropy(kr):.3f} (uniform {np.log(8):.3f})")
    assert kd.sum() == kr.sum() == budget
    assert kd.max() / budget < kr.max() / budget - 0.2
    assert entropy(kd) > entropy(kr) + 0.3
    pc = dbp.artefacts["dbp_clusters"]
    assert set(pc.columns) >= {"cluster", "size", "d_intra", "d_inter", "complexity", "share", "quota"}
    assert pc["quota"].sum() == budget and (pc["quota"] <= pc["size"]).all()
    assert abs(pc["share"].sum() - 1) < 1e-9


@pytest.mark.parametrize("name", ["dbp", "ssp", "random"])
def test_budget_met_exactly_and_deterministic(name):
    x, lab, uids = imbalanced_pool(seed=1)
    n = len(uids)
    kw = {"k": 10, "niter": 8} if name != "random" else {}
    for budget in (0, 1, 37, 999, n - 1, n):
        a = get_stage(name)(**kw).apply(inp_for(x, uids, budget, seed=4))
        assert a.decisions["keep"].sum() == budget
        assert len(a.decisions) == n
        b = get_stage(name)(**kw).apply(inp_for(x, uids, budget, seed=4))
        assert a.decisions.equals(b.decisions)
    over = get_stage(name)(**kw).apply(inp_for(x, uids, n + 10))
    assert over.decisions["keep"].all() and over.stats["warnings"]
    if name == "random":
        c = get_stage(name)().apply(inp_for(x, uids, 500, seed=5)).decisions
        d = get_stage(name)().apply(inp_for(x, uids, 500, seed=4)).decisions
        assert not c["keep"].equals(d["keep"])
    with pytest.raises(UsageError):
        get_stage(name)(**kw).apply(inp_for(x, uids, None))


def test_dbp_keep_modes_within_clusters(tmp_path):
    x, lab, uids = imbalanced_pool(seed=2)
    score = np.random.default_rng(0).random(len(uids))
    cache = ArrayCache(tmp_path)
    for keep in ("hard", "easy", "score", "random"):
        kw = {"score": "m"} if keep == "score" else {}
        stage = get_stage("dbp")(k=8, niter=10, keep=keep, **kw)
        inp = inp_for(x, uids, 700, cache=cache, score__m=score)
        res = stage.apply(inp)
        dec = res.decisions
        clu = clusters_of(stage, inp).join(dec, on="uid").with_columns(pl.Series("score", score))
        assert dec["keep"].sum() == 700
        for (c,), g in clu.group_by("cluster"):
            kept, dropped = g.filter(pl.col("keep")), g.filter(~pl.col("keep"))
            if kept.height == 0 or dropped.height == 0:
                continue
            if keep == "hard":
                assert kept["centroid_dist"].min() >= dropped["centroid_dist"].max()
            elif keep == "easy":
                assert kept["centroid_dist"].max() <= dropped["centroid_dist"].min()
            elif keep == "score":
                assert kept["score"].min() >= dropped["score"].max()
        assert (dec.filter(~pl.col("keep"))["reason"] == "dbp_over_quota").all()


def test_dbp_new_budget_reuses_the_cached_clustering_and_floor_holds(tmp_path):
    x, lab, uids = imbalanced_pool(seed=3)
    cache = ArrayCache(tmp_path)
    first = get_stage("dbp")(k=8, niter=10, lb_ratio=0.5).apply(inp_for(x, uids, 400, cache=cache))
    assert first.stats["clustering"] == "computed"
    again = get_stage("dbp")(k=8, niter=10, lb_ratio=0.5).apply(inp_for(x, uids, 250, cache=cache))
    fresh = get_stage("dbp")(k=8, niter=10, lb_ratio=0.5).apply(inp_for(x, uids, 250))
    assert again.stats["clustering"] == "cache" and again.decisions.equals(fresh.decisions)
    pc = first.artefacts["dbp_clusters"]
    lb = first.stats["lb"]
    assert lb == 400 * 0.5 // 8
    assert (pc["quota"] >= np.minimum(lb, pc["size"])).all()
    # a clustering given as frame columns (centroids recomputed as cluster means)
    frame = clusters_of(get_stage("dbp")(k=8, niter=10), inp_for(x, uids, 250, cache=cache))
    prov = get_stage("dbp")(k=8, niter=10).apply(
        StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, budget=250))
    assert prov.stats["clustering"] == "provided" and prov.decisions["keep"].sum() == 250


def test_budget_from_the_stage_params():
    x, lab, uids = imbalanced_pool(seed=3)
    for name, kw in (("random", {}), ("dbp", {"k": 4, "niter": 4})):
        assert get_stage(name).uses_budget
        assert get_stage(name)(budget=0.25, **kw).apply(inp_for(x, uids, None)).decisions["keep"].sum() == \
            round(0.25 * len(uids))
        assert get_stage(name)(budget=300, **kw).apply(inp_for(x, uids, None)).decisions["keep"].sum() == 300
        assert get_stage(name)(budget=300, **kw).apply(inp_for(x, uids, 200)).decisions["keep"].sum() == 200


def test_ssp_floor_and_global_cut(tmp_path):
    x, lab, uids = imbalanced_pool(seed=4)
    cache = ArrayCache(tmp_path)
    stage = get_stage("ssp")(k=8, niter=10, floor_ratio=0.5)
    res = stage.apply(inp_for(x, uids, 500, cache=cache))
    dec = clusters_of(stage, inp_for(x, uids, 500, cache=cache)).join(res.decisions, on="uid")
    floor = res.stats["floor"]
    assert floor == int(0.5 * 500 / 8)
    kept_per = dec.group_by("cluster").agg(pl.col("keep").sum().alias("kept"), pl.len().alias("size"))
    assert (kept_per["kept"] >= np.minimum(floor, kept_per["size"])).all()
    # beyond each cluster's floor, the cut is one global distance
    ranked = dec.with_columns(pl.col("centroid_dist").rank("ordinal", descending=True).over("cluster").alias("r"))
    rest = ranked.filter(pl.col("r") > floor)
    if rest.filter(pl.col("keep")).height and rest.filter(~pl.col("keep")).height:
        assert rest.filter(pl.col("keep"))["centroid_dist"].min() >= rest.filter(~pl.col("keep"))["centroid_dist"].max()
    easy = get_stage("ssp")(k=8, niter=10, keep="easy", floor_ratio=0.0).apply(inp_for(x, uids, 500, cache=cache))
    assert easy.stats["clustering"] == "cache"
    e = dec.select("uid", "centroid_dist").join(easy.decisions, on="uid")
    assert e.filter(pl.col("keep"))["centroid_dist"].max() <= e.filter(~pl.col("keep"))["centroid_dist"].min()


def test_random_subset_ignores_input_order():
    x, lab, uids = imbalanced_pool(seed=5)
    a = get_stage("random")(seed=9).apply(inp_for(x, uids, 300)).decisions
    perm = np.random.default_rng(0).permutation(len(uids))
    b = get_stage("random")(seed=9).apply(inp_for(x[perm], uids[perm], 300)).decisions
    assert a.sort("uid").equals(b.sort("uid"))


def test_param_errors():
    for name, kw in (("dbp", {"keep": "x"}), ("dbp", {"keep": "score"}), ("dbp", {"tau": 0}), ("dbp", {"scorer": ""}),
                     ("dbp", {"k": 0}), ("ssp", {"keep": "random"}), ("ssp", {"floor_ratio": -1})):
        with pytest.raises(UsageError):
            get_stage(name)(**kw)


def test_ssp_threshold_is_the_global_cut_and_floor_rows_say_so():
    x, lab, uids = imbalanced_pool(seed=6)
    dec = get_stage("ssp")(k=8, niter=10, floor_ratio=0.8).apply(inp_for(x, uids, 400)).decisions
    thr = dec["threshold"][0]
    floor_rows = dec.filter(pl.col("detail").str.ends_with(" floor"))
    assert floor_rows["keep"].all() and floor_rows.height > 0
    rest = dec.filter(~pl.col("detail").str.ends_with(" floor"))
    assert (rest.filter(pl.col("keep"))["value"] >= thr).all()
    assert (rest.filter(~pl.col("keep"))["value"] <= thr).all()
