"""Token-granularity LRU, reservation and Belady: hand-built cases and differential tests."""

from collections import OrderedDict

import libcachesim as lcs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.errors import DsacacheError
from dsacache.simulator import CacheConfig, replay, simulate_addresses
from dsacache.simulator.caches import make_model
from dsacache.simulator.reference import COUNTERS
from dsacache.simulator.workload import CLASS_ID
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

LINE = 128


def _objects(seed, n, n_objects, max_lines):
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.3, n) % n_objects
    lines = 1 + (ids * 7919) % max_lines  # each object has a fixed size
    return ids, lines


def _run_tokens(policy, ids, lines, capacity_lines):
    stride = 1 << 20
    addr = ids.astype(np.int64) * stride
    nbytes = lines.astype(np.int64) * LINE
    klass = np.full(len(ids), CLASS_ID["kv"], np.int8)
    model = make_model(CacheConfig(capacity_lines * LINE, 1), policy)
    counters = np.zeros((len(ids), len(COUNTERS)), np.int64)
    future = None
    if model.needs_future:
        from dsacache.simulator.engine import next_use

        future = next_use(model.future_keys(addr, nbytes, klass))
    model.run_chunk(
        addr,
        nbytes,
        np.zeros(len(ids), bool),
        klass,
        np.zeros(len(ids), np.int16),
        np.arange(len(ids)),
        counters,
        future,
    )
    return counters[:, 1] > 0  # token hit per access


def _python_lru(ids, lines, capacity_lines):
    cache, used, hits = OrderedDict(), 0, []
    for i, size in zip(ids.tolist(), lines.tolist(), strict=True):
        if i in cache:
            cache.move_to_end(i)
            hits.append(True)
            continue
        hits.append(False)
        if size > capacity_lines:
            continue
        while used + size > capacity_lines:
            used -= cache.popitem(last=False)[1]
        cache[i] = size
        used += size
    return np.array(hits)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 400),
    n_objects=st.integers(1, 60),
    max_lines=st.integers(1, 6),
    capacity=st.integers(1, 40),
)
def test_token_lru_equals_python_model(seed, n, n_objects, max_lines, capacity):
    ids, lines = _objects(seed, n, n_objects, max_lines)
    np.testing.assert_array_equal(
        _run_tokens("token-lru", ids, lines, capacity), _python_lru(ids, lines, capacity)
    )


def _libcachesim_hits(cache, ids, sizes, future=None):
    hits = []
    for j, (i, size) in enumerate(zip(ids.tolist(), sizes.tolist(), strict=True)):
        req = lcs.Request(obj_id=int(i) + 1, obj_size=int(size))
        if future is not None:
            req.next_access_vtime = (
                int(future[j]) if future[j] < (1 << 62) else np.iinfo(np.int64).max
            )
        hits.append(bool(cache.get(req)))
    return np.array(hits)


@pytest.mark.parametrize("seed", range(4))
def test_token_lru_equals_libcachesim_sized_lru(seed):
    ids, lines = _objects(seed, 3000, 300, 5)
    capacity = 120
    ours = _run_tokens("token-lru", ids, lines, capacity)
    theirs = _libcachesim_hits(lcs.LRU(cache_size=capacity * LINE), ids, lines * LINE)
    assert ours.sum() > 0
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("seed", range(4))
def test_token_belady_equals_libcachesim_belady(seed):
    from dsacache.simulator.engine import next_use

    ids, _ = _objects(seed, 3000, 400, 1)
    lines = np.ones(len(ids), np.int64)
    ours = _run_tokens("token-belady", ids, lines, 50)
    theirs = _libcachesim_hits(lcs.Belady(cache_size=50), ids, lines, next_use(ids))
    np.testing.assert_array_equal(ours, theirs)
    assert ours.sum() > _run_tokens("token-lru", ids, lines, 50).sum()


@pytest.mark.parametrize("seed", range(3))
def test_line_belady_fully_associative_equals_libcachesim(seed):
    from dsacache.simulator.engine import next_use

    ids, _ = _objects(seed, 4000, 500, 1)
    out = simulate_addresses(ids * LINE, size=64 * LINE, ways=64, nbytes=LINE, policy="belady")
    theirs = _libcachesim_hits(lcs.Belady(cache_size=64), ids, np.ones(len(ids)), next_use(ids))
    assert out["line_hits"] == theirs.sum() > 0


def test_belady_is_a_bound_for_set_associative_policies():
    ids, _ = _objects(7, 20000, 3000, 1)
    misses = {
        p: simulate_addresses(ids * LINE, size="64KiB", ways=8, nbytes=LINE, policy=p)[
            "line_misses"
        ]
        for p in ("lru", "fifo", "random", "belady")
    }
    assert misses["belady"] < min(misses["lru"], misses["fifo"], misses["random"])


# ---- a hand-built DSA-like trace: the same selection at every step -----------------------------
K, LAYERS, STEPS = 32, 3, 5


@pytest.fixture(scope="module")
def fixed_selection(tmp_path_factory):
    cfg = SynthConfig(
        layers=LAYERS,
        context=5000,
        steps=STEPS,
        k=K,
        keep=1.0,
        layer_variation=0.0,
        sinks=0,
        recency_weight=0.0,
        return_weight=0.0,
        seed=2,
        model={"name": "t", "attention": "MLA", "layout": "mla-fp8"},
    )
    return open_trace(synthesize(cfg, tmp_path_factory.mktemp("fx") / "fixed.dsatrace"))


def _kv_hits_by_step(df):
    kv = df[df["class"] == "kv"].groupby(["policy", "step"], observed=True)
    return (kv["sector_hits"].sum() / kv["sectors"].sum()).unstack("step")


def test_reused_tokens_hit_at_the_next_step(fixed_selection):
    df = replay(fixed_selection, policies=["token-lru"], cache_size="4MiB", ways=16)
    rate = _kv_hits_by_step(df).loc["token-lru"]
    assert rate[0] == 0.0 and (rate[1:] == 1.0).all()


def test_reservation_larger_than_selection_retains_it(fixed_selection):
    # k x layers x footprint: 32 x 3 x (at most 7 lines x 128 B) = 86 KB; 2 ways of a 1 MiB
    # 16-way cache are 128 KiB
    big = "reserve:ways=2"
    # index reads (5000 tokens x 132 B x 3 layers ~ 2 MB per step) flush a plain 1 MiB LRU
    df = replay(fixed_selection, policies=[big, "lru"], cache_size="1MiB", ways=16)
    rates = _kv_hits_by_step(df)
    assert (rates.loc["reserve:ways=2", 1:] == 1.0).all()
    assert rates.loc["lru", 1:].max() < 0.2


def test_reservation_too_small_thrashes_under_lru(fixed_selection):
    # 16 KiB < 32 x 3 tokens: cyclic reuse under LRU never hits; Belady keeps part of it
    df = replay(
        fixed_selection,
        policies=["reserve:bytes=16KiB", "reserve:bytes=16KiB,inner=token-belady"],
        cache_size="256KiB",
        ways=16,
    )
    rates = _kv_hits_by_step(df)
    assert rates.loc["reserve:bytes=16KiB", 1:].max() == 0.0
    assert rates.loc["reserve:bytes=16KiB,inner=token-belady", 1:].min() > 0.1


def test_admit_on_second_use(fixed_selection):
    df = replay(
        fixed_selection, policies=["reserve:ways=2,admit=second"], cache_size="1MiB", ways=16
    )
    rate = _kv_hits_by_step(df).iloc[0]
    assert rate[0] == 0.0 and rate[1] == 0.0 and (rate[2:] == 1.0).all()


def test_reserve_per_layer_splits_capacity(fixed_selection):
    # one per-layer third of 96 KiB holds a layer's 32 tokens (28 KiB); 48 KiB shared also does;
    # 60 KiB per-layer (20 KiB each) cannot hold a layer's tokens, shared 60 KiB cannot hold all
    df = replay(
        fixed_selection,
        policies=["reserve:bytes=96KiB,scope=layer", "reserve:bytes=20KiB,scope=layer"],
        cache_size="512KiB",
        ways=16,
    )
    rates = _kv_hits_by_step(df)
    assert (rates.iloc[0, 1:] == 1.0).all()
    assert rates.iloc[1, 1:].max() == 0.0


def test_reserve_rejects_impossible_sizes(fixed_selection):
    with pytest.raises(DsacacheError, match="needs 1..15 of the 16 ways"):
        replay(fixed_selection, policies=["reserve:ways=16"], cache_size="1MiB", ways=16)
    with pytest.raises(DsacacheError, match="admit='maybe' is not one of all, second"):
        replay(fixed_selection, policies=["reserve:admit=maybe"])


def test_policy_labels_show_sizes():
    from dsacache.policies import make_policy

    assert make_policy("reserve:bytes=8MiB,admit=second").label == "reserve:bytes=8MiB,admit=second"


def test_learned_layer_admission_beats_thrashing(tmp_path):
    # 6 layers re-select the same 32 tokens (~26 KB of lines per layer per step); 64 KiB holds
    # two layers. Shared token-LRU thrashes; learned admission keeps two layers whole.
    cfg = SynthConfig(
        layers=6,
        context=5000,
        steps=6,
        k=32,
        keep=1.0,
        layer_variation=0.0,
        sinks=0,
        recency_weight=0.0,
        return_weight=0.0,
        seed=4,
        model={"name": "t", "attention": "MLA", "layout": "mla-fp8"},
    )
    trace = open_trace(synthesize(cfg, tmp_path / "six.dsatrace"))
    df = replay(
        trace,
        policies=["reserve:bytes=64KiB", "reserve:bytes=64KiB,scope=learned"],
        cache_size="1MiB",
        ways=16,
    )
    rates = _kv_hits_by_step(df)
    assert rates.loc["reserve:bytes=64KiB", 1:].max() == 0.0
    steady = rates.loc["reserve:bytes=64KiB,scope=learned", 3:]
    assert np.allclose(steady, 2 / 6, atol=0.02)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 400),
    n_objects=st.integers(1, 60),
    max_lines=st.integers(1, 4),
    sets=st.integers(2, 6),
    per_set=st.integers(4, 12),
)
def test_set_associative_token_lru_equals_one_python_lru_per_set(
    seed, n, n_objects, max_lines, sets, per_set
):
    from dsacache.simulator.objects import sets_of

    ids, lines = _objects(seed, n, n_objects, max_lines)
    got = _run_tokens(f"token-lru:sets={sets}", ids, lines, sets * per_set)
    which = sets_of(ids.astype(np.int64) * (1 << 20), sets)  # a token's set: hash of its key
    want = np.zeros(n, bool)
    for s in range(sets):
        mine = which == s
        want[mine] = _python_lru(ids[mine], lines[mine], per_set)
    np.testing.assert_array_equal(got, want)


def test_token_sets_spread_tokens_evenly():
    from dsacache.simulator.objects import sets_of

    counts = np.bincount(sets_of(np.arange(4000, dtype=np.int64) * 656, 8), minlength=8)
    assert counts.min() > 400 and counts.max() < 600  # 500 each if perfectly even


def test_set_associative_token_lru_rejects_sets_smaller_than_a_line():
    with pytest.raises(DsacacheError, match="leave less than one 128-B line per set"):
        make_model(CacheConfig(4 * LINE, 1), "token-lru:sets=8")


def test_token_misses_fetch_whole_fill_units(fixed_selection):
    # a 656-B token touches 11 aligned 64-B units wherever it starts (addresses are 16-B
    # aligned): 22 sectors from memory for its 20.5-21 sectors read
    df = replay(fixed_selection, policies=["token-lru"], cache_size="4MiB", ways=16, fill=64)
    first = df[(df["class"] == "kv") & (df["step"] == 0)]
    assert first["fetched_sectors"].sum() == 22 * K * LAYERS
    assert first["sector_misses"].sum() < first["fetched_sectors"].sum()
    df = replay(fixed_selection, policies=["token-lru"], cache_size="4MiB", ways=16, fill=32)
    first = df[(df["class"] == "kv") & (df["step"] == 0)]
    assert first["fetched_sectors"].sum() == first["sector_misses"].sum()
