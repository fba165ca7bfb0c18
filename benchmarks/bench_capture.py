"""Overhead of capturing the indices the DSA kernels read, on the GPU (issue goal: < 5%).

The decode-step driver (``kernels/decode_step.run_trace``) replays a DeepSeek-V3.2-shaped
synthetic trace (MLA fp8, 128 heads, k = 2048, 64 indexer heads) through our kernels:
indexer over every cached key, radix top-k, sparse MLA decode, per layer and step. Each
repetition runs it once without capture and once with ``capture=PATH`` for each transfer
interval N in ``--steps-per-copy`` (per step one device-to-device copy of the selections
every layer reads into a ring on the GPU; every N steps one transfer of N steps to a pinned
buffer, and a thread that waits for it and appends those steps to a raw spool, which is
encoded into the trace at close),
in a shuffled order (seeded), so that neither drift nor the run before (a capture's
encoding leaves work behind) favours one. Reported per interval: the median over
repetitions of the ratio of the wall time per decode step with capture to the one without
in the same repetition, with a 95% bootstrap interval of that median (the shared VMs these run on vary
by tens of percent from run to run; the interval says what the data can resolve), the
median times, and apart from the ratio the encoding at close. Time per step: the step loop
until its last kernel and the spool are done; building the random caches and reading the
trace's first step (the whole of this short trace's one part) are not timed. A first run
compiles the kernels untimed.

    python benchmarks/bench_capture.py [--batch 8] [--layers 8] [--context 32768]
        [--steps-per-copy 1,16] [--repeats 20] [--cuda-graph] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsacache.kernels.decode_step import run_trace  # noqa: E402
from dsacache.tracer import SynthConfig, synthesize  # noqa: E402
from dsacache.traces import open_trace  # noqa: E402

DEEPSEEK = {"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128}


def median_interval(x: list[float], seed: int = 0, n: int = 10000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``x``."""
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(np.asarray(x), size=(n, len(x))), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="repetitions (runs vary by 20-30%%)")
    p.add_argument("--steps-per-copy", default="1,16",
                   help="capture runs per repetition: N steps per transfer to the host, N in this list")  # fmt: skip
    p.add_argument("--cuda-graph", action="store_true",
                   help="launch each step as one CUDA graph (a loop bound by the GPU, as in serving)")  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT"), help="write bench_capture.json here")
    args = p.parse_args(argv)
    intervals = [int(n) for n in args.steps_per_copy.split(",")]
    if min(intervals) < 1 or len(set(intervals)) < len(intervals):
        sys.exit(f"--steps-per-copy {args.steps_per_copy}: distinct intervals >= 1")
    if not torch.cuda.is_available():
        sys.exit("bench_capture needs a CUDA GPU")
    work = Path(tempfile.mkdtemp(prefix="bench_capture-"))
    cfg = SynthConfig(layers=args.layers, requests=args.batch, context=args.context,
                      steps=args.steps, k=2048, seed=0, model=DEEPSEEK)  # fmt: skip
    trace = open_trace(synthesize(cfg, work / "src.dsatrace"))

    stats: dict[int, list[dict[str, float]]] = {n: [] for n in intervals}

    def run(capture: Path | None, per_copy: int = 1) -> float:
        """Seconds per decode step: the step loop to its final sync and the spool's last
        write (``RunResult.seconds`` less the encoding at close, reported apart; building
        the caches is not in it)."""
        res = run_trace(trace, layout="mla-fp8", batch=args.batch, device="cuda",
                        capture=str(capture) if capture else None,
                        capture_steps_per_copy=per_copy, cuda_graph=args.cuda_graph)  # fmt: skip
        if capture:
            stats[per_copy].append({k: v / res.steps for k, v in res.capture_stats.items()})
        return (res.seconds - res.capture_stats.get("encode_s", 0.0)) / res.steps

    run(work / "warm.dsatrace", intervals[0])  # compiles every kernel, fills the allocator
    stats[intervals[0]].clear()
    times: dict[int, list[float]] = {0: [], **{n: [] for n in intervals}}  # 0: no capture
    order = random.Random(0)
    for i in range(args.repeats):
        for case in order.sample(list(times), len(times)):
            gc.collect()
            path = work / f"cap-{case}-{i}.dsatrace" if case else None
            times[case].append(run(path, case or 1))
            if i and path is not None:  # the first repetition's traces are validated below
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    off = statistics.median(times[0])
    result: dict = {"step_ms_without_capture": 1e3 * off,
                    "runs_without": [round(1e3 * x, 3) for x in times[0]], "by_steps_per_copy": {}}  # fmt: skip
    print(f"per decode step ({args.layers} layers, batch {args.batch}, context {args.context}"
          f"{', CUDA graphs' if args.cuda_graph else ''}), "
          f"{args.repeats} repetitions in shuffled order: median {1e3 * off:.3f} ms without "
          "capture")  # fmt: skip
    for per_copy in intervals:
        captured = open_trace(work / f"cap-{per_copy}-0.dsatrace")
        captured.validate()
        ratios = [c / o for c, o in zip(times[per_copy], times[0], strict=True)]
        ratio = statistics.median(ratios)
        low, high = median_interval(ratios)
        per_step = {f"{key[:-2]}_ms_per_step": 1e3 * statistics.median(st[key] for st in stats[per_copy])
                    for key in stats[per_copy][0]}  # fmt: skip
        result["by_steps_per_copy"][per_copy] = {
            "step_ms_with_capture": 1e3 * statistics.median(times[per_copy]), "ratio": ratio,
            "ratio_95": [low, high], "overhead_pct": 100 * (ratio - 1),
            "runs_with": [round(1e3 * x, 3) for x in times[per_copy]], **per_step,
            "captured_rows": int(captured.manifest["totals"]["rows"])}  # fmt: skip
        print(f"  capture, {per_copy} step(s) per transfer: "
              f"{1e3 * statistics.median(times[per_copy]):.3f} ms, ratio {ratio:.3f} "
              f"({100 * (ratio - 1):+.1f}%, 95% interval {100 * (low - 1):+.1f}% to "
              f"{100 * (high - 1):+.1f}%); per step the launching thread spent "
              f"{per_step['launcher_ms_per_step']:.3f} ms in the capture's calls (waiting "
              f"{per_step['launcher_wait_ms_per_step']:.3f} ms for a free buffer), the capture's "
              f"thread {per_step['copy_wait_ms_per_step']:.3f} ms waiting for transfers and "
              f"{per_step['spool_ms_per_step']:.3f} ms writing the spool; encoding it at close "
              f"took {per_step['encode_ms_per_step']:.3f} ms per step (not in the ratio)")  # fmt: skip
    result.update(config=vars(args) | {"k": 2048, "layout": "mla-fp8", "heads": 128},
                  gpu=torch.cuda.get_device_name(), command=" ".join([sys.executable, *sys.argv]))  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_capture.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
