"""A complete policy plug-in: LIP (LRU insertion policy; Qureshi et al., ISCA 2007).

New lines are inserted at the LRU end of their set and move to the MRU end only when they
are hit again, so a stream that is read once cannot flush lines that are reused. Run it with

    dsacache replay t.dsatrace --policy docs/plugin_policy.py:lip --policy lru

No dsacache file is edited: this file registers the policy when it is loaded. A policy is four
``@njit(inline="always")`` hooks over state arrays (see dsacache/policies/base.py); here the
state is the same doubly-linked recency list that dsacache's LRU keeps.
"""

import numpy as np
from numba import njit

from dsacache.policies import PolicyType, register
from dsacache.policies.lru import init, tail, to_front


@njit(inline="always")
def to_back(line_state, set_state, glob, s, way, ways, clock, params):
    """Make ``way`` the least recently used way of set ``s``."""
    n_sets = set_state.shape[0] // 2
    n = line_state.shape[0] // 2
    base = s * ways
    old_tail = set_state[n_sets + s]
    if old_tail == way:
        return
    prev = line_state[base + way]
    nxt = line_state[n + base + way]
    if prev >= 0:
        line_state[n + base + prev] = nxt
    else:
        set_state[s] = nxt
    line_state[base + nxt] = prev  # way is not the tail, so it has a successor
    line_state[n + base + old_tail] = way
    line_state[base + way] = old_tail
    line_state[n + base + way] = -1
    set_state[n_sets + s] = way


LIP = register(
    PolicyType(
        name="lip",
        description="LRU insertion policy: fills enter at the LRU end (a docs/ plug-in example)",
        init=init,
        on_hit=to_front,
        on_fill=to_back,
        victim=tail,
        line_dtype=np.int32,
        line_words=2,
        set_words=2,
        set_major=False,  # LRU's list: heads, then tails, one column of n_sets each
    )
)
