"""Belady / OPT: evict the line whose next use lies furthest in the future.

An offline bound, not an implementable policy: it reads the stream's future, which the
engine passes in ``glob[0]`` (the index of the next access to the current line). Every miss
is inserted (no bypass), as in Belady's MIN and libCacheSim's Belady.
"""

import numpy as np
from numba import njit

from dsacache.policies.base import PolicyType, register


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = 0


@njit(inline="always")
def remember_next_use(line_state, set_state, glob, s, way, ways, clock, params):
    line_state[s * ways + way] = glob[0]


@njit(inline="always")
def furthest(line_state, set_state, glob, s, ways, clock, params):
    base = s * ways
    best = 0
    far = line_state[base]
    for w in range(1, ways):
        if line_state[base + w] > far:
            far = line_state[base + w]
            best = w
    return best


BELADY = register(
    PolicyType(
        name="belady",
        description="offline optimum (OPT/MIN): evicts the line used furthest in the future",
        init=init,
        on_hit=remember_next_use,
        on_fill=remember_next_use,
        victim=furthest,
        line_dtype=np.int64,
        reads_access=False,
        needs_future=True,
    )
)
