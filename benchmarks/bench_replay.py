"""Line accesses per second of dsacache's Numba engine against peer simulators, same streams.

Streams (line addresses; every access is one aligned 128 B line unless said otherwise):
- ``zipf``: bounded Zipf (alpha 0.99) over 2 M lines, ranks scattered by a fixed permutation;
- ``dsa``: the decode stream of a synthetic DeepSeek-V3.2 trace (4 steps, 16K context, default
  workload), its accesses split into the lines they touch. The ``raw`` row replays the
  stream as built (unaligned multi-sector reads and the KV appends as writes).

Engines, each timed on its replay only (building the cache, converting the stream to the
peer's input and Numba's compilation are outside the timer), median of 3 runs:
- dsacache (Numba), set-associative LRU 50 MiB, 16 ways, ``Cache.run``: the baseline;
- pycachesim 0.3.1 (C), same geometry, ``CacheSimulator.load(list_of_addresses, length=1)``;
- libCacheSim 0.3.5 (C) LRU, fully associative, 50 MiB of 128 B objects, ``process_trace``
  over an oracleGeneral file (its C fast path), next to dsacache's own fully-associative
  engine (``token-lru``) on the same objects;
- dsacache's pure-Python ``ReferenceCache`` on a prefix of the stream.
A peer library that does not import is named and its rows left out; without libCacheSim the
token engine's misses are checked against ``ReferenceCache`` as one fully-associative set
over the whole stream (untimed, about a minute). Miss counts of engines
that model the same cache must be identical; a difference is printed
as MISMATCH and the script exits with status 1. All in one process, pinned to one core.

    python benchmarks/bench_replay.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LINE = 128
SIZE = 50 * 2**20
WAYS = 16
OBJECTS = SIZE // LINE  # capacity of the fully-associative caches, in lines
SET_ASSOC = "set-assoc LRU 50MiB/16w"
FULLY_ASSOC = f"fully-assoc LRU {OBJECTS} lines"


@dataclass
class Row:
    engine: str
    cache: str
    stream: str
    accesses: int  # line accesses replayed per run
    seconds: float  # median
    misses: int | None  # line misses, None where not comparable
    group: str | None  # rows of one group model the same cache on the same accesses

    @property
    def rate(self) -> float:
        return self.accesses / self.seconds


def median_time(setup: Callable, run: Callable, repeat: int) -> tuple[float, object]:
    """Median wall time of ``run(setup())`` over ``repeat`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        state = setup()
        t = time.perf_counter()
        out = run(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ------------------------------------------------------------------------------- streams


def zipf_lines(n: int, universe: int, alpha: float = 0.99, seed: int = 0) -> np.ndarray:
    """``n`` line numbers, Zipf(alpha) over ``universe`` lines (inverse-CDF sampling)."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, universe + 1, dtype=np.float64) ** alpha)
    ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    ranks = np.minimum(ranks, universe - 1)
    return rng.permutation(universe).astype(np.int64)[ranks]


def dsa_stream(steps: int, context: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(addr, nbytes, is_write) of the decode stream of a synthetic DeepSeek-V3.2 trace."""
    from dsacache.simulator import Workload, iter_stream, plan_replay
    from dsacache.simulator.workload import CLASS_ID, WRITE_CLASSES
    from dsacache.tracer import preset, synthesize
    from dsacache.traces import open_trace

    with tempfile.TemporaryDirectory() as tmp:
        path = synthesize(
            preset("deepseek-v3.2", steps=steps, context=context), f"{tmp}/t.dsatrace"
        )
        trace = open_trace(path)
        chunks = list(iter_stream(trace, plan_replay(trace, Workload())))
    addr = np.concatenate([c.addr for c in chunks]).astype(np.int64)
    nbytes = np.concatenate([c.nbytes for c in chunks]).astype(np.int64)
    klass = np.concatenate([c.cls for c in chunks])
    is_write = np.isin(klass, [CLASS_ID[c] for c in WRITE_CLASSES])
    return addr, nbytes, is_write


# ------------------------------------------------------------------------------- engines


def numba_setup():
    from dsacache.simulator import Cache, CacheConfig

    return Cache(CacheConfig.of(SIZE, ways=WAYS), "lru")


def numba_run(cache, addr, nbytes, is_write, bucket) -> int:
    """Line misses of reads (sector-complete line hits count as hits)."""
    from dsacache.simulator.reference import COUNTERS

    counters = np.zeros((1, len(COUNTERS)), np.int64)
    cache.run(addr, nbytes, is_write, bucket, counters)
    return int(counters[0, 0] - counters[0, 1])


def pycachesim_setup():
    import cachesim

    mem = cachesim.MainMemory()
    l2 = cachesim.Cache("L2", SIZE // (WAYS * LINE), WAYS, LINE, "LRU")
    mem.load_to(l2)
    mem.store_from(l2)
    return cachesim.CacheSimulator(l2, mem), l2


def pycachesim_run(state, addr_list: list) -> int:
    sim, l2 = state
    sim.load(addr_list, length=1)
    return l2.stats()["MISS_count"]


def write_oracle_general(lines: np.ndarray, path: str) -> None:
    """libCacheSim's oracleGeneral binary trace: per request, packed little-endian
    (u32 time, u64 object id, u32 object size, i64 next access), here size 1 per line."""
    rec = np.empty(
        len(lines), np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    )
    rec["t"] = np.arange(len(lines)) & 0xFFFFFFFF
    rec["id"] = lines
    rec["size"] = 1
    rec["next"] = -1
    rec.tofile(path)


def libcachesim_setup(path: str):
    import libcachesim

    reader = libcachesim.TraceReader(path, libcachesim.TraceType.ORACLE_GENERAL_TRACE)
    return libcachesim.LRU(cache_size=OBJECTS), reader


def libcachesim_run(state, n: int) -> int:
    cache, reader = state
    miss_ratio, _ = cache.process_trace(reader)
    return round(miss_ratio * n)


def token_setup():
    from dsacache.simulator import CacheConfig
    from dsacache.simulator.caches import make_model

    return make_model(CacheConfig(SIZE, 1), "token-lru")


def token_run(model, addr, nbytes, is_write, klass, layer, bucket) -> int:
    from dsacache.simulator.reference import COUNTERS

    counters = np.zeros((1, len(COUNTERS)), np.int64)
    model.run_chunk(addr, nbytes, is_write, klass, layer, bucket, counters)
    return int(counters[0, 0] - counters[0, 1])


def reference_setup():
    from dsacache.simulator.reference import ReferenceCache

    return ReferenceCache(SIZE, WAYS)


def reference_run(ref, addr_list: list) -> int:
    for a in addr_list:
        ref.access(a, LINE)
    c = ref.counts[()]
    return c["accesses"] - c["line_hits"]


# ---------------------------------------------------------------------------- benchmark


def time_pycachesim(addr: np.ndarray, repeat: int) -> tuple[float, int]:
    addr_list = addr.tolist()
    return median_time(pycachesim_setup, lambda s: pycachesim_run(s, addr_list), repeat)


def importable_peers() -> dict[str, str]:
    """The peer libraries that import here (module name -> version); each one that does not
    is named with its error, and its rows are left out (libCacheSim's wheel needs the
    system's GLib, which some machines lack)."""
    import importlib

    peers = {}
    for module in ("cachesim", "libcachesim"):
        try:
            peers[module] = getattr(importlib.import_module(module), "__version__", "?")
        except ImportError as e:
            print(f"{module} does not import ({e}): its rows are left out")
    return peers


def bench_lines(
    name: str, lines: np.ndarray, ref_prefix: int, repeat: int, tmp: str, peers: dict[str, str]
) -> list:
    """Every engine on the aligned line stream ``lines`` (of the peers, those in ``peers``)."""
    from dsacache.simulator.workload import CLASS_ID

    n = len(lines)
    addr = lines * LINE
    nbytes = np.full(n, LINE, np.int64)
    reads = np.zeros(n, np.bool_)
    bucket = np.zeros(n, np.int64)
    rows = []

    t, miss = median_time(numba_setup, lambda c: numba_run(c, addr, nbytes, reads, bucket), repeat)
    rows.append(Row("dsacache Numba", SET_ASSOC, name, n, t, miss, "set"))

    if "cachesim" in peers:
        t, miss = time_pycachesim(addr, repeat)  # its Python list lives only in there
        rows.append(Row("pycachesim C", SET_ASSOC, name, n, t, miss, "set"))

    if "libcachesim" in peers:
        path = os.path.join(tmp, f"{name}.oracleGeneral.bin")
        write_oracle_general(lines, path)
        t, miss = median_time(
            lambda: libcachesim_setup(path), lambda s: libcachesim_run(s, n), repeat
        )
        rows.append(Row("libCacheSim LRU", FULLY_ASSOC, name, n, t, miss, "full"))
        os.remove(path)

    klass = np.full(n, CLASS_ID["kv"], np.int8)  # every line is one token-engine object
    layer = np.zeros(n, np.int16)
    t, miss = median_time(
        token_setup, lambda m: token_run(m, addr, nbytes, reads, klass, layer, bucket), repeat
    )
    rows.append(Row("dsacache token-lru", FULLY_ASSOC, name, n, t, miss, "full"))
    if "libcachesim" not in peers:  # the misses still checked: the Python reference, untimed
        from dsacache.simulator.reference import ReferenceCache

        print(f"{name}: token-lru checked against the Python reference instead (slow)")
        miss = reference_run(ReferenceCache(SIZE, OBJECTS), addr.tolist())
        rows.append(Row("dsacache reference (Python)", FULLY_ASSOC, name, n, 0.0, miss, "full"))

    m = min(ref_prefix, n)
    prefix = addr[:m].tolist()
    t, miss = median_time(reference_setup, lambda r: reference_run(r, prefix), repeat)
    rows.append(Row("dsacache reference (Python)", SET_ASSOC, f"{name}[:{m}]", m, t, miss, "ref"))
    # the Numba engine on the same prefix, untimed, for the miss check
    ours = numba_run(numba_setup(), addr[:m], nbytes[:m], reads[:m], bucket[:m])
    rows.append(Row("dsacache Numba", SET_ASSOC, f"{name}[:{m}]", m, 0.0, ours, "ref"))
    return rows


def bench_raw(name: str, addr, nbytes, is_write, repeat: int) -> Row:
    """The Numba engine on the DSA stream as built: sectored, unaligned, with writes."""
    from dsacache.simulator.engine import line_numbers

    n_lines = len(line_numbers(addr, nbytes, LINE))
    bucket = np.zeros(len(addr), np.int64)
    t, miss = median_time(
        numba_setup, lambda c: numba_run(c, addr, nbytes, is_write, bucket), repeat
    )
    return Row("dsacache Numba (raw, sectored)", SET_ASSOC, name, n_lines, t, miss, None)


def warm_up() -> None:
    """Compile the Numba kernels outside the timers."""
    from dsacache.simulator.workload import CLASS_ID

    n = 1000
    addr = np.arange(n, dtype=np.int64) * LINE
    nbytes = np.full(n, LINE, np.int64)
    reads, bucket = np.zeros(n, np.bool_), np.zeros(n, np.int64)
    numba_run(numba_setup(), addr, nbytes, reads, bucket)
    klass = np.full(n, CLASS_ID["kv"], np.int8)
    token_run(token_setup(), addr, nbytes, reads, klass, np.zeros(n, np.int16), bucket)


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_table(rows: list[Row]) -> None:
    base = {r.stream: r.rate for r in rows if r.engine == "dsacache Numba" and r.seconds}
    head = (
        f"{'engine':<31} {'cache':<30} {'stream':<14} {'accesses':>11} "
        f"{'M acc/s':>8} {'vs Numba':>8} {'misses':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if not r.seconds:
            continue  # untimed check rows
        ref = base.get(r.stream, base.get(r.stream.split("[")[0]))
        print(
            f"{r.engine:<31} {r.cache:<30} {r.stream:<14} {r.accesses:>11,} "
            f"{r.rate / 1e6:8.2f} {r.rate / ref:8.3f} {'' if r.misses is None else r.misses:>11}"
        )


def check_misses(rows: list[Row]) -> bool:
    ok = True
    keys = {(r.group, r.stream) for r in rows if r.group}
    for group, stream in sorted(keys):
        same = [r for r in rows if r.group == group and r.stream == stream]
        counts = {r.misses for r in same}
        names = ", ".join(f"{r.engine}={r.misses}" for r in same)
        if len(same) == 1:
            print(f"unchecked      {stream:<14} {same[0].cache}: {names} (no peer ran)")
        elif len(counts) == 1:
            print(f"misses agree   {stream:<14} {same[0].cache}: {names}")
        else:
            ok = False
            print(f"MISMATCH       {stream:<14} {same[0].cache}: {names}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small streams, < 60 s")
    args = p.parse_args()
    if args.quick:
        zipf_n, universe, steps, context, ref_prefix = 1_000_000, 2_000_000, 1, 8192, 50_000
    else:
        zipf_n, universe, steps, context, ref_prefix = 16_000_000, 2_000_000, 4, 16384, 200_000
    repeat = 3

    import numba

    from dsacache.simulator.engine import line_numbers

    peers = importable_peers()
    versions = "".join(f", {m} {v}" for m, v in peers.items())
    print(
        f"{cpu_name()}; {pin_one_core()}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, numba {numba.__version__}{versions}; median of {repeat} runs"
    )
    t0 = time.perf_counter()
    warm_up()
    print(f"JIT warm-up {time.perf_counter() - t0:.1f} s")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        zipf = zipf_lines(zipf_n, universe)
        print(f"zipf stream: {zipf_n:,} line accesses over {universe:,} lines")
        rows += bench_lines("zipf", zipf, ref_prefix, repeat, tmp, peers)
        del zipf

        addr, nbytes, is_write = dsa_stream(steps, context)
        dsa = line_numbers(addr, nbytes, LINE)
        print(
            f"dsa stream: deepseek-v3.2, {steps} step(s), context {context}: {len(addr):,} "
            f"accesses ({int(is_write.sum())} writes) = {len(dsa):,} line accesses"
        )
        rows += bench_lines("dsa", dsa, ref_prefix, repeat, tmp, peers)
        rows.append(bench_raw("dsa", addr, nbytes, is_write, repeat))
        del dsa, addr, nbytes, is_write
    print(f"benchmark {time.perf_counter() - t0:.1f} s\n")

    print_table(rows)
    print()
    ok = check_misses(rows)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"\npeak RSS {rss / 1024:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
