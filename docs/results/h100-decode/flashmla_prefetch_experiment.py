"""Experiment (2026-12-06, CPU only; monkeypatches the stream builder and run_step, not part of
the model): FlashMLA with one read per token, each row read as its latent (512 B) and then its
scales + RoPE (144 B), the latent's 256-B L2 prefetch emulated by an access to the aligned
256-B blocks it touches (reads not counted, DRAM fetches added to the kv class), and the
query read as often per request as the cold-L2 probe measured, all at the kernel's start (the
parts run at once). Usage: python flashmla_prefetch_experiment.py h100 1 1

Output on the H100 profiles (KV, mean measured / simulated hit rate, worst error in points,
median DRAM error %): f01 0.575/0.541 4.0 3.1; f02 0.551/0.518 4.2 4.9; f03 0.515/0.301 21.6
27.3; f04 0.596/0.517 11.5 4.4; f05 0.308/0.163 14.6 3.4; f06 0.587/0.616 5.9 14.3; f07
0.311/0.238 7.8 24.2. (With the query re-reads spread over the gathers instead: f01 6.4,
f03 34.8, f05 14.6 points.)
"""
import numpy as np, pandas as pd, sys
from dsacache import calibration as c
from dsacache.kernels import decode_step as ds
from dsacache.simulator import stream as st
from dsacache.simulator.stream import AccessChunk
from dsacache.simulator.workload import CLASS_ID, CLASSES
from dsacache.simulator.engine import COUNTERS

MULT = {(1, 2048): 9.3, (1, 512): 5.1, (8, 256): 1.8, (8, 2048): 6.8, (64, 2048): 1.1}
gpu, use_q, use_pf = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ds.FLASHMLA_READS = 1
# since 2026-12-07 the model itself reads FlashMLA's loads and query passes; undo that so
# this script starts, as it did, from one whole-record read per token and one query read
ds.FLASHMLA_LOADS = ()
ds.flashmla_query_reads = lambda batch, k: 1.0
ds.split_partial_bytes = lambda *args: 0  # nor the split-K partials (also since 2026-12-07)
orig_build = st.build_step
state = {}
PF = len(CLASSES)  # extra counters row
F = AccessChunk.__dataclass_fields__

def sub(ch, idx):
    return AccessChunk(*(getattr(ch, k)[idx] for k in F))

def build(amap, rows):
    ch = orig_build(amap, rows)
    qb = amap.query_base + amap.workload.batch * amap.index_query_bytes
    out, buckets = [], []
    cut = np.flatnonzero((np.diff(ch.layer) != 0) | (np.diff(ch.cls) != 0)) + 1
    for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(ch)]):
        seg = sub(ch, np.arange(lo, hi))
        if ch.cls[lo] != CLASS_ID["kv"]:
            out.append(seg); buckets.append(seg.cls.astype(np.int64)); continue
        isq = seg.addr >= qb
        q, g = sub(seg, np.flatnonzero(isq)), sub(seg, np.flatnonzero(~isq))
        n = len(g)
        # per row: latent (512 B), [prefetch of its aligned 256-B blocks], scales+rope (144 B)
        lat = AccessChunk(g.addr.copy(), np.full(n, 512, np.int64), g.cls, g.step, g.layer, g.tier, g.score)
        tail = AccessChunk(g.addr + 512, np.full(n, 144, np.int64), g.cls, g.step, g.layer, g.tier, g.score)
        b0 = (g.addr // 256) * 256
        b1 = -(-(g.addr + 512) // 256) * 256
        pf = AccessChunk(b0, b1 - b0, g.cls, g.step, g.layer, g.tier, g.score)
        parts = [lat, pf, tail] if use_pf else [lat, tail]
        inter = AccessChunk(*(np.stack([getattr(p, k) for p in parts], 1).reshape(-1) for k in F))
        bk = np.stack([np.full(n, CLASS_ID["kv"]), np.full(n, PF), np.full(n, CLASS_ID["kv"])][: len(parts)] if use_pf else [np.full(n, CLASS_ID["kv"])] * 2, 1).reshape(-1)
        reps = max(1, int(round(state["mult"]))) if use_q else 1
        rows_per = np.array_split(np.arange(n), reps)
        for r in rows_per:
            out.append(q); buckets.append(q.cls.astype(np.int64))
        out.append(inter); buckets.append(bk)
    res = AccessChunk.concat(out)
    res.bucket = np.concatenate(buckets)
    return res

def run_step(cache, chunk, as_weights=None):
    klass = chunk.cls.copy()
    if as_weights is not None:
        klass[as_weights] = CLASS_ID["weights"]
    counters = np.zeros((len(CLASSES) + 1, len(COUNTERS)), np.int64)
    bucket = getattr(chunk, "bucket", chunk.cls.astype(np.int64))
    cache.run_chunk(chunk.addr, chunk.nbytes, np.zeros(len(chunk), bool), klass, chunk.layer, bucket, counters)
    counters[CLASS_ID["kv"], 7] += counters[PF, 7]
    return counters[: len(CLASSES)]

st.build_step = build
c.run_step = run_step
m = pd.read_parquet(c.kernel_measurements(gpu)[0])
rows = []
from dsacache.tracer.synth import parse_spec
for cfg in ["f01", "f02", "f03", "f04", "f05", "f06", "f07"]:
    part = m[m.config == cfg].reset_index(drop=True)
    args = c.driver_args(part)
    state["mult"] = MULT[(args.batch, parse_spec(args.trace).k)]
    rows += c.compare_decode_step(cfg, part, (c.fitted(gpu),))
df = c._errors(rows)
kv = df[df.point.str.endswith("kv")]
print(kv.groupby("experiment").agg(meas=("measured", "mean"), sim=("simulated", "mean"), err=("error_points", lambda e: e.abs().max()), dram=("dram_error_pct", lambda e: e.abs().median())).round(3))
