"""The L2 persisting access-policy window: hand-worked cases and a differential test against a
pure-Python model."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.errors import DsacacheError
from dsacache.policies import make_policy
from dsacache.simulator import Cache, CacheConfig
from dsacache.simulator.reference import COUNTERS
from dsacache.simulator.workload import CLASSES

KV, INDEX = CLASSES.index("kv"), CLASSES.index("index")
LINE = 128


def _run(spec, lines, klass, ways=4, sets=1):
    cache = Cache(CacheConfig(ways * sets * LINE, ways), spec)
    n = len(lines)
    counters = np.zeros((n, len(COUNTERS)), np.int64)
    cache.run(np.array(lines, np.int64) * LINE, np.full(n, LINE), np.zeros(n, bool),
              np.arange(n), counters, np.array(klass, np.int8))  # fmt: skip
    return (counters[:, 1] > 0).tolist()


def test_persisting_lines_survive_a_stream_of_normal_lines():
    # 4 ways, 2 set aside (256 B with one set): KV lines 0 and 1 persist through 10 index lines
    seq = [0, 1] + list(range(10, 20)) + [0, 1]
    klass = [KV, KV] + [INDEX] * 10 + [KV, KV]
    assert _run("persist:set_aside=256", seq, klass)[-2:] == [True, True]
    assert _run("lru", seq, klass)[-2:] == [False, False]


def test_persisting_lines_replace_each_other_when_the_set_aside_is_full():
    # full set: index 5, 6 normal, KV 0, 1 persisting (the 2 set-aside ways). KV 2 evicts 0
    # (LRU persisting), not a normal line; then KV 0 evicts 1, and both index lines still hit.
    seq = [5, 6, 0, 1, 2, 5, 6, 0, 1]
    klass = [INDEX, INDEX, KV, KV, KV, INDEX, INDEX, KV, KV]
    assert _run("persist:set_aside=256", seq, klass) == [False] * 5 + [True, True, False, False]


def test_normal_lines_use_set_aside_ways_no_persisting_line_holds():
    # nothing persists (hit_ratio=0): the window policy is plain LRU over all 4 ways
    seq = [10, 11, 12, 13, 10, 11, 12, 13]
    assert _run("persist:set_aside=256,hit_ratio=0", seq, [INDEX] * 8) == [False] * 4 + [True] * 4


def test_window_lines_that_do_not_persist_stream_out_first():
    """hit_ratio=0: every KV line gets missProp. Streaming, KV 0 and 1 are the first victims
    of index lines 10-12 in a 4-way set, so index 5 and 6 survive and KV 0 misses again;
    as normal lines, plain LRU evicts index 5 and 6 instead."""
    seq = [5, 6, 0, 1, 10, 11, 5, 6, 0]
    klass = [INDEX, INDEX, KV, KV, INDEX, INDEX, INDEX, INDEX, KV]
    streaming = _run("persist:set_aside=0,hit_ratio=0", seq, klass)
    assert streaming == [False] * 6 + [True, True, False]
    assert _run("persist:set_aside=0,hit_ratio=0,miss=normal", seq, klass) == [False] * 9
    with pytest.raises(DsacacheError, match="miss='evict'"):
        make_policy("persist:miss=evict")


def test_set_aside_is_capped_by_the_device_limit():
    with pytest.raises(DsacacheError, match="set_aside=40MiB is outside"):
        make_policy("persist:set_aside=40MiB")


def _kind(line, klass, window, ratio, miss):
    """'persisting', 'streaming' or 'normal', as CUDA's window marks the line's accesses."""
    if klass != window:
        return "normal"
    h = ((line * 0x9E3779B97F4A7C15) % 2**64) >> 40
    return "persisting" if h < int(ratio * 2**24) else miss


def _python_persist(lines, klass, ways, sets, limit, window, ratio, miss="streaming"):
    """Per set: way -> [line, last use, persisting]; the rules of policies/persist.py (a
    streaming line's last use is older than any clock: the first victim of its kind)."""
    cache = [[] for _ in range(sets)]
    hits = []
    for clock, (ln, k) in enumerate(zip(lines, klass, strict=True)):
        s = cache[ln % sets]
        kind = _kind(ln, k, window, ratio, miss)
        pers = kind == "persisting"
        use = clock - 10**9 if kind == "streaming" else clock
        count = sum(w[2] for w in s)
        way = next((w for w in s if w[0] == ln), None)
        hits.append(way is not None)
        if way is not None:
            way[1] = use
            if not way[2] and count < limit and pers:
                way[2] = True
            continue
        if len(s) == ways:
            want = pers and count >= limit and limit > 0
            victim = min((w for w in s if w[2] == want), key=lambda w: w[1])
            s.remove(victim)
            count -= victim[2]
        s.append([ln, use, count < limit and pers])
    return hits


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ways=st.sampled_from([2, 4, 8]),
    sets=st.sampled_from([1, 4]),
    aside=st.integers(0, 8),
    ratio=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    miss=st.sampled_from(["streaming", "normal"]),
)
def test_equals_python_model(seed, ways, sets, aside, ratio, miss):
    rng = np.random.default_rng(seed)
    n = 400
    lines = rng.integers(0, 6 * ways * sets, n).tolist()
    klass = rng.choice([KV, INDEX], n).tolist()
    set_aside = aside * sets * LINE
    limit = min(aside, ways - 1)
    spec = f"persist:set_aside={set_aside},hit_ratio={ratio},miss={miss}"
    got = _run(spec, lines, klass, ways, sets)
    assert got == _python_persist(lines, klass, ways, sets, limit, KV, ratio, miss)
