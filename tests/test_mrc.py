"""Miss-ratio curves: exact stack distances against brute-force LRU and the engine, OPT against
a pure-Python Belady, SHARDS against exact on the bundled real trace."""

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.errors import DsacacheError
from dsacache.simulator import mrc, simulate_addresses
from dsacache.simulator.workload import Workload
from dsacache.traces import bundled_path, open_trace


def _python_lru_hits(keys, counted, capacity: int) -> int:
    """Counted hits of a fully-associative LRU cache of ``capacity`` objects (slow reference)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for key, c in zip(keys.tolist(), counted.tolist(), strict=True):
        if key in cache:
            cache.move_to_end(key)
            hits += c
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def _python_opt_hits(keys, counted, capacity: int) -> int:
    """Belady's MIN, inserting every miss, by scanning the future (slow reference)."""
    keys = keys.tolist()
    cache: set[int] = set()
    hits = 0
    for i, key in enumerate(keys):
        if key in cache:
            hits += int(counted[i])
            continue
        if len(cache) == capacity:

            def next_use(k, i=i):
                for j in range(i + 1, len(keys)):
                    if keys[j] == k:
                        return j
                return len(keys) + 1

            # ties (never used again) go to the largest key, as any choice among them is optimal
            cache.remove(max(cache, key=lambda k: (next_use(k), k)))
        cache.add(key)
    return hits


def _stream(seed: int, n: int, n_keys: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # a mix of Zipf-hot keys and cyclic scans, so stack distances spread over all sizes
    hot = rng.zipf(1.2, n) % n_keys
    scan = np.arange(n) % max(n_keys // 2, 1)
    return np.where(rng.random(n) < 0.5, hot, scan).astype(np.int64) * 7919 + 3


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 3000),
    n_keys=st.integers(1, 400),
    obj=st.sampled_from([1, 128, 656, 768]),
    chunks=st.integers(1, 7),
    with_writes=st.booleans(),
)
def test_exact_mrc_equals_python_lru(seed, n, n_keys, obj, chunks, with_writes):
    keys = _stream(seed, n, n_keys)
    rng = np.random.default_rng(seed + 1)
    counted = rng.random(n) < 0.8 if with_writes else np.ones(n, bool)
    cuts = np.sort(rng.integers(0, n + 1, chunks - 1))
    parts = list(zip(np.split(keys, cuts), np.split(counted, cuts), strict=True))
    curve = mrc.lru_curve(parts, obj)
    assert curve.total == counted.sum()
    assert curve.objects == len(np.unique(keys))
    capacities = sorted({1, 2, 3, 4, 5, 8, 13, 21, 40, 100, n_keys // 2 + 1, n_keys, n_keys + 5})
    assert len(capacities) >= 10
    for cap in capacities:
        want = _python_lru_hits(keys, counted, cap)
        # any byte size that holds ``cap`` whole objects (and not cap + 1) gives the same ratio
        for size in (cap * obj, cap * obj + obj - 1):
            got = curve.hit_ratio(size)[0] * curve.total
            assert round(got) == want, (cap, size)


def test_exact_mrc_survives_growth_and_compaction():
    # more distinct keys than the first table (4096) and a stream long enough that the
    # Fenwick tree over access times is compacted several times
    keys = _stream(7, 60_000, 9_000)
    counted = np.ones(len(keys), bool)
    sd = mrc.StackDistances(1)
    for part in np.array_split(keys, 13):
        sd.feed(part)
    curve = sd.curve()
    for cap in (1, 10, 100, 1000, 2000, 4000, 4500, 6000, 8000, 9000):
        assert round(curve.hit_ratio(cap)[0] * curve.total) == _python_lru_hits(keys, counted, cap)


def test_line_mrc_equals_fully_associative_engine(small_trace):
    """Line MRC of the replay stream = the Numba engine's LRU with one set of ``ways`` lines."""
    tr = open_trace(small_trace)
    wl = Workload(batch=2, classes=("index", "kv"))
    curve = mrc.line_mrc(tr, workload=wl, classes=("index", "kv"))
    lines = np.concatenate(
        [k for k, _ in mrc.line_stream(tr, workload=wl, classes=("index", "kv"))]
    )
    assert curve.total == len(lines)
    for ways in (1, 4, 16, 64, 200, 512, 1024, 3000, 6000, 12000):
        got = simulate_addresses(lines * 128, size=ways * 128, ways=ways, nbytes=128)
        assert round(curve.hit_ratio(ways * 128)[0] * curve.total) == got["line_hits"], ways


def test_line_mrc_counts_kv_inside_the_full_stream(small_trace):
    """Indexer reads and appends update recency but only KV gathers count (as the replay's
    kv_line_hit_rate does): checked against the Python LRU with the same counted mask."""
    tr = open_trace(small_trace)
    wl = Workload(batch=2)
    classes = ("index", "kv", "append")
    curve = mrc.line_mrc(tr, workload=wl, classes=classes, count=("kv",))
    lines, counted = mrc.collect(mrc.line_stream(tr, workload=wl, classes=classes, count=("kv",)))
    kv_only = mrc.collect(mrc.line_stream(tr, workload=wl, classes=("kv",)))[0]
    assert counted.sum() == len(kv_only) < len(lines)
    assert curve.total == counted.sum()
    for cap in (1, 8, 64, 300, 1000, 2000, 4000, 8000, 12000, 20000):
        want = _python_lru_hits(lines, counted, cap)
        assert round(curve.hit_ratio(cap * 128)[0] * curve.total) == want, cap


def test_token_stream_keys_and_sizes(small_trace):
    tr = open_trace(small_trace)
    rows = tr.read_all()
    keys, counted = mrc.collect(mrc.token_stream(tr))
    assert len(keys) == len(rows.indices) and counted.all()
    # one object per (request, layer, group, token): as many as distinct such tuples
    row_of = np.repeat(np.arange(len(rows)), rows.lengths)
    tuples = {
        (int(rows.request[r]), int(rows.layer[r]), int(rows.group[r]), int(i))
        for r, i in zip(row_of, rows.indices, strict=True)
    }
    assert len(np.unique(keys)) == len(tuples)
    # GQA, 2 KV heads of 64 dims in bf16, split over 2 groups: K + V slice = 2 x 128 bytes
    assert mrc.token_object_bytes(tr) == 256
    assert mrc.token_object_bytes(tr, "gqa:kv_heads=2,head_dim=128") == 512
    assert len(np.concatenate([k for k, _ in mrc.token_stream(tr, batch=1)])) < len(keys)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 400), n_keys=st.integers(1, 60))
def test_opt_points_equal_python_belady(seed, n, n_keys):
    keys = _stream(seed, n, n_keys)
    counted = np.random.default_rng(seed).random(n) < 0.9
    sizes = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]
    curve = mrc.opt_curve(keys, 100, [s * 100 for s in sizes], counted)
    lru = mrc.lru_curve([(keys, counted)], 100)
    for s, hr in zip(sizes, curve.hits_known, strict=True):
        want = _python_opt_hits(keys, counted, s)
        total = counted.sum()
        assert round(hr * total) == want, s
        assert hr >= lru.hit_ratio(s * 100)[0] - 1e-12  # OPT bounds LRU


def test_shards_is_exact_at_rate_one_and_close_at_one_percent():
    tr = open_trace(bundled_path("smollm2-135m-oracle-k64"))
    keys, _ = mrc.collect(mrc.token_stream(tr))
    exact = mrc.lru_curve([(keys, None)], 768)
    full = mrc.lru_curve([(keys, None)], 768, sample_rate=1.0, seed=5)
    np.testing.assert_array_equal(exact.counts, full.counts)
    errors = []
    for seed in range(3):
        approx = mrc.lru_curve([(keys, None)], 768, sample_rate=0.01, seed=seed)
        assert approx.kind == "shards" and 0.005 < approx.accesses / len(keys) < 0.02
        assert abs(approx.objects / exact.objects - 1) < 0.25
        errors.append(mrc.curve_error(exact, approx)["mae"])
    assert max(errors) <= 0.02, errors
    # sampling is spatial: the same objects are kept whatever the chunking
    a = mrc.lru_curve([(k, None) for k in np.array_split(keys, 5)], 768, sample_rate=0.01)
    b = mrc.lru_curve([(keys, None)], 768, sample_rate=0.01)
    assert a.accesses == b.accesses


def test_curve_sizes_and_footprint():
    keys = np.repeat(np.arange(10, dtype=np.int64)[None], 3, axis=0).ravel()  # 3 cyclic scans
    curve = mrc.lru_curve([(keys, None)], 656)
    assert curve.footprint_bytes == 6560
    # a cyclic scan of 10 objects: all misses below 10 objects, all re-uses hit at 10
    assert curve.hit_ratio(9 * 656)[0] == 0
    assert curve.hit_ratio(10 * 656)[0] == pytest.approx(20 / 30)
    table = curve.to_dict()
    assert (np.diff(table["hit_ratio"]) >= 0).all()
    assert table["size_bytes"][-1] >= curve.footprint_bytes


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: mrc.StackDistances(0), "object_bytes"),
        (lambda: mrc.StackDistances(128, sample_rate=0), "sample rate"),
        (lambda: mrc.StackDistances(128, sample_rate=1.5), "sample rate"),
        (lambda: mrc.StackDistances(128).feed(np.array([1, -2])), "non-negative"),
        (lambda: mrc.StackDistances(128).feed(np.zeros((2, 2))), "1-D"),
        (lambda: mrc.opt_curve(np.arange(3), 128, [128], np.ones(2, bool)), "counted"),
    ],
)
def test_bad_input_is_one_line(call, needle):
    with pytest.raises(DsacacheError, match=needle):
        call()


def test_bad_trace_options(small_trace):
    tr = open_trace(small_trace)
    with pytest.raises(DsacacheError, match="batch 9"):
        mrc.token_mrc(tr, batch=9)
    with pytest.raises(DsacacheError, match="traffic class"):
        mrc.line_mrc(tr, classes=("bogus",))
