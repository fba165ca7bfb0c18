"""LRU: evict the line used least recently (per set)."""

from numba import njit

from dsacache.policies.base import PolicyType, register


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = 0


@njit(inline="always")
def touch(line_state, set_state, glob, s, way, ways, clock, params):
    line_state[s * ways + way] = clock


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    base = s * ways
    best = 0
    oldest = line_state[base]
    for w in range(1, ways):
        if line_state[base + w] < oldest:
            oldest = line_state[base + w]
            best = w
    return best


LRU = register(
    PolicyType(
        name="lru",
        description="least recently used line in the set is evicted",
        init=init,
        on_hit=touch,
        on_fill=touch,
        victim=victim,
    )
)
