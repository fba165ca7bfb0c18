"""Cache-eviction hints as a GPU offers them: ``evict_first`` / ``evict_last`` per traffic class.

On Hopper a load can carry an L2 eviction priority (PTX ``ld.global.L2::evict_first`` /
``L2::evict_last``; Triton's ``tl.load(..., eviction_policy=...)``). The model: a fill takes
the priority of its access, a hinted hit sets it, and an unhinted (``normal``) hit leaves it
as it is; a victim is the least recently used line of the lowest priority present in the set
(first < normal < last). Recency is ``lru.py``'s (a packed order up to 16 ways, a linked list
above); the victim search walks it from the least recent line, and is the plain LRU victim
while a set holds no evict_first line and no evict_last line keeps its priority.

Only the ``persist_ways`` most recent evict_last lines of a set keep their priority; the
others act as normal. ``persist_ways`` is the L2 set-aside for persisting accesses (CUDA
programming guide, L2 cache control) or, without one, what the GPU gives evict_last lines
anyway: the H100's hint probe (dsacache/data/h100/README.md) keeps about 9.4 MiB of
evict_last data through any volume of unhinted reads, even after an unhinted re-read of it,
which the fitted profile's ``evict_last_ways`` captures. With 0 evict_last acts as normal.
"""

import numpy as np
from numba import njit

from dsacache.policies.base import Param, PolicyType, make_policy, register, split_plugin
from dsacache.policies.lru import PACKED_WAYS, lru_init, lru_touch, lru_victim
from dsacache.simulator.workload import CLASSES
from dsacache.units import parse_spec

LEVELS = ("first", "normal", "last")
CLASS_ORDER = CLASSES  # one level per traffic class, in the workload's class order


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    n = n_sets * ways
    lru_init(line_state[: 2 * n], set_state[: 2 * n_sets], glob, n_sets, ways, params)
    line_state[2 * n :] = 1
    set_state[2 * n_sets :] = 0  # evict_first lines per set


@njit(inline="always")
def _touch(line_state, set_state, glob, s, way, ways, clock, params, fill):
    n = line_state.shape[0] // 3
    n_sets = set_state.shape[0] // 3
    lru_touch(line_state[: 2 * n], set_state[: 2 * n_sets], glob, s, way, ways, clock, params)
    i = 2 * n + s * ways + way
    level = params[glob[1]]
    if fill or level != 1:  # an unhinted hit keeps the line's priority
        set_state[2 * n_sets + s] += np.int64(level == 0) - np.int64(line_state[i] == 0)
        line_state[i] = level


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    _touch(line_state, set_state, glob, s, way, ways, clock, params, False)


@njit(inline="always")
def on_fill(line_state, set_state, glob, s, way, ways, clock, params):
    _touch(line_state, set_state, glob, s, way, ways, clock, params, True)


@njit(inline="always")
def _consider(way, level, n_last, seen_last, persist_ways, best, best_level):
    """One step of the victim walk (least recent first): the lowest level wins, the first
    (least recent) of it; evict_last lines outside the set-aside count as normal."""
    if level == 2:
        seen_last += 1
        if persist_ways == 0 or n_last - seen_last >= persist_ways:
            level = 1
    if level < best_level:
        best, best_level = way, level
    return seen_last, best, best_level


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    n = line_state.shape[0] // 3
    n_sets = set_state.shape[0] // 3
    levels = 2 * n + s * ways
    persist_ways = np.int64(params[len(CLASS_ORDER)])
    if persist_ways == 0 and set_state[2 * n_sets + s] == 0:  # every line acts as normal
        return lru_victim(line_state[: 2 * n], set_state[: 2 * n_sets], glob, s, ways, clock,
                          params)  # fmt: skip
    n_last = 0
    if persist_ways > 0:  # else every evict_last line acts as normal: nothing to count
        for w in range(ways):
            if line_state[levels + w] == 2:
                n_last += 1
    best, best_level, seen_last = -1, 3, 0
    if ways <= PACKED_WAYS:  # recency ranks packed in one word, least recent at the top
        order = set_state[s]
        for rank in range(ways - 1, -1, -1):
            way = (order >> (4 * rank)) & 15
            seen_last, best, best_level = _consider(
                way, line_state[levels + way], n_last, seen_last, persist_ways, best, best_level
            )
            if best_level == 0:
                break
    else:  # the linked list, from its tail
        way = set_state[n_sets + s]
        while way >= 0:
            seen_last, best, best_level = _consider(
                way, line_state[levels + way], n_last, seen_last, persist_ways, best, best_level
            )
            if best_level == 0:
                break
            way = line_state[s * ways + way]  # previous = more recent
    return best


HINTS = register(
    PolicyType(
        name="hints",
        description="LRU with evict_first / evict_last priorities per traffic class (GPU load hints)",
        init=init,
        on_hit=on_hit,
        on_fill=on_fill,
        victim=victim,
        params=tuple(
            Param(c, "choice", "normal", f"eviction priority of {c} loads", LEVELS)
            for c in CLASS_ORDER
        )
        + (
            Param(
                "persist_ways",
                "int",
                0,
                "ways per set where evict_last lines keep their priority (the L2 set-aside for "
                "persisting accesses, or what the GPU keeps without one: a fitted profile's "
                "evict_last_ways; 0: evict_last acts as normal)",
                low=0,
            ),
        ),
        line_dtype=np.int64,  # the packed recency order is one int64 per set
        line_words=3,
        set_words=3,
        set_major=False,
    )
)


def takes_gpu_evict_last_ways(spec: str) -> bool:
    """Whether a GPU's fitted evict_last ways (a profile's ``evict_last_ways``) apply to the
    policy ``spec``: a ``hints`` policy with an evict_last level that names no
    ``persist_ways`` of its own."""
    policy = make_policy(spec)
    named = parse_spec(split_plugin(spec)[1], "policy").params
    return (
        policy.name == "hints" and "last" in policy.values.values() and "persist_ways" not in named
    )
