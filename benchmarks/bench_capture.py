"""Overhead of capturing the indices the DSA kernels read, on the GPU (issue goal: < 5%).

The decode-step driver (``kernels/decode_step.run_trace``) replays a DeepSeek-V3.2-shaped
synthetic trace (MLA fp8, 128 heads, k = 2048, 64 indexer heads) through our kernels:
indexer over every cached key, radix top-k, sparse MLA decode, per layer and step. It runs
``--repeats`` times without capture and as often with ``capture=PATH`` in each of
``IndexCapture``'s two ways of spooling (per step one non-blocking copy of the selections
every layer reads into a pinned buffer and a CUDA event; then either a thread appends the
step to a raw spool, or the launching thread does when the copy has finished; the spool is
encoded into the trace at close), interleaved so that drift hits all alike. Reported: the
median wall time per decode step of each (the step loop until its last kernel and the
spool are done; building the random caches is not timed), the ratios, the capture overhead
in percent, and apart from it the encoding at close per step. A first run of each compiles
the kernels untimed.

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

    modes = {"thread": True, "no_thread": False}  # IndexCapture(background=...)
    stats: dict[str, list[dict[str, float]]] = {m: [] for m in modes}

    def run(mode: str | None, capture: Path | None = None) -> float:
        """Seconds per decode step: the step loop to its final sync and the spool's last
        write (``RunResult.seconds`` less the encoding at close, reported apart; building
        the caches is not in it)."""
        res = run_trace(trace, layout="mla-fp8", batch=args.batch, device="cuda",
                        capture=str(capture) if mode else None,
                        capture_thread=modes.get(mode, True))  # fmt: skip
        if mode:
            stats[mode].append({k: v / res.steps for k, v in res.capture_stats.items()})
        return (res.seconds - res.capture_stats.get("encode_s", 0.0)) / res.steps

    for mode in modes:  # compiles every kernel, fills the allocator
        run(mode, work / f"warm-{mode}.dsatrace")
        stats[mode].clear()
    times: dict[str, list[float]] = {"off": [], **{m: [] for m in modes}}
    for i in range(args.repeats):
        times["off"].append(run(None))
        for mode in modes:
            times[mode].append(run(mode, work / f"cap-{mode}-{i}.dsatrace"))
    off = statistics.median(times["off"])
    result: dict = {"step_ms_without_capture": 1e3 * off,
                    "runs_without": [round(1e3 * x, 3) for x in times["off"]]}  # fmt: skip
    print(f"per decode step ({args.layers} layers, batch {args.batch}, context {args.context}), "
          f"medians of {args.repeats} interleaved runs: {1e3 * off:.3f} ms without capture")  # fmt: skip
    for mode in modes:
        captured = open_trace(work / f"cap-{mode}-0.dsatrace")
        captured.validate()
        on = statistics.median(times[mode])
        per_step = {f"{key[:-2]}_ms_per_step": 1e3 * statistics.median(st[key] for st in stats[mode])
                    for key in stats[mode][0]}  # fmt: skip
        result[mode] = {"step_ms_with_capture": 1e3 * on, "ratio": on / off,
                        "overhead_pct": 100 * (on / off - 1),
                        "runs_with": [round(1e3 * x, 3) for x in times[mode]], **per_step,
                        "captured_rows": int(captured.manifest["totals"]["rows"])}  # fmt: skip
        print(f"  capture ({mode.replace('_', ' ')}): {1e3 * on:.3f} ms, ratio {on / off:.3f} "
              f"({100 * (on / off - 1):+.1f}%); per step the launching thread waited "
              f"{per_step['launcher_wait_ms_per_step']:.3f} ms for a free buffer, "
              f"{per_step['copy_wait_ms_per_step']:.3f} ms went to waiting for copies and "
              f"{per_step['spool_ms_per_step']:.3f} ms to writing the spool; encoding it at close "
              f"took {per_step['encode_ms_per_step']:.3f} ms per step (not in the ratio)")  # fmt: skip
    result.update(config=vars(args) | {"k": 2048, "layout": "mla-fp8", "heads": 128},
                  gpu=torch.cuda.get_device_name(), command=" ".join([sys.executable, *sys.argv]))  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_capture.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
