"""Peak memory of a streaming replay: bounded by one decode step's stream, not by the trace.

Synthesizes a DeepSeek-V3.2-shaped trace (61 layers, k=2048, 32K context) with enough steps
for >= 1e8 line accesses, replays it with LRU on the H100 L2 model, and prints line accesses,
throughput and peak RSS, next to the RSS before the replay and the size of the trace's
access stream if it were held in memory (16 bytes per access). Goal: peak < 1 GiB.

    python benchmarks/bench_memory.py [--steps 40] [--context 32768]

At billion-access scale (issue 12's goal: peak < 2 GiB), ``--steps 120 --context 131072``:
1.08e9 line accesses, peak RSS 891 MiB, 46 s (23 M accesses/s on a shared 2-core machine,
2026-12-01).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--context", type=int, default=32768)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ds.dsatrace"
        # synthesize in a child process so that its memory does not count here
        code = (
            "from dsacache.tracer import preset, synthesize; "
            f"synthesize(preset('deepseek-v3.2', steps={args.steps}, context={args.context}), {path!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        import dsacache

        trace = dsacache.open_trace(path)
        dsacache.replay(trace, policies=["lru"], cache_size="50MiB")  # compile, warm up
        before = rss_mib()
        t = time.perf_counter()
        df = dsacache.replay(trace, policies=["lru"], cache_size="50MiB")
        wall = time.perf_counter() - t
        peak = rss_mib()
    lines = int(df["accesses"].sum())
    stream_mib = lines * 16 / 2**20
    print(f"trace: {args.steps} steps x 61 layers, k=2048, context {args.context}")
    print(f"line accesses          {lines:,}")
    print(
        f"replay wall            {wall:.1f} s ({lines / wall / 1e6:.1f} M line accesses/s, stream building included)"
    )
    print(f"RSS before replay      {before:.0f} MiB")
    print(f"peak RSS               {peak:.0f} MiB (goal < 1024)")
    print(
        f"whole stream in memory would be {stream_mib:,.0f} MiB; peak / that = {peak / stream_mib:.3f}"
    )


if __name__ == "__main__":
    main()
