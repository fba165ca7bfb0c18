"""Overhead of capturing the indices the DSA kernels read, on the GPU (issue goal: < 5%).

The decode-step driver (``kernels/decode_step.run_trace``) replays a DeepSeek-V3.2-shaped
synthetic trace (MLA fp8, 128 heads, k = 2048, 64 indexer heads) through our kernels:
indexer over every cached key, radix top-k, sparse MLA decode, per layer and step. Each
repetition runs it once without capture and once with ``capture=PATH`` for each transfer
interval N in ``--steps-per-copy`` (per step one copy of the selections every layer reads
into a ring on the GPU; every N steps one transfer of N steps to a pinned host buffer, and a
thread that waits for it and appends those steps to a raw spool, encoded into the trace at
close), in a shuffled order (seeded), so that neither drift nor the run before favours one.
``--ablate`` adds, per interval, runs with the ring copies alone, with copies and
transfers but no spool, with the spool's records written to /dev/null (all of the spool's
work but the file system's), and with the spool written through the page cache instead of
with O_DIRECT, to show which stage costs what.

Reported per case: the median over repetitions of the ratio of the time per decode step
with capture to the one without in the same repetition, with a 95% bootstrap interval of
that median (the shared VMs these run on vary by tens of percent from run to run; the
interval says what the data can resolve). Time per step: the step loop until its last
kernel (the decode); also reported, the ratio up to the end of the capture's close less its
encoding (the steps still in the ring moved and spooled after the decode), and the encoding
itself. Building the random caches and the capture's buffers and reading the trace's first
step (the whole of this short trace's one part) are not timed. A first run compiles the
kernels untimed.

    python benchmarks/bench_capture.py [--batch 8] [--layers 8] [--context 32768]
        [--steps-per-copy 1,16] [--repeats 20] [--cuda-graph] [--ablate [copies,...]]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsacache.kernels.decode_step import run_trace  # noqa: E402
from dsacache.kernels.index_capture import IndexCapture  # noqa: E402
from dsacache.tracer import SynthConfig, synthesize  # noqa: E402
from dsacache.traces import open_trace  # noqa: E402
from dsacache.traces import spool as spool_module  # noqa: E402
from dsacache.traces.spool import StepSpool  # noqa: E402

DEEPSEEK = {"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128}


def median_interval(x: list[float], seed: int = 0, n: int = 10000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``x``."""
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(np.asarray(x), size=(n, len(x))), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


ABLATIONS = {"": "capture", "copies": "ring copies alone", "transfers": "copies + transfers",
             "null": "spool to /dev/null", "buffered": "spool through the page cache"}  # fmt: skip


@contextlib.contextmanager
def ablated(part: str) -> Iterator[None]:
    """Run the capture with its later stages left out: ``copies`` (the ring copies alone:
    no transfer to the host, nothing spooled), ``transfers`` (nothing spooled; the capture's
    thread still waits for each transfer and returns its buffer) or ``null`` (the spool's
    records written to /dev/null); or ``buffered``: the spool written without O_DIRECT."""
    if part not in ABLATIONS:
        raise ValueError(f"ablation {part!r}: one of {sorted(ABLATIONS)}")
    with contextlib.ExitStack() as stack:
        if part in ("copies", "transfers"):
            stack.enter_context(mock.patch.object(StepSpool, "append_batch", lambda *a: None))
        if part == "copies":
            stack.enter_context(mock.patch.object(IndexCapture, "_transfer", lambda *a: None))
        if part == "null":
            null, append_batch = os.open(os.devnull, os.O_WRONLY), StepSpool.append_batch

            def to_null(spool: StepSpool, *args: object) -> None:
                fds, (spool._fd, spool._direct) = (spool._fd, spool._direct), (null, -1)
                try:
                    append_batch(spool, *args)
                finally:
                    spool._fd, spool._direct = fds

            stack.callback(os.close, null)
            stack.enter_context(mock.patch.object(StepSpool, "append_batch", to_null))
        if part == "buffered":
            stack.enter_context(mock.patch.object(spool_module, "_O_DIRECT", 0))
        yield


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
    p.add_argument("--ablate", nargs="?", const=",".join(a for a in ABLATIONS if a), default="",
                   help="also time the capture's stages apart (see above): all, or those listed")  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT"), help="write bench_capture.json here")
    args = p.parse_args(argv)
    intervals = [int(n) for n in args.steps_per_copy.split(",")]
    if min(intervals) < 1 or len(set(intervals)) < len(intervals):
        sys.exit(f"--steps-per-copy {args.steps_per_copy}: distinct intervals >= 1")
    if not torch.cuda.is_available():
        sys.exit("bench_capture needs a CUDA GPU")
    ablations = list(dict.fromkeys(a for a in args.ablate.split(",") if a))
    if any(a not in ABLATIONS for a in ablations):
        sys.exit(f"--ablate {args.ablate}: a list of {', '.join(a for a in ABLATIONS if a)}")
    work = Path(tempfile.mkdtemp(prefix="bench_capture-"))
    cfg = SynthConfig(layers=args.layers, requests=args.batch, context=args.context,
                      steps=args.steps, k=2048, seed=0, model=DEEPSEEK)  # fmt: skip
    trace = open_trace(synthesize(cfg, work / "src.dsatrace"))

    cases = ["off"] + [f"{n}{part}" for n in intervals for part in
                       [f":{a}" for a in ablations] + [""]]  # fmt: skip
    stats: dict[str, list[dict[str, float]]] = {case: [] for case in cases}

    def run(case: str, capture: Path | None) -> tuple[float, float]:
        """Seconds per decode step: the step loop to its last kernel, and to the end of the
        capture's close less its encoding (reported apart). Building the caches and the
        capture's buffers is in neither."""
        per_copy, _, ablation = case.partition(":")
        with ablated(ablation):
            res = run_trace(trace, layout="mla-fp8", batch=args.batch, device="cuda",
                            capture=str(capture) if capture else None,
                            capture_steps_per_copy=int(per_copy) if capture else None,
                            cuda_graph=args.cuda_graph)  # fmt: skip
        if capture:
            stats[case].append({k: v / res.steps for k, v in res.capture_stats.items()})
        encode = res.capture_stats.get("encode_s", 0.0)
        return res.decode_seconds / res.steps, (res.seconds - encode) / res.steps

    run(cases[-1], work / "warm.dsatrace")  # compiles every kernel, fills the allocators
    stats[cases[-1]].clear()
    times: dict[str, list[tuple[float, float]]] = {case: [] for case in cases}
    order = random.Random(0)
    for i in range(args.repeats):
        for case in order.sample(cases, len(cases)):
            gc.collect()
            path = work / f"cap-{case.replace(':', '-')}-{i}.dsatrace" if case != "off" else None
            times[case].append(run(case, path))
            if i and path is not None:  # the first repetition's traces are validated below
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    off = [t[0] for t in times["off"]]
    result: dict = {"step_ms_without_capture": 1e3 * statistics.median(off),
                    "runs_without": [round(1e3 * x, 3) for x in off], "cases": {}}  # fmt: skip
    print(f"per decode step ({args.layers} layers, batch {args.batch}, context {args.context}"
          f"{', CUDA graphs' if args.cuda_graph else ''}), "
          f"{args.repeats} repetitions in shuffled order: median {1e3 * statistics.median(off):.3f}"
          " ms without capture")  # fmt: skip
    for case in cases[1:]:
        per_copy, _, ablation = case.partition(":")
        rows = None
        if ablation in ("", "buffered"):  # the others write nothing
            captured = open_trace(work / f"cap-{case.replace(':', '-')}-0.dsatrace")
            captured.validate()
            rows = int(captured.manifest["totals"]["rows"])
        ratios = [c[0] / o for c, o in zip(times[case], off, strict=True)]
        ends = [c[1] / o for c, o in zip(times[case], off, strict=True)]
        ratio, end = statistics.median(ratios), statistics.median(ends)
        low, high = median_interval(ratios)
        per_step = {f"{key[:-2]}_ms_per_step": 1e3 * statistics.median(st[key] for st in stats[case])
                    for key in stats[case][0]}  # fmt: skip
        result["cases"][case] = {
            "steps_per_copy": int(per_copy), "ablation": ablation or None,
            "step_ms_with_capture": 1e3 * statistics.median(c[0] for c in times[case]),
            "ratio": ratio, "ratio_95": [low, high], "overhead_pct": 100 * (ratio - 1),
            "ratio_to_close": end, "runs_with": [round(1e3 * c[0], 3) for c in times[case]],
            "runs_with_to_close": [round(1e3 * c[1], 3) for c in times[case]], **per_step,
            "captured_rows": rows}  # fmt: skip
        print(f"  {ABLATIONS[ablation]}, {per_copy} step(s) per transfer: "
              f"{1e3 * statistics.median(c[0] for c in times[case]):.3f} ms, ratio {ratio:.3f} "
              f"({100 * (ratio - 1):+.1f}%, 95% interval {100 * (low - 1):+.1f}% to "
              f"{100 * (high - 1):+.1f}%), {100 * (end - 1):+.1f}% to the end of the close; per "
              f"step the launching thread spent {per_step['launcher_ms_per_step']:.3f} ms in the "
              f"capture's calls (waiting {per_step['launcher_wait_ms_per_step']:.3f} ms for a "
              f"free buffer), the capture's thread {per_step['copy_wait_ms_per_step']:.3f} ms "
              f"waiting for transfers and {per_step['spool_ms_per_step']:.3f} ms writing the "
              f"spool; encoding at close took {per_step['encode_ms_per_step']:.3f} ms per step")  # fmt: skip
    result.update(config=vars(args) | {"k": 2048, "layout": "mla-fp8", "heads": 128},
                  gpu=torch.cuda.get_device_name(), command=" ".join([sys.executable, *sys.argv]))  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_capture.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)  # the traces of the first repetition, validated above


if __name__ == "__main__":
    main()
