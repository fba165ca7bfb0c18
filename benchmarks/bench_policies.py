"""Throughput of every registered policy relative to plain LRU, same stream, same run.

The stream is a DeepSeek-V3.2-shaped decode (61 layers, k = 2048, 16K context, 3 steps)
replayed through the 50 MiB H100 L2 model with ``dsacache.replay`` (stream building included,
so the ratio is what a user sees). Median of 3 runs. Goal: no policy below 1/4 of LRU, OPT
excepted.

    python benchmarks/bench_policies.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import dsacache
from dsacache.policies import registered
from dsacache.tracer import preset, synthesize

SPECS = {"reserve": "reserve:bytes=16MiB", "hints": "hints:index=first"}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trace = dsacache.open_trace(
            synthesize(preset("deepseek-v3.2", steps=3, context=16384), f"{tmp}/t.dsatrace")
        )
        names = sorted(n for n in registered() if n != "lip")
        results = {}
        for name in names:
            spec = SPECS.get(name, name)
            dsacache.replay(trace, policies=[spec], cache_size="50MiB")  # compile
            times = []
            for _ in range(3):
                t = time.perf_counter()
                df = dsacache.replay(trace, policies=[spec], cache_size="50MiB")
                times.append(time.perf_counter() - t)
            results[spec] = (statistics.median(times), int(df["accesses"].sum()))
    base = results["lru"][0]
    print(f"{'policy':<24} {'seconds':>8} {'M line acc/s':>13} {'vs lru':>7}")
    for spec, (t, acc) in sorted(results.items(), key=lambda kv: kv[1][0]):
        flag = "" if base / t >= 0.25 or "belady" in spec else "  < 1/4 of LRU"
        print(f"{spec:<24} {t:8.2f} {acc / t / 1e6:13.1f} {base / t:7.2f}{flag}")


if __name__ == "__main__":
    main()
