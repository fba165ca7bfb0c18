"""LRU: evict the line used least recently (per set).

Each set keeps all its ways in a doubly-linked recency list: ``line_state`` holds every way's
previous way (first half) and next way (second half), ``set_state`` each set's head = most
recent (first half) and tail = least recent (second half). Hits, fills and the victim choice
are O(1) at any associativity. The list starts as ways 0..ways-1; the engine fills ways in
that order and moves each filled way to the front, so ways never filled stay behind every
filled one and the tail is a true LRU victim once the set is full.
"""

import numpy as np
from numba import njit

from dsacache.policies.base import PolicyType, register


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


LRU = register(
    PolicyType(
        name="lru",
        description="least recently used line in the set is evicted",
        init=init,
        on_hit=to_front,
        on_fill=to_front,
        victim=tail,
        line_dtype=np.int32,
        line_words=2,
        set_words=2,
    )
)
