"""Spherical k-means: seeded explicit training sample, streamed assignment, device choice, caching."""

import numpy as np
import polars as pl
import pytest

from curate.cluster import (ClusterSpec, Device, assign, cluster_means, clustering_for_stage, clustering_frame,
                            flat_ip_index, load_clustering, normalise_rows, resolve_device, save_clustering,
                            spherical_kmeans, train_centroids, training_sample)
from curate.errors import CurateError, UsageError
from curate.stages.base import ArrayEmbeddings, EmbeddingView, StageInput


def blobs(n=4000, d=32, k=8, spread=0.15, seed=0):
    """Unit vectors around k random directions, stored fp16 like the workspace does."""
    rng = np.random.default_rng(seed)
    centres = normalise_rows(rng.standard_normal((k, d)))
    labels = rng.integers(0, k, n)
    x = centres[labels] + spread * rng.standard_normal((n, d)) / np.sqrt(d) * 3
    return x.astype(np.float16), labels


class CountingView(EmbeddingView):
    """A real array-backed view that records the largest block it ever handed out."""

    def __init__(self, array):
        self.array, (self.n, self.dim) = array, array.shape
        self.max_rows = 0
        self.rows_read = 0

    def _note(self, k):
        self.max_rows = max(self.max_rows, k)
        self.rows_read += k

    def chunks(self, rows=65536):
        for start in range(0, self.n, rows):
            block = np.array(self.array[start:start + rows], dtype=np.float32)
            self._note(len(block))
            yield start, block

    def take(self, positions):
        block = np.array(self.array[np.asarray(positions)], dtype=np.float32)
        self._note(len(block))
        return block


def test_normalise_rows_handles_zero_and_nonfinite_rows():
    x = np.array([[3, 4], [0, 0], [np.nan, 1], [np.inf, 0]], dtype=np.float32)
    y = normalise_rows(x)
    assert np.allclose(y[0], [0.6, 0.8])
    assert (y[1:] == 0).all()
    src = np.ones((20000, 3), np.float32)
    normalise_rows(src)
    normalise_rows(src[:10], inplace=True)  # a view into someone's array: still copied
    assert (src == 1).all()
    own = np.ones((20000, 3), np.float32)
    assert normalise_rows(own, inplace=True) is own and np.allclose(own, 1 / np.sqrt(3))
    assert np.array_equal(normalise_rows(src), src / np.linalg.norm(src, axis=1, keepdims=True))


def test_resolve_device_logic_without_gpus():
    assert resolve_device("auto", num_gpus=0) == Device("cpu")
    assert resolve_device("cpu", num_gpus=4) == Device("cpu")
    assert resolve_device(None, num_gpus=0) == Device("cpu")
    with pytest.raises(UsageError):
        resolve_device("gpu", num_gpus=0)
    with pytest.raises(UsageError):
        resolve_device("tpu", num_gpus=0)


def test_resolve_device_gpu_branches():
    assert resolve_device("auto", num_gpus=2) == Device("gpu", (0, 1))
    assert resolve_device("gpu", num_gpus=3) == Device("gpu", (0, 1, 2))
    assert resolve_device("GPU:1", num_gpus=2) == Device("gpu", (1,))
    assert resolve_device("gpu:0,2", num_gpus=3) == Device("gpu", (0, 2))
    assert str(resolve_device("gpu:0,2", num_gpus=3)) == "gpu:0,2"
    for bad in ("gpu:2", "gpu:0,0", "gpu:x", "gpu:-1", "gpu:"):
        with pytest.raises(UsageError):
            resolve_device(bad, num_gpus=2)


def test_real_faiss_device_probe_and_gpu_index_on_cpu_build():
    import faiss

    dev = resolve_device("auto")
    assert dev.kind == ("gpu" if faiss.get_num_gpus() > 0 else "cpu")
    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("GPU build of FAISS: the CPU-only error path does not apply")
    with pytest.raises(CurateError, match="GPU build"):
        flat_ip_index(8, Device("gpu", (0,)))


def test_training_sample_is_seeded_sorted_and_capped():
    a = training_sample(10_000, 500, seed=3)
    assert len(a) == 500 and len(np.unique(a)) == 500 and (np.diff(a) > 0).all()
    assert np.array_equal(a, training_sample(10_000, 500, seed=3))
    assert not np.array_equal(a, training_sample(10_000, 500, seed=4))
    assert np.array_equal(training_sample(50, 500, seed=0), np.arange(50))


def test_kmeans_recovers_planted_clusters_and_distances_are_cosine():
    x, labels = blobs()
    # k above the planted 8: random-init k-means may merge two planted clusters at k=8
    res = spherical_kmeans(ArrayEmbeddings(x), 16, niter=20, seed=1)
    assert res.assignments.dtype == np.int32 and res.distances.dtype == np.float32
    assert res.centroids.shape == (16, 32)
    assert np.allclose(np.linalg.norm(res.centroids, axis=1), 1, atol=1e-5)
    # purity: each found cluster is (almost) one planted cluster
    purity = sum(np.bincount(labels[res.assignments == c]).max() for c in range(16) if (res.assignments == c).any())
    assert purity / len(labels) > 0.97
    xn = normalise_rows(x)
    sims = xn @ res.centroids.T
    assert np.array_equal(res.assignments, sims.argmax(1))
    assert np.allclose(res.distances, 1 - sims.max(1), atol=1e-5)


def test_kmeans_deterministic_and_chunk_size_independent():
    x, _ = blobs(n=3000)
    a = spherical_kmeans(ArrayEmbeddings(x), 6, niter=10, seed=7, sample_size=1200)
    b = spherical_kmeans(ArrayEmbeddings(x), 6, niter=10, seed=7, sample_size=1200, chunk_rows=257)
    assert np.array_equal(a.centroids, b.centroids)
    assert np.array_equal(a.assignments, b.assignments)
    assert np.array_equal(a.distances, b.distances)
    c = spherical_kmeans(ArrayEmbeddings(x), 6, niter=10, seed=8, sample_size=1200)
    assert not np.array_equal(a.centroids, c.centroids)


def test_kmeans_trains_on_exactly_the_explicit_sample():
    x, _ = blobs(n=3000)
    res = spherical_kmeans(ArrayEmbeddings(x), 5, niter=8, seed=2, sample_size=700)
    assert res.params["sample_size"] == 700 and res.params["seed"] == 2
    sample = normalise_rows(x[training_sample(3000, 700, seed=2)].astype(np.float32))
    assert np.array_equal(train_centroids(sample, 5, niter=8, seed=2), res.centroids)


def test_assignment_streams_in_chunks_never_whole_pool():
    x, _ = blobs(n=5000)
    view = CountingView(x)
    res = spherical_kmeans(view, 4, niter=5, seed=0, sample_size=800, chunk_rows=1000)
    assert view.max_rows <= 1000
    assert view.rows_read == 800 + 5000
    ids, dist = assign(ArrayEmbeddings(x), res.centroids, chunk_rows=5000)
    assert np.array_equal(ids, res.assignments) and np.array_equal(dist, res.distances)


def test_k_capped_at_rows_and_empty_view():
    x, _ = blobs(n=5)
    res = spherical_kmeans(ArrayEmbeddings(x), 50, niter=3, seed=0)
    assert res.k == 5 and res.params["k_requested"] == 50
    empty = spherical_kmeans(ArrayEmbeddings(np.zeros((0, 8), np.float16)), 4)
    assert len(empty.assignments) == 0


def test_save_load_roundtrip(tmp_path):
    x, _ = blobs(n=1000)
    res = spherical_kmeans(ArrayEmbeddings(x), 4, niter=5, seed=0)
    save_clustering(res, tmp_path / "clu")
    back = load_clustering(tmp_path / "clu")
    assert np.array_equal(back.assignments, res.assignments)
    assert np.array_equal(back.distances, res.distances)
    assert np.array_equal(back.centroids, res.centroids)
    assert back.params == res.params
    assert clustering_frame(pl.Series([f"{i:032x}" for i in range(1000)]), res).columns == \
        ["uid", "cluster", "centroid_dist"]
    mm = load_clustering(tmp_path / "clu", mmap=True)
    assert np.array_equal(np.asarray(mm.assignments), res.assignments)
    with pytest.raises(UsageError):
        load_clustering(tmp_path / "nothing")


def test_cluster_means_approximate_centroids():
    x, _ = blobs(n=3000)
    res = spherical_kmeans(ArrayEmbeddings(x), 8, niter=20, seed=0)
    means = cluster_means(ArrayEmbeddings(x), res.assignments, res.k, chunk_rows=333)
    assert (np.sum(means * res.centroids, axis=1) > 0.995).all()


def test_stage_glue_cache_order_independence_and_provided(tmp_path):
    from curate.executors.local import ArrayCache

    x, _ = blobs(n=1500)
    uids = pl.Series("uid", [f"{i:032x}" for i in range(1500)])
    cache = ArrayCache(tmp_path / "cache")
    spec = ClusterSpec(k=5, niter=5, seed=0, scorer="s")
    inp = StageInput(pl.DataFrame({"uid": uids}), {("s", "img"): ArrayEmbeddings(x)}, seed=0, cache=cache)
    got = clustering_for_stage(inp, spec)
    assert got.source == "computed" and got.centroids.shape == (5, 32)
    again = clustering_for_stage(inp, spec)
    assert again.source == "cache" and again.identity == got.identity
    assert np.array_equal(again.cluster, got.cluster) and np.array_equal(again.dist, got.dist)
    # the same pool in another order: the cache entry fits (stored in uid order) ...
    perm = np.random.default_rng(0).permutation(1500)
    shuffled = StageInput(pl.DataFrame({"uid": uids[perm]}), {("s", "img"): ArrayEmbeddings(x[perm])}, cache=cache)
    hit = clustering_for_stage(shuffled, spec)
    assert hit.source == "cache" and np.array_equal(hit.cluster, got.cluster[perm])
    # ... and without a cache the computation itself does not depend on the order
    fresh = clustering_for_stage(StageInput(shuffled.frame, shuffled.embeddings), spec)
    assert fresh.source == "computed"
    assert np.array_equal(fresh.cluster, got.cluster[perm]) and np.array_equal(fresh.dist, got.dist[perm])
    # another spec or another uid set misses
    assert clustering_for_stage(inp, ClusterSpec(k=6, niter=5, seed=0, scorer="s")).source == "computed"
    sub = StageInput(inp.frame[:-1], {("s", "img"): ArrayEmbeddings(x[:-1])}, cache=cache)
    assert clustering_for_stage(sub, spec).source == "computed"
    # provided columns win; centroids, when asked for, are the normalised cluster means
    frame = inp.frame.with_columns(pl.Series("cluster", got.cluster), pl.Series("centroid_dist", got.dist))
    prov = clustering_for_stage(StageInput(frame, {("s", "img"): ArrayEmbeddings(x)}), spec, need_centroids=True)
    assert prov.source == "provided" and np.array_equal(prov.cluster, got.cluster)
    assert (np.sum(prov.centroids * got.centroids, axis=1) > 0.99).all()
    bad = frame.with_columns(pl.lit(-1).alias("cluster"))
    with pytest.raises(UsageError):
        clustering_for_stage(StageInput(bad), spec)


def test_inverse_permutation_and_rows_of_ranks_across_chunk_boundaries():
    from curate.cluster import inverse_permutation, rows_of_ranks

    rng = np.random.default_rng(3)
    for n in (1, 7, (1 << 20) + 5):  # the inverse is filled a million entries at a time
        perm = rng.permutation(n).astype(np.uint32)
        inv = inverse_permutation(perm)
        assert inv.dtype == np.int32
        assert np.array_equal(perm[inv], np.arange(n))
        ranks = np.sort(rng.choice(n, size=max(1, n // 5), replace=False))
        rows = rows_of_ranks(perm, ranks)
        assert np.array_equal(rows, inv[ranks])  # the rows holding those ranks, in rank order
        assert np.array_equal(perm[rows], ranks)


def test_take_sorted_reads_a_cache_file_by_range(tmp_path):
    from curate.cluster import take_sorted

    a = np.arange(3_000_000, dtype=np.int32) * 7 - 5
    np.save(tmp_path / "a.npy", a)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), 50_000)  # unsorted, with repeats, across chunk boundaries
    got = take_sorted(mm, idx, chunk=1 << 18)
    assert got.dtype == np.int32 and not isinstance(got, np.memmap)
    assert np.array_equal(got, a[idx])
    assert np.array_equal(take_sorted(mm, np.array([len(a) - 1, 0])), a[[len(a) - 1, 0]])
    assert np.array_equal(take_sorted(a, idx[:10]), a[idx[:10]])  # plain arrays: plain indexing
    with pytest.raises(IndexError):
        take_sorted(mm, np.array([len(a)]))


def test_shard_view_gathers_contiguous_permuted_and_repeated_rows(tmp_path):
    """Rows read straight into the float32 batch (a slice when contiguous on both sides, else an
    index copy) come back in the asked order whatever the pattern."""
    from curate.embeddings import EmbeddingRef, ShardEmbeddingView

    rng = np.random.default_rng(2)
    refs, arrays = {}, {}
    for sid, rows in ((0, 50), (3, 40)):
        a = rng.normal(size=(rows, 8)).astype(np.float16)
        np.save(tmp_path / f"{sid}.npy", a)
        arrays[sid] = a
        refs[sid] = EmbeddingRef("s", sid, "img", str(tmp_path / f"{sid}.npy"), None, None, "float16", rows, 8)
    frame = pl.DataFrame({"shard_id": [0] * 50 + [3] * 40, "row_idx": list(range(50)) + list(range(40))})
    view = ShardEmbeddingView(frame, refs)
    want = np.concatenate([arrays[0], arrays[3]]).astype(np.float32)
    for sel in (np.arange(90), np.arange(10, 30), np.arange(45, 60), np.array([5, 3, 4, 6]),
                np.array([0, 2, 1, 3]), np.array([7, 7, 8, 60, 60, 2]), rng.permutation(90)):
        got = view.take(sel)
        assert got.dtype == np.float32 and np.array_equal(got, want[sel]), sel
    assert np.array_equal(np.concatenate([b for _, b in view.chunks(32)]), want)
