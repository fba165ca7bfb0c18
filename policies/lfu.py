"""LFU: evict the line of the set with the fewest hits since it was filled; ties go to the
least recently used of them.

In-cache LFU: a line's count starts at 1 when it is filled and grows by one on every hit
(also a hit whose sectors were partly missing); the count is forgotten when the line is
evicted. Among lines with the lowest count the victim is the one whose last access (fill or
hit) is oldest, which is what libCacheSim's LFU does with its per-frequency FIFO lists (a line
enters a frequency's list at its latest access). ``line_state`` holds one word per way: the
count in the high bits and the engine clock of the last access (fill or hit) in the low
``CLOCK_BITS``, so the smallest word of the set is the victim (one O(ways) scan of one array).
"""

from numba import njit

from dsacache.policies.base import PolicyType, register

CLOCK_BITS = 40  # accesses a replay may make before clocks wrap: 1.1e12
_COUNT = 1 << CLOCK_BITS
_CLOCK_MASK = _COUNT - 1


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = 0


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    i = s * ways + way
    line_state[i] = ((line_state[i] >> CLOCK_BITS) + 1) * _COUNT + (clock & _CLOCK_MASK)


@njit(inline="always")
def on_fill(line_state, set_state, glob, s, way, ways, clock, params):
    line_state[s * ways + way] = _COUNT + (clock & _CLOCK_MASK)


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    base = s * ways
    best = 0
    best_key = line_state[base]
    for w in range(1, ways):
        key = line_state[base + w]
        if key < best_key:
            best, best_key = w, key
    return best


LFU = register(
    PolicyType(
        name="lfu",
        description="least frequently used line in the set (count since fill); ties by LRU",
        init=init,
        on_hit=on_hit,
        on_fill=on_fill,
        victim=victim,
        line_words=1,
        set_words=1,
        reads_access=False,
    )
)
