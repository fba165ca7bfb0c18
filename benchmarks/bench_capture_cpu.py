"""Capture overhead without a GPU: a launch-bound stand-in loop with and without capture.

``bench_capture.py`` needs a GPU. This stand-in keeps what makes capture expensive there: the
decode loop is Python-bound (a GPU decode step is ~100 kernel launches from Python), so any
CPU time the capture takes per step, in a thread (the GIL) or on another vCPU that shares
the core, slows it. Each "layer" runs ``--ops`` tiny in-place torch ops (about 0.8 ms, like
one layer's launches), then hands a ``[batch, k]`` index tensor to ``IndexCapture``; the
loop runs with and without capture, interleaved, medians of ``--repeats``. Reported per
step: the loop without and with capture, their ratio, the capture thread's spool writes and
the encoding at close (not in the ratio). Also: a busy process on another CPU alone, to
show how much these machines' CPUs share.

    python benchmarks/bench_capture_cpu.py [--layers 8] [--batch 8] [--k 2048] [--steps 48]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time

import numpy as np
import torch

from dsacache.kernels.index_capture import IndexCapture


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--ops", type=int, default=380, help="torch ops per layer (the launches)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sel = [
        torch.from_numpy(
            np.stack([np.sort(rng.choice(32768, args.k, replace=False)) for _ in range(args.batch)])
        ).to(torch.int32)
        for _ in range(args.layers)
    ]
    x = torch.zeros(16)
    shape = (args.layers, args.batch, 1, args.k)
    positions = np.full((args.layers, args.batch), 32768)

    def loop(capture: bool) -> tuple[float, dict[str, float]]:
        cap = None
        if capture:
            path = f"{tempfile.mkdtemp()}/t.dsatrace"
            cap = IndexCapture(path, False, model={"name": "stand-in"},
                               indexer={"kind": "oracle", "k": args.k},
                               part_rows=8 * args.layers * args.batch)  # fmt: skip
        t0 = time.perf_counter()
        for step in range(args.steps):
            if cap:
                cap.begin_step(step, positions, shape)
            for layer in range(args.layers):
                for _ in range(args.ops):
                    x.add_(1.0)
                if cap:
                    cap.add(layer, sel[layer])
            if cap:
                cap.end_step()
        t1 = time.perf_counter()
        if cap is None:
            return (t1 - t0) / args.steps, {}
        cap.close()
        return (t1 - t0) / args.steps, {k: v / args.steps for k, v in cap.stats.items()}

    loop(True)  # warm-up
    off, on, stats = [], [], []
    for _ in range(args.repeats):
        off.append(loop(False)[0])
        seconds, st = loop(True)
        on.append(seconds)
        stats.append(st)
    med = {k: 1e3 * statistics.median(s[k] for s in stats) for k in stats[0]}
    ratio = statistics.median(on) / statistics.median(off)
    print(f"per step: {1e3 * statistics.median(off):.3f} ms without capture, "
          f"{1e3 * statistics.median(on):.3f} ms with: ratio {ratio:.3f} ({100 * (ratio - 1):+.1f}%); "
          f"spool writes {med['spool_s']:.3f} ms, encoding at close {med['encode_s']:.3f} ms "
          f"per step (not in the ratio)")  # fmt: skip
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0,))
    spinner.start()
    time.sleep(1.0)
    busy = statistics.median(loop(False)[0] for _ in range(args.repeats))
    spinner.terminate()
    print(
        f"the loop alone beside a busy process: {1e3 * busy:.3f} ms per step "
        f"({busy / statistics.median(off):.2f}x; 1.00 when CPUs share nothing)"
    )


if __name__ == "__main__":
    main()
