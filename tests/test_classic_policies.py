"""Classic line policies (plru, srrip, brrip, drrip, lfu, sieve, s3fifo): hand-worked sequences,
differential tests against the pure-Python models in tests/policy_reference.py, and exact
cross-checks against libCacheSim's fully-associative LFU and S3FIFO (SIEVE's is in
tests/test_peer_libraries.py). libCacheSim has no tree-PLRU or RRIP family in its Python
package, so those rest on the hand-worked cases and the independent model.
"""

from __future__ import annotations

import libcachesim
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_reference import ReferencePolicyCache

from dsacache.errors import DsacacheError
from dsacache.policies import make_policy
from dsacache.simulator import Cache, CacheConfig, simulate_addresses
from dsacache.simulator.reference import COUNTERS

LINE = 128


def hits(policy: str, seq: str | list[int], ways: int, sets: int = 1) -> str:
    """Replay whole-line reads of the letters in ``seq`` (letter ``A`` is line 0, ...) or of
    the line numbers in a list (line ``i`` maps to set ``i % sets``); ``H``/``m`` per access."""
    lines = np.array([ord(c) - ord("A") for c in seq] if isinstance(seq, str) else seq, np.int64)
    n = len(lines)
    counters = np.zeros((n, len(COUNTERS)), np.int64)
    cache = Cache(CacheConfig(sets * ways * LINE, ways, LINE, LINE), policy)
    cache.run(lines * LINE, np.full(n, LINE), np.zeros(n, bool), np.arange(n), counters)
    return "".join("H" if h else "m" for h in counters[:, 1])


# ------------------------------------------------------------------------ hand-worked cases


def test_plru_tree_keeps_what_true_lru_drops():
    # 4 ways. After A B C D A the tree points right at the root and left in the right
    # subtree: E replaces C (LRU would replace B). B then hits, refreshing the left half, so
    # C replaces D, and D misses.
    assert hits("plru", "ABCDAEBCD", 4) == "mmmmHmHmm"
    assert hits("lru", "ABCDAEBCD", 4) == "mmmmHmmmm"


def test_srrip_ages_lines_and_evicts_the_first_distant_way():
    # RRPVs (bits=2): fills at 2, hits to 0. E finds no 3, ages all (A=1, B C D=3), takes way
    # 1 (B); F takes way 2 (C, still 3); A, D hit; B ages again and takes E's way; E takes F's.
    assert hits("srrip", "ABCDAEFADBEA", 4) == "mmmmHmmHHmmH"


def test_brrip_with_epsilon_zero_recycles_one_way():
    # Every fill is distant (3): after A hits, way 1 takes every new line while A, C and D
    # (re-referenced) stay.
    assert hits("brrip:epsilon=0", "ABCDAEFCDAE", 4) == "mmmmHmmHHHm"


def test_brrip_with_epsilon_one_is_srrip():
    rng = np.random.default_rng(3)
    addrs = rng.integers(0, 40, 3000) * LINE
    args = {"size": 4 * 8 * LINE, "ways": 8, "nbytes": LINE}
    assert simulate_addresses(addrs, policy="brrip:epsilon=1", **args) == simulate_addresses(
        addrs, policy="srrip", **args
    )


def test_lfu_evicts_the_least_used_then_the_least_recent():
    # 3 ways. D evicts B (count 1, older than C); B evicts C (count 1, older than D); C evicts
    # B (count 1; A has 3, D has 2).
    assert hits("lfu", "AABCDBADCDA", 3) == "mHmmmmHHmHH"


def test_sieve_hand_skips_visited_lines_and_remembers_its_place():
    # 4 ways, queue A B C D. A and B are visited; E's hand clears them and evicts C, staying at
    # D; F evicts D, C evicts E, E evicts F. D then evicts C, and A and B (never moved) still
    # hit, where LRU drops A and then B.
    assert hits("sieve", "ABCDABEFABCEDAB", 4) == "mmmmHHmmHHmmmHH"
    assert hits("lru", "ABCDABEFABCEDAB", 4) == "mmmmHHmmHHmmmmm"


def test_s3fifo_small_main_and_ghost():
    # 5 ways: S = 2 ways, M = 3, G = 2 entries. A B fill S, C D E fill M. F: S's A (unused)
    # goes to G. A: ghost hit, B goes to G, A enters M. G: M over its share, C (unused) leaves.
    # D E A F hit. B: ghost hit; S's F (used) moves to M, G is evicted; B enters M. C: M's D E A
    # get a second chance, F (not used since its move) is evicted, so F misses where LRU hits.
    seq = "ABCDEFAGDEAFBCF"
    assert hits("s3fifo:small_ratio=0.4,ghost_ratio=0.4", seq, 5) == "mmmmmmmmHHHHmmm"
    assert hits("lru", seq, 5) == "mmmmmmmmHHHHmmH"


@pytest.mark.parametrize("policy", ["plru", "srrip", "lfu", "sieve"])
def test_sets_are_independent(policy):
    # Two sets: set 0 replays one hand-worked sequence (even lines), set 1 another (odd
    # lines), interleaved access by access; each set's hits are those of its sequence alone.
    first, second = "ABCDAEBCDABEF", "AABCDBADCDAEB"
    lines = []
    for a, b in zip(first, second, strict=True):
        lines += [2 * (ord(a) - 65), 2 * (ord(b) - 65) + 1]
    both = hits(policy, lines, 4, sets=2)
    assert both[::2] == hits(policy, first, 4)
    assert both[1::2] == hits(policy, second, 4)


# --------------------------------------------------------------------------- differential

SPECS = [
    "plru",
    "srrip",
    "srrip:bits=1",
    "srrip:bits=3",
    "brrip",
    "brrip:epsilon=0.5,seed=7",
    "drrip",
    "drrip:leaders=2,psel_bits=3",
    "drrip:leaders=8",
    "drrip:leaders=1,psel_bits=2,epsilon=0.25,seed=3",
    "lfu",
    "sieve",
    "s3fifo",
    "s3fifo:small_ratio=0.3,ghost_ratio=0.5,threshold=2",
    "s3fifo:small_ratio=0.5,ghost_ratio=1,threshold=3",
    "s3fifo:ghost_ratio=0",
]


def _stream(rng: np.random.Generator, n: int, capacity_lines: int, line: int) -> np.ndarray:
    """Byte addresses with reuse: a mix of a Zipf-like hot set, loops and scans."""
    universe = max(2, int(capacity_lines * rng.uniform(1.2, 4)))
    kind = rng.integers(0, 3)
    if kind == 0:
        lines = (rng.pareto(rng.uniform(0.3, 1.5), n) * universe / 8).astype(np.int64) % universe
    elif kind == 1:
        lines = np.arange(n) % universe
    else:
        hot = rng.integers(0, max(1, capacity_lines // 2), n)
        lines = np.where(rng.random(n) < 0.5, hot, universe + np.arange(n))
    return lines * line + rng.integers(0, line, n)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    spec=st.sampled_from(SPECS),
    sets=st.sampled_from([1, 2, 3, 4, 8, 16]),
    ways=st.sampled_from([1, 2, 3, 4, 5, 8, 16]),
    geometry=st.sampled_from([(128, 32), (128, 128), (64, 16)]),
    set_hash=st.sampled_from(["mod", "hash"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_engine_equals_reference(spec, sets, ways, geometry, set_hash, seed):
    if spec == "plru" and ways & (ways - 1):
        ways = 4
    line, sector = geometry
    size = sets * ways * line
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 1500))
    addrs = _stream(rng, n, sets * ways, line)
    nbytes = rng.integers(1, 2 * line, n)
    ref = ReferencePolicyCache(size, ways, spec, line, sector, set_hash)
    for a, b in zip(addrs.tolist(), nbytes.tolist(), strict=True):
        ref.access(a, b)
    ours = simulate_addresses(
        addrs, size=size, ways=ways, line=line, sector=sector, policy=spec, nbytes=nbytes,
        set_hash=set_hash,
    )  # fmt: skip
    ours.pop("line_misses")
    expect = {k: v for k, v in ref.counts.items() if k != "write_sectors"}
    assert ours == expect


@pytest.mark.parametrize("ways", [4, 8, 16, 24])
def test_s3fifo_ghost_tells_apart_lines_with_equal_low_halves(ways):
    """S3-FIFO keeps line numbers as two int32 halves and matches its ghost on the low half
    first (16 at a time for ways >= 8): lines 2**31 apart must not be taken for each other."""
    sets = 4
    rng = np.random.default_rng(ways)
    lines = rng.integers(0, 3 * sets * ways, 6000) + rng.integers(0, 2, 6000) * 2**31 * sets
    addrs = lines * LINE
    ref = ReferencePolicyCache(sets * ways * LINE, ways, "s3fifo", LINE, LINE)
    for a in addrs.tolist():
        ref.access(a, 1)
    n = len(addrs)
    counters = np.zeros((n, len(COUNTERS)), np.int64)
    cache = Cache(CacheConfig(sets * ways * LINE, ways, LINE, LINE), "s3fifo")
    cache.run(addrs, np.ones(n, np.int64), np.zeros(n, bool), np.arange(n), counters)
    np.testing.assert_array_equal(counters[:, 1].astype(bool), np.array(ref.hits))


@pytest.mark.parametrize("spec", SPECS)
def test_engine_equals_reference_per_access(spec):
    """Every access's hit/miss, on a stream big enough for DRRIP's PSEL to move both ways."""
    sets, ways = 64, 8
    rng = np.random.default_rng(11)
    phases = [_stream(rng, 4000, sets * ways, LINE) for _ in range(4)]
    addrs = np.concatenate(phases)
    n = len(addrs)
    ref = ReferencePolicyCache(sets * ways * LINE, ways, spec, LINE, LINE)
    for a in addrs.tolist():
        ref.access(a, 1)
    counters = np.zeros((n, len(COUNTERS)), np.int64)
    cache = Cache(CacheConfig(sets * ways * LINE, ways, LINE, LINE), spec)
    cache.run(addrs, np.ones(n, np.int64), np.zeros(n, bool), np.arange(n), counters)
    np.testing.assert_array_equal(counters[:, 1].astype(bool), np.array(ref.hits))


# ---------------------------------------------------------------- libCacheSim, one set


def _libcachesim_misses(ids: np.ndarray, peer) -> int:
    misses = 0
    for t, obj in enumerate(ids.tolist()):
        misses += not peer.get(libcachesim.Request(obj_size=1, obj_id=int(obj), clock_time=t))
    return misses


def _ours_misses(ids: np.ndarray, capacity: int, spec: str) -> int:
    out = simulate_addresses(
        ids * LINE, size=capacity * LINE, ways=capacity, nbytes=LINE, policy=spec
    )
    return out["line_misses"]


def _ids(seed: int, n: int, capacity: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    universe = capacity * int(rng.integers(2, 6))
    kind = seed % 3
    if kind == 0:
        return rng.zipf(rng.uniform(1.1, 1.6), n) % universe
    if kind == 1:
        return np.arange(n) % (capacity + 1 + seed % 5)
    return np.where(rng.random(n) < 0.5, rng.integers(0, capacity, n), universe + np.arange(n))


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 16, 64])
def test_lfu_equals_libcachesim_lfu(capacity):
    for seed in range(3):
        ids = _ids(seed, 2000, capacity)
        peer = libcachesim.LFU(cache_size=capacity)
        assert _ours_misses(ids, capacity, "lfu") == _libcachesim_misses(ids, peer)


@pytest.mark.parametrize("capacity", [20, 29, 64, 100])
@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_s3fifo_equals_libcachesim_s3fifo(capacity, threshold):
    # libCacheSim admits nothing into a one-object S (an object must be smaller than S), so the
    # comparison needs floor(0.1 * capacity) >= 2; a cache set always places the missing line.
    for seed in range(3):
        ids = _ids(seed, 3000, capacity)
        peer = libcachesim.S3FIFO(cache_size=capacity, move_to_main_threshold=threshold)
        spec = f"s3fifo:threshold={threshold}"
        assert _ours_misses(ids, capacity, spec) == _libcachesim_misses(ids, peer)


# -------------------------------------------------------------------------------- behaviour


def test_drrip_duels_to_the_better_policy():
    """On a cyclic scan over twice the cache, SRRIP thrashes and BRRIP keeps part of the loop;
    DRRIP's followers switch to BRRIP. On a small hot set they stay with SRRIP (equal hits)."""
    sets, ways = 256, 16
    loop = (np.arange(200_000) % (2 * sets * ways)) * LINE
    args = {"size": sets * ways * LINE, "ways": ways, "nbytes": LINE}
    got = {p: simulate_addresses(loop, policy=p, **args)["line_hits"] for p in ("srrip", "brrip")}
    drrip = simulate_addresses(loop, policy="drrip", **args)["line_hits"]
    assert got["srrip"] == 0 < got["brrip"]
    assert drrip > 0.8 * got["brrip"]


def test_scan_resistant_policies_beat_lru_on_hot_set_plus_scan():
    sets, ways = 16, 8
    rng = np.random.default_rng(5)
    n = 40_000
    hot = rng.integers(0, sets * ways // 2, n)
    scan = 10 * sets * ways + np.arange(n)
    addrs = np.where(rng.random(n) < 0.5, hot, scan) * LINE
    args = {"size": sets * ways * LINE, "ways": ways, "nbytes": LINE}
    lru = simulate_addresses(addrs, policy="lru", **args)["line_hits"]
    for p in ("srrip", "s3fifo", "sieve", "lfu"):
        assert simulate_addresses(addrs, policy=p, **args)["line_hits"] > 1.1 * lru, p


# ---------------------------------------------------------------------------- bad input


def test_plru_needs_power_of_two_ways():
    with pytest.raises(DsacacheError, match="power-of-two number of ways.*got 12"):
        simulate_addresses(np.arange(10), size=12 * 4 * LINE, ways=12, policy="plru")
    assert simulate_addresses(np.arange(10), size=16 * 4 * LINE, ways=16, policy="plru")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("srrip:bits=9", r"bits=9 is outside"),
        ("brrip:epsilon=2", r"epsilon=2 is outside"),
        ("drrip:leaders=0", r"leaders=0 is outside"),
        ("s3fifo:small_ratio=x", r"small_ratio='x' is not a number"),
        ("s3fifo:threshold=4", r"threshold=4 is outside"),
        ("sieve:k=1", r"unknown parameter"),
    ],
)
def test_bad_parameters_are_one_line_errors(spec, message):
    with pytest.raises(DsacacheError, match=message):
        make_policy(spec)
