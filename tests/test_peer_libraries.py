"""Differential tests against independent cache simulators, with exact miss counts.

- pycachesim 0.3.1 (C): set-associative LRU and FIFO over 128 B lines, one set index
  ``line % sets`` as ``set_hash="mod"``. It counts one hit or miss per cache line a load
  touches, so line-aligned 128 B loads compare one to one with our line accesses, and
  unaligned multi-line loads compare too when our sector is the whole line.
- libCacheSim 0.3.5 (C): fully-associative caches over objects; each object is one 128 B line
  (address ``obj_id * 128``), our cache has one set of ``N`` ways, theirs ``N`` unit-size
  objects. ``PEER_POLICIES`` maps our policy names to theirs: a policy that dsacache does not
  register yet is skipped, so supporting one is a single line there.

Every stream comes from a seeded numpy generator and hypothesis runs derandomized, so the
tests are deterministic.
"""

from __future__ import annotations

import cachesim
import libcachesim
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.policies import registered
from dsacache.simulator import CacheConfig, simulate_addresses
from dsacache.simulator.caches import make_model
from dsacache.simulator.engine import next_use
from dsacache.simulator.reference import COUNTERS
from dsacache.simulator.workload import CLASS_ID

LINE = 128
NEVER = np.iinfo(np.int64).max  # libCacheSim's "no next access" (it aborts on -1)

# dsacache line policy -> libCacheSim cache class (fully associative, unit-size objects).
PEER_POLICIES = {
    "lru": "LRU",
    "fifo": "FIFO",
    "belady": "Belady",
    "sieve": "Sieve",
}
# dsacache token-granularity policy (its own fully-associative engine) -> libCacheSim class.
PEER_TOKEN_POLICIES = {"token-lru": "LRU", "token-belady": "Belady"}

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None)
STREAMS = ("zipf", "working-set", "loop", "scan-and-hot")


def make_stream(kind: str, n: int, capacity: int, seed: int) -> np.ndarray:
    """``n`` line numbers (>= 0) with reuse, for a cache of ``capacity`` lines."""
    rng = np.random.default_rng(seed)
    if kind == "zipf":  # bounded Zipf over 2-8x the cache, ranks scattered over the lines
        universe = capacity * int(rng.integers(2, 9))
        cdf = np.cumsum(np.arange(1, universe + 1) ** -rng.uniform(0.6, 1.2))
        ranks = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), universe - 1)
        return rng.permutation(universe)[ranks]
    if kind == "working-set":  # uniform over a window around the capacity that drifts
        width = max(2, int(capacity * rng.uniform(0.8, 1.6)))
        drift = np.arange(n) // int(rng.integers(4, 17))
        return drift + rng.integers(0, width, n)
    if kind == "loop":  # cyclic scan just over the capacity: LRU's and FIFO's worst case
        period = capacity + int(rng.integers(1, capacity // 2 + 2))
        return np.arange(n) % period
    if kind == "scan-and-hot":  # a one-touch scan interleaved with a small hot set
        hot = rng.integers(0, max(1, capacity // 2), n)
        scan = capacity * 4 + np.arange(n)
        return np.where(rng.random(n) < 0.5, hot, scan)
    raise ValueError(kind)


# ---------------------------------------------------------------------------- pycachesim


def pycachesim_counts(
    addrs: np.ndarray, sets: int, ways: int, policy: str, length: int = LINE
) -> tuple[int, int]:
    """(misses, line accesses) of pycachesim loading ``length`` bytes at every address."""
    mem = cachesim.MainMemory()
    cache = cachesim.Cache("L2", sets, ways, LINE, policy.upper())
    mem.load_to(cache)
    mem.store_from(cache)
    cachesim.CacheSimulator(cache, mem).load(np.asarray(addrs).tolist(), length=length)
    stats = cache.stats()
    assert stats["LOAD_count"] == len(addrs)  # load calls
    return stats["MISS_count"], stats["HIT_count"] + stats["MISS_count"]


@FAST
@given(
    sets=st.sampled_from([1, 2, 3, 6, 16, 96, 1024]),
    ways=st.sampled_from([1, 2, 3, 4, 8, 16]),
    kind=st.sampled_from(STREAMS),
    base=st.sampled_from([0, 12345, 1 << 36]),  # in lines
    seed=st.integers(0, 2**32 - 1),
    policy=st.sampled_from(["lru", "fifo"]),
)
def test_set_associative_matches_pycachesim(sets, ways, kind, base, seed, policy):
    lines = base + make_stream(kind, 3000, sets * ways, seed)
    addrs = lines * LINE
    ours = simulate_addresses(addrs, size=sets * ways * LINE, ways=ways, nbytes=LINE, policy=policy)
    misses, accesses = pycachesim_counts(addrs, sets, ways, policy)
    assert ours["accesses"] == accesses == len(lines)
    assert ours["line_misses"] == misses
    assert ours["line_misses"] / ours["accesses"] == misses / accesses


@FAST
@given(
    sets=st.sampled_from([1, 3, 8, 64]),
    ways=st.sampled_from([1, 2, 4, 16]),
    length=st.sampled_from([1, 31, 100, 129, 300, 1000]),
    seed=st.integers(0, 2**32 - 1),
)
def test_unaligned_multi_line_loads_match_pycachesim(sets, ways, length, seed):
    """Loads that straddle lines: both split them into the same line accesses. With one
    sector per line our line hit is pycachesim's (no partially valid lines)."""
    rng = np.random.default_rng(seed)
    addrs = rng.integers(0, sets * ways * LINE * 3, 2000)
    ours = simulate_addresses(
        addrs, size=sets * ways * LINE, ways=ways, sector=LINE, nbytes=length, policy="lru"
    )
    misses, accesses = pycachesim_counts(addrs, sets, ways, "lru", length=length)
    assert ours["accesses"] == accesses
    assert ours["line_misses"] == misses


# --------------------------------------------------------------------------- libCacheSim


def next_access(ids: list[int]) -> list[int]:
    """For each request, the index of the next request of the same object (``NEVER`` if none)."""
    out, seen = [NEVER] * len(ids), {}
    for i in range(len(ids) - 1, -1, -1):
        out[i] = seen.get(ids[i], NEVER)
        seen[ids[i]] = i
    return out


def libcachesim_misses(ids: np.ndarray, capacity: int, peer: str) -> int:
    """Misses of libCacheSim's ``peer`` cache holding ``capacity`` unit-size objects."""
    cache = getattr(libcachesim, peer)(cache_size=capacity)
    ids = [int(i) for i in ids]
    nxt = next_access(ids)
    misses = 0
    for t, (obj, n) in enumerate(zip(ids, nxt, strict=True)):
        req = libcachesim.Request(obj_size=1, obj_id=obj, clock_time=t, next_access_vtime=n)
        misses += not cache.get(req)
    return misses


def fully_associative_misses(ids: np.ndarray, capacity: int, policy: str) -> int:
    """Our line engine as one set of ``capacity`` ways, one 128 B line per object."""
    ours = simulate_addresses(
        ids * LINE, size=capacity * LINE, ways=capacity, nbytes=LINE, policy=policy
    )
    assert ours["accesses"] == len(ids)
    return ours["line_misses"]


def token_engine_misses(ids: np.ndarray, capacity: int, policy: str) -> int:
    """Our token-granularity engine, every object one 128 B KV token."""
    model = make_model(CacheConfig(capacity * LINE, 1), policy)
    n = len(ids)
    addr, nbytes = ids * LINE, np.full(n, LINE, np.int64)
    klass = np.full(n, CLASS_ID["kv"], np.int8)
    future = next_use(model.future_keys(addr, nbytes, klass)) if model.needs_future else None
    counters = np.zeros((1, len(COUNTERS)), np.int64)
    model.run_chunk(
        addr, nbytes, np.zeros(n, bool), klass, np.zeros(n, np.int16), np.zeros(n, np.int64),
        counters, future,
    )  # fmt: skip
    assert counters[0, 0] == n
    return int(counters[0, 0] - counters[0, 1])


def _policy_params(table: dict[str, str]) -> list:
    have = registered()
    return [
        pytest.param(
            ours,
            peer,
            id=ours,
            marks=[] if ours in have else pytest.mark.skip(f"dsacache has no {ours!r} policy"),
        )
        for ours, peer in table.items()
    ]


CAPACITIES = [1, 2, 3, 7, 16, 64]


@pytest.mark.parametrize(("policy", "peer"), _policy_params(PEER_POLICIES))
@pytest.mark.parametrize("kind", STREAMS)
def test_fully_associative_matches_libcachesim(policy, peer, kind):
    for i, capacity in enumerate(CAPACITIES):
        ids = make_stream(kind, 1500, capacity, seed=1000 * i + STREAMS.index(kind))
        assert fully_associative_misses(ids, capacity, policy) == libcachesim_misses(
            ids, capacity, peer
        ), (capacity, kind)


@pytest.mark.slow  # compiling the token engine takes ~15 s on a cold process
@pytest.mark.parametrize(("policy", "peer"), _policy_params(PEER_TOKEN_POLICIES))
@pytest.mark.parametrize("kind", STREAMS)
def test_token_engine_matches_libcachesim(policy, peer, kind):
    for i, capacity in enumerate(CAPACITIES + [1000]):
        ids = make_stream(kind, 1500, capacity, seed=77 + 1000 * i + STREAMS.index(kind))
        assert token_engine_misses(ids, capacity, policy) == libcachesim_misses(
            ids, capacity, peer
        ), (capacity, kind)


@FAST
@given(
    capacity=st.integers(1, 80),
    kind=st.sampled_from(STREAMS),
    seed=st.integers(0, 2**32 - 1),
    policy=st.sampled_from([p for p in PEER_POLICIES if p in registered()]),
)
def test_fully_associative_matches_libcachesim_random_shapes(capacity, kind, seed, policy):
    ids = make_stream(kind, 800, capacity, seed)
    assert fully_associative_misses(ids, capacity, policy) == libcachesim_misses(
        ids, capacity, PEER_POLICIES[policy]
    )
