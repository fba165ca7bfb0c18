"""Overhead of capturing the indices the DSA kernels read, on the GPU (issue goal: < 5%).

The decode-step driver (``kernels/decode_step.run_trace``) replays a DeepSeek-V3.2-shaped
synthetic trace (MLA fp8, 128 heads, k = 2048, 64 indexer heads) through our kernels:
indexer over every cached key, radix top-k, sparse MLA decode, per layer and step. It runs
``--repeats`` times without capture and as often with ``capture=PATH`` (per step one
non-blocking copy of the selections every layer reads into a pinned buffer, a CUDA event,
and a thread that appends the step to a raw spool; the spool is encoded into the trace at
close), interleaved so that drift hits both alike. Reported: median wall time per decode step of
each (the step loop until its last kernel and the spool are done; building the random
caches is not timed), their ratio, the capture overhead in percent, and apart from it the
encoding at close per step. A first run compiles the kernels untimed.

    python benchmarks/bench_capture.py [--batch 8] [--layers 8] [--context 32768] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

from dsacache.kernels.decode_step import run_trace  # noqa: E402
from dsacache.tracer import SynthConfig, synthesize  # noqa: E402
from dsacache.traces import open_trace  # noqa: E402

DEEPSEEK = {"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT"), help="write bench_capture.json here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_capture needs a CUDA GPU")
    work = Path(tempfile.mkdtemp(prefix="bench_capture-"))
    cfg = SynthConfig(layers=args.layers, requests=args.batch, context=args.context,
                      steps=args.steps, k=2048, seed=0, model=DEEPSEEK)  # fmt: skip
    trace = open_trace(synthesize(cfg, work / "src.dsatrace"))

    stats: list[dict[str, float]] = []

    def run(capture: Path | None) -> float:
        """Seconds per decode step: the step loop to its final sync and the spool thread's
        last write (``RunResult.seconds`` less the encoding at close, reported apart;
        building the caches is not in it)."""
        res = run_trace(trace, layout="mla-fp8", batch=args.batch, device="cuda",
                        capture=str(capture) if capture else None)  # fmt: skip
        if capture:
            stats.append({k: v / res.steps for k, v in res.capture_stats.items()})
        return (res.seconds - res.capture_stats.get("encode_s", 0.0)) / res.steps

    run(work / "warm.dsatrace")  # compiles every kernel, fills the allocator
    stats.clear()
    off, on = [], []
    for i in range(args.repeats):
        off.append(run(None))
        on.append(run(work / f"cap{i}.dsatrace"))
    captured = open_trace(work / "cap0.dsatrace")
    captured.validate()
    result = {
        "step_ms_without_capture": 1e3 * statistics.median(off),
        "step_ms_with_capture": 1e3 * statistics.median(on),
        "ratio": statistics.median(on) / statistics.median(off),
        "runs_without": [round(1e3 * x, 3) for x in off],
        "runs_with": [round(1e3 * x, 3) for x in on],
        # per step, medians over the runs: where the capture's time goes
        **{
            f"{key[:-2]}_ms_per_step": 1e3 * statistics.median(st[key] for st in stats)
            for key in stats[0]
        },  # fmt: skip
        "captured_rows": int(captured.manifest["totals"]["rows"]),
        "config": vars(args) | {"k": 2048, "layout": "mla-fp8", "heads": 128},
        "gpu": torch.cuda.get_device_name(),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    result["overhead_pct"] = 100 * (result["ratio"] - 1)
    print(f"per decode step ({args.layers} layers, batch {args.batch}, context {args.context}): "
          f"{result['step_ms_without_capture']:.3f} ms without capture, "
          f"{result['step_ms_with_capture']:.3f} ms with: ratio {result['ratio']:.3f} "
          f"({result['overhead_pct']:+.1f}%), medians of {args.repeats}; per step the launching "
          f"thread waited {result['launcher_wait_ms_per_step']:.3f} ms for a free buffer, the "
          f"spool thread {result['copy_wait_ms_per_step']:.3f} ms for copies and "
          f"{result['spool_ms_per_step']:.3f} ms writing; encoding the spool at close took "
          f"{result['encode_ms_per_step']:.3f} ms per step (not in the ratio)")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_capture.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
