"""Replay throughput of dsacache's Numba engines against peers, on the same streams, one run.

Streams: a Zipf stream of line addresses and the line stream of a DeepSeek-V3.2-shaped decode
(61 layers, k = 2048, 16K context). Engines:
- set-associative LRU, 50 MiB, 16 ways: dsacache (Numba) vs pycachesim's C loop
  (``CacheSimulator.load(list)``) vs dsacache's pure-Python reference (on a prefix);
- fully-associative LRU over objects: dsacache's token-granularity engine vs libCacheSim's LRU
  (``process_trace`` on an oracleGeneral file).
Miss counts must agree between engines of the same kind (checked, printed). Throughput is the
median of 3 runs, in million accesses per second, with the ratio to dsacache's engine.

    python benchmarks/bench_replay.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np

LINE = 128
CAPACITY = 65536  # objects of the fully-associative caches


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def zipf_lines(n: int, universe: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.zipf(1.2, n) % universe).astype(np.int64)


def dsa_lines(n: int) -> np.ndarray:
    from dsacache.simulator import Workload, iter_stream, plan_replay
    from dsacache.simulator.engine import line_numbers
    from dsacache.tracer import preset, synthesize
    from dsacache.traces import open_trace

    with tempfile.TemporaryDirectory() as tmp:
        trace = open_trace(
            synthesize(preset("deepseek-v3.2", steps=4, context=16384), f"{tmp}/t.dsatrace")
        )
        lines, total = [], 0
        for chunk in iter_stream(trace, plan_replay(trace, Workload(classes=("index", "kv")))):
            lines.append(line_numbers(chunk.addr, chunk.nbytes, LINE))
            total += len(lines[-1])
            if total >= n:
                break
    return np.concatenate(lines)[:n]


def dsacache_set_assoc(lines: np.ndarray) -> int:
    from dsacache.simulator import Cache, CacheConfig

    cache = Cache(CacheConfig.of("50MiB", ways=16), "lru")
    n = len(lines)
    counters = np.zeros((1, 7), np.int64)
    cache.run(lines * LINE, np.full(n, LINE), np.zeros(n, bool), np.zeros(n, np.int64), counters)
    return int(counters[0, 0] - counters[0, 1])


def pycachesim_set_assoc(addr_list: list) -> int:
    import cachesim

    mem = cachesim.MainMemory()
    l2 = cachesim.Cache("L2", 50 * 2**20 // (16 * LINE), 16, LINE, "LRU")
    mem.load_to(l2)
    mem.store_from(l2)
    cachesim.CacheSimulator(l2, mem).load(addr_list, length=1)
    return l2.stats()["MISS_count"]


def reference_set_assoc(lines: np.ndarray) -> int:
    from dsacache.simulator.reference import ReferenceCache

    ref = ReferenceCache(50 * 2**20, 16)
    for ln in lines.tolist():
        ref.access(ln * LINE, LINE)
    c = ref.counts[()]
    return c["accesses"] - c["line_hits"]


def dsacache_fully_assoc(lines: np.ndarray, capacity: int) -> int:
    from dsacache.simulator import CacheConfig
    from dsacache.simulator.caches import make_model
    from dsacache.simulator.workload import CLASS_ID

    model = make_model(CacheConfig(capacity * LINE, 1), "token-lru")
    n = len(lines)
    counters = np.zeros((1, 7), np.int64)
    klass = np.full(n, CLASS_ID["kv"], np.int8)
    model.run_chunk(lines * LINE, np.full(n, LINE), np.zeros(n, bool), klass, np.zeros(n, np.int16), np.zeros(n, np.int64), counters)  # fmt: skip
    return int(counters[0, 0] - counters[0, 1])


def libcachesim_fully_assoc(path: str, capacity: int, n: int) -> int:
    import libcachesim as lcs

    reader = lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE)
    miss_ratio, _ = lcs.LRU(cache_size=capacity).process_trace(reader)
    return int(round(miss_ratio * n))


def write_oracle_general(lines: np.ndarray, path: str) -> None:
    rec = np.zeros(
        len(lines), dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")]
    )
    rec["t"] = np.arange(len(lines))
    rec["id"] = lines.astype(np.uint64) + 1
    rec["size"] = 1
    rec["next"] = -1
    rec.tofile(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    n = 2_000_000 if args.quick else 10_000_000
    streams = {"zipf": zipf_lines(n, 2_000_000), "dsa-decode": dsa_lines(n)}
    dsacache_set_assoc(streams["zipf"][:1000])  # compile
    dsacache_fully_assoc(streams["zipf"][:1000], 64)
    rows = []
    for name, lines in streams.items():
        t_ours, miss_ours = timed(lambda lines=lines: dsacache_set_assoc(lines))
        as_list = (lines * LINE).tolist()
        t_pcs, miss_pcs = timed(lambda as_list=as_list: pycachesim_set_assoc(as_list))
        prefix = lines[: 100_000 if args.quick else 200_000]
        t_ref, _ = timed(lambda prefix=prefix: reference_set_assoc(prefix), repeat=1)
        t_ref *= len(lines) / len(prefix)  # per-access rate of the prefix, scaled
        rows += [
            (name, "set-assoc LRU 50 MiB", "dsacache (Numba)", t_ours, 1.0, miss_ours),
            (name, "set-assoc LRU 50 MiB", "pycachesim (C)", t_pcs, t_ours / t_pcs, miss_pcs),
            (
                name,
                "set-assoc LRU 50 MiB",
                "dsacache reference (Python)",
                t_ref,
                t_ours / t_ref,
                None,
            ),
        ]
        t_fa, miss_fa = timed(lambda lines=lines: dsacache_fully_assoc(lines, CAPACITY))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "t.oracleGeneral.bin")
            write_oracle_general(lines, path)
            t_lcs, miss_lcs = timed(lambda path=path: libcachesim_fully_assoc(path, CAPACITY, n))
        rows += [
            (name, "fully-assoc LRU 64K objects", "dsacache token engine", t_fa, 1.0, miss_fa),
            (
                name,
                "fully-assoc LRU 64K objects",
                "libCacheSim process_trace",
                t_lcs,
                t_fa / t_lcs,
                miss_lcs,
            ),
        ]
    print(
        f"{'stream':<11} {'cache':<28} {'engine':<28} {'M acc/s':>8} {'vs dsacache':>11} {'misses':>12}"
    )
    for stream, cache, engine, t, ratio, misses in rows:
        n_acc = len(streams[stream])
        print(
            f"{stream:<11} {cache:<28} {engine:<28} {n_acc / t / 1e6:8.1f} {ratio:11.2f} "
            f"{'' if misses is None else misses:>12}"
        )
    for stream in streams:
        for cache in {r[1] for r in rows}:
            counts = {r[5] for r in rows if r[0] == stream and r[1] == cache and r[5] is not None}
            if len(counts) > 1:
                print(f"MISMATCH: {stream}, {cache}: engines disagree on misses {sorted(counts)}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
