"""Tree pseudo-LRU: a binary tree of ``ways - 1`` direction bits per set points at the victim.

The classic tree-PLRU of set-associative CPU caches (described e.g. in Al-Zoubi, Milenkovic
and Milenkovic, "Performance evaluation of cache replacement policies for the SPEC CPU2000
benchmark suite", ACM-SE 2004). The ways are the leaves of a complete binary tree; each inner
node holds one bit, 0 = the pseudo-LRU side is the left subtree (lower ways), 1 = the right.
An access (hit or fill) to a way sets every node on its root-to-leaf path to point *away* from
that way; the victim is the leaf reached by following the bits from the root. Ways must be a
power of two.

State: node ``i`` (heap order, root 1, children ``2i`` and ``2i + 1``) of set ``s`` is
``line_state[s * ways + i]``; word 0 of each set is unused. All bits start at 0, so the first
victim of a set that was filled in way order is way 0 — as in hardware, where fills also update
the tree.
"""

import numpy as np
from numba import njit

from dsacache.errors import DsacacheError
from dsacache.policies.base import PolicyType, register


def check(ways: int, n_sets: int, policy) -> None:
    """Tree-PLRU needs a power-of-two number of ways."""
    if ways < 1 or ways & (ways - 1):
        raise DsacacheError(
            f"policy plru needs a power-of-two number of ways (1, 2, 4, 8, 16, ...), got {ways}"
        )


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = 0


@njit(inline="always")
def touch(line_state, set_state, glob, s, way, ways, clock, params):
    base = s * ways
    node = 1
    half = ways >> 1
    while half:
        right = 1 if way & half else 0
        line_state[base + node] = 1 - right  # point away from the way just used
        node = 2 * node + right
        half >>= 1


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    base = s * ways
    node = 1
    while node < ways:
        node = 2 * node + line_state[base + node]
    return node - ways


PLRU = register(
    PolicyType(
        name="plru",
        description="tree pseudo-LRU: ways-1 direction bits per set (ways must be a power of two)",
        init=init,
        on_hit=touch,
        on_fill=touch,
        victim=victim,
        line_dtype=np.int32,
        reads_access=False,
        line_words=1,
        set_words=1,
        check=check,
    )
)
