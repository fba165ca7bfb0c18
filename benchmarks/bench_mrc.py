"""SHARDS at 1% against exact LRU stack distances: accuracy and speed, same stream, same run.

Streams: the KV gathers of the bundled real traces (batch = all their requests) and of a
synthetic DeepSeek-V3.2-shaped decode (61 layers, k = 2048, 32K context, FP8 MLA 656-byte
tokens), each at token granularity (one object per selected token and layer) and at line
granularity (128-byte lines of the replay stream's KV class).

Two timings per stream, each the median of ``--repeats`` runs (round-robin):

1. ``in memory``: the stream's chunks are built once and held; exact and SHARDS consume the
   same arrays. This is the cost of the stack-distance computation itself.
2. ``from trace``: read the trace and build the stream as well (what ``token_mrc`` /
   ``line_mrc`` cost a user); one run each, since reading dominates SHARDS here.

Error: mean absolute hit-ratio difference over 120 log-spaced cache sizes from one object to
past the footprint (``mrc.curve_error``), for three hash seeds.

Goal (issue 9): MAE <= 0.02 and SHARDS >= 20x faster than exact.

    python benchmarks/bench_mrc.py [--steps 32] [--repeats 2] [--rate 0.01]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dsacache.simulator import mrc
from dsacache.simulator.workload import Workload
from dsacache.tracer import preset, synthesize
from dsacache.traces import bundled, bundled_path, open_trace

GOAL_MAE = 0.02
GOAL_SPEEDUP = 20.0


def _timed(fn, *args, **kw):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def _streams(trace):
    """(name, object bytes, chunk factory, from-trace curve function) per granularity."""
    wl = Workload(batch=mrc.trace_shape(trace)[2])
    tb = mrc.token_object_bytes(trace)
    return [
        (
            "token",
            tb,
            lambda: list(mrc.token_stream(trace)),
            lambda rate: mrc.token_mrc(trace, sample_rate=rate),
        ),
        (
            "line",
            128,
            lambda: list(mrc.line_stream(trace, workload=wl, classes=("kv",))),
            lambda rate: mrc.line_mrc(trace, workload=wl, classes=("kv",), sample_rate=rate),
        ),
    ]


def bench(title: str, path: Path, rate: float, repeats: int) -> list[dict]:
    trace = open_trace(path)
    rows = []
    for gran, obj, make_chunks, from_trace in _streams(trace):
        chunks = make_chunks()
        n = sum(len(k) for k, _ in chunks)
        t_exact, t_shards = [], []
        for _ in range(repeats):  # round-robin so load changes hit both alike
            t, exact = _timed(mrc.lru_curve, chunks, obj)
            t_exact.append(t)
            t_shards.append(_timed(mrc.lru_curve, chunks, obj, sample_rate=rate)[0])
        te, ts = statistics.median(t_exact), statistics.median(t_shards)
        errors = [
            mrc.curve_error(exact, mrc.lru_curve(chunks, obj, sample_rate=rate, seed=s))["mae"]
            for s in range(3)
        ]
        del chunks
        fe = _timed(from_trace, 1.0)[0]  # one run each: exact is the slow part
        fs = _timed(from_trace, rate)[0]
        rows.append(
            {
                "trace": title,
                "granularity": gran,
                "accesses": n,
                "objects": int(exact.objects),
                "footprint_MiB": exact.footprint_bytes / 2**20,
                "mae_mean": statistics.mean(errors),
                "mae_max": max(errors),
                "exact_s": te,
                "shards_s": ts,
                "speedup": te / ts,
                "from_trace_speedup": fe / fs,
                "exact_ns_per_access": te / n * 1e9,
            }
        )
        r = rows[-1]
        print(
            f"{title:<34} {gran:<5} {n:>11,} {r['footprint_MiB']:>9.1f} {r['mae_mean']:>8.4f} "
            f"{r['mae_max']:>8.4f} {te:>8.2f} {ts:>8.3f} {r['speedup']:>8.1f} "
            f"{r['from_trace_speedup']:>8.1f}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=32, help="steps of the DeepSeek-V3.2 trace")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.01)
    args = ap.parse_args()
    print(
        f"SHARDS {args.rate:g} vs exact LRU stack distances; MAE over 120 log-spaced sizes, "
        f"mean/max of 3 seeds; medians of {args.repeats}"
    )
    print(
        f"{'trace':<34} {'gran':<5} {'accesses':>11} {'foot MiB':>9} {'MAE':>8} {'MAE max':>8} "
        f"{'exact s':>8} {'SHARDS s':>8} {'speedup':>8} {'e2e':>8}"
    )
    warm = [(np.arange(100), None)]
    mrc.lru_curve(warm, 1), mrc.lru_curve(warm, 1, sample_rate=0.5)  # compile outside timings
    rows = []
    for name in bundled():
        rows += bench(f"{name} (real)", bundled_path(name), args.rate, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset("deepseek-v3.2", steps=args.steps, context=args.context)
        path = synthesize(cfg, Path(tmp) / "ds.dsatrace")
        title = f"DeepSeek-V3.2 synth ({args.steps} steps)"
        rows += bench(title, path, args.rate, args.repeats)
    worst_mae = max(r["mae_mean"] for r in rows)
    worst_speed = min(r["speedup"] for r in rows)
    print(
        f"\nworst mean MAE {worst_mae:.4f} (goal <= {GOAL_MAE}): "
        f"{'met' if worst_mae <= GOAL_MAE else 'NOT met'}; "
        f"slowest speed-up {worst_speed:.1f}x in memory (goal >= {GOAL_SPEEDUP:g}x): "
        f"{'met' if worst_speed >= GOAL_SPEEDUP else 'NOT met'}; "
        f"from the trace (reading and stream building included): "
        f"{min(r['from_trace_speedup'] for r in rows):.1f}-"
        f"{max(r['from_trace_speedup'] for r in rows):.1f}x"
    )


if __name__ == "__main__":
    main()
