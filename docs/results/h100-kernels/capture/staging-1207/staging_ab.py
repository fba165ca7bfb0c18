"""Same-process A/B of the decode-step driver's host staging (2026-12-07, issue #6/#7).

``new``: ``decode_step.StepStaging`` (array operations, pinned buffers reused round robin).
``old``: what it replaced, kept here only for this comparison: a Python loop over the step's
rows into a fresh numpy array, then ``pin_memory()`` (a second copy) every step.

Runs ``run_trace`` without capture on the ``bench_capture`` trace (DeepSeek-V3.2 shape, MLA
fp8, k 2048, context 32K), alternating old and new, and prints the median time per decode
step of each, with CUDA graphs and without, and each one's host time for staging a step.

    python docs/results/h100-kernels/capture/staging-1207/staging_ab.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import dsacache.kernels.decode_step as ds
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

DEEPSEEK = {"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128}


class LoopStaging(ds.StepStaging):
    """The staging before StepStaging: a loop over rows, a new pinned copy each step."""

    def fill(self, rows, min_width):
        width = max(min_width, int(rows.lengths.max()) if len(rows) else 0)
        layers, batch, groups = self.shape
        sel = np.full((layers, batch, groups, width), -1, dtype=np.int32)
        pos = np.ones((layers, batch), dtype=np.int64)
        for i in range(len(rows)):
            layer, g, req = int(rows.layer[i]), int(rows.group[i]), int(rows.request[i])
            if layer >= layers or g >= groups or not 0 <= req < self.requests:
                continue
            idx = rows.row(i)[:width]
            for b in range(req, batch, self.requests):
                sel[layer, b, g, : len(idx)] = idx
                pos[layer, b] = int(rows.position[i])
        sel_t, ctx_t = torch.from_numpy(sel), torch.from_numpy(pos.astype(np.int32))
        if self.pinned:
            sel_t, ctx_t = sel_t.pin_memory(), ctx_t.pin_memory()
        return sel_t, ctx_t, pos, int((sel >= 0).sum())

    def copied(self):
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", type=int, default=192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    cfg = SynthConfig(layers=args.layers, requests=args.batch, context=32768, steps=args.steps,
                      k=2048, seed=0, model=DEEPSEEK)  # fmt: skip
    trace = open_trace(synthesize(cfg, work / "src.dsatrace"))
    staging = {"new": ds.StepStaging, "old": LoopStaging}
    out: dict = {"config": vars(args), "gpu": torch.cuda.get_device_name()}
    for graph in (True, False):
        times: dict[str, list[float]] = {"new": [], "old": []}
        host: dict[str, list[float]] = {"new": [], "old": []}
        for i in range(args.repeats + 1):
            for name in ("new", "old") if i % 2 else ("old", "new"):
                cls = staging[name]
                spent: list[float] = []

                def timed_fill(self, rows, min_width, _fill=cls.fill, _spent=spent):
                    t0 = time.perf_counter()
                    res = _fill(self, rows, min_width)
                    _spent.append(time.perf_counter() - t0)
                    return res

                with mock.patch.object(ds, "StepStaging", cls), \
                        mock.patch.object(cls, "fill", timed_fill):  # fmt: skip
                    res = ds.run_trace(trace, layout="mla-fp8", batch=args.batch, device="cuda",
                                       cuda_graph=graph)  # fmt: skip
                if i:  # the first round compiles and warms up
                    times[name].append(res.decode_seconds / res.steps)
                    host[name].append(statistics.median(spent))
        key = "graph" if graph else "eager"
        out[key] = {
            name: {"step_ms": 1e3 * statistics.median(times[name]),
                   "runs_ms": [round(1e3 * t, 4) for t in times[name]],
                   "staging_ms": 1e3 * statistics.median(host[name])}
            for name in times
        }  # fmt: skip
        ratios = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
        out[key]["new_over_old"] = statistics.median(ratios)
        print(key, json.dumps(out[key]))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "staging_ab.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
