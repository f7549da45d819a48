"""The cluster-major listing the prune runner feeds SemDeDup and DBP with (curate.clustered):
the on-disk index against the in-memory listing, the stages over both, the staged decisions,
the streamed k-means assignment and the pool's uid ranks."""

import duckdb
import numpy as np
import polars as pl
import pytest

from curate.cluster import spherical_kmeans
from curate.clustered import BitSet, ClusteredInput, ClusterIndex, NpyWriter, read_range, seeded_keys
from curate.stages.base import ArrayEmbeddings
from curate.stages.dbp import DensityBasedPruning
from curate.stages.semdedup import SemanticDedup


def pool(n=5000, k=23, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    cluster = rng.integers(0, k, n).astype(np.int32)
    cluster[cluster == 7] = 8  # an empty cluster
    x = centres[cluster] + rng.normal(scale=0.3, size=(n, d)).astype(np.float32)
    x[100:160] = x[40:100]  # exact duplicates
    cluster[100:160] = cluster[40:100]
    dist = np.round(rng.random(n), 2).astype(np.float32)  # many ties: the uid breaks them
    rank = rng.permutation(n).astype(np.uint32)  # each position's uid rank
    cent = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return x, cluster, dist, rank, cent


def index_over(tmp_path, cluster, dist, rank, k):
    """A ClusterIndex built as the runner builds it: rows in uid-rank order, positions beside."""
    pos_of_rank = np.argsort(rank)
    con = duckdb.connect()
    con.execute("SET memory_limit = '64MB'")
    rows = ((cluster[pos_of_rank[s:s + 999]], dist[pos_of_rank[s:s + 999]], np.arange(s, min(s + 999, len(rank))),
             pos_of_rank[s:s + 999]) for s in range(0, len(rank), 999))
    return ClusterIndex.build(tmp_path / "idx", con, k, len(rank), rows)


def test_index_lists_what_the_in_memory_listing_lists(tmp_path):
    x, cluster, dist, rank, cent = pool()
    k = int(cluster.max()) + 1
    idx = index_over(tmp_path, cluster, dist, rank, k)
    assert ClusterIndex.complete(tmp_path / "idx") and idx.bounds[-1] == len(x)
    alive = np.random.default_rng(1).random(len(x)) < 0.7
    sub = np.flatnonzero(alive)
    files = ClusteredInput(n=len(sub), k=k, centroids=cent, bounds=idx.bounds, read=idx.read,
                           uid_of=lambda p: rank[p], uid_series=lambda p, u: pl.Series("uid", u),
                           embed=lambda p: x[p], wanted=BitSet.of(alive))
    mem = ClusteredInput.from_arrays(cluster[sub], dist[sub], rank[sub], k=k, centroids=cent)
    a = [(b.pos, b.cluster, b.dist) for b in files.batches(700)]
    b = [(sub[bt.pos], bt.cluster, bt.dist) for bt in mem.batches(300)]  # other batch sizes: same listing
    for i in range(3):
        assert np.array_equal(np.concatenate([t[i] for t in a]), np.concatenate([t[i] for t in b]))
    for bt in files.batches(700):
        assert (np.diff(bt.cluster) >= 0).all()
        for s, e in zip(bt.bounds[:-1], bt.bounds[1:]):  # farthest first, ties by uid
            d, u = bt.dist[s:e], bt.uid[s:e]
            assert ((d[:-1] > d[1:]) | ((d[:-1] == d[1:]) & (u[:-1] < u[1:]))).all()
    assert np.array_equal(files.totals()[0], mem.totals()[0])
    assert np.allclose(files.totals()[1], mem.totals()[1])
    assert files.totals()[0][7] == 0
    with pytest.raises(ValueError, match="cluster ids"):
        ClusteredInput.from_arrays(cluster, dist, rank, k=5)


@pytest.mark.parametrize("stage", [
    SemanticDedup(scorer="e", eps=0.05, k=23), SemanticDedup(scorer="e", target_keep=0.8, k=23, keep="random"),
    SemanticDedup(scorer="e", eps=0.3, k=23, rule="greedy", keep="closest"),
    DensityBasedPruning(scorer="e", k=23), DensityBasedPruning(scorer="e", k=23, keep="easy"),
    DensityBasedPruning(scorer="e", k=23, keep="random")])
def test_stages_decide_the_same_from_the_index_and_from_memory(tmp_path, stage):
    x, cluster, dist, rank, cent = pool(seed=2)
    k = int(cluster.max()) + 1
    idx = index_over(tmp_path, cluster, dist, rank, k)
    alive = np.random.default_rng(3).random(len(x)) < 0.8
    sub = np.flatnonzero(alive)
    files = ClusteredInput(n=len(sub), k=k, centroids=cent, bounds=idx.bounds, read=idx.read,
                           uid_of=lambda p: rank[p], uid_series=lambda p, u: pl.Series("uid", u),
                           embed=lambda p: x[p], wanted=BitSet.of(alive), identity="i")
    mem = ClusteredInput.from_arrays(cluster[sub], dist[sub], rank[sub], k=k, centroids=cent,
                                     embed=ArrayEmbeddings(x[sub]).take, identity="i")
    a = pl.concat(list(stage.run_clustered(files, 1500, 0).decision_chunks()))
    b = pl.concat(list(stage.run_clustered(mem, 1500, 0).decision_chunks()))
    b = b.with_columns(pl.Series("_pos", sub[b["_pos"].to_numpy()]),
                       pl.col("_ref_pos").map_batches(lambda s: pl.Series(np.where(s.is_null(), -1, sub[s.fill_null(0)]))))
    a = a.with_columns(pl.col("_ref_pos").fill_null(-1))
    assert a.sort("_pos").equals(b.sort("_pos"))
    assert a.height == len(sub) and a["_pos"].n_unique() == len(sub) and alive[a["_pos"].to_numpy()].all()
    if stage.name == "dbp":
        assert int(a["keep"].sum()) == 1500
    else:
        assert 0 < int((~a["keep"]).sum()) < len(sub)
        dropped = a.filter(~pl.col("keep"))
        assert (dropped["_ref_pos"] >= 0).all()
        # the ref is a sample of the same cluster listed before it
        assert (cluster[dropped["_ref_pos"].to_numpy()] == cluster[dropped["_pos"].to_numpy()]).all()


def test_bitset_and_seeded_keys():
    m = np.random.default_rng(0).random(100_003) < 0.4
    b = BitSet.of(m, chunk=8 * 1000)
    assert np.array_equal(b[np.arange(len(m))], m) and b.count() == m.sum()
    s = BitSet(len(m))
    s.add(np.flatnonzero(m)[::-1])
    assert np.array_equal(s.bits, b.bits)
    u = np.arange(1000)
    k1, k2 = seeded_keys(u, 1), seeded_keys(u[::-1], 1)[::-1]
    assert np.array_equal(k1, k2) and len(np.unique(k1)) == 1000
    assert not np.array_equal(k1, seeded_keys(u, 2))


def test_npy_writer_is_atomic_and_read_range_reads_plainly(tmp_path):
    w = NpyWriter(tmp_path / "a.npy", np.float32, 10)
    w.write(np.arange(4))
    w.write(np.arange(4, 10))
    w.close()
    a = np.load(tmp_path / "a.npy")
    assert a.dtype == np.float32 and a.tolist() == list(range(10))
    assert read_range(tmp_path / "a.npy", 3, 7).tolist() == [3, 4, 5, 6]
    assert read_range(tmp_path / "a.npy", 8, 99).tolist() == [8, 9] and len(read_range(tmp_path / "a.npy", 9, 9)) == 0
    w = NpyWriter(tmp_path / "b.npy", np.int32, 5)
    w.write(np.arange(3))
    with pytest.raises(RuntimeError, match="3 entries written of 5"):
        w.close()
    assert not (tmp_path / "b.npy").exists() and not list(tmp_path.glob(".b.npy*"))


def test_streamed_assignment_equals_the_in_memory_one():
    x, *_ = pool(n=3000, seed=4)
    a = spherical_kmeans(ArrayEmbeddings(x), 11, niter=5, seed=3, chunk_rows=700, device="cpu")
    got = {}
    b = spherical_kmeans(ArrayEmbeddings(x), 11, niter=5, seed=3, chunk_rows=700, device="cpu",
                         sink=lambda s, ids, d: got.setdefault(s, (ids, d)))
    assert b.assignments is None and b.params["empty_clusters"] == a.params["empty_clusters"]
    assert np.array_equal(np.concatenate([got[s][0] for s in sorted(got)]), a.assignments)
    assert np.array_equal(np.concatenate([got[s][1] for s in sorted(got)]), a.distances)
    assert np.array_equal(a.centroids, b.centroids)


def test_runner_cluster_index_path_equals_the_frame_path(tmp_path):
    """`curate prune` feeds SemDeDup and DBP cluster by cluster from the pool's cluster index
    and writes their decisions through a position sort; applied to the whole pool
    (`apply_to = "pool"`) the same stage gets a frame and clusters it itself. Both must record
    the same decisions; and the pool's uid ranks follow the uid strings' order."""
    from conftest import run_cli, run_json
    from curate.executors.local import PoolSource
    from curate.manifest import Manifest

    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "6000", "--seed", "4", "--shard-size", "2500",
            "--clusters", "50")
    run_json("ingest", pool, "-w", ws)
    # what a killed prune leaves behind: staged decisions, a half-written cache array
    (ws / "tmp" / "decisions-99-1").mkdir(parents=True)
    (ws / "tmp" / "decisions-99-1" / "staged.parquet").write_bytes(b"x")
    (ws / "cache" / "semdedup-x").mkdir(parents=True)
    (ws / "cache" / "semdedup-x" / ".nn.npy.123.partial").write_bytes(b"x")
    runs = {}
    for where in ("survivors", "pool"):
        recipe = tmp_path / f"{where}.toml"
        recipe.write_text(f'name = "r"\nseed = 3\n[[stages]]\nstage = "semdedup"\nscorer = "datacomp-l14"\n'
                          f'eps = 0.08\nk = 30\napply_to = "{where}"\n')
        runs[where] = run_json("prune", "-w", ws, "-p", recipe)["run_id"]
    m = Manifest(ws / "manifest.duckdb", read_only=True)
    try:
        q = ("SELECT uid, keep, reason, value, threshold, ref_uid, detail FROM decisions WHERE run_id = ? "
             "ORDER BY uid")
        a, b = m.frame(q, [runs["survivors"]]), m.frame(q, [runs["pool"]])
        src = PoolSource(m, [])
        uids = m.frame("SELECT uid FROM samples WHERE status = 'ok' ORDER BY shard_id, row_idx")["uid"]
    finally:
        m.close()
    assert not (ws / "tmp" / "decisions-99-1").exists() and not list((ws / "cache").glob("*/.*.partial"))
    assert not list((ws / "tmp").glob("decisions-*"))  # the runs' own staging is gone too
    assert a.height == 6000 and 0 < (~a["keep"]).sum() < 6000
    assert a.equals(b)
    assert (a.filter(~pl.col("keep"))["ref_uid"].is_not_null()).all()
    assert np.array_equal(src.rank, (uids.rank("ordinal") - 1).to_numpy())


def test_runner_dbp_keep_score_reads_the_spine_scores(tmp_path):
    """keep = "score" through the runner: each cluster keeps its quota of highest-scored
    samples (scores from the manifest's `scores` table via the spine), value = the score."""
    from conftest import run_cli, run_json
    from curate.manifest import Manifest

    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "5000", "--seed", "6", "--shard-size", "2000",
            "--clusters", "40")
    run_json("ingest", pool, "-w", ws)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[[stages]]\nstage = "dbp"\nscorer = "datacomp-l14"\nk = 25\nkeep = "score"\n'
                      'score = "datacomp-b32"\n')
    out = run_json("prune", "-w", ws, "-p", recipe, "--budget", "1200")
    assert out["kept"] == 1200
    m = Manifest(ws / "manifest.duckdb", read_only=True)
    try:
        d = m.frame("SELECT d.uid, d.keep, d.value, d.threshold, d.detail, s.score FROM decisions d "
                    "JOIN scores s ON s.uid = d.uid AND s.scorer = 'datacomp-b32' WHERE d.run_id = ?",
                    [out["run_id"]])
    finally:
        m.close()
    assert d.height == 5000 and d["value"].equals(d["score"], check_names=False)
    per = d.group_by("detail").agg(
        pl.col("score").filter(pl.col("keep")).min().alias("lo_kept"),
        pl.col("score").filter(~pl.col("keep")).max().alias("hi_dropped"),
        pl.col("keep").sum().alias("kept"), pl.col("threshold").first().alias("thr"))
    both = per.drop_nulls(["lo_kept", "hi_dropped"])
    assert both.height > 5 and (both["lo_kept"] >= both["hi_dropped"]).all()
    kept = per.filter(pl.col("kept") > 0)
    assert (kept["thr"] == kept["lo_kept"]).all()  # the cluster's boundary is its lowest kept score


def test_runner_exact_dedup_through_duckdb_matches_a_plain_reference(tmp_path):
    """exact_dedup in `curate prune`: condensed batches streamed to Parquet, grouped by DuckDB.
    Its decisions must equal a plain polars reference: keys in order among the survivors, the
    earliest (shard_id, row_idx) copy of each group stays, the others name it."""
    from conftest import run_cli, run_json
    from curate.manifest import Manifest
    from curate.stages.dedup_exact import normalise_urls

    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "6000", "--seed", "11", "--shard-size", "2500",
            "--clusters", "30")
    run_json("ingest", pool, "-w", ws)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[[stages]]\nstage = "exact_dedup"\nkeys = ["sha256", "url"]\n')
    out = run_json("prune", "-w", ws, "-p", recipe)
    m = Manifest(ws / "manifest.duckdb", read_only=True)
    try:
        d = m.frame("SELECT uid, keep, reason, value, ref_uid FROM decisions WHERE run_id = ?", [out["run_id"]])
        s = m.frame("SELECT uid, sha256, url, shard_id, row_idx FROM samples WHERE status = 'ok' "
                    "ORDER BY shard_id, row_idx")
    finally:
        m.close()
    s = s.with_columns(pl.col("sha256").str.strip_chars().str.to_lowercase().replace("", None),
                       normalise_urls(s["url"]).alias("url"))
    alive = pl.Series([True] * s.height)
    want = {}
    for key in ("sha256", "url"):
        f = s.with_row_index("i").filter(alive & pl.col(key).is_not_null())
        g = f.group_by(key).agg(pl.col("i").first().alias("first"), pl.len().alias("size"))
        f = f.join(g, on=key).filter(pl.col("i") != pl.col("first"))
        for i, first, size in f.select("i", "first", "size").iter_rows():
            want[s["uid"][i]] = (f"duplicate_{key}", float(size), s["uid"][first])
        alive = alive.scatter(f["i"].to_list(), False) if f.height else alive
    got = {u: (r, v, ref) for u, k, r, v, ref in d.iter_rows() if not k}
    assert d.height == s.height and len(want) > 20
    assert got == want
