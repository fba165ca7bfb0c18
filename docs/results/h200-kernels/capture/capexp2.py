"""Where does the spool capture's remaining overhead go? Variants, interleaved."""
import json, os, statistics, sys, tempfile, threading
from pathlib import Path
import torch
from dsacache.kernels import decode_step as ds
from dsacache.kernels.decode_step import run_trace
from dsacache.traces import spool as sp
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

out = Path(os.environ["OUT"])
batch, layers = int(sys.argv[1]), int(sys.argv[2])
work = Path(tempfile.mkdtemp())
cfg = SynthConfig(layers=layers, requests=batch, context=32768, steps=64, k=2048, seed=0,
                  model={"name": "deepseek-v3.2-shape", "attention": "MLA", "heads": 128})
trace = open_trace(synthesize(cfg, work / "src.dsatrace"))
real = {"fsync": os.fsync, "append": sp.StepSpool.append, "add": ds.IndexCapture.add, "work": ds.IndexCapture._work}
ncpu = os.cpu_count()
def pinned_work(self):
    os.sched_setaffinity(0, {ncpu - 1})
    return real["work"](self)
def variant(name):
    os.fsync = real["fsync"]; sp.StepSpool.append = real["append"]; ds.IndexCapture.add = real["add"]; ds.IndexCapture._work = real["work"]
    os.sched_setaffinity(0, set(range(ncpu)))
    if name == "nofsync": os.fsync = lambda fd: None
    if name == "nospool": sp.StepSpool.append = lambda self, *a: None
    if name == "noadd": ds.IndexCapture.add = lambda self, *a: None
    if name == "pinned":
        os.sched_setaffinity(0, {0}); ds.IndexCapture._work = pinned_work
res = {}
names = ["off", "capture", "nofsync", "nospool", "noadd", "pinned"]
run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=str(work / "warm.dsatrace"))
for rep in range(5):
    for name in names:
        variant(name)
        cap = None if name == "off" else str(work / f"{name}{rep}.dsatrace")
        r = run_trace(trace, layout="mla-fp8", batch=batch, device="cuda", capture=cap)
        res.setdefault(name, []).append({"ms": 1e3 * (r.seconds - r.capture_stats.get("encode_s", 0)) / r.steps, **{k: 1e3 * v / r.steps for k, v in r.capture_stats.items()}})
variant("capture")
summary = {name: {k: round(statistics.median(x[k] for x in runs), 3) for k in runs[0]} for name, runs in res.items()}
for name, s in summary.items():
    print(f"batch {batch} layers {layers} {name:10s} {s}", flush=True)
(out / f"capexp2_b{batch}_l{layers}.json").write_text(json.dumps({"summary": summary, "runs": res}, indent=1))
