"""SIEVE (Zhang, Yang, Yue, Vigfusson and Rashmi, "SIEVE is Simpler than LRU: an Efficient
Turn-Key Eviction Algorithm for Web Caches", NSDI 2024), one queue per set.

Each set keeps its lines in insertion order (a FIFO queue; a new line enters at the head) with
one "visited" bit per line and a hand. A hit only sets the visited bit. To evict, the hand
starts where it stopped last time (at the tail, the oldest line, when it has no position) and
moves toward the head: a visited line has its bit cleared and is skipped, the first unvisited
line is the victim; the hand stays at the victim's newer neighbour (or, if the victim was the
head, goes back to the tail). Lines are never moved on a hit, only removed where they are.

State: the recency list of ``lru.py`` (previous = newer way, next = older way; head/tail per
set) in the first two thirds of ``line_state`` and ``set_state``, the visited bits in the last
third of ``line_state`` and the hand (``-1``: the tail) in the last third of ``set_state``.
With one set this is libCacheSim's ``Sieve`` exactly (tests/test_peer_libraries.py).
"""

import numpy as np
from numba import njit

from dsacache.policies.base import PolicyType, register
from dsacache.policies.lru import init as list_init
from dsacache.policies.lru import to_front


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    n = n_sets * ways
    list_init(line_state[: 2 * n], set_state[: 2 * n_sets], glob, n_sets, ways, params)
    line_state[2 * n :] = 0
    set_state[2 * n_sets :] = -1


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    line_state[2 * (line_state.shape[0] // 3) + s * ways + way] = 1


@njit(inline="always")
def on_fill(line_state, set_state, glob, s, way, ways, clock, params):
    n = line_state.shape[0] // 3
    n_sets = set_state.shape[0] // 3
    line_state[2 * n + s * ways + way] = 0
    to_front(line_state[: 2 * n], set_state[: 2 * n_sets], glob, s, way, ways, clock, params)


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    n = line_state.shape[0] // 3
    n_sets = set_state.shape[0] // 3
    base = s * ways
    tail = set_state[n_sets + s]
    way = set_state[2 * n_sets + s]
    if way < 0:
        way = tail
    while line_state[2 * n + base + way]:
        line_state[2 * n + base + way] = 0
        way = line_state[base + way]  # the newer neighbour
        if way < 0:
            way = tail
    set_state[2 * n_sets + s] = line_state[base + way]
    return way


SIEVE = register(
    PolicyType(
        name="sieve",
        description="SIEVE (NSDI'24) per set: FIFO order, visited bit, a hand that skips visited lines",
        init=init,
        on_hit=on_hit,
        on_fill=on_fill,
        victim=victim,
        line_dtype=np.int32,
        reads_access=False,
        line_words=3,
        set_words=3,
        set_major=False,
    )
)
