"""Experiment (2026-12-07, CPU only; monkeypatches the stream builder and run_step, not part of
the model): the split-K partial outputs of the attention kernel, fp32 [splits, 128 heads, 512]
per request, written by the kernel and read back by its merge (our dsa_merge_splits,
FlashMLA's combine), at one scratch address that every layer reuses (the caching allocator
hands back the same block), streamed after each layer's KV gathers as 4-KiB writes then
reads, in the L2 but counted in no compared class. Splits: ours as _plan_splits plans them
on 132 SMs (min(132 // (batch x 2), k // 128)); FlashMLA's parts per request as its
scheduler makes them at the measured shapes (32, 8, 2, 7, 1). No partials when one split.

    python splitk_partials_experiment.py h100|h200 CONFIGS

Output (worst KV error in points, bundled model -> with the partials), H100: f06 11.5 -> 1.9,
t11 7.5 -> 2.1, t14 8.2 -> 2.3, t10 5.2 -> 2.2, t12 3.2 -> 1.8, t04 11.7 -> 9.3, f01 1.9 ->
1.2; worse: r01 4.6 -> 6.0, t09 3.6 -> 4.9, t01 3.1 -> 3.8, t06 3.1 -> 3.6; the other 19
unchanged. H200: t11 9.9 -> 2.1, t14 6.9 -> 3.1, t10 4.6 -> 1.5, f06 6.6 -> 5.5, t04 12.7 ->
9.2, t15 3.3 -> 1.8, t09 3.3 -> 2.7; worse: f01 7.4 -> 10.8, t01 3.2 -> 5.7, t16 2.9 -> 4.2,
r01 4.3 -> 4.6. f06's KV DRAM error 28% -> 5%.
"""
import sys
import numpy as np, pandas as pd
from dsacache import calibration as c
from dsacache.simulator import stream as st
from dsacache.simulator.stream import AccessChunk
from dsacache.simulator.workload import CLASS_ID, CLASSES
from dsacache.simulator.engine import COUNTERS
from dsacache.tracer.synth import parse_spec

gpu = sys.argv[1]
cfgs = sys.argv[2].split(",")
from dsacache.kernels import decode_step as ds

# since 2026-12-07 the model streams the partials itself; this script adds its own
ds.split_partial_bytes = lambda *args: 0
orig = st.build_step
state = {}
F = list(AccessChunk.__dataclass_fields__)

def partial_bytes(backend, batch, k):
    if backend == "flashmla":
        blocks = -(-k // 64) + 5  # scheduler: blocks plus overhead per request over 66 parts
        parts = {(1, 2048): 32, (1, 512): 8, (8, 256): 2, (8, 2048): 7, (64, 2048): 1}.get((batch, k), 1)
        return 0 if parts == 1 else batch * parts * 128 * 512 * 4
    splits = max(1, min(132 // (batch * 2), k // 128))
    return 0 if splits == 1 else batch * splits * 128 * 512 * 4

def build(amap, rows):
    ch = orig(amap, rows)
    P = state["P"]
    if not P:
        state["w"] = np.zeros(len(ch), bool); state["x"] = np.zeros(len(ch), bool)
        return ch
    scratch = amap.query_base + 2**32
    out, w, x = [], [], []
    key = ch.layer.astype(np.int64)
    cut = np.flatnonzero(np.diff(key) != 0) + 1
    for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(ch)]):
        seg = AccessChunk(*(getattr(ch, f)[lo:hi] for f in F))
        out.append(seg); w.append(np.zeros(len(seg), bool)); x.append(np.zeros(len(seg), bool))
        n = P // 4096
        a = scratch + np.arange(n) * 4096
        L = ch.layer[lo]
        for write in (True, False):
            part = AccessChunk(a, np.full(n, 4096), np.full(n, CLASS_ID["kv"], np.int8), np.full(n, ch.step[lo], np.int32), np.full(n, L, np.int16), np.zeros(n, np.int8), np.full(n, np.nan, np.float32))
            out.append(part); w.append(np.full(n, write)); x.append(np.ones(n, bool))
    res = AccessChunk.concat(out)
    state["w"] = np.concatenate(w); state["x"] = np.concatenate(x)
    return res

XB = len(CLASSES)
def run_step(cache, chunk, as_weights=None, counted_as=None):
    klass = chunk.cls.copy()
    if as_weights is not None:
        klass[as_weights] = CLASS_ID["weights"]
    counters = np.zeros((len(CLASSES) + 1, len(COUNTERS)), np.int64)
    bucket = (chunk.cls if counted_as is None else counted_as).astype(np.int64)
    bucket[state["x"]] = XB
    cache.run_chunk(chunk.addr, chunk.nbytes, state["w"], klass, chunk.layer, bucket, counters)
    return counters[: len(CLASSES)]

st.build_step = build
c.run_step = run_step
m = pd.read_parquet(c.kernel_measurements(gpu)[0])
rows = []
for cfg in cfgs:
    part = m[m.config == cfg].reset_index(drop=True)
    args = c.driver_args(part)
    k = parse_spec(args.trace).k if args.trace.startswith("synth") else 2048
    state["P"] = partial_bytes(args.backend, args.batch, k) if args.layout != "gqa" else 0
    rows += c.compare_decode_step(cfg, part, (c.fitted(gpu),))
df = c._errors(rows)
kv = df[df.point.str.endswith("kv")]
print(kv.groupby("experiment").agg(meas=("measured", "mean"), sim=("simulated", "mean"), err=("error_points", lambda e: e.abs().max()), dram=("dram_error_pct", lambda e: e.abs().median())).round(3))
