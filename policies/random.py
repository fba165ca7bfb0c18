"""Random: evict a uniformly random way (seeded xorshift64*, reproducible)."""

from numba import njit

from dsacache.policies.base import Param, PolicyType, register


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    glob[4] = int(params[0]) * 2654435761 + 88172645463325252


@njit(inline="always")
def on_access(line_state, set_state, glob, s, way, ways, clock, params):
    pass


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    x = glob[4]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    glob[4] = x
    r = (x * 2685821657736338717) >> 33
    return (r & 0x7FFFFFFF) % ways


RANDOM = register(
    PolicyType(
        name="random",
        description="a uniformly random way of the set is evicted (seeded)",
        init=init,
        on_hit=on_access,
        on_fill=on_access,
        victim=victim,
        params=(Param("seed", "int", 0, "random seed", low=0),),
        reads_access=False,
    )
)
