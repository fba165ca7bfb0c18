"""Sweep speed-up from 1 to 2 Dask worker processes, same grid, same run.

The grid replays the bundled real trace (SmolLM2-135M, k=64, 128 steps, 30 layers) under
2 policies x 2 cache sizes x 2 batch sizes = 8 cells. Each cluster is started once, every
worker compiles the policies on a tiny trace first (``client.run``), then the whole sweep is
timed ``--repeats`` times into fresh directories; the median is reported. Cluster start-up
and Numba compilation are outside the timed region: they are paid once per sweep, not per
cell.

    python benchmarks/bench_sweep.py [--repeats 3] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from dsacache.simulator.sweep import run_sweep
from dsacache.traces import bundled_path, open_trace

GRID = {
    "policy": ["lru", "token-lru"],
    "cache_size": ["8MiB", "32MiB"],
    "batch": [2, 4],
}


def _warm(policies: list[str]) -> None:
    """Compile every policy in this worker process (runs on each worker)."""
    from dsacache.simulator import Workload, replay
    from dsacache.tracer import SynthConfig, synthesize
    from dsacache.traces import open_trace

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(layers=1, context=256, steps=2, k=16)
        tr = open_trace(synthesize(cfg, Path(tmp) / "w.dsatrace"))
        replay(tr, policies=policies, cache_size="1MiB", workload=Workload())


def bench(trace, workers: int, repeats: int) -> list[float]:
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm, GRID["policy"])
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                res = run_sweep(trace, GRID, Path(tmp) / "sw", client=client)
                times.append(time.perf_counter() - t)
                assert len(res.ran) == 8
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    trace = open_trace(bundled_path("smollm2-135m-oracle-k64"))
    counts = [int(w) for w in args.workers.split(",")]
    print(f"grid: {GRID} on {trace.path.name}; median of {args.repeats} run(s)")
    print(f"{'workers':>7} {'median s':>9} {'runs':>24} {'speed-up':>9}")
    base = None
    for w in counts:
        times = bench(trace, w, args.repeats)
        med = statistics.median(times)
        base = base or med
        runs = " ".join(f"{t:.2f}" for t in times)
        print(f"{w:>7} {med:9.2f} {runs:>24} {base / med:9.2f}x")


if __name__ == "__main__":
    main()
