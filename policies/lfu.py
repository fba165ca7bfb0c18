"""LFU: evict the line of the set with the fewest hits since it was filled; ties go to the
least recently used of them.

In-cache LFU: a line's count starts at 1 when it is filled and grows by one on every hit
(also a hit whose sectors were partly missing); the count is forgotten when the line is
evicted. Among lines with the lowest count the victim is the one whose last access (fill or
hit) is oldest, which is what libCacheSim's LFU does with its per-frequency FIFO lists (a line
enters a frequency's list at its latest access). ``line_state`` holds per way the count (first
half) and the engine clock of its last access (second half); the victim is one O(ways) scan.
"""

from numba import njit

from dsacache.policies.base import PolicyType, register


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = 0


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    i = s * ways + way
    line_state[i] += 1
    line_state[line_state.shape[0] // 2 + i] = clock


@njit(inline="always")
def on_fill(line_state, set_state, glob, s, way, ways, clock, params):
    i = s * ways + way
    line_state[i] = 1
    line_state[line_state.shape[0] // 2 + i] = clock


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    base = s * ways
    last = line_state.shape[0] // 2 + base
    best = 0
    best_count = line_state[base]
    best_time = line_state[last]
    for w in range(1, ways):
        c = line_state[base + w]
        if c < best_count or (c == best_count and line_state[last + w] < best_time):
            best, best_count, best_time = w, c, line_state[last + w]
    return best


LFU = register(
    PolicyType(
        name="lfu",
        description="least frequently used line in the set (count since fill); ties by LRU",
        init=init,
        on_hit=on_hit,
        on_fill=on_fill,
        victim=victim,
        line_words=2,
        set_words=1,
    )
)
