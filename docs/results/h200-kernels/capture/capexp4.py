"""Spool capture (1-s fsync, lazy padding): overhead vs off, with the spool thread pinned, and
without spool writes; interleaved, many repeats."""
import json, os, statistics, sys, tempfile
from pathlib import Path
import torch
from dsacache.kernels import decode_step as ds
from dsacache.kernels.decode_step import run_trace
from dsacache.traces import spool as sp
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

out = Path(os.environ["OUT"])
batch, layers, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
work = Path(tempfile.mkdtemp())
cfg = SynthConfig(layers=layers, requests=batch, context=32768, steps=64, k=2048, seed=0,
                  model={"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128})
trace = open_trace(synthesize(cfg, work / "src.dsatrace"))
real = {"append": sp.StepSpool.append, "work": ds.IndexCapture._work, "event": torch.cuda.Event}
cpus = sorted(os.sched_getaffinity(0))
def pinned_work(self):
    os.sched_setaffinity(0, {cpus[-1]})
    return real["work"](self)
def variant(name):
    sp.StepSpool.append = real["append"]; ds.IndexCapture._work = real["work"]; torch.cuda.Event = real["event"]
    if name == "nospool": sp.StepSpool.append = lambda self, *a: None
    if name == "spin": torch.cuda.Event = lambda **kw: real["event"]()
res = {}
names = ["off", "capture", "spin", "nospool"]
run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=str(work / "warm.dsatrace"))
for rep in range(reps):
    for name in names:
        variant(name)
        cap = None if name == "off" else str(work / f"{name}{rep}.dsatrace")
        r = run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=cap)
        res.setdefault(name, []).append({"ms": 1e3 * (r.seconds - r.capture_stats.get("encode_s", 0)) / r.steps, **{k: 1e3 * v / r.steps for k, v in r.capture_stats.items()}})
variant("capture")
summary = {name: {k: round(statistics.median(x[k] for x in runs), 3) for k in runs[0]} for name, runs in res.items()}
base = summary["off"]["ms"]
for name, s in summary.items():
    print(f"batch {batch} layers {layers} {name:9s} {100 * (s['ms'] / base - 1):+5.1f}% {s}", flush=True)
meta = {"gpu": torch.cuda.get_device_name(), "cpus": len(cpus), "torch": torch.__version__, "command": " ".join(sys.argv), "note": "ms per step without the encoding at close; medians over interleaved runs"}
(out / f"capexp4_b{batch}_l{layers}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": res}, indent=1))
