"""No-thread capture: which part costs the launch-bound loop? Variants interleaved, per-rep ratios
to 'off', plus the launching thread's CPU time per step (time.thread_time around the step loop)."""
import json, os, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
from dsacache.kernels import decode_step as ds
from dsacache.kernels.decode_step import run_trace
from dsacache.traces import spool as sp
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

out = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(os.environ["OUT"])
batch, layers, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
work = Path(tempfile.mkdtemp())
cfg = SynthConfig(layers=layers, requests=batch, context=32768, steps=64, k=2048, seed=0,
                  model={"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128})
trace = open_trace(synthesize(cfg, work / "src.dsatrace"))
IC = ds.IndexCapture
real = {"append": sp.StepSpool.append, "queue": IC._queue, "begin": IC.begin_step, "end": IC.end_step, "ev": ds._copy_event}
def nocopy(self, layers, idx):
    self._current.added[layers] = True
def bare_begin(self, step, positions, shape):
    pass
def bare_end(self):
    pass
def variant(name):
    sp.StepSpool.append = real["append"]; IC._queue = real["queue"]; IC.begin_step = real["begin"]; IC.end_step = real["end"]; ds._copy_event = real["ev"]
    if name in ("nospool", "nospool_nocopy"): sp.StepSpool.append = lambda self, *a: None
    if name in ("nocopy", "nospool_nocopy"): IC._queue = nocopy
    if name == "bare": IC.begin_step = bare_begin; IC.end_step = bare_end; IC._queue = lambda *a: None
res = {}
names = ["off", "full", "nospool", "nocopy", "nospool_nocopy", "bare", "thread"]
for name in ("full", "thread"):
    run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=str(work / f"warm-{name}.dsatrace"), capture_thread=name == "thread")
tt = {}
orig_iter = type(trace).iter_steps
for rep in range(reps):
    for name in names:
        variant(name)
        cap = None if name == "off" else str(work / f"{name}{rep}.dsatrace")
        t0 = time.thread_time()
        r = run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=cap, capture_thread=name == "thread")
        cpu = time.thread_time() - t0
        res.setdefault(name, []).append({"ms": 1e3 * (r.seconds - r.capture_stats.get("encode_s", 0)) / r.steps,
            "launch_ms": 1e3 * float(np.sum(r.step_seconds)) / r.steps, "thread_cpu_ms_run": 1e3 * cpu,
            **{k: 1e3 * v / r.steps for k, v in r.capture_stats.items()}})
variant("full")
ratios = {n: statistics.median(res[n][i]["ms"] / res["off"][i]["ms"] for i in range(reps)) for n in names}
summary = {name: {k: round(statistics.median(x[k] for x in runs), 3) for k in runs[0]} for name, runs in res.items()}
for name, s in summary.items():
    print(f"b{batch} l{layers} {name:15s} median pair ratio {100 * (ratios[name] - 1):+5.1f}% {s}", flush=True)
meta = {"gpu": torch.cuda.get_device_name(), "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__, "command": " ".join(sys.argv),
        "note": "ms per step without the encoding at close; launch_ms = step loop wall time per step without sync; thread_cpu_ms_run = launching thread CPU time of the whole run_trace (cache building included); ratios: per repetition to off, median"}
(out / f"capexp5_b{batch}_l{layers}.json").write_text(json.dumps({"meta": meta, "summary": summary, "pair_ratio": ratios, "runs": res}, indent=1))
