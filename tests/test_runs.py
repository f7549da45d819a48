"""RunArray / RunBuilder / RunInverse: the prune runner's compact per-sample columns must give
back exactly the arrays they stand for, whether those fall into runs or not."""

import numpy as np

from curate.executors.runs import RunArray, RunBuilder, RunInverse


def _built(chunks, step: int) -> RunArray:
    b = RunBuilder(step, np.int32)
    for c in chunks:
        b.add(c)
    return b.finish()


def _cases(rng):
    for _ in range(200):
        n = int(rng.integers(0, 3000))
        yield np.sort(rng.integers(0, 20, n)).astype(np.int32)  # shard ids of a pool in shard order
        yield np.concatenate([np.arange(rng.integers(0, 200)) for _ in range(rng.integers(1, 20))])[:n].astype(np.int32)
        yield rng.permutation(n).astype(np.int32)  # no runs at all: kept as a plain array


def test_runs_give_back_the_array_whole_or_built_chunk_by_chunk():
    rng = np.random.default_rng(0)
    compressed = 0
    for a in _cases(rng):
        for step in (0, 1):
            cuts = np.sort(rng.integers(0, len(a) + 1, rng.integers(0, 6)))
            for ra in (RunArray(a, step), _built(np.split(a, cuts), step)):
                assert len(ra) == len(a) and ra.dtype == np.int32
                if len(a):
                    idx = rng.integers(0, len(a), 64)
                    assert np.array_equal(ra[idx], a[idx])
                    assert np.array_equal(ra[np.arange(len(a))], a)
                    assert ra.max() == a.max()
                compressed += ra.dense is None and len(a) > 100
    assert compressed > 100  # shard ids and row counters do compress


def test_run_inverse_maps_values_back_to_positions():
    rng = np.random.default_rng(1)
    for _ in range(50):
        # row ids of a pool: runs of consecutive ids in shuffled blocks, with holes between them
        a = np.concatenate([np.arange(s, s + ln) for s, ln in zip(rng.permutation(40) * 1000, rng.integers(1, 900, 40))])
        for arr in (a.astype(np.int32), rng.permutation(300).astype(np.int32)):
            inv = RunInverse(RunArray(arr, 1))
            want = np.full(int(arr.max()) + 1, -1)
            want[arr] = np.arange(len(arr))
            assert len(inv) == len(want)
            assert np.array_equal(inv[np.arange(len(want))], want)
