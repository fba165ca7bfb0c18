"""S3-FIFO (Yang, Zhang, Qiu, Yue and Rashmi, "FIFO queues are all you need for cache
eviction", SOSP 2023), adapted to one set of a set-associative cache.

Per set: a small FIFO S, a main FIFO M and a ghost FIFO G of line numbers recently evicted from
S (no data). Every line has a 2-bit frequency (0..3), 0 at fill, +1 per hit (saturating).

- Miss on a line that is in G: it leaves G and is filled into M; any other miss fills into S.
- Evict (the set is full): if M holds more than its share (``ways - small``) or S is empty,
  take M's oldest line: one with frequency f > 0 goes back to M's head with f - 1 (a 2-bit
  CLOCK), the first with 0 is the victim. Otherwise take S's oldest line: one with at least
  ``threshold`` hits moves to M's head (frequency 0), the first with fewer is the victim and
  its line number enters G (G drops its oldest entry when full). If S empties by moves, M
  evicts. ``threshold=1`` is the paper's rule (an S object accessed at least once moves to M);
  libCacheSim's default is 2.

The per-set adaptation: S is ``max(1, floor(small_ratio * ways))`` ways (at most ``ways - 1``),
G holds ``floor(ghost_ratio * ways)`` line numbers (the paper sizes S at 10% and G like M, per
cache; here per set, since a set is the unit that evicts). While a set is still filling for the
first time, new lines go to S until S has its share and to M after that (the authors'
libCacheSim S3FIFO.c, which refines the paper's listing where every new object enters S). With
one set, ``small_ratio * ways >= 2`` and unit-size objects this is libCacheSim's ``S3FIFO`` with
``move_to_main_threshold = threshold`` exactly; libCacheSim refuses objects no smaller than S,
so with a one-way S it caches nothing, while a set must always place the missing line.

State (int32 to keep memory traffic down; set-major so that a set's state is contiguous): set
``s`` owns ``line_state[s * 8 * ways:]``: a record per way (its line number as two halves, 31 low
bits and the rest, and its frequency; a miss touches one record), S's ring of ways, M's ring
of ways and G's ring of line numbers (low halves, -1 where free; then high halves).
``set_state[s * 7:]`` holds S head/count, M head/count, G head/count and "has evicted".
``glob[4]`` carries "this miss hit G" from ``victim`` to ``on_fill``; ``glob[5:8]`` hold the S, M and G capacities.
"""

import numpy as np
from numba import njit

from dsacache.policies.base import Param, PolicyType, register
from dsacache.simulator.engine import ctz, match16, prefetch

# A set's block: one 4-word record per way (line number low/high half, frequency, unused),
# then S's ring, M's ring, G's low halves, G's high halves (``ways`` words each).
REC, R_LO, R_HI, R_FREQ = 4, 0, 1, 2
S_RING, M_RING, G_LO, G_HI = 4, 5, 6, 7
S_HEAD, S_COUNT, M_HEAD, M_COUNT, G_HEAD, G_COUNT, EVICTED = 0, 1, 2, 3, 4, 5, 6
LINE_WORDS, SET_WORDS = 8, 7
LOW = 0x7FFFFFFF  # a line number (< 2**55) is kept as two int32 halves: 31 low bits, the rest


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = 0
    set_state[:] = 0
    for s in range(n_sets):
        g = (s * LINE_WORDS + G_LO) * ways
        line_state[g : g + ways] = -1
    small = max(1, int(params[0] * ways))
    if ways > 1:
        small = min(small, ways - 1)
    glob[4] = 0
    glob[5] = small
    glob[6] = ways - small
    glob[7] = min(ways, int(params[1] * ways))


@njit(inline="always")
def _push(line_state, set_state, ring, head, s, ways, value):
    """Append ``value`` to the ring whose words start at ``line_state[ring]`` and whose head
    and count are ``set_state[head]`` and ``set_state[head + 1]``."""
    count = set_state[head + 1]
    slot = set_state[head] + count
    if slot >= ways:
        slot -= ways
    line_state[ring + slot] = value
    set_state[head + 1] = count + 1


@njit(inline="always")
def _pop(line_state, set_state, ring, head, s, ways):
    h = set_state[head]
    value = line_state[ring + h]
    set_state[head] = h + 1 if h + 1 < ways else 0
    set_state[head + 1] -= 1
    return value


@njit(inline="always")
def _ghost_add(line_state, set_state, ghost, ways, head_at, cap, lo, hi):
    """Append ``line`` to the ghost ring ``line_state[ghost:ghost + cap]`` (head and count at
    ``set_state[head_at]`` and ``[head_at + 1]``), overwriting the oldest entry when full."""
    if cap == 0:
        return
    head = set_state[head_at]
    count = set_state[head_at + 1]
    slot = head + count
    if slot >= cap:
        slot -= cap
    line_state[ghost + slot] = lo
    line_state[ghost + ways + slot] = hi
    if count == cap:
        set_state[head_at] = head + 1 if head + 1 < cap else 0
    else:
        set_state[head_at + 1] = count + 1


@njit(inline="always")
def _ghost_take(line_state, set_state, ghost, ways, head_at, cap, lo, hi):
    """Remove ``line`` from the ghost ring, keeping the others in order; 1 if it was there.
    Free slots hold -1. The low halves are compared 16 at a time (``match16``; a scalar scan
    of a 14-entry ghost was about a third of a miss's cost) when 16 words from the ring lie
    inside the set's block (``ways >= 8``: the high halves follow the low ones)."""
    found = -1
    if ways >= 8:
        c = 0
        while c < cap and found < 0:
            m = match16(line_state, ghost + c, lo)
            if cap - c < 16:
                m &= (1 << (cap - c)) - 1
            while m:
                i = c + ctz(m)
                if line_state[ghost + ways + i] == hi:
                    found = i
                    break
                m &= m - 1
            c += 16
    else:
        for i in range(cap):  # an early exit keeps it scalar (vectorized: AVX-512 gathers)
            if line_state[ghost + i] == lo and line_state[ghost + ways + i] == hi:
                found = i
                break
    if found < 0:
        return 0
    head = set_state[head_at]
    count = set_state[head_at + 1]
    slot = found
    last = head + count - 1
    if last >= cap:
        last -= cap
    while slot != last:  # younger entries move one place older
        nxt = slot + 1 if slot + 1 < cap else 0
        line_state[ghost + slot] = line_state[ghost + nxt]
        line_state[ghost + ways + slot] = line_state[ghost + ways + nxt]
        slot = nxt
    line_state[ghost + last] = -1
    set_state[head_at + 1] = count - 1
    return 1


@njit(inline="always")
def prefetch_set(line_state, set_state, s, ways):
    """A miss walks S's and M's rings and G's two halves: four cache lines of the set's block."""
    base = s * LINE_WORDS * ways
    prefetch(line_state, base + S_RING * ways)
    prefetch(line_state, base + M_RING * ways)
    prefetch(line_state, base + G_LO * ways)
    prefetch(line_state, base + G_HI * ways)


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    i = s * LINE_WORDS * ways + REC * way + R_FREQ
    if line_state[i] < 3:
        line_state[i] += 1


@njit(inline="always")
def on_fill(line_state, set_state, glob, s, way, ways, clock, params):
    base = s * LINE_WORDS * ways
    st = s * SET_WORDS
    rec = base + REC * way
    line_state[rec + R_LO] = glob[2] & LOW
    line_state[rec + R_HI] = glob[2] >> 31
    line_state[rec + R_FREQ] = 0
    if glob[4]:
        glob[4] = 0
        _push(line_state, set_state, base + M_RING * ways, st + M_HEAD, s, ways, way)
    elif set_state[st + EVICTED] == 0 and set_state[st + S_COUNT] >= glob[5]:
        _push(line_state, set_state, base + M_RING * ways, st + M_HEAD, s, ways, way)
    else:
        _push(line_state, set_state, base + S_RING * ways, st + S_HEAD, s, ways, way)


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    base = s * LINE_WORDS * ways
    st = s * SET_WORDS
    ghost, small, main = base + G_LO * ways, base + S_RING * ways, base + M_RING * ways
    freq = base + R_FREQ
    lo, hi = glob[2] & LOW, glob[2] >> 31
    glob[4] = _ghost_take(line_state, set_state, ghost, ways, st + G_HEAD, glob[7], lo, hi)
    set_state[st + EVICTED] = 1
    while True:
        if set_state[st + M_COUNT] > glob[6] or set_state[st + S_COUNT] == 0:
            while True:
                way = _pop(line_state, set_state, main, st + M_HEAD, s, ways)
                f = line_state[freq + REC * way]
                if f == 0:
                    return way
                line_state[freq + REC * way] = f - 1
                _push(line_state, set_state, main, st + M_HEAD, s, ways, way)
        while set_state[st + S_COUNT] > 0:
            way = _pop(line_state, set_state, small, st + S_HEAD, s, ways)
            if line_state[freq + REC * way] < params[2]:
                lo = line_state[base + REC * way + R_LO]
                hi = line_state[base + REC * way + R_HI]
                _ghost_add(line_state, set_state, ghost, ways, st + G_HEAD, glob[7], lo, hi)
                return way
            line_state[freq + REC * way] = 0
            _push(line_state, set_state, main, st + M_HEAD, s, ways, way)


S3FIFO = register(
    PolicyType(
        name="s3fifo",
        description="S3-FIFO (SOSP'23) per set: small FIFO, main 2-bit CLOCK FIFO, ghost of small",
        init=init,
        on_hit=on_hit,
        on_fill=on_fill,
        victim=victim,
        params=(
            Param("small_ratio", "float", 0.1, "share of each set's ways for S", low=0.0, high=1.0),
            Param("ghost_ratio", "float", 0.9, "ghost entries per set / ways", low=0.0, high=1.0),
            Param("threshold", "int", 1, "hits in S that promote a line to M", low=1, high=3),
        ),
        line_dtype=np.int32,
        line_words=LINE_WORDS,
        set_words=SET_WORDS,
        prefetch=prefetch_set,
    )
)
