"""The L2 persisting access-policy window, as CUDA exposes it on Ampere and Hopper GPUs.

A program sets aside part of the L2 for *persisting* lines (``cudaLimitPersistingL2CacheSize``,
at most 32,768,000 B on the lent H100 and 39,321,600 B on the H200) and marks an address window on a stream
(``accessPolicyWindow``): a ``hit_ratio`` share of the window's lines, chosen by address, is
accessed with the persisting property (``hitProp``), the rest with ``missProp``: streaming
(CUDA's usual choice and the decode-step driver's), or normal. The model, per set:

- at most ``set_aside / (sets x line)`` ways hold persisting lines (at most ways - 1);
- a persisting fill takes the LRU normal line while the set has room for another persisting
  line, else the LRU persisting line; a normal fill takes the LRU normal line (normal traffic
  may use set-aside ways that no persisting line holds, as CUDA documents);
- a persisting hit on a normal line promotes it when there is room;
- a streaming line (a window line that does not persist, ``miss=streaming``) is the first
  victim of its set, as an evict_first line: "preferentially evicted", in CUDA's words.

``window`` names the traffic class whose buffer the window covers (the KV pool, the indexer
keys, ...): in the access stream every class lives in its own address range. Which lines
persist is decided by a hash of the line number, so a line is persisting on every access or
on none. The replacement among lines of the same kind is LRU (last-use clocks).
"""

import numpy as np
from numba import njit

from dsacache.policies.base import Param, PolicyType, register
from dsacache.simulator.workload import CLASSES

MAX_PERSISTING_BYTES = 39_321_600  # cudaDevAttrMaxPersistingL2CacheSize: H200 (H100: 32,768,000)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_OTHER_KIND = np.int64(1) << np.int64(62)  # above any engine clock
STREAMING_AGE = np.int64(1) << np.int64(48)  # a streaming line's use: older than any clock
NORMAL, PERSISTING, STREAMING = 0, 1, 2


@njit(inline="always")
def _kind(glob, params):
    """How the current access's line is cached: outside the window normal; inside, the
    ``hit_ratio`` share chosen by a hash of the line persisting, the rest ``miss``."""
    if glob[1] != int(params[0]):
        return NORMAL
    h = (np.uint64(glob[2]) * _MIX) >> np.uint64(40)  # 24 well-mixed bits
    if h < np.uint64(params[1] * 16777216.0):
        return PERSISTING
    return STREAMING if params[3] == 0.0 else NORMAL


@njit(inline="always")
def _last_use(kind, clock):
    return clock - STREAMING_AGE if kind == STREAMING else clock


@njit(inline="always")
def init(line_state, set_state, glob, n_sets, ways, params):
    limit = int(params[2]) // (n_sets * glob[3])
    glob[4] = min(max(limit, 0), ways - 1)


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    i = 2 * (s * ways + way)
    kind = _kind(glob, params)
    line_state[i] = _last_use(kind, clock)
    if line_state[i + 1] == 0 and set_state[s] < glob[4] and kind == PERSISTING:
        line_state[i + 1] = 1
        set_state[s] += 1


@njit(inline="always")
def on_fill(line_state, set_state, glob, s, way, ways, clock, params):
    i = 2 * (s * ways + way)
    kind = _kind(glob, params)
    line_state[i] = _last_use(kind, clock)
    line_state[i + 1] = 0
    if set_state[s] < glob[4] and kind == PERSISTING:
        line_state[i + 1] = 1
        set_state[s] += 1


@njit(inline="always")
def victim(line_state, set_state, glob, s, ways, clock, params):
    # evict persisting lines only when a persisting line comes in and the set-aside is full
    full = set_state[s] >= glob[4] and glob[4] > 0
    want = 1 if (full and _kind(glob, params) == PERSISTING) else 0
    # the least recent line of the wanted kind: clocks of the other kind sort after every clock
    base = 2 * s * ways
    best, best_key = 0, np.int64(0x7FFFFFFFFFFFFFFF)
    for w in range(ways):
        key = line_state[base + 2 * w] + (line_state[base + 2 * w + 1] ^ want) * _OTHER_KIND
        if key < best_key:
            best, best_key = w, key
    if line_state[2 * (s * ways + best) + 1] == 1:
        set_state[s] -= 1
    return best


PERSIST = register(
    PolicyType(
        name="persist",
        description="L2 persisting access-policy window over one traffic class (CUDA)",
        init=init,
        on_hit=on_hit,
        on_fill=on_fill,
        victim=victim,
        params=(
            Param(
                "window", "choice", "kv", "traffic class whose buffer the window covers", CLASSES
            ),  # fmt: skip
            Param(
                "hit_ratio",
                "float",
                1.0,
                "share of the window's lines that persist",
                low=0.0,
                high=1.0,
            ),  # fmt: skip
            Param(
                "set_aside",
                "size",
                16 * 2**20,
                "L2 bytes set aside for persisting lines (cudaLimitPersistingL2CacheSize)",
                low=0,
                high=MAX_PERSISTING_BYTES,
            ),  # fmt: skip
            Param(
                "miss",
                "choice",
                "streaming",
                "how the window's lines that do not persist are cached (missProp)",
                choices=("streaming", "normal"),
            ),
        ),
        line_words=2,
        set_words=1,
    )
)
