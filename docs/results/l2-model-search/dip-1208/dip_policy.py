"""DIP (dynamic insertion policy; Qureshi et al., ISCA 2007) as a dsacache plug-in, for the
adaptive-insertion experiment of issue #8 (README beside this file).

LRU's recency list, with set dueling between two insertion rules: 1/32 of the sets always
insert at the MRU end (LRU), 1/32 insert at the LRU end except with probability ``epsilon``
(BIP, thrash-resistant: a cyclic footprint larger than the cache keeps part of itself); a
saturating counter (``psel_bits``) counts the leaders' misses and the other sets follow the
leader group that misses less. ``glob[4]`` is the counter, ``glob[5]`` the xorshift state.
"""

import sys
from pathlib import Path

import numpy as np
from numba import njit

from dsacache.policies import Param, PolicyType, register
from dsacache.policies.lru import init as lru_list_init
from dsacache.policies.lru import tail, to_front

sys.path.insert(0, str(Path(__file__).parents[3]))  # docs/: the LIP plug-in's to_back
from plugin_policy import to_back  # noqa: E402

LEADER_PERIOD = 32  # one set in 32 leads for each rule


@njit(inline="always")
def dip_init(line_state, set_state, glob, n_sets, ways, params):
    lru_list_init(line_state, set_state, glob, n_sets, ways, params)
    glob[4] = 1 << (int(params[1]) - 1)  # the counter starts in the middle
    glob[5] = 0x2545F4914F6CDD1D


@njit(inline="always")
def dip_fill(line_state, set_state, glob, s, way, ways, clock, params):
    top = (1 << int(params[1])) - 1
    # leaders spread by a multiplicative hash of the set (not s % 32: strided layouts)
    group = ((s * 0x9E3779B1) >> 7) % LEADER_PERIOD
    if group == 0:  # an LRU leader missed: BIP is the better rule
        if glob[4] > 0:
            glob[4] -= 1
        bip = False
    elif group == 1:  # a BIP leader missed
        if glob[4] < top:
            glob[4] += 1
        bip = True
    else:
        bip = glob[4] <= top // 2
    if bip:
        x = glob[5]
        x ^= x << 13
        x ^= (x >> 7) & 0x1FFFFFFFFFFFFFF
        x ^= x << 17
        glob[5] = x
        if ((x >> 11) & 0xFFFFFF) >= params[0] * 16777216.0:
            to_back(line_state, set_state, glob, s, way, ways, clock, params)
            return
    to_front(line_state, set_state, glob, s, way, ways, clock, params)


DIP = register(
    PolicyType(
        name="dip",
        description="dynamic insertion (LRU vs bimodal insertion by set dueling; experiment)",
        init=dip_init,
        on_hit=to_front,
        on_fill=dip_fill,
        victim=tail,
        params=(
            Param("epsilon", "float", 1 / 32, "BIP's chance of an MRU insertion", low=0, high=1),
            Param("psel_bits", "int", 10, "bits of the dueling counter", low=1, high=30),
        ),
        line_dtype=np.int32,
        line_words=2,
        set_words=2,
        set_major=False,
        reads_access=False,
    )
)
