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
  evicts.

The per-set adaptation: S is ``max(1, floor(small_ratio * ways))`` ways (at most ``ways - 1``),
G holds ``floor(ghost_ratio * ways)`` line numbers (the paper sizes S at 10% and G like M, per
cache; here per set, since a set is the unit that evicts). While a set is still filling for the
first time, new lines go to S until S has its share and to M after that (the authors'
libCacheSim S3FIFO.c, which refines the paper's listing where every new object enters S). With
one set, ``small_ratio * ways >= 2`` and unit-size objects this is libCacheSim's ``S3FIFO`` with
``move_to_main_threshold = threshold`` exactly; libCacheSim refuses objects no smaller than S,
so with a one-way S it caches nothing, while a set must always place the missing line.

State (int64): ``line_state`` fields (each ``n_sets * ways`` long, way-indexed per set) are the
line number, the frequency, S's ring of ways, M's ring of ways and G's ring of line numbers;
``set_state`` fields are S head/count, M head/count, G head/count and "has evicted". ``glob[4]``
carries "this miss hit G" from ``victim`` to ``on_fill``; ``glob[5:8]`` hold the S, M and G
capacities.
"""

from numba import njit

from dsacache.policies.base import Param, PolicyType, register

TAG, FREQ, S_RING, M_RING, G_RING = 0, 1, 2, 3, 4
S_HEAD, S_COUNT, M_HEAD, M_COUNT, G_HEAD, G_COUNT, EVICTED = 0, 1, 2, 3, 4, 5, 6
LINE_WORDS, SET_WORDS = 5, 7


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = 0
    set_state[:] = 0
    small = max(1, int(params[0] * ways))
    if ways > 1:
        small = min(small, ways - 1)
    glob[4] = 0
    glob[5] = small
    glob[6] = ways - small
    glob[7] = min(ways, int(params[1] * ways))


@njit(inline="always")
def _push(line_state, set_state, ring, head_field, s, ways, value):
    n = line_state.shape[0] // LINE_WORDS
    n_sets = set_state.shape[0] // SET_WORDS
    count = set_state[(head_field + 1) * n_sets + s]
    slot = set_state[head_field * n_sets + s] + count
    if slot >= ways:
        slot -= ways
    line_state[ring * n + s * ways + slot] = value
    set_state[(head_field + 1) * n_sets + s] = count + 1


@njit(inline="always")
def _pop(line_state, set_state, ring, head_field, s, ways):
    n = line_state.shape[0] // LINE_WORDS
    n_sets = set_state.shape[0] // SET_WORDS
    head = set_state[head_field * n_sets + s]
    value = line_state[ring * n + s * ways + head]
    set_state[head_field * n_sets + s] = head + 1 if head + 1 < ways else 0
    set_state[(head_field + 1) * n_sets + s] -= 1
    return value


@njit(inline="always")
def _ghost_add(line_state, set_state, s, ways, cap, line):
    if cap == 0:
        return
    n = line_state.shape[0] // LINE_WORDS
    n_sets = set_state.shape[0] // SET_WORDS
    ring = G_RING * n + s * ways
    head = set_state[G_HEAD * n_sets + s]
    count = set_state[G_COUNT * n_sets + s]
    if count == cap:  # drop the oldest
        head = head + 1 if head + 1 < cap else 0
        count -= 1
        set_state[G_HEAD * n_sets + s] = head
    slot = head + count
    if slot >= cap:
        slot -= cap
    line_state[ring + slot] = line
    set_state[G_COUNT * n_sets + s] = count + 1


@njit(inline="always")
def _ghost_take(line_state, set_state, s, ways, cap, line):
    """Remove ``line`` from the set's ghost; 1 if it was there."""
    n = line_state.shape[0] // LINE_WORDS
    n_sets = set_state.shape[0] // SET_WORDS
    ring = G_RING * n + s * ways
    head = set_state[G_HEAD * n_sets + s]
    count = set_state[G_COUNT * n_sets + s]
    slot = head
    for i in range(count):
        if line_state[ring + slot] == line:
            for _ in range(i, count - 1):  # close the gap: younger entries move one older
                nxt = slot + 1 if slot + 1 < cap else 0
                line_state[ring + slot] = line_state[ring + nxt]
                slot = nxt
            set_state[G_COUNT * n_sets + s] = count - 1
            return 1
        slot = slot + 1 if slot + 1 < cap else 0
    return 0


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    i = FREQ * (line_state.shape[0] // LINE_WORDS) + s * ways + way
    if line_state[i] < 3:
        line_state[i] += 1


@njit(inline="always")
def on_fill(line_state, set_state, glob, s, way, ways, clock, params):
    n = line_state.shape[0] // LINE_WORDS
    n_sets = set_state.shape[0] // SET_WORDS
    line_state[TAG * n + s * ways + way] = glob[2]
    line_state[FREQ * n + s * ways + way] = 0
    if glob[4]:
        glob[4] = 0
        _push(line_state, set_state, M_RING, M_HEAD, s, ways, way)
    elif set_state[EVICTED * n_sets + s] == 0 and set_state[S_COUNT * n_sets + s] >= glob[5]:
        _push(line_state, set_state, M_RING, M_HEAD, s, ways, way)
    else:
        _push(line_state, set_state, S_RING, S_HEAD, s, ways, way)


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    n = line_state.shape[0] // LINE_WORDS
    n_sets = set_state.shape[0] // SET_WORDS
    glob[4] = _ghost_take(line_state, set_state, s, ways, glob[7], glob[2])
    set_state[EVICTED * n_sets + s] = 1
    freq = FREQ * n + s * ways
    while True:
        if set_state[M_COUNT * n_sets + s] > glob[6] or set_state[S_COUNT * n_sets + s] == 0:
            while True:
                way = _pop(line_state, set_state, M_RING, M_HEAD, s, ways)
                f = line_state[freq + way]
                if f == 0:
                    return way
                line_state[freq + way] = f - 1
                _push(line_state, set_state, M_RING, M_HEAD, s, ways, way)
        while set_state[S_COUNT * n_sets + s] > 0:
            way = _pop(line_state, set_state, S_RING, S_HEAD, s, ways)
            if line_state[freq + way] < params[2]:
                _ghost_add(
                    line_state, set_state, s, ways, glob[7], line_state[TAG * n + s * ways + way]
                )
                return way
            line_state[freq + way] = 0
            _push(line_state, set_state, M_RING, M_HEAD, s, ways, way)


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
        line_words=LINE_WORDS,
        set_words=SET_WORDS,
    )
)
