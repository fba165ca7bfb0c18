"""evict_first / evict_last hints: hand-worked cases and a differential test."""

from collections import OrderedDict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.policies.hints import CLASS_ORDER, LEVELS
from dsacache.simulator import Cache, CacheConfig
from dsacache.simulator.reference import COUNTERS
from dsacache.simulator.workload import CLASSES


def test_class_order_matches_the_simulator():
    assert CLASS_ORDER == CLASSES


def _run(spec, lines, klass, ways=4, sets=1):
    cache = Cache(CacheConfig(ways * sets * 128, ways), spec)
    n = len(lines)
    counters = np.zeros((n, len(COUNTERS)), np.int64)
    cache.run(
        np.array(lines) * 128,
        np.full(n, 128),
        np.zeros(n, bool),
        np.arange(n),
        counters,
        np.array(klass, np.int8),
    )
    return counters[:, 1] > 0


def test_evict_first_lines_go_first():
    # 4 ways; lines 0-2 are kv (normal), 3 is an index line marked evict_first; 4 evicts 3, not 0
    kv, index = CLASSES.index("kv"), CLASSES.index("index")
    hits = _run("hints:index=first", [0, 1, 2, 3, 4, 0, 3], [kv, kv, kv, index, kv, kv, index])
    assert hits.tolist() == [False] * 5 + [True, False]


def test_evict_last_lines_survive_a_scan_only_inside_the_set_aside():
    kv, index = CLASSES.index("kv"), CLASSES.index("index")
    seq = [0, 1] + list(range(10, 20)) + [0, 1]
    klass = [kv, kv] + [index] * 10 + [kv, kv]
    assert _run("hints:kv=last,persist_ways=2", seq, klass)[-2:].tolist() == [True, True]
    # one way set aside: only the most recent evict_last line (1) keeps its priority
    assert _run("hints:kv=last,persist_ways=1", seq, klass)[-2:].tolist() == [False, True]
    # no ways for evict_last: it acts as normal
    assert _run("hints:kv=last", seq, klass)[-2:].tolist() == [False, False]
    assert _run("lru", seq, klass)[-2:].tolist() == [False, False]


def test_an_unhinted_hit_keeps_the_priority_a_hinted_one_sets_it():
    # lines 0, 1 filled evict_last (kv), re-read unhinted (index), then a scan of unhinted
    # lines: they still hold their priority, as the H100 keeps evict_last data that was re-read
    # without a hint (dsacache/data/h100/l2-hint-evict_last.parquet)
    kv, index, append = (CLASSES.index(c) for c in ("kv", "index", "append"))
    seq = [0, 1, 0, 1] + list(range(10, 20)) + [0, 1]
    klass = [kv, kv, index, index] + [index] * 10 + [kv, kv]
    assert _run("hints:kv=last,persist_ways=2", seq, klass)[-2:].tolist() == [True, True]
    # a hinted re-read (append marked evict_first) sets the new priority: both go first
    klass = [kv, kv, append, append] + [index] * 10 + [kv, kv]
    spec = "hints:kv=last,append=first,persist_ways=2"
    assert _run(spec, seq, klass)[-2:].tolist() == [False, False]


def _python_hints(levels, lines, klass, ways, sets, persist_ways):
    cache = [OrderedDict() for _ in range(sets)]  # line -> priority, oldest first
    hits = []
    for ln, k in zip(lines, klass, strict=True):
        s = cache[ln % sets]
        hit = ln in s
        hits.append(hit)
        if hit:
            s.move_to_end(ln)
            if levels[k] != 1:  # an unhinted hit keeps the line's priority
                s[ln] = levels[k]
            continue
        if len(s) == ways:
            # evict_last (2) counts only for the persist_ways most recent such lines
            last = [x for x, p in s.items() if p == 2]
            kept = set(last[max(0, len(last) - persist_ways) :])
            level = {x: (1 if p == 2 and x not in kept else p) for x, p in s.items()}
            low = min(level.values())
            victim = next(x for x in s if level[x] == low)
            del s[victim]
        s[ln] = levels[k]
    return np.array(hits)


@settings(max_examples=80, deadline=None)
@given(
    levels=st.lists(st.sampled_from(LEVELS), min_size=len(CLASS_ORDER), max_size=len(CLASS_ORDER)),
    seed=st.integers(0, 2**31),
    ways=st.sampled_from([1, 2, 4, 8, 16, 32]),  # up to 16: packed recency; 32: linked list
    sets=st.sampled_from([1, 3, 4]),
    persist_ways=st.sampled_from([0, 1, 2, 8]),
)
def test_hints_equal_python_model(levels, seed, ways, sets, persist_ways):
    rng = np.random.default_rng(seed)
    lines = rng.integers(0, ways * sets * 3, 400).tolist()
    klass = rng.integers(0, len(CLASS_ORDER), 400).tolist()
    spec = "hints:" + ",".join(f"{c}={lv}" for c, lv in zip(CLASS_ORDER, levels, strict=True))
    spec += f",persist_ways={persist_ways}"
    expect = _python_hints(
        [LEVELS.index(lv) for lv in levels], lines, klass, ways, sets, persist_ways
    )
    np.testing.assert_array_equal(_run(spec, lines, klass, ways, sets), expect)
