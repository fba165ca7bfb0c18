"""Reading a trace step by step (``iter_steps``) against decoding its Parquet parts alone
(``iter_parts``), in one process: what splitting the parts into steps adds.

Synthesizes the DeepSeek-V3.2-shaped trace that ``benchmarks/bench_capture.py`` replays (batch
8 x 8 layers x 32K context, k 2048, 64 steps, one part), reads it both ways, alternating, and
prints the median milliseconds per step of each and their ratio. Steps are views of their
part. Before 2026-12-07 every step's rows were regathered: on the 2-core CPU machine, medians
of 7, ``iter_steps`` took 2.53 ms a step where the parts alone took 1.14 (2.22x); with views,
1.12 against 1.16 (0.97x).

Then, as a decode loop bound by its GPU uses it: the same rows written in parts of 8 steps,
read by a consumer that waits ``--consumer-ms`` per step without holding the GIL (as a thread
waiting for its kernels does), with and without ``iter_steps(read_ahead=True)``, which
decodes the next part in a worker thread meanwhile (2026-12-07, same machine, 1 ms a step:
2.39 ms a step without, 1.49 with, 1.60x).

    python benchmarks/bench_trace_read.py [--batch 8] [--layers 8] [--steps 64] [--repeats 7]
        [--consumer-ms 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

DEEPSEEK = {"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--consumer-ms", type=float, default=1.0, help="a step's wait in the consumer")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(layers=args.layers, requests=args.batch, context=32768,
                          steps=args.steps, k=2048, seed=0, model=DEEPSEEK)  # fmt: skip
        trace = open_trace(synthesize(cfg, Path(tmp) / "t.dsatrace"))
        steps = sum(1 for _ in trace.iter_steps())  # also verifies every part once
        times: dict[str, list[float]] = {"parts": [], "steps": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _part in trace.iter_parts():
                pass
            times["parts"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _rows in trace.iter_steps():
                pass
            times["steps"].append(time.perf_counter() - t0)
        parts_ms, steps_ms = (1e3 * statistics.median(times[n]) / steps for n in times)
        print(f"{steps} steps of {args.layers} layers x batch {args.batch} x k 2048 in "
              f"{len(trace.parts)} part(s), medians of {args.repeats}: parts decoded "
              f"{parts_ms:.3f} ms a step, iter_steps {steps_ms:.3f} ms a step "
              f"({steps_ms / parts_ms:.2f}x)")  # fmt: skip

        rows_per_step = args.layers * args.batch
        parted = open_trace(synthesize(cfg, Path(tmp) / "parts.dsatrace",
                                       part_rows=8 * rows_per_step))  # fmt: skip
        sum(1 for _ in parted.iter_steps())  # verify every part once
        waits: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for ahead in (False, True):
                t0 = time.perf_counter()
                for _rows in parted.iter_steps(read_ahead=ahead):
                    time.sleep(args.consumer_ms / 1e3)
                waits[ahead].append(time.perf_counter() - t0)
        plain, ahead = (1e3 * statistics.median(waits[a]) / steps for a in (False, True))
        print(f"{len(parted.parts)} parts, consumer waiting {args.consumer_ms} ms a step: "
              f"{plain:.3f} ms a step reading in the consumer's thread, {ahead:.3f} ms reading "
              f"ahead ({plain / ahead:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
