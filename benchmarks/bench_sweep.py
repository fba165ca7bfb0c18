"""Sweep speed-up from 1 to 2 Dask worker processes, same grid, same run.

The grid replays the bundled real trace (SmolLM2-135M, k=64, 128 steps, 30 layers) under
2 policies x 2 cache sizes x 2 batch sizes = 8 cells. Each cluster is started once, every
worker compiles the policies on a tiny trace first (``client.run``), then the whole sweep is
timed ``--repeats`` times into fresh directories, the cluster sizes interleaved so that load
from other processes hits both alike; the median is reported. Cluster start-up and Numba
compilation are outside the timed region: they are paid once per sweep, not per cell.
"cells at once" is the workers' compute time over wall time (from Dask's task stream): it
shows whether the workers ran side by side even when other processes slow them all down.

    python benchmarks/bench_sweep.py [--repeats 3] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster, get_task_stream

from dsacache.simulator.sweep import run_sweep
from dsacache.traces import bundled_path, open_trace

GRID = {
    "policy": ["lru", "token-lru"],
    "cache_size": ["8MiB", "16MiB", "32MiB", "64MiB"],
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


def _cluster(workers: int) -> LocalCluster:
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )


def _timed(trace, client) -> tuple[float, float]:
    """Wall seconds of one sweep, and the mean number of cells computing at once."""
    with tempfile.TemporaryDirectory() as tmp, get_task_stream(client) as stream:
        t = time.perf_counter()
        res = run_sweep(trace, GRID, Path(tmp) / "sw", client=client)
        elapsed = time.perf_counter() - t
    assert len(res.ran) == len(res.cells)
    busy = sum(s["stop"] - s["start"] for task in stream.data for s in task["startstops"]
               if s["action"] == "compute")  # fmt: skip
    return elapsed, busy / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)  # no INFO lines at shutdown
    trace = open_trace(bundled_path("smollm2-135m-oracle-k64"))
    counts = [int(w) for w in args.workers.split(",")]
    print(f"grid: {GRID} on {trace.path.name}; median of {args.repeats} run(s)")
    print(f"CPUs: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")
    clusters = {w: _cluster(w) for w in counts}
    clients = {w: Client(c) for w, c in clusters.items()}
    try:
        for client in clients.values():
            client.run(_warm, GRID["policy"])
        times: dict[int, list[float]] = {w: [] for w in counts}
        busy: dict[int, list[float]] = {w: [] for w in counts}
        for _ in range(args.repeats):  # interleaved, so load from elsewhere hits all alike
            for w in counts:
                elapsed, concurrency = _timed(trace, clients[w])
                times[w].append(elapsed)
                busy[w].append(concurrency)
    finally:
        for obj in (*clients.values(), *clusters.values()):
            obj.close()
    print(f"{'workers':>7} {'median s':>9} {'runs':>24} {'speed-up':>9} {'cells at once':>14}")
    base = statistics.median(times[counts[0]])
    for w in counts:
        med = statistics.median(times[w])
        runs = " ".join(f"{t:.2f}" for t in times[w])
        conc = statistics.median(busy[w])
        print(f"{w:>7} {med:9.2f} {runs:>24} {base / med:9.2f}x {conc:14.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes share the CPUs)")


if __name__ == "__main__":
    main()
