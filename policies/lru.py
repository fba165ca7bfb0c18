"""LRU: evict the line used least recently (per set).

Sets of up to 16 ways keep their recency order packed in one int64 of ``set_state``: nibble
``k`` is the way of recency rank ``k`` (0 = most recent), so a hit, a fill and the victim are
a few register operations on one word. Larger sets keep a doubly-linked recency list (which
FIFO, SIEVE, hints and plug-ins reuse): ``line_state`` holds every way's previous way (first
half) and next way (second half), ``set_state`` each set's head = most recent (first half)
and tail = least recent (second half); O(1) at any associativity. Both orders start as ways
0..ways-1; the engine fills ways in that order and moves each filled way to the front, so ways
never filled stay behind every filled one and the last is a true LRU victim once the set is
full.
"""

import numpy as np
from numba import njit

from dsacache.policies.base import PolicyType, register
from dsacache.simulator.engine import ctz


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    n = n_sets * ways
    for s in range(n_sets):
        for w in range(ways):
            line_state[s * ways + w] = w - 1
            line_state[n + s * ways + w] = w + 1 if w + 1 < ways else -1
        set_state[s] = 0
        set_state[n_sets + s] = ways - 1


@njit(inline="always")
def to_front(line_state, set_state, glob, s, way, ways, clock, params):
    n_sets = set_state.shape[0] // 2
    head = set_state[s]
    if head != way:
        n = line_state.shape[0] // 2
        base = s * ways
        i = base + way
        prev = line_state[i]
        # The tail's successor is known (none): skipping that load keeps the common
        # evict-and-refill path free of a dependent cache miss.
        if way == set_state[n_sets + s]:
            nxt = -1
            set_state[n_sets + s] = prev
        else:
            nxt = line_state[n + i]
            line_state[base + nxt] = prev
        line_state[n + base + prev] = nxt
        line_state[i] = -1
        line_state[n + i] = head
        line_state[base + head] = way
        set_state[s] = way


@njit(inline="always")
def tail(line_state, set_state, glob, s, ways, clock, params):
    return set_state[set_state.shape[0] // 2 + s]


PACKED_WAYS = 16
_NIBBLES_7 = 0x7777777777777777
_NIBBLES_8 = -0x7777777777777778  # 0x8888888888888888 as a signed 64-bit integer
_NIBBLES_1 = 0x1111111111111111
_IDENTITY = -0x0123456789ABCDF0  # 0xFEDCBA9876543210: way k at rank k


@njit(inline="always")
def packed_to_front(order, way):
    """``order`` (ways as nibbles by recency rank) with ``way`` moved to rank 0."""
    x = order ^ (way * _NIBBLES_1)  # way's nibble becomes 0
    rank = ctz(~(((x & _NIBBLES_7) + _NIBBLES_7) | x) & _NIBBLES_8) >> 2  # exact zero-nibble test
    below = (np.int64(1) << (4 * rank)) - 1
    return (order & ~((below << 4) | 15)) | ((order & below) << 4) | way


@njit(inline="always")
def lru_init(line_state, set_state, glob, n_sets, ways, params):
    if ways > PACKED_WAYS:
        init(line_state, set_state, glob, n_sets, ways, params)
    else:
        set_state[:n_sets] = _IDENTITY


@njit(inline="always")
def lru_touch(line_state, set_state, glob, s, way, ways, clock, params):
    if ways > PACKED_WAYS:
        to_front(line_state, set_state, glob, s, way, ways, clock, params)
    else:
        set_state[s] = packed_to_front(set_state[s], way)


@njit(inline="always")
def lru_victim(line_state, set_state, glob, s, ways, clock, params):
    if ways > PACKED_WAYS:
        return tail(line_state, set_state, glob, s, ways, clock, params)
    return (set_state[s] >> (4 * (ways - 1))) & 15


LRU = register(
    PolicyType(
        name="lru",
        description="least recently used line in the set is evicted",
        init=lru_init,
        on_hit=lru_touch,
        on_fill=lru_touch,
        victim=lru_victim,
        line_dtype=np.int64,
        reads_access=False,
        line_words=2,
        set_words=2,
        set_major=False,
    )
)
