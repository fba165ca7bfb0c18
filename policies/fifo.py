"""FIFO: evict the line filled first (hits do not change the order)."""

import numpy as np
from numba import njit

from dsacache.policies.base import PolicyType, register
from dsacache.policies.lru import init, tail, to_front


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    pass


FIFO = register(
    PolicyType(
        name="fifo",
        description="first-in first-out per set; hits do not reorder",
        init=init,
        on_hit=on_hit,
        on_fill=to_front,
        victim=tail,
        line_dtype=np.int32,
        reads_access=False,
        line_words=2,
        set_words=2,
        set_major=False,
    )
)
