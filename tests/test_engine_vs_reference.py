"""Differential tests: the Numba engine and the vectorized stream builder against the slow
pure-Python reference models, counter for counter."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.errors import DsacacheError
from dsacache.simulator import (
    Cache,
    CacheConfig,
    Workload,
    build_step,
    plan_replay,
    replay,
    simulate_addresses,
)
from dsacache.simulator.engine import NEVER, TAG32_LINES, next_use
from dsacache.simulator.reference import (
    COUNTERS,
    ReferenceCache,
    reference_replay,
    reference_stream,
)
from dsacache.simulator.workload import CLASSES, TIERS
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import TraceWriter, open_trace

geometries = st.tuples(
    st.sampled_from([1, 2, 4, 8, 16]),  # ways (16: the fixed-way kernel build)
    st.sampled_from([1, 2, 3, 8, 16]),  # sets per partition
    st.sampled_from([1, 2, 4]),  # partitions
    st.sampled_from([(128, 32), (64, 16), (128, 128), (256, 32)]),  # line, sector
    st.sampled_from(["mod", "xor", "hash", "mix"]),
    st.booleans(),  # write-allocate
    st.booleans(),  # replicate: partitions keep near copies of lines read from afar
    st.sampled_from([1, 2, 4]),  # fill unit in sectors (capped at the line)
)


@settings(max_examples=100, deadline=None)
@given(geom=geometries, seed=st.integers(0, 2**31), n=st.integers(1, 600))
def test_engine_equals_reference_cache(geom, seed, n):
    ways, sets, parts, (line, sector), set_hash, walloc, replicate, per_fill = geom
    replicate = replicate and parts > 1  # replication needs two partitions or more
    fill = min(per_fill * sector, line)
    size = ways * sets * parts * line
    rng = np.random.default_rng(seed)
    span = size * rng.choice([1, 2, 4])
    addr = rng.integers(0, span, n)
    nbytes = rng.integers(1, 3 * line, n)
    write = rng.random(n) < 0.2
    bucket = rng.integers(0, 3, n)
    ref = ReferenceCache(size, ways, line, sector, set_hash, parts, walloc, replicate, fill)
    for a, b, w, k in zip(addr, nbytes, write, bucket, strict=True):
        ref.access(int(a), int(b), bool(w), (int(k),))
    cfg = CacheConfig(size, ways, line, sector, set_hash, parts, walloc, replicate, fill)
    cache = Cache(cfg, "lru")
    counters = np.zeros((3, len(COUNTERS)), np.int64)
    half = n // 2  # two calls: the state (and the reader hash) must carry across them
    for sl in (slice(0, half), slice(half, n)):
        cache.run(addr[sl], nbytes[sl], write[sl], bucket[sl], counters)
    for k in range(3):
        expect = ref.counts.get((k,), dict.fromkeys(COUNTERS, 0))
        assert dict(zip(COUNTERS, counters[k].tolist(), strict=True)) == expect


def _trace(tmp_path, seed, groups=1, requests=2):
    model = {
        "name": "t",
        "attention": "GQA" if groups > 1 else "MLA",
        "kv_heads": groups,
        "head_dim": 64,
    }
    cfg = SynthConfig(
        layers=2,
        groups=groups,
        requests=requests,
        context=150,
        steps=4,
        k=24,
        seed=seed,
        model=model,
    )
    return open_trace(synthesize(cfg, tmp_path / f"t{seed}-{groups}.dsatrace"))


workloads = st.builds(
    Workload,
    layout=st.sampled_from(
        ["", "mla-fp8", "mla-bf16", "gqa:kv_heads=2,head_dim=64", "gta:kv_heads=2,head_dim=64"]
    ),
    batch=st.integers(1, 2),
    page_tokens=st.sampled_from([16, 64]),
    page_order=st.sampled_from(["contiguous", "shuffled"]),
    seed=st.integers(0, 5),
    classes=st.sampled_from(
        [
            ("index", "kv", "append"),
            ("kv",),
            ("weights", "kv", "append"),
            ("weights", "index", "kv", "append", "query"),
            ("kv", "query"),
            ("index", "kv", "query", "partials"),
        ]
    ),
    weight_bytes=st.sampled_from([0, 5000]),
    reads_per_token=st.integers(1, 3),
    block_tokens=st.sampled_from([8, 64]),
    kv_loads_apart=st.booleans(),
    # FlashMLA's loads, and overlapping, unaligned ones (both fit a 656-B record)
    kv_loads=st.sampled_from(
        [
            (),
            ((512, 16), *((64 * d, 64) for d in range(8)), (528, 64), (592, 64)),
            ((0, 100), (50, 100), (8, 16), (300, 20), (40, 200)),
        ]
    ),  # fmt: skip
    query_reads=st.sampled_from([1.0, 1.8, 3.0]),
    partial_bytes=st.sampled_from([0, 3000]),
    peer_share=st.sampled_from([0.0, 0.3]),
    remote_share=st.sampled_from([0.0, 0.2]),
)


def test_a_step_with_no_class_to_stream_is_empty(tmp_path):
    trace = _trace(tmp_path, 0)
    amap = plan_replay(trace, Workload(classes=("weights",)))  # weights of 0 bytes: nothing
    chunk = build_step(amap, next(trace.iter_steps()))
    assert len(chunk) == 0 and chunk.addr.dtype == np.int64


def test_kv_gathers_carry_their_tokens_scores(tmp_path):
    """Each KV access carries the indexer score of the token it reads, in the kernel's order
    (row, block, CTA, plane, load, token), with ragged rows of several blocks."""
    model = {"name": "t", "attention": "MLA", "kv_heads": 1, "head_dim": 64}
    rng = np.random.default_rng(0)
    with TraceWriter(tmp_path / "s.dsatrace", model=model, indexer={"kind": "t", "k": 40}) as w:
        for layer in range(2):
            for request in range(2):
                idx = np.sort(rng.choice(300, 13 + 17 * request + layer, replace=False))
                w.append(request=request, step=0, position=300, layer=layer, group=0,
                         indices=idx, scores=idx / 1024)  # fmt: skip
    trace = open_trace(tmp_path / "s.dsatrace")
    wl = Workload(layout="mla-fp8", batch=2, reads_per_token=2, kv_loads_apart=True,
                  block_tokens=8, classes=("index", "kv", "append", "query"), heads=8)  # fmt: skip
    amap = plan_replay(trace, wl)
    rows = next(trace.iter_steps())
    chunk = build_step(amap, rows)
    loads = sum(len(amap.layout.plane_loads(p, 1, True)) for p in amap.layout.planes)
    expect = []
    for i in range(len(rows)):  # rows come in (layer, request) order
        tokens = rows.row(i).tolist()
        for start in range(0, len(tokens), 8):
            expect += [t / 1024 for t in tokens[start : start + 8]] * (2 * loads)
    kv = chunk.cls == CLASSES.index("kv")
    assert chunk.score[kv].tolist() == expect
    assert np.isnan(chunk.score[~kv]).all()


@settings(max_examples=40, deadline=None)
@given(
    wl=workloads,
    seed=st.integers(0, 3),
    groups=st.sampled_from([1, 2]),
    heads=st.sampled_from([3, 8]),
)
def test_stream_builder_equals_reference(tmp_path_factory, wl, seed, groups, heads):
    if groups > 1 and wl.layout.startswith("mla"):
        wl = Workload(**{**wl.__dict__, "layout": "gqa:kv_heads=2,head_dim=64"})
    if wl.kv_loads and (groups > 1 or not wl.layout.startswith("mla")):  # one plane, whole
        wl = Workload(**{**wl.__dict__, "layout": "mla-fp8"})
        groups = 1
    if "query" in wl.classes:
        wl = Workload(**{**wl.__dict__, "heads": heads})
    if "partials" not in wl.classes:
        wl = Workload(**{**wl.__dict__, "partial_bytes": 0})
    if "weights" not in wl.classes:
        wl = Workload(**{**wl.__dict__, "weight_bytes": 0})
    trace = _trace(tmp_path_factory.mktemp("s"), seed, groups)
    amap = plan_replay(trace, wl)
    for rows in trace.iter_steps():
        rows = rows.take(rows.request < wl.batch)
        chunk = build_step(amap, rows)
        query = chunk.cls == CLASSES.index("query")
        partials = chunk.cls == CLASSES.index("partials")
        assert query.any() == ("query" in wl.classes)
        assert partials.any() == ("partials" in wl.classes and wl.partial_bytes > 0)
        # the queries lie past the pools and the weights, the partials past the queries, and
        # nothing else does
        assert (chunk.addr[query] >= amap.weights_base + amap.layers * wl.weight_bytes).all()
        assert (chunk.addr[query] + chunk.nbytes[query] <= amap.partials_base).all()
        assert (chunk.addr[partials] >= amap.partials_base).all()
        pools = ~(query | partials)
        assert (chunk.addr[pools] + chunk.nbytes[pools] <= amap.query_base).all()
        expect = list(reference_stream(amap, rows))
        got = list(
            zip(
                chunk.addr.tolist(),
                chunk.nbytes.tolist(),
                [CLASSES[c] for c in chunk.cls],
                chunk.step.tolist(),
                chunk.layer.tolist(),
                chunk.tier.tolist(),
                strict=True,
            )
        )
        assert got == expect


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 3),
    ways=st.sampled_from([2, 4]),
    kib=st.sampled_from([8, 32, 64]),
    batch=st.integers(1, 2),
    peer=st.sampled_from([0.0, 0.5]),
)
def test_replay_equals_reference_replay(tmp_path_factory, seed, ways, kib, batch, peer):
    trace = _trace(tmp_path_factory.mktemp("r"), seed)
    wl = Workload(layout="mla-fp8", batch=batch, peer_share=peer, page_order="shuffled")
    df = replay(trace, policies=["lru"], cache_size=kib * 1024, ways=ways, workload=wl)
    ref = ReferenceCache(kib * 1024, ways, 128, 32, "mod", 2, fill=64)  # the h100 preset's
    counts = reference_replay(ref, plan_replay(trace, wl), trace.iter_steps())
    got = {
        (row.step, row.layer, row.cls, row.tier): {c: getattr(row, c) for c in COUNTERS}
        for row in df.rename(columns={"class": "cls"}).itertuples(index=False)
    }
    expect = {
        (s, layer, c, TIERS[t]): v for (s, layer, c, t), v in counts.items() if any(v.values())
    }
    assert got == expect


def test_simulate_addresses_counts_sectors():
    # 4 sectors of one line, then the same line again: 1 line miss then 1 line hit
    out = simulate_addresses(np.array([0, 32, 64, 96, 0]), size="4KiB", ways=4)
    assert out["accesses"] == 5 and out["sector_misses"] == 4 and out["sector_hits"] == 1
    assert out["line_hits"] == 1 and out["line_misses"] == 4
    out = simulate_addresses(np.array([0, 0]), size="4KiB", ways=4, nbytes=128)
    assert (out["sectors"], out["sector_misses"], out["line_hits"]) == (8, 4, 1)


def test_a_miss_fetches_its_whole_fill_unit():
    # 32 B at byte 32 of a line: with 64-B fill units sectors 0 and 1 come from memory, and
    # a later read of sector 0 hits; with sector fill it misses
    addr = np.array([32, 0, 96, 64])
    out = simulate_addresses(addr, size="4KiB", ways=4, fill=64)
    assert (out["sector_misses"], out["fetched_sectors"], out["sector_hits"]) == (2, 4, 2)
    out = simulate_addresses(addr, size="4KiB", ways=4)
    assert (out["sector_misses"], out["fetched_sectors"], out["sector_hits"]) == (4, 4, 0)
    # a 656-B row starting 16 B into a 64-B unit reads 11 units = 22 sectors from memory
    out = simulate_addresses(np.array([656]), size="4KiB", ways=4, nbytes=656, fill=64)
    assert (out["sectors"], out["fetched_sectors"]) == (21, 22)
    out = simulate_addresses(np.array([0]), size="4KiB", ways=4, nbytes=128, fill=128)
    assert out["fetched_sectors"] == 4


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(size=1000, ways=4), "not a multiple of ways x line"),
        (dict(size=4096, ways=4, sector=48), "sector 48 B must be a power of two"),
        (dict(size=4096, ways=4, sector=256), "divides the line"),
        (dict(size=4096, ways=0), "ways must be >= 1"),
        (dict(size=4096, ways=4, fill=48), "fill unit 48 B must be a power of two"),
        (dict(size=4096, ways=4, fill=256), "to the line (128 B), or 0 for one sector"),
        (dict(size=4096, ways=4, fill=16), "from the sector (32 B)"),
        (dict(size="4XB", ways=4), "invalid size '4XB'"),
        (dict(size=4096, ways=4.0), "cache ways must be an integer, got 4.0"),
        (dict(size=4096, ways=4, line=128.0), "cache line must be an integer, got 128.0"),
    ],
)
def test_bad_cache_shapes(kwargs, needle):
    with pytest.raises(DsacacheError) as e:
        simulate_addresses(np.arange(10), **kwargs)
    assert needle in str(e.value)


def test_bad_addresses():
    with pytest.raises(DsacacheError, match="1-D integer"):
        simulate_addresses(np.zeros((2, 2), int), size="4KiB", ways=4)
    with pytest.raises(DsacacheError, match=r"\[0, 2\*\*62\), got -1"):
        simulate_addresses(np.array([128, -1]), size="4KiB", ways=4)
    with pytest.raises(DsacacheError, match=r"got 4611686018427387904"):
        simulate_addresses(np.array([0, 2**62]), size="4KiB", ways=4)
    for nbytes, needle in [
        (np.full(2, 1.7), "got float64 (2,)"),  # was truncated to 1 B
        (np.array([32, 32, 32]), "shaped like the addresses (2,), got int64 (3,)"),
        (np.array([32, 0]), ">= 1, got 0"),
    ]:
        with pytest.raises(DsacacheError, match=re.escape(needle)):
            simulate_addresses(np.array([0, 128]), size="4KiB", ways=4, nbytes=nbytes)


@pytest.mark.parametrize("sets", [1, 3, 5])
def test_huge_line_numbers_map_like_the_reference(sets):
    # line numbers beyond 2**52 lose precision in float64: the engine must fall back to `%`
    rng = np.random.default_rng(sets)
    lines = 2**53 + rng.integers(0, 2**40, 300)
    addr = np.concatenate([lines, lines[::-1]]) * 128
    ref = ReferenceCache(sets * 2 * 128, 2)
    for a in addr.tolist():
        ref.access(a, 128)
    out = simulate_addresses(addr, size=sets * 2 * 128, ways=2, nbytes=128)
    assert out["line_hits"] == ref.counts[()]["line_hits"]
    assert out["sector_misses"] == ref.counts[()]["sector_misses"]


@pytest.mark.parametrize("first_line", [0, 2**31 - 60, TAG32_LINES - 60])
@pytest.mark.parametrize("ways", [2, 16])
def test_tag_width_is_invisible(first_line, ways):
    """Line numbers are kept in 32-bit tags while they fit (above 2**31 their low bits wrap
    negative) and in 64-bit tags once a call reaches ``TAG32_LINES``: the switch happens
    between two calls and keeps the cached lines, and every counter equals the reference."""
    rng = np.random.default_rng(ways)
    below = first_line + rng.integers(0, 40, 400)  # all below TAG32_LINES
    later = first_line + rng.integers(0, 120, 400)  # the last case crosses it
    addr = np.concatenate([below, later]) * 128 + rng.integers(0, 128, 800)
    nbytes = rng.integers(1, 200, 800)
    ref = ReferenceCache(4 * ways * 128, ways)
    for a, b in zip(addr.tolist(), nbytes.tolist(), strict=True):
        ref.access(a, b)
    cache = Cache(CacheConfig(4 * ways * 128, ways), "lru")
    counters = np.zeros((1, len(COUNTERS)), np.int64)
    for sl in (slice(0, 400), slice(400, 800)):
        if sl.start:
            assert cache.tags.dtype == np.int32  # the first call stayed below TAG32_LINES
        cache.run(addr[sl], nbytes[sl], np.zeros(400, bool), np.zeros(400, np.int64), counters)
    assert dict(zip(COUNTERS, counters[0].tolist(), strict=True)) == ref.counts[()]
    assert cache.tags.dtype == (np.int64 if first_line == TAG32_LINES - 60 else np.int32)


def test_counters_the_compiled_loop_would_overrun_are_refused():
    cache = Cache(CacheConfig.of("4KiB", ways=4), "lru")
    addr, n = np.arange(4) * 128, np.full(4, 32)
    write, bucket = np.zeros(4, bool), np.zeros(4, np.int64)
    with pytest.raises(DsacacheError, match=r"shape \(buckets, 8\).*got int64 \(1, 7\)"):
        cache.run(addr, n, write, bucket, np.zeros((1, 7), np.int64))
    with pytest.raises(DsacacheError, match="got float64"):
        cache.run(addr, n, write, bucket, np.zeros((1, len(COUNTERS))))
    with pytest.raises(DsacacheError, match=r"bucket numbers must be in \[0, 2\) .*got 0\.\.2"):
        cache.run(addr, n, write, np.array([0, 1, 2, 0]), np.zeros((2, len(COUNTERS)), np.int64))


def _check_next_use(keys):
    """The hash-table next_use against the definition, by a stable sort of the keys."""
    keys = np.array(keys, np.int64)
    order = np.argsort(keys, kind="stable")
    expect = np.full(len(keys), NEVER, np.int64)
    same = keys[order[1:]] == keys[order[:-1]]
    expect[order[:-1][same]] = order[1:][same]
    assert next_use(keys).tolist() == expect.tolist()


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(-(2**62), 2**62)) | st.lists(st.integers(0, 30)))
def test_next_use_is_the_next_position_of_the_same_key(keys):
    _check_next_use(keys)  # negative and huge keys hash like any other


def test_next_use_across_table_growth():
    rng = np.random.default_rng(1)
    for distinct in (600, 5000, 70000):  # the table starts at 1024 slots, kept half full
        _check_next_use(rng.integers(0, distinct, 4 * distinct) * 128)


def test_next_use_refuses_what_is_not_integer_keys():
    with pytest.raises(DsacacheError, match="next_use needs a 1-D integer array, got float64"):
        next_use(np.array([1.0, 2.0]))


def test_flashmla_loads_ask_the_l2_for_each_sector_of_a_token_once(tmp_path):
    """FlashMLA's loads (scales first, eight 64-B latent loads, two RoPE loads): on 656-B
    records, half of which start mid-sector, the loads that reach the L2 cover every sector
    of each selected record exactly once, sector-aligned; the attention query is read
    ``query_reads`` times per request, back to back."""
    from dsacache.kernels.decode_step import FLASHMLA_LOADS
    from dsacache.simulator.workload import query_repeats

    trace = _trace(tmp_path, 0)
    wl = Workload(layout="mla-fp8", batch=2, kv_loads=FLASHMLA_LOADS, query_reads=2.5,
                  classes=("kv", "query"), heads=8)  # fmt: skip
    amap = plan_replay(trace, wl)
    rows = next(trace.iter_steps())
    chunk = build_step(amap, rows)
    kv = chunk.cls == CLASSES.index("kv")
    assert (chunk.addr[kv] % 32 == 0).all() and (chunk.nbytes[kv] % 32 == 0).all()
    got = np.concatenate([np.arange(a, a + n, 32) for a, n in
                          zip(chunk.addr[kv], chunk.nbytes[kv], strict=True)]) // 32  # fmt: skip
    want = []
    for i in range(len(rows)):
        for t in rows.row(i):
            start = amap.kv_address(int(rows.layer[i]), 0, int(rows.request[i]), int(t), 0)
            want.append(np.arange(start // 32, (start + 655) // 32 + 1))
    assert sorted(got.tolist()) == sorted(np.concatenate(want).tolist())  # each once
    query = chunk.addr[chunk.cls == CLASSES.index("query")]
    per_layer = query_repeats(2.5, np.arange(2)).sum()
    assert len(query) == per_layer * amap.layers
    assert set(query_repeats(2.5, np.arange(100)).tolist()) == {2, 3}
    for reads, n in ((2.5, 1000), (9.3, 1), (1.8, 1), (1.8, 8), (6.8, 64)):
        assert query_repeats(reads, np.arange(n)).sum() == round(n * reads)  # nearest total


def test_kv_loads_and_query_reads_are_checked():
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(DsacacheError, match=f"query_reads must be a number >= 1, got {bad}"):
            Workload(query_reads=bad).check()
    with pytest.raises(DsacacheError, match="kv_loads must be integer"):
        Workload(kv_loads=((0.5, 64),)).check()
    with pytest.raises(DsacacheError, match=r"kv_loads must be .* got \(\(0, 0\),\)"):
        Workload(kv_loads=((0, 0),)).check()


def test_kv_loads_need_a_one_plane_layout_holding_them(tmp_path):
    trace = _trace(tmp_path, 0)
    with pytest.raises(DsacacheError, match="kv_loads .* inside its 656-byte record"):
        plan_replay(trace, Workload(layout="mla-fp8", kv_loads=((600, 64),)))
    with pytest.raises(DsacacheError, match="one-plane layout"):
        plan_replay(trace, Workload(layout="gqa:kv_heads=2,head_dim=64", kv_loads=((0, 64),)))


def test_partials_are_written_after_the_gathers_per_request_and_checked(tmp_path):
    """The split-K partials: one write of ``partial_bytes`` per request after each layer's
    KV gathers, at the same scratch addresses every layer; sized only with their class."""
    trace = _trace(tmp_path, 0)
    wl = Workload(layout="mla-fp8", batch=2, classes=("kv", "partials"), partial_bytes=4096)
    amap = plan_replay(trace, wl)
    chunk = build_step(amap, next(trace.iter_steps()))
    part = chunk.cls == CLASSES.index("partials")
    assert part.sum() == 2 * amap.layers and (chunk.nbytes[part] == 4096).all()
    assert set(chunk.addr[part].tolist()) == {amap.partials_base, amap.partials_base + 4096}
    last_kv = np.flatnonzero(chunk.cls == CLASSES.index("kv"))
    for layer in range(amap.layers):  # after every gather of its layer
        mine = chunk.layer == layer
        assert np.flatnonzero(part & mine).min() > last_kv[chunk.layer[last_kv] == layer].max()
    with pytest.raises(DsacacheError, match="partial_bytes=4096 .* add partials to the classes"):
        Workload(partial_bytes=4096).check()
