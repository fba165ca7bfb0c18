"""Differential test against pycachesim (an independent C implementation) for plain
set-associative LRU. pycachesim counts load calls, so every access here is exactly one line."""

import cachesim
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.simulator import simulate_addresses

LINE = 128


def _pycachesim_misses(lines, sets, ways, policy="LRU"):
    mem = cachesim.MainMemory()
    cache = cachesim.Cache("L2", sets, ways, LINE, policy)
    mem.load_to(cache)
    mem.store_from(cache)
    cachesim.CacheSimulator(cache, mem).load((np.asarray(lines) * LINE).tolist(), length=1)
    stats = cache.stats()
    return stats["MISS_count"], stats["HIT_count"] + stats["MISS_count"]


@settings(max_examples=60, deadline=None)
@given(
    sets=st.sampled_from([1, 2, 4, 64, 1024]),
    ways=st.sampled_from([1, 2, 4, 8, 16]),
    universe_factor=st.sampled_from([1, 2, 8]),
    seed=st.integers(0, 2**31),
    policy=st.sampled_from(["lru", "fifo"]),
)
def test_set_associative_matches_pycachesim(sets, ways, universe_factor, seed, policy):
    rng = np.random.default_rng(seed)
    universe = sets * ways * universe_factor
    lines = rng.zipf(1.3, 3000) % universe
    ours = simulate_addresses(
        lines * LINE, size=sets * ways * LINE, ways=ways, nbytes=LINE, policy=policy
    )
    misses, loads = _pycachesim_misses(lines, sets, ways, policy.upper())
    assert loads == ours["accesses"] == len(lines)
    assert ours["line_misses"] == misses
