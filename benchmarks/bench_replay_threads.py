"""Several policies in one replay: one thread against one thread per policy, same process.

``dsacache.replay`` runs each policy's cache on its own thread for every step (the compiled
replay loops release the GIL) while the next step's stream is built in the background. This
prints the median wall time of ``threads=1`` and of the default (one per policy, up to the
CPU count), alternating, and their ratio; the results must be identical (exit 1 otherwise).

    python benchmarks/bench_replay_threads.py [--trace deepseek|bundled] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    import dsacache
    from dsacache.tracer import preset, synthesize
    from dsacache.traces import MAIN_TRACE, open_trace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", choices=["deepseek", "bundled"], default="deepseek")
    p.add_argument("--steps", type=int, default=8, help="steps of the DeepSeek-V3.2 trace")
    p.add_argument("--policies", default="lru;hints:index=first;fifo;reserve:bytes=16MiB")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    policies = args.policies.split(";")
    with tempfile.TemporaryDirectory() as tmp:
        if args.trace == "bundled":
            trace, workload = open_trace(MAIN_TRACE), dsacache.Workload(batch=4)
        else:
            path = synthesize(preset("deepseek-v3.2", steps=args.steps), f"{tmp}/d.dsatrace")
            trace, workload = open_trace(path), dsacache.Workload(batch=1)
        reference = dsacache.replay(trace, policies=policies, workload=workload, threads=1)
        times: dict[str, list[float]] = {"1 thread": [], "default": []}
        for _ in range(args.repeats):
            for label, threads in (("1 thread", 1), ("default", None)):
                start = time.perf_counter()
                df = dsacache.replay(trace, policies=policies, workload=workload, threads=threads)
                times[label].append(time.perf_counter() - start)
                if not df.equals(reference):
                    print(f"MISMATCH: threads={threads} differs from threads=1")
                    sys.exit(1)
    one, many = statistics.median(times["1 thread"]), statistics.median(times["default"])
    print(f"{args.trace} trace, policies {', '.join(policies)}; {os.cpu_count()} CPUs")
    print(f"  threads=1:       {one:7.3f} s")
    print(f"  default threads: {many:7.3f} s")
    print(f"  ratio 1 thread / default: {one / many:.2f}x (identical results)")


if __name__ == "__main__":
    main()
