"""Would the replay loop gain from keeping each set's state in one 128-B block?

The engine keeps a 16-way set's state in three arrays: tags (64 B), valid bits (16 B) and
LRU's recency word (8 B), so an access to a random set touches three host cache lines. This
benchmark runs the same LRU hit/fill loop (8-ahead prefetch, the engine's vector tag match
and packed recency update) on both layouts, in one process, and prints the speed ratio:

- ``separate``: the engine's layout (three arrays, 128-B aligned);
- ``blocked``: one 128-B block per set (tags in bytes 0-63, valid bits in 64-79, the
  recency word in 80-87), two adjacent host lines.

Streams (16 M accesses, 25,600 sets as a 50 MiB / 16-way L2): uniform over 2 M lines (a
scattered stream, ~17% hits), over 300 K and 2 K lines (mostly hits; 2 K: state in L1), and
a skewed Zipf(1.3) stream (~97% hits). Both loops must count the same hits. Medians of 5.

    python benchmarks/bench_set_layout.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from numba import njit

from dsacache.policies.lru import packed_to_front
from dsacache.simulator.engine import ctz, match16, prefetch

SETS = 25_600
WAYS = 16
AHEAD = 8
N = 16_000_000
FULL = 15  # all four sectors valid
IDENTITY = -0x0123456789ABCDF0  # recency word: way k at rank k
BLOCK_WORDS = 32  # int32 words per set block (128 B)
VALID_AT = 64  # byte of the block where the valid bits start
RECENCY_AT = 10  # int64 word of the block holding the recency word (bytes 80-87)


@njit(nogil=True)
def separate(sets, tag_of, tags, valid, recency):
    hits = 0
    n = len(sets)
    for i in range(n):
        if i + AHEAD < n:
            a = sets[i + AHEAD]
            prefetch(tags, a * WAYS)
            prefetch(valid, a * WAYS)
            prefetch(recency, a)
        s = sets[i]
        m = match16(tags, s * WAYS, tag_of[i])
        if m:
            w = ctz(m)
            hits += valid[s * WAYS + w] == FULL
        else:
            w = (recency[s] >> 60) & 15
            tags[s * WAYS + w] = tag_of[i]
            valid[s * WAYS + w] = FULL
        recency[s] = packed_to_front(recency[s], w)
    return hits


@njit(nogil=True)
def blocked(sets, tag_of, words, raw, longs):
    hits = 0
    n = len(sets)
    for i in range(n):
        if i + AHEAD < n:
            a = sets[i + AHEAD]
            prefetch(words, a * BLOCK_WORDS)
            prefetch(words, a * BLOCK_WORDS + BLOCK_WORDS // 2)
        s = sets[i]
        m = match16(words, s * BLOCK_WORDS, tag_of[i])
        r = s * (BLOCK_WORDS // 2) + RECENCY_AT
        if m:
            w = ctz(m)
            hits += raw[s * 4 * BLOCK_WORDS + VALID_AT + w] == FULL
        else:
            w = (longs[r] >> 60) & 15
            words[s * BLOCK_WORDS + w] = tag_of[i]
            raw[s * 4 * BLOCK_WORDS + VALID_AT + w] = FULL
        longs[r] = packed_to_front(longs[r], w)
    return hits


def aligned(nbytes: int) -> np.ndarray:
    """Zeroed bytes starting on a 128-B boundary."""
    buf = np.zeros(nbytes + 128, np.uint8)
    start = -buf.ctypes.data % 128
    return buf[start : start + nbytes]


def run_separate(sets: np.ndarray, tag_of: np.ndarray) -> tuple[float, int]:
    tags = aligned(SETS * WAYS * 4 + 64).view(np.int32)  # padded for the vector compare
    tags[:] = -1
    valid = aligned(SETS * WAYS)
    recency = aligned(SETS * 8).view(np.int64)
    recency[:] = IDENTITY
    t = time.perf_counter()
    hits = separate(sets, tag_of, tags, valid, recency)
    return time.perf_counter() - t, hits


def run_blocked(sets: np.ndarray, tag_of: np.ndarray) -> tuple[float, int]:
    raw = aligned(SETS * 4 * BLOCK_WORDS + 64)
    words, longs = raw.view(np.int32), raw.view(np.int64)
    words[: SETS * BLOCK_WORDS].reshape(SETS, BLOCK_WORDS)[:, :WAYS] = -1
    longs[: SETS * BLOCK_WORDS // 2].reshape(SETS, BLOCK_WORDS // 2)[:, RECENCY_AT] = IDENTITY
    t = time.perf_counter()
    hits = blocked(sets, tag_of, words, raw, longs)
    return time.perf_counter() - t, hits


def stream(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Line numbers of a stream, scattered over 2 M lines by a fixed permutation."""
    if kind == "zipf(1.3)":
        ranks = rng.zipf(1.3, N) % 2_000_000
    else:
        ranks = rng.integers(0, int(kind.split()[1]), N)
    return rng.permutation(2_000_000)[ranks].astype(np.int64)


def main() -> None:
    rng = np.random.default_rng(0)
    small = np.arange(64, dtype=np.int64)
    run_separate(small % SETS, small)  # compile both before timing
    run_blocked(small % SETS, small)
    print(f"{'stream':<16}{'separate M/s':>14}{'blocked M/s':>14}{'blocked/separate':>18}")
    for kind in ("uniform 2000000", "uniform 300000", "uniform 2000", "zipf(1.3)"):
        lines = stream(kind, rng)
        sets, tag_of = lines % SETS, lines
        times = {"separate": [], "blocked": []}
        hits = set()
        for _ in range(5):
            for name, fn in (("separate", run_separate), ("blocked", run_blocked)):
                seconds, h = fn(sets, tag_of)
                times[name].append(seconds)
                hits.add(h)
        if len(hits) != 1:
            raise SystemExit(f"MISMATCH on {kind}: hits {sorted(hits)}")
        sep, blk = (statistics.median(times[k]) for k in ("separate", "blocked"))
        print(f"{kind:<16}{N / sep / 1e6:>14.1f}{N / blk / 1e6:>14.1f}{sep / blk:>18.3f}")


if __name__ == "__main__":
    main()
