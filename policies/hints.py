"""Cache-eviction hints as a GPU offers them: ``evict_first`` / ``evict_last`` per traffic class.

On Hopper a load can carry an L2 eviction priority (PTX ``ld.global.L2::evict_first`` /
``L2::evict_last``; Triton's ``tl.load(..., eviction_policy=...)``). The model: every line
keeps the priority of the access that last touched it; a victim is the least recently used
line of the lowest priority present in the set (first < normal < last). Recency is the LRU
list of ``lru.py``; the victim search walks it from the tail.

evict_last is the priority of persisting accesses, and the CUDA programming guide (L2 cache
control) gives persisting accesses prioritised use of the L2 set-aside only. So only the
``persist_ways`` most recent evict_last lines of a set keep their priority; the others, and
all of them when nothing is set aside (a GPU's default, ``persist_ways=0``), act as normal.
That matches the H100 and H200 measurements (dsacache/data/*/README.md): evict_first on the
indexer-key loads lifts the next step's KV hit rate from 4% to 37-54%, evict_last on the KV
gathers alone changes nothing.
"""

import numpy as np
from numba import njit

from dsacache.policies.base import Param, PolicyType, register
from dsacache.policies.lru import init as lru_init
from dsacache.policies.lru import to_front

LEVELS = ("first", "normal", "last")
CLASS_ORDER = ("weights", "index", "kv", "append")  # as simulator.workload.CLASSES


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    n = n_sets * ways
    lru_init(line_state[: 2 * n], set_state[: 2 * n_sets], glob, n_sets, ways, params)
    line_state[2 * n :] = 1
    set_state[2 * n_sets :] = 0  # evict_first lines per set


@njit(inline="always")
def touch(line_state, set_state, glob, s, way, ways, clock, params):
    n = line_state.shape[0] // 3
    n_sets = set_state.shape[0] // 3
    to_front(line_state[: 2 * n], set_state[: 2 * n_sets], glob, s, way, ways, clock, params)
    i = 2 * n + s * ways + way
    level = np.int32(params[glob[1]])
    set_state[2 * n_sets + s] += np.int32(level == 0) - np.int32(line_state[i] == 0)
    line_state[i] = level


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    n = line_state.shape[0] // 3
    n_sets = set_state.shape[0] // 3
    base = s * ways
    persist_ways = np.int64(params[len(CLASS_ORDER)])
    if persist_ways == 0 and set_state[2 * n_sets + s] == 0:
        return set_state[n_sets + s]  # every line acts as normal: the LRU tail
    n_last = 0
    if persist_ways > 0:  # else every evict_last line acts as normal: nothing to count
        for w in range(ways):
            if line_state[2 * n + base + w] == 2:
                n_last += 1
    best = -1
    best_level = 3
    seen_last = 0
    way = set_state[n_sets + s]  # the tail: least recently used
    while way >= 0:
        level = line_state[2 * n + base + way]
        if level == 2:
            seen_last += 1
            if persist_ways == 0 or n_last - seen_last >= persist_ways:  # not set aside
                level = 1
        if level < best_level:
            best, best_level = way, level
            if level == 0:
                break
        way = line_state[base + way]  # previous = more recent
    return best


HINTS = register(
    PolicyType(
        name="hints",
        description="LRU with evict_first / evict_last priorities per traffic class (GPU load hints)",
        init=init,
        on_hit=touch,
        on_fill=touch,
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
                "persisting accesses; 0, a GPU's default: evict_last acts as normal)",
                low=0,
            ),
        ),
        line_dtype=np.int32,
        line_words=3,
        set_words=3,
    )
)
