"""Spool fsync moved to a background thread, no fsync at close: overhead vs off, and a control
that puts the fsync at close back. Shuffled order per repetition, median of per-rep ratios."""
import gc, json, os, random, statistics, sys, tempfile
from pathlib import Path
import numpy as np
import torch
from dsacache.kernels.decode_step import run_trace
from dsacache.traces import spool as sp
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

out = Path(sys.argv[4])
batch, layers, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
work = Path(tempfile.mkdtemp())
cfg = SynthConfig(layers=layers, requests=batch, context=32768, steps=64, k=2048, seed=0,
                  model={"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128})
trace = open_trace(synthesize(cfg, work / "src.dsatrace"))
real_close = sp.StepSpool.close
def close_with_fsync(self):
    if self._fd >= 0:
        os.fsync(self._fd)
    real_close(self)
names = ["off", "no_thread", "thread", "no_thread_fsync_at_close"]
res = {n: [] for n in names}
for n in names[1:3]:
    run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=str(work / f"w{n}.dsatrace"), capture_thread=n == "thread")
order = random.Random(1)
for rep in range(reps):
    for n in order.sample(names, len(names)):
        sp.StepSpool.close = close_with_fsync if n.endswith("at_close") else real_close
        gc.collect()
        cap = None if n == "off" else str(work / f"{n}{rep}.dsatrace")
        r = run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=cap, capture_thread=n == "thread")
        res[n].append(1e3 * (r.seconds - r.capture_stats.get("encode_s", 0)) / r.steps)
        if cap:
            import shutil; p = Path(cap); shutil.rmtree(p) if p.is_dir() else p.unlink()
sp.StepSpool.close = real_close
ratios = {n: statistics.median(a / b for a, b in zip(res[n], res["off"])) for n in names}
for n in names:
    print(f"b{batch} l{layers} {n:26s} {100 * (ratios[n] - 1):+5.1f}%  median {statistics.median(res[n]):.3f} ms", flush=True)
meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv), "note": "ms per step without the encoding at close; per-repetition ratio to off, median; shuffled order"}
(out / f"capexp6_b{batch}_l{layers}.json").write_text(json.dumps({"meta": meta, "pair_ratio": ratios, "runs_ms": res}, indent=1))
