"""Deduplication: SemDeDup (blocked vs dense, paper vs greedy, cache), exact dedup, decontamination."""

import numpy as np
import polars as pl
import pytest

from curate.cluster import normalise_rows, uid_ranks
from curate.errors import UsageError
from curate.stages.base import ArrayEmbeddings, StageInput, get_stage
from curate.stages.dedup_exact import normalise_urls
from curate.stages.semdedup import (apply_eps, calibrate_eps, cluster_order, max_earlier, max_earlier_torch,
                                    semdedup_pass, similarity_device)


def uids_for(n, offset=0):
    return pl.Series("uid", [f"{i + offset:032x}" for i in range(n)], dtype=pl.Utf8)


def dup_pool(n_base=1200, d=48, k=6, n_groups=80, max_copies=4, noise=0.02, seed=0):
    """Clustered unit vectors plus planted near-duplicate groups (cos >= ~0.99 within a group).

    Returns fp16 embeddings, group id per row (-1: not planted) and the planted cluster labels.
    """
    rng = np.random.default_rng(seed)
    centres = normalise_rows(rng.standard_normal((k, d)))
    lab = rng.integers(0, k, n_base)
    x = centres[lab] + 0.9 * rng.standard_normal((n_base, d)) / np.sqrt(d)
    group = np.full(n_base, -1)
    srcs = rng.choice(n_base, n_groups, replace=False)
    extra, glab, gid = [], [], []
    for g, s in enumerate(srcs):
        group[s] = g
        for _ in range(rng.integers(1, max_copies + 1)):
            extra.append(x[s] + noise * np.linalg.norm(x[s]) * rng.standard_normal(d) / np.sqrt(d))
            glab.append(lab[s])
            gid.append(g)
    x = np.vstack([x, np.array(extra)])
    group = np.r_[group, gid]
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float16), group[perm], np.r_[lab, glab][perm]


def dense_reference(x, cluster, dist, eps, keep="farthest", seed=0, tiebreak=None):
    """Paper rule with whole-cluster similarity matrices and a plain loop: the definition, written out."""
    n = len(x)
    order = cluster_order(cluster, dist, keep, seed, tiebreak)
    keep_mask = np.ones(n, bool)
    ref = np.full(n, -1)
    sc = cluster[order]
    for c in np.unique(sc):
        members = order[sc == c]
        xs = normalise_rows(x[members].astype(np.float32))
        s = xs @ xs.T
        for j in range(1, len(members)):
            if s[j, :j].max() >= 1.0 - eps:
                keep_mask[members[j]] = False
                ref[members[j]] = members[int(s[j, :j].argmax())]
    return keep_mask, ref


def dense_greedy(x, cluster, dist, eps, keep="farthest", seed=0, tiebreak=None):
    n = len(x)
    order = cluster_order(cluster, dist, keep, seed, tiebreak)
    keep_mask = np.ones(n, bool)
    ref = np.full(n, -1)
    sc = cluster[order]
    for c in np.unique(sc):
        members = order[sc == c]
        xs = normalise_rows(x[members].astype(np.float32))
        s = xs @ xs.T
        kept_local = [0]
        for j in range(1, len(members)):
            prev = s[j, kept_local]
            if prev.max() >= 1.0 - eps:
                keep_mask[members[j]] = False
                ref[members[j]] = members[kept_local[int(prev.argmax())]]
            else:
                kept_local.append(j)
    return keep_mask, ref


def clustered(seed=0, **kw):
    x, group, lab = dup_pool(seed=seed, **kw)
    xn = normalise_rows(x.astype(np.float32))
    k = lab.max() + 1
    cent = normalise_rows(np.vstack([xn[lab == c].mean(0) for c in range(k)]))
    dist = (1 - (xn * cent[lab]).sum(1)).astype(np.float32)
    return x, group, lab.astype(np.int32), dist


# --------------------------------------------------------------------------------------------- core

@pytest.mark.parametrize("n,block,tile", [(1, 4, 4), (2, 4, 4), (37, 8, 8), (300, 32, 64), (300, 512, 8192),
                                          (513, 64, 100)])
def test_max_earlier_equals_dense(n, block, tile):
    rng = np.random.default_rng(n)
    x = normalise_rows(rng.standard_normal((n, 24)).astype(np.float16))
    sim, idx, flops = max_earlier(x, block, tile)
    s = x @ x.T
    s[np.triu(np.ones((n, n), bool))] = -np.inf
    a = s.argmax(1)
    assert np.array_equal(idx[1:], a[1:]) and idx[0] == -1
    assert np.allclose(sim[1:], s[np.arange(n), a][1:], atol=1e-6, rtol=0)
    assert flops <= 2.0 * n * (n + block) * 24


def test_max_earlier_ties_take_first_occurrence():
    e = np.eye(4, dtype=np.float32)
    x = e[[0, 1, 0, 0, 1, 2, 1]]
    for fn in (max_earlier, lambda *a, **k: max_earlier_torch(*a, "cpu", **k)):
        sim, idx, _ = fn(x, block_rows=2, tile_cols=2)
        assert idx.tolist() == [-1, 0, 0, 0, 1, 0, 1]  # all-zero rows tie at index 0
        assert sim[2] == 1.0 and sim[1] == 0.0


@pytest.mark.parametrize("n,block,tile", [(1, 4, 4), (37, 8, 8), (300, 32, 64), (513, 64, 100)])
def test_max_earlier_on_torch_equals_numpy(n, block, tile):
    """The GPU path's algorithm (torch matmuls; here on torch's CPU device): the same nearest
    earlier rows and similarities as the numpy path."""
    rng = np.random.default_rng(n + 1)
    x = normalise_rows(rng.standard_normal((n, 24)).astype(np.float16))
    sim, idx, flops = max_earlier(x, block, tile)
    tsim, tidx, tflops = max_earlier_torch(x, "cpu", block, tile)
    assert np.array_equal(idx, tidx) and flops == tflops
    assert np.allclose(sim[1:], tsim[1:], atol=1e-6, rtol=0) and tsim[0] == -np.inf
    assert similarity_device("cpu") is None  # numpy on the CPU; a CUDA device only where torch sees one


@pytest.mark.parametrize("eps", [0.005, 0.03, 0.15, 0.4])
@pytest.mark.parametrize("keep", ["farthest", "closest", "random"])
def test_blocked_paper_and_greedy_equal_dense_reference(eps, keep):
    x, group, cluster, dist = clustered()
    tb = uid_ranks(uids_for(len(x)))
    cache = semdedup_pass(ArrayEmbeddings(x), cluster, dist, keep=keep, seed=5, tiebreak=tb,
                          block_rows=32, tile_cols=96, batch_rows=300)
    got = apply_eps(cache, eps, "paper")
    want_keep, want_ref = dense_reference(x, cluster, dist, eps, keep, 5, tb)
    assert np.array_equal(got.keep, want_keep)
    assert np.array_equal(got.ref_pos, want_ref)
    g = apply_eps(cache, eps, "greedy")
    gk, gr = dense_greedy(x, cluster, dist, eps, keep, 5, tb)
    assert np.array_equal(g.keep, gk)
    assert np.array_equal(g.ref_pos, gr)
    assert g.keep.sum() >= got.keep.sum()  # greedy keeps a superset-sized set


def test_chain_paper_keeps_only_first_greedy_keeps_both_ends():
    # A~B (0.95), B~C (0.95), A~C (0.805): farthest-first order A, B, C via centroid_dist
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.95, np.sqrt(1 - 0.95 ** 2), 0.0])
    t = np.arccos(0.95)
    c = np.array([np.cos(2 * t), np.sin(2 * t), 0.0])
    x = np.vstack([c, a, b]).astype(np.float32)
    uids = uids_for(3)
    frame = pl.DataFrame({"uid": uids, "cluster": [0, 0, 0], "centroid_dist": [0.1, 0.3, 0.2]})
    inp = StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)})
    paper = get_stage("semdedup")(eps=0.1).apply(inp).decisions
    assert paper["keep"].to_list() == [False, True, False]
    assert paper["ref_uid"].to_list() == [uids[2], None, uids[1]]  # C dup of B, B dup of A
    assert paper["reason"].to_list() == ["semantic_duplicate", None, "semantic_duplicate"]
    greedy = get_stage("semdedup")(eps=0.1, rule="greedy").apply(inp).decisions
    assert greedy["keep"].to_list() == [True, True, False]
    assert greedy["ref_uid"].to_list() == [None, None, uids[1]]
    assert abs(greedy["value"][2] - 0.95) < 1e-6 and abs(greedy["threshold"][2] - 0.9) < 1e-12


def test_planted_duplicates_removed_recall_and_ref_uid():
    x, group, _ = dup_pool(n_base=2000, n_groups=150, seed=3)
    uids = uids_for(len(x))
    inp = StageInput(pl.DataFrame({"uid": uids}), {("datacomp-l14", "img"): ArrayEmbeddings(x)}, seed=1)
    res = get_stage("semdedup")(eps=0.02, k=8, niter=10).apply(inp)
    dec = res.decisions
    keep = dec["keep"].to_numpy()
    planted = group >= 0
    n_groups = len(np.unique(group[planted]))
    should_drop = planted.sum() - n_groups
    dropped_planted = int((~keep & planted).sum())
    recall = dropped_planted / should_drop
    print(f"\nsemdedup planted-duplicate recall: {recall:.4f} ({dropped_planted}/{should_drop}), "
          f"false drops: {int((~keep & ~planted).sum())}")
    assert recall >= 0.99
    assert int((~keep & ~planted).sum()) == 0
    pos = {u: i for i, u in enumerate(uids.to_list())}
    for row in dec.filter(~pl.col("keep")).iter_rows(named=True):
        j = pos[row["ref_uid"]]
        assert group[j] == group[pos[row["uid"]]]
        assert row["value"] >= row["threshold"] == pytest.approx(0.98)
    # every group keeps at least one member
    assert set(group[planted & keep]) == set(group[planted])
    assert res.stats["clustering"] == "computed" and res.stats["similarities"] == "computed"
    per = res.artefacts["semdedup_clusters"]
    assert per["size"].sum() == len(x) and per["dropped"].sum() == int((~keep).sum())


class CountingView(ArrayEmbeddings):
    """A real in-memory view that counts the rows handed out (to prove a cached run reads none)."""

    rows = 0

    def chunks(self, rows=65536):
        for start, block in super().chunks(rows):
            self.rows += len(block)
            yield start, block

    def take(self, positions):
        self.rows += len(positions)
        return super().take(positions)


@pytest.mark.parametrize("rule", ["paper", "greedy"])
def test_new_eps_from_cache_equals_full_recompute(rule, tmp_path):
    from curate.executors.local import ArrayCache

    x, _, _ = dup_pool(seed=4)
    uids = uids_for(len(x))
    cache = ArrayCache(tmp_path / "cache")
    frame = pl.DataFrame({"uid": uids})
    first = get_stage("semdedup")(eps=0.02, k=6, niter=8, rule=rule).apply(
        StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, seed=2, cache=cache))
    assert first.stats["clustering"] == "computed" and first.stats["similarities"] == "computed"
    # the full recompute, no cache
    fresh = get_stage("semdedup")(eps=0.25, k=6, niter=8, rule=rule).apply(
        StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, seed=2))
    # re-run with a new eps: neither clustering nor similarities are recomputed
    view = CountingView(x)
    again = get_stage("semdedup")(eps=0.25, k=6, niter=8, rule=rule).apply(
        StageInput(frame, {("datacomp-l14", "img"): view}, seed=2, cache=cache))
    assert again.stats["clustering"] == "cache" and again.stats["similarities"] == "cache"
    assert again.decisions.equals(fresh.decisions)
    assert fresh.decisions["keep"].sum() < first.decisions["keep"].sum()
    if rule == "paper":
        assert view.rows == 0  # not one embedding read
    else:
        assert view.rows <= len(x)  # at most one read of each cluster holding a chain
    # a different keep order needs new similarities, not a new clustering
    other = get_stage("semdedup")(eps=0.25, k=6, niter=8, keep="closest", rule=rule).apply(
        StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, seed=2, cache=cache))
    assert other.stats["clustering"] == "cache" and other.stats["similarities"] == "computed"


def test_cache_fits_shuffled_input_and_not_other_pools(tmp_path):
    from curate.executors.local import ArrayCache

    x, _, cluster, dist = clustered(seed=6)
    uids = uids_for(len(x))
    cache = ArrayCache(tmp_path / "cache")
    frame = pl.DataFrame({"uid": uids, "cluster": cluster, "centroid_dist": dist})
    res = get_stage("semdedup")(eps=0.1).apply(StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)},
                                                           cache=cache))
    assert res.stats["clustering"] == "provided" and res.stats["similarities"] == "computed"
    perm = np.random.default_rng(0).permutation(len(x))
    res2 = get_stage("semdedup")(eps=0.1).apply(
        StageInput(frame[perm], {("datacomp-l14", "img"): CountingView(x[perm])}, cache=cache))
    assert res2.stats["similarities"] == "cache"
    assert _order_free(res2).equals(_order_free(res))
    res3 = get_stage("semdedup")(eps=0.1).apply(
        StageInput(frame[:-5], {("datacomp-l14", "img"): ArrayEmbeddings(x[:-5])}, cache=cache))
    assert res3.stats["similarities"] == "computed"
    moved = frame.with_columns((pl.col("centroid_dist") * 0.5).alias("centroid_dist"))
    res4 = get_stage("semdedup")(eps=0.1).apply(
        StageInput(moved, {("datacomp-l14", "img"): ArrayEmbeddings(x)}, cache=cache))
    assert res4.stats["similarities"] == "computed"  # another provided clustering, another entry


@pytest.mark.parametrize("keep", ["farthest", "random"])
def test_decisions_do_not_depend_on_input_order(keep):
    x, _, cluster, dist = clustered(seed=7)
    uids = uids_for(len(x))
    frame = pl.DataFrame({"uid": uids, "cluster": cluster, "centroid_dist": dist})
    a = get_stage("semdedup")(eps=0.05, keep=keep, seed=3).apply(StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}))
    perm = np.random.default_rng(1).permutation(len(x))
    b = get_stage("semdedup")(eps=0.05, keep=keep, seed=3).apply(
        StageInput(frame[perm], {("datacomp-l14", "img"): ArrayEmbeddings(x[perm])}))
    assert _order_free(a).equals(_order_free(b))


def _order_free(res) -> pl.DataFrame:
    """Decisions sorted by uid, without the input-row pointer `_ref_row` (checked here: it names
    the same sample as ref_uid, and is null exactly where ref_uid is)."""
    from curate.stages.base import REF_ROW

    d = res.decisions
    rows = d[REF_ROW]
    assert rows.is_null().equals(d["ref_uid"].is_null())
    has = rows.is_not_null()
    assert d["uid"].gather(rows.filter(has)).equals(d["ref_uid"].filter(has), check_names=False)
    return d.drop(REF_ROW).sort("uid")


def test_closest_keeps_the_member_nearest_the_centroid():
    x, group, cluster, dist = clustered(seed=8)
    out = apply_eps(semdedup_pass(ArrayEmbeddings(x), cluster, dist, keep="closest"), 0.02)
    for g in np.unique(group[group >= 0]):
        m = np.flatnonzero(group == g)
        same = m[cluster[m] == cluster[m][np.argmin(dist[m])]]
        assert out.keep[same[np.argmin(dist[same])]]


def test_calibration_paper_exact_and_greedy_close():
    x, _, cluster, dist = clustered(seed=9)
    cache = semdedup_pass(ArrayEmbeddings(x), cluster, dist)
    n = len(x)
    for f in (0.95, 0.8, 0.5, 0.2):
        eps, _ = calibrate_eps(cache, f)
        assert apply_eps(cache, eps).keep.sum() == round(f * n)
    eps, _ = calibrate_eps(cache, 1.0)
    assert apply_eps(cache, eps).keep.all()
    eps, info = calibrate_eps(cache, 0.7, "greedy", seed=1, sample_rows=400)
    got = apply_eps(cache, eps, "greedy").keep.mean()
    assert info["calibration_rows"] < n
    assert abs(got - 0.7) < 0.05
    stage = get_stage("semdedup")(target_keep=0.6)
    frame = pl.DataFrame({"uid": uids_for(n), "cluster": cluster, "centroid_dist": dist})
    res = stage.apply(StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}))
    assert res.decisions["keep"].sum() == round(0.6 * n)
    assert res.stats["eps"] == pytest.approx(1 - res.stats["threshold"])


def test_semdedup_param_errors():
    for bad in ({"rule": "x"}, {"keep": "x"}, {"target_keep": 1.5}, {"eps": None}, {"k": 0}):
        with pytest.raises(UsageError):
            get_stage("semdedup")(**bad)


# --------------------------------------------------------------------------------------------- exact

def test_normalise_urls():
    got = normalise_urls([
        "HTTP://Example.COM:80/a/b/?utm_source=x&id=3&fbclid=zz#frag",
        "http://example.com/a/b?id=3",
        "https://example.com:443/",
        "https://EXAMPLE.com",
        "https://example.com:8443/x",
        "  //cdn.Example.com/img.jpg?UTM_Medium=1  ",
        "https://example.com/p?a=1&&b=2&gclid=9",
        None,
        "",
        "https://example.com/Path/Case",
    ]).to_list()
    assert got[0] == got[1] == "http://example.com/a/b?id=3"
    assert got[2] == got[3] == "https://example.com"
    assert got[4] == "https://example.com:8443/x"
    assert got[5] == "//cdn.example.com/img.jpg"
    assert got[6] == "https://example.com/p?a=1&b=2"
    assert got[7] is None and got[8] is None
    assert got[9] == "https://example.com/Path/Case"  # paths are case-sensitive


def exact_frame():
    return pl.DataFrame({
        "uid": [f"{i:032x}" for i in range(9)],
        "shard_id": [1, 0, 0, 2, 1, 0, 0, 0, 3],
        "row_idx": [0, 5, 1, 0, 1, 7, 8, 9, 0],
        "sha256": ["aa", "AA", "aa", "bb", None, None, "cc", "cc", "dd"],
        "url": ["u1", "u2", "u3", "http://X.com/a?utm_x=1", "http://x.com/a/", "u6", "u7", "u8", "u9"],
        "caption": ["c", "c", "d", "c", "c", "c", "same", "same", "c"],
        "width": [10, 100, 50, 10, 10, 10, 20, 30, 10],
        "height": [10, 100, 50, 10, 10, 10, 20, 30, 10],
        "score__m": [0.1, 0.2, 0.9, 0.1, 0.1, 0.1, 0.5, None, 0.1],
    })


def test_exact_dedup_first_policy_sha_and_url():
    f = exact_frame()
    res = get_stage("exact_dedup")(keys=["sha256", "url"]).apply(StageInput(f))
    d = {r["uid"]: r for r in res.decisions.iter_rows(named=True)}
    u = f["uid"].to_list()
    # sha "aa" group: rows 0 (1,0), 1 (0,5), 2 (0,1): first by (shard_id,row_idx) is row 2
    assert d[u[2]]["keep"] and not d[u[0]]["keep"] and not d[u[1]]["keep"]
    assert d[u[0]]["ref_uid"] == d[u[1]]["ref_uid"] == u[2]
    assert d[u[0]]["reason"] == "duplicate_sha256" and d[u[0]]["value"] == 3
    assert not d[u[7]]["keep"] and d[u[7]]["ref_uid"] == u[6]
    # the runner's pointer to the copy that stayed: its input row, null for kept rows
    assert d[u[0]]["_ref_row"] == d[u[1]]["_ref_row"] == 2 and d[u[7]]["_ref_row"] == 6
    assert d[u[2]]["_ref_row"] is None and d[u[5]]["_ref_row"] is None
    # url: rows 3 and 4 normalise to the same URL; 3 is (2,0), 4 is (1,1): 4 stays
    assert d[u[4]]["keep"] and d[u[3]]["reason"] == "duplicate_url" and d[u[3]]["ref_uid"] == u[4]
    assert d[u[5]]["keep"]  # null sha256 never matches
    assert res.stats["dropped_sha256"] == 3 and res.stats["dropped_url"] == 1
    assert res.decisions["uid"].to_list() == u  # one row per input, input order


def test_exact_dedup_policies_and_pairs():
    f = exact_frame()
    hs = get_stage("exact_dedup")(keys=["sha256"], policy="highest_score", score="m").apply(StageInput(f)).decisions
    assert hs["keep"].to_list()[:3] == [False, False, True] and hs["keep"][6] and not hs["keep"][7]
    big = get_stage("exact_dedup")(keys=["sha256"], policy="largest_image").apply(StageInput(f)).decisions
    assert big["keep"].to_list()[:3] == [False, True, False] and big["keep"][7] and not big["keep"][6]
    pair = get_stage("exact_dedup")(keys=["sha256_caption"]).apply(StageInput(f)).decisions
    # (aa, c) twice -> one dropped; (aa, d) distinct; (cc, same) twice
    assert pair.filter(~pl.col("keep"))["reason"].to_list() == ["duplicate_sha256_caption"] * 2
    with pytest.raises(UsageError):
        get_stage("exact_dedup")(keys=["sha256"], policy="highest_score")
    with pytest.raises(UsageError):
        get_stage("exact_dedup")(keys=["nope"])


def test_exact_dedup_uid_then_sha_sequential():
    f = pl.concat([exact_frame(), exact_frame()[:2]])
    res = get_stage("exact_dedup")(keys=["uid", "sha256"]).apply(StageInput(f))
    dec = res.decisions
    assert len(dec) == 11
    assert dec.filter(pl.col("reason") == "duplicate_uid").height == 2
    assert dec.filter(pl.col("reason") == "duplicate_uid")["ref_uid"].to_list() == f["uid"][:2].to_list()
    assert res.stats["n_kept"] == 11 - 2 - 3


def test_exact_dedup_vectorised_on_a_big_frame():
    n = 200_000
    rng = np.random.default_rng(0)
    f = pl.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "shard_id": rng.integers(0, 50, n),
                      "row_idx": np.arange(n), "sha256": rng.integers(0, n // 2, n).astype(str),
                      "url": [f"http://h{i % 70_000}.com/x" for i in range(n)]})
    import time
    t = time.perf_counter()
    res = get_stage("exact_dedup")(keys=["sha256", "url"]).apply(StageInput(f))
    elapsed = time.perf_counter() - t
    kept = res.decisions.filter(pl.col("keep"))
    assert kept.join(f, on="uid")["sha256"].n_unique() == kept.height
    assert elapsed < 20


def planted_dedup_frame(n=4000, seed=0):
    """Samples with planted exact duplicates: repeated uids, sha256 values in other cases, URL
    variants (tracking parameters, host/scheme case, default ports, trailing slashes, fragments),
    and null or empty keys; in shuffled (shard_id, row_idx) order, with score and size ties."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, n // 3, n)
    variant = rng.integers(0, 8, n)
    host = [f"img{b % 97}.Example.com" for b in base]
    forms = [
        "http://{h}/p/{b}.jpg?id={b}",
        "HTTP://{H}:80/p/{b}.jpg?utm_source=x&id={b}#top",
        "http://{h}/p/{b}.jpg/?id={b}&fbclid=zz",
        "http://{h}/p/{b}.jpg?&id={b}&",
        "  http://{h}:80/p/{b}.jpg?gclid=1&id={b}  ",
        "https://{h}:443/q/{b}?UTM_Medium=a",
        "https://{H}/q/{b}/",
        "http://{h}:8080/p/{b}.jpg?id={b}",  # another port: another URL
    ]
    url = [forms[v].format(h=h.lower(), H=h.upper(), b=b) for v, h, b in zip(variant, host, base)]
    sha = [(f"{b * 7919:064x}".upper() if v % 3 == 0 else f"{b * 7919:064x}") for v, b in zip(variant, base // 2)]
    caption = [f"caption {b % 5}" if v % 2 else None for v, b in zip(variant, base)]
    uid = [f"{rng.integers(0, 2**62):032x}" for _ in range(n)]
    for i in rng.choice(n, n // 50, replace=False):  # repeated uids
        uid[i] = uid[int(rng.integers(0, n))]
    hole = rng.random((2, n))
    for i in np.flatnonzero(hole[0] < 0.04):
        url[i] = None if i % 2 else ""
    for i in np.flatnonzero(hole[1] < 0.04):
        sha[i] = None if i % 2 else " "
    return pl.DataFrame({
        "uid": uid, "shard_id": rng.integers(0, 5, n).astype(np.int32), "row_idx": rng.permutation(n).astype(np.int32),
        "url": url, "sha256": sha, "caption": caption,
        "width": rng.integers(1, 4, n) * 100, "height": rng.integers(1, 4, n) * 100,
        "image_bytes": rng.integers(0, 3, n) * 1000,
        "score__m": np.where(hole[0] > 0.9, np.nan, rng.integers(0, 4, n) / 4),
    })


def uid_ranks_frame(f):
    """f with uid replaced by UInt32 ranks in sorted uid order (what the runner passes), and the rank -> uid map."""
    ranked = f.with_columns(pl.col("uid").rank("dense").cast(pl.UInt32) - 1)
    names = pl.DataFrame({"rank": ranked["uid"], "name": f["uid"]}).unique("rank")
    return ranked, names


def ranks_to_strings(dec, names):
    back = dict(zip(names["rank"].to_list(), names["name"].to_list()))
    return dec.with_columns(pl.col("uid").replace_strict(back, return_dtype=pl.Utf8),
                            pl.col("ref_uid").replace_strict(back, default=None, return_dtype=pl.Utf8))


EXACT_CONFIGS = [dict(keys=["uid", "sha256", "url"]), dict(keys=["url"], policy="highest_score", score="m"),
                 dict(keys=["sha256_caption", "uid", "url"], policy="largest_image"),
                 dict(keys=["sha256", "uid"], policy="highest_score", score="m")]


@pytest.mark.parametrize("cfg", EXACT_CONFIGS)
def test_exact_dedup_condensed_batches_equal_raw(cfg):
    f = planted_dedup_frame()
    st = get_stage("exact_dedup")(**cfg)
    want = st.apply(StageInput(f))
    assert (~want.decisions["keep"]).sum() > 0
    # A row's hashes do not depend on its batch.
    assert pl.concat([st.condense(f.slice(i, 1)) for i in range(60)]).equals(st.condense(f.head(60)))
    for size in (97, 1000, len(f)):
        parts = [st.condense(f.slice(s, size)) for s in range(0, len(f), size)]
        for p in parts[:3]:
            assert [c for c, t in p.schema.items() if t == pl.Utf8] == ["uid"]
            assert not {"url", "sha256", "caption"} & set(p.columns)
        got = st.apply(StageInput(pl.concat(parts)))
        assert got.decisions.equals(want.decisions), size
        assert got.stats == want.stats


@pytest.mark.parametrize("cfg", EXACT_CONFIGS)
def test_exact_dedup_uid_ranks_equal_uid_strings(cfg):
    f = planted_dedup_frame(seed=1)
    ranked, names = uid_ranks_frame(f)
    st = get_stage("exact_dedup")(**cfg)
    want = st.apply(StageInput(f)).decisions
    for frame in (ranked, pl.concat([st.condense(ranked.slice(s, 700)) for s in range(0, len(f), 700)])):
        if frame is not ranked:
            assert not [c for c, t in frame.schema.items() if t == pl.Utf8]
        got = st.apply(StageInput(frame)).decisions
        assert got["uid"].dtype == got["ref_uid"].dtype == pl.UInt32
        assert ranks_to_strings(got, names).equals(want)


def test_exact_dedup_finds_planted_url_and_sha_variants():
    f = planted_dedup_frame(seed=2).with_columns(
        url_key=pl.col("url").str.strip_chars().str.to_lowercase().str.replace(r"^https?://", "")
        .str.replace(r":(80|443)/", "/").str.replace(r"[?#].*$", "").str.replace(r"/+$", ""),
        port=pl.col("url").str.contains(":8080"),
        sha_key=pl.col("sha256").str.strip_chars().str.to_lowercase())
    # every form but the :8080 one of one image normalises to the same URL (the id parameter is kept)
    st = get_stage("exact_dedup")(keys=["url"])
    kept = f.filter(st.apply(StageInput(f)).decisions["keep"])
    have_url = pl.col("url").str.strip_chars().fill_null("") != ""
    assert kept.filter(have_url).group_by("url_key", "port").len()["len"].max() == 1
    assert kept.filter(have_url).height == f.filter(have_url).select("url_key", "port").n_unique()
    assert kept.filter(~have_url).height == f.filter(~have_url).height  # null/empty never match
    st = get_stage("exact_dedup")(keys=["sha256"])
    kept = f.filter(st.apply(StageInput(f)).decisions["keep"])
    have_sha = pl.col("sha_key").fill_null("") != ""
    assert kept.filter(have_sha)["sha_key"].is_unique().all()
    assert kept.filter(~have_sha).height == f.filter(~have_sha).height


def test_exact_dedup_needs_columns():
    assert get_stage("exact_dedup")(keys=["uid"]).needs_columns() == []
    assert get_stage("exact_dedup")().needs_columns() == ["sha256", "url"]
    assert get_stage("exact_dedup")(keys=["sha256_caption", "url"], policy="largest_image").needs_columns() == [
        "sha256", "caption", "url", "width", "height", "image_bytes"]
    assert get_stage("exact_dedup")(keys=["url"], policy="highest_score", score="m").needs_columns() == ["url"]


# --------------------------------------------------------------------------------------------- decontaminate

def test_decontaminate_drops_eval_near_copies(tmp_path):
    rng = np.random.default_rng(0)
    d = 32
    ev = rng.standard_normal((50, d)).astype(np.float32)
    np.save(tmp_path / "eval.npy", ev.astype(np.float16))
    pool = rng.standard_normal((400, d))
    copies = rng.choice(400, 20, replace=False)
    src = rng.choice(50, 20, replace=False)
    pool[copies] = ev[src] + 0.01 * rng.standard_normal((20, d))
    inp = StageInput(pl.DataFrame({"uid": uids_for(400)}), {("datacomp-l14", "img"): ArrayEmbeddings(pool.astype(np.float16))})
    stage = get_stage("decontaminate")(eval_embeddings=str(tmp_path / "eval.npy"), threshold=0.95, chunk_rows=64)
    dec = stage.apply(inp).decisions
    dropped = np.flatnonzero(~dec["keep"].to_numpy())
    assert sorted(dropped) == sorted(copies)
    det = dict(zip(dec["uid"].to_list(), dec["detail"].to_list()))
    for c, s in zip(copies, src):
        assert det[f"{c:032x}"] == f"eval_row={s}"
    assert (dec.filter(~pl.col("keep"))["reason"] == "eval_near_duplicate").all()
    assert stage.params()["eval_rows"] == 50
    with pytest.raises(UsageError):
        get_stage("decontaminate")(eval_embeddings=str(tmp_path / "missing.npy"))
    np.save(tmp_path / "eval64.npy", np.ones((3, 64), np.float32))
    with pytest.raises(UsageError):
        get_stage("decontaminate")(eval_embeddings=str(tmp_path / "eval64.npy")).apply(inp)


def test_greedy_stage_with_target_keep_and_provided_clustering():
    x, _, cluster, dist = clustered(seed=10)
    n = len(x)
    frame = pl.DataFrame({"uid": uids_for(n), "cluster": cluster, "centroid_dist": dist})
    res = get_stage("semdedup")(target_keep=0.75, rule="greedy", calibration_rows=10**9).apply(
        StageInput(frame, {("datacomp-l14", "img"): ArrayEmbeddings(x)}))
    # calibrated on every cluster: the greedy count at the chosen eps is the closest reachable
    assert abs(res.stats["keep_fraction"] - 0.75) < 0.01
    assert res.stats["clustering"] == "provided"
    dropped = res.decisions.filter(~pl.col("keep"))
    kept_uids = set(res.decisions.filter(pl.col("keep"))["uid"].to_list())
    assert set(dropped["ref_uid"].to_list()) <= kept_uids  # greedy: every ref stays
    assert (dropped["value"] >= dropped["threshold"]).all()


def test_group_runs_groups_equal_tuples_and_survives_first_code_collisions():
    from curate.stages.dedup_exact import group_runs

    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(1, 400))
        a = rng.integers(0, 6, n).astype(np.uint64)  # few values: many equal first codes
        # second code: equal to a (no collision), or a different value for some rows whose first
        # codes are equal (a 64-bit collision of the first half)
        b = a * 7 + (rng.integers(0, 2, n).astype(np.uint64) if trial % 2 else 0)
        rows = None if trial % 3 == 0 else np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
        for second in (b, pl.Series(b)):
            perm, start = group_runs([a, second], rows, stable=True)
            idx = np.arange(n) if rows is None else rows
            assert sorted(perm.tolist()) == list(range(len(idx)))
            tuples = [(int(a[idx[p]]), int(b[idx[p]])) for p in perm]
            gid = np.cumsum(start) - 1
            for g in range(gid[-1] + 1):  # one group per distinct tuple, members in ascending order
                members = perm[gid == g]
                assert len({tuples[i] for i in np.flatnonzero(gid == g)}) == 1
                assert (np.diff(members) > 0).all()
            assert gid[-1] + 1 == len(set(tuples))


def test_cache_files_give_the_decisions_of_the_computed_pass(tmp_path):
    """The pass written to the runner's array cache as it runs (listing order, read back a batch
    at a time with plain reads) decides exactly like the pass held in memory, for both rules and
    a calibrated target."""
    from curate.executors.local import ArrayCache
    from curate.stages.semdedup import SemDedupCache

    n = 3000
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 16)).astype(np.float32)[rng.integers(0, 40, n)]
    x += rng.normal(scale=0.05, size=x.shape).astype(np.float32)
    cluster = rng.integers(0, 12, n).astype(np.int32)
    dist = rng.random(n).astype(np.float32)
    tb = rng.permutation(n).astype(np.uint32) * 3 + 11  # not a whole pool's ranks
    for keep in ("farthest", "random"):
        fresh = semdedup_pass(ArrayEmbeddings(x), cluster, dist, keep=keep, seed=3, tiebreak=tb, batch_rows=700)
        store = ArrayCache(tmp_path)
        key = f"k-{keep}"
        store.put_stream(key, {"nn_sim": np.float32, "nn": np.int32}, n,
                         ((fresh.nn_sim[s:s + 999], fresh.nn[s:s + 999]) for s in range(0, n, 999)))
        got = store.get(key)
        assert isinstance(got["nn_sim"], np.memmap)
        loaded = SemDedupCache(fresh.cin, got["nn_sim"], got["nn"], keep, 3)
        for rule in ("paper", "greedy"):
            a, b = apply_eps(fresh, 0.2, rule), apply_eps(loaded, 0.2, rule)
            assert np.array_equal(a.keep, b.keep) and 0 < (~a.keep).sum() < n
            assert np.array_equal(a.ref_pos, b.ref_pos) and (a.ref_pos[~a.keep] >= 0).all()
            assert np.array_equal(a.value, b.value, equal_nan=True)
        assert calibrate_eps(fresh, 0.6) == calibrate_eps(loaded, 0.6)
    with pytest.raises(RuntimeError, match="10 entries written of 3000"):
        store.put_stream("short", {"nn_sim": np.float32}, n, [(np.zeros(10, np.float32),)])
    assert store.get("short") is None
