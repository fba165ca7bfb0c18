"""Re-reference interval prediction: SRRIP, BRRIP and DRRIP (Jaleel, Theobald, Steely and Emer,
"High Performance Cache Replacement Using Re-Reference Interval Prediction (RRIP)", ISCA 2010).

Every line holds an M-bit re-reference prediction value (RRPV; ``bits`` = M, max = 2**M - 1 =
"distant"). A hit sets the line's RRPV to 0 (the paper's hit-priority variant, RRIP-HP). The
victim is the first way (lowest way index) whose RRPV is the maximum; if no line has it, every
RRPV of the set is incremented until one does (done here in one step: add the difference
between the maximum and the set's largest RRPV to all lines).

- ``srrip``: a filled line gets RRPV = max - 1 ("long" re-reference interval): scan-resistant.
- ``brrip``: a filled line gets RRPV = max ("distant"), and max - 1 only with probability
  ``epsilon`` (paper: 1/32): thrash-resistant, the RRIP analogue of BIP.
- ``drrip``: set dueling (Qureshi et al., "Adaptive insertion policies for high performance
  caching", ISCA 2007). The sets are cut into ``leaders`` constituencies of ``n_sets //
  leaders`` consecutive sets; constituency ``k`` dedicates one set to SRRIP and one to BRRIP
  (offsets ``k mod C`` and ``(k + C/2) mod C``, so leaders spread over the index). A fill (a
  miss) in an SRRIP leader increments the saturating ``psel_bits`` counter PSEL, one in a BRRIP
  leader decrements it; the follower sets use BRRIP while PSEL's top bit is set and SRRIP
  otherwise. PSEL starts just below the midpoint (followers start as SRRIP). With fewer sets
  than ``2 * leaders`` there are ``n_sets // 2`` leaders of each kind; a single set has none and
  is plain SRRIP.

The BRRIP coin is a 64-bit LCG in ``glob[4]`` (bits 33..63 of the state), drawn once per fill
that uses BRRIP, so runs are reproducible from ``seed``. PSEL is ``glob[5]``.
"""

import numpy as np
from numba import njit

from dsacache.policies.base import Param, PolicyType, register

_LCG_MUL = 6364136223846793005
_LCG_ADD = 1442695040888963407
FOLLOWER, SRRIP_LEADER, BRRIP_LEADER = 0, 1, 2


@njit(inline="always")
def _coin(glob, epsilon):
    """True with probability ``epsilon``: the next LCG draw as 31 bits against epsilon."""
    x = glob[4] * _LCG_MUL + _LCG_ADD  # wraps modulo 2**64
    glob[4] = x
    return ((x >> 33) & 0x7FFFFFFF) < epsilon * 2147483648.0


@njit(inline="always")
def _rrip_victim(line_state, s, ways, distant):
    base = s * ways
    top = line_state[base]
    first = 0
    for w in range(1, ways):
        v = line_state[base + w]
        if v > top:
            top = v
            first = w
    if top < distant:
        gap = distant - top
        for w in range(ways):
            line_state[base + w] += gap
    return first


@njit(inline="always")
def on_hit(line_state, set_state, glob, s, way, ways, clock, params):
    line_state[s * ways + way] = 0


# ---------------------------------------------------------------- SRRIP: params (bits,)


@njit(inline="always")
def srrip_init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = (1 << int(params[0])) - 1


@njit(inline="always")
def srrip_fill(line_state, set_state, glob, s, way, ways, clock, params):
    line_state[s * ways + way] = (1 << int(params[0])) - 2


@njit(inline="always")
def srrip_victim(line_state, set_state, glob, s, ways, clock, params):
    return _rrip_victim(line_state, s, ways, (1 << int(params[0])) - 1)


# ------------------------------------------------------ BRRIP: params (bits, epsilon, seed)


@njit(inline="always")
def brrip_init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = (1 << int(params[0])) - 1
    glob[4] = int(params[2])


@njit(inline="always")
def brrip_fill(line_state, set_state, glob, s, way, ways, clock, params):
    distant = (1 << int(params[0])) - 1
    line_state[s * ways + way] = distant - 1 if _coin(glob, params[1]) else distant


# ---------------------------------- DRRIP: params (bits, psel_bits, leaders, epsilon, seed)


@njit(inline="always")
def drrip_init(line_state, set_state, glob, n_sets, ways, params):
    line_state[:] = (1 << int(params[0])) - 1
    set_state[:] = FOLLOWER
    leaders = min(int(params[2]), n_sets // 2)
    if leaders > 0:
        size = n_sets // leaders
        for k in range(leaders):
            set_state[k * size + k % size] = SRRIP_LEADER
            set_state[k * size + (k + size // 2) % size] = BRRIP_LEADER
    glob[4] = int(params[4])
    glob[5] = (1 << (int(params[1]) - 1)) - 1


@njit(inline="always")
def drrip_fill(line_state, set_state, glob, s, way, ways, clock, params):
    distant = (1 << int(params[0])) - 1
    role = set_state[s]
    if role == SRRIP_LEADER:
        glob[5] = min(glob[5] + 1, (1 << int(params[1])) - 1)
        brrip = False
    elif role == BRRIP_LEADER:
        glob[5] = max(glob[5] - 1, 0)
        brrip = True
    else:
        brrip = glob[5] >= 1 << (int(params[1]) - 1)
    if brrip and not _coin(glob, params[3]):
        line_state[s * ways + way] = distant
    else:
        line_state[s * ways + way] = distant - 1


_BITS = Param("bits", "int", 2, "RRPV bits per line (max RRPV = 2**bits - 1)", low=1, high=7)
_EPSILON = Param(
    "epsilon",
    "float",
    1 / 32,
    "probability that BRRIP inserts long instead of distant",
    low=0.0,
    high=1.0,
)
_SEED = Param("seed", "int", 0, "seed of BRRIP's coin", low=0)

SRRIP = register(
    PolicyType(
        name="srrip",
        description="static RRIP (ISCA'10): insert at RRPV max-1, hit -> 0, evict an RRPV=max line",
        init=srrip_init,
        on_hit=on_hit,
        on_fill=srrip_fill,
        victim=srrip_victim,
        params=(_BITS,),
        line_dtype=np.int32,
        reads_access=False,
    )
)

BRRIP = register(
    PolicyType(
        name="brrip",
        description="bimodal RRIP (ISCA'10): insert at RRPV max, at max-1 with probability epsilon",
        init=brrip_init,
        on_hit=on_hit,
        on_fill=brrip_fill,
        victim=srrip_victim,
        params=(_BITS, _EPSILON, _SEED),
        line_dtype=np.int32,
        reads_access=False,
    )
)

DRRIP = register(
    PolicyType(
        name="drrip",
        description="dynamic RRIP (ISCA'10): SRRIP vs BRRIP by set dueling with a PSEL counter",
        init=drrip_init,
        on_hit=on_hit,
        on_fill=drrip_fill,
        victim=srrip_victim,
        params=(
            _BITS,
            Param("psel_bits", "int", 10, "bits of the policy-selection counter", low=1, high=30),
            Param("leaders", "int", 32, "leader sets per policy", low=1),
            _EPSILON,
            _SEED,
        ),
        line_dtype=np.int32,
        reads_access=False,
    )
)
