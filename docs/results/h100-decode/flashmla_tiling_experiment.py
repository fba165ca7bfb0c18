"""Experiment (2026-12-06, CPU only): FlashMLA's tiling as its source states it, without the
256-B prefetch. One read per selected token (FLASHMLA_READS = 1) and the attention query read
again once per split part, as many times per request as the cold-L2 probe measured
(docs/results/h200-decode/flashmla-parts.parquet), spread over the KV gathers. Monkeypatches
the stream builder; not part of the model. Usage: python flashmla_tiling_experiment.py h100 1

Output on the H100 profiles (KV, mean measured / simulated hit rate, worst error in points,
median DRAM error %): f01 0.570/0.443 13.1 3.2; f02 0.546/0.401 15.4 0.2; f03 0.509/0.082
42.8 34.0; f04 0.592/0.398 22.8 0.8; f05 0.294/0.013 28.1 5.8; f06 0.582/0.545 15.4 23.2;
f07 0.311/0.118 19.8 25.2.
"""
import numpy as np, pandas as pd, sys
from dsacache import calibration as c
from dsacache.kernels import decode_step as ds
from dsacache.simulator import stream as st
from dsacache.simulator.stream import AccessChunk
from dsacache.simulator.workload import CLASS_ID

MULT = {(1, 2048): 9.3, (1, 512): 5.1, (8, 256): 1.8, (8, 2048): 6.8, (64, 2048): 1.1}
gpu = sys.argv[1]
reads = int(sys.argv[2])
ds.FLASHMLA_READS = reads
# since 2026-12-07 the model itself reads FlashMLA's loads and query passes; undo that so
# this script starts, as it did, from one whole-record read per token and one query read
ds.FLASHMLA_LOADS = ()
ds.flashmla_query_reads = lambda batch, k: 1.0
ds.split_partial_bytes = lambda *args: 0  # nor the split-K partials (also since 2026-12-07)
if reads != 1:  # the stand-in's whole-record reads per token
    ds.kv_reads_per_token = lambda backend, layout, heads: reads
orig_build = st.build_step
state = {}

def build(amap, rows):
    ch = orig_build(amap, rows)
    m = state["mult"]
    if m <= 1:
        return ch
    qb = amap.query_base + amap.workload.batch * amap.index_query_bytes
    parts = []
    idx = np.arange(len(ch))
    # per (layer): the kv run = [queries][gathers]; spread (m-1) repeats of each query over gathers
    out = []
    cut = np.flatnonzero((np.diff(ch.layer) != 0) | (np.diff(ch.cls) != 0)) + 1
    bounds = list(zip([0, *cut.tolist()], [*cut.tolist(), len(ch)]))
    f = AccessChunk.__dataclass_fields__
    for lo, hi in bounds:
        seg = AccessChunk(*(getattr(ch, k)[lo:hi] for k in f))
        if ch.cls[lo] != CLASS_ID["kv"]:
            out.append(seg); continue
        isq = seg.addr >= qb
        q = AccessChunk(*(getattr(seg, k)[isq] for k in f))
        g = AccessChunk(*(getattr(seg, k)[~isq] for k in f))
        reps = int(round(m))
        pieces = np.array_split(np.arange(len(g)), reps)
        for p in pieces:
            out.append(q)
            out.append(AccessChunk(*(getattr(g, k)[p] for k in f)))
    return AccessChunk.concat(out)

st.build_step = build
m = pd.read_parquet(c.kernel_measurements(gpu)[0])
rows = []
for cfg in ["f01", "f02", "f03", "f04", "f05", "f06", "f07"]:
    part = m[m.config == cfg].reset_index(drop=True)
    args = c.driver_args(part)
    from dsacache.tracer.synth import parse_spec
    s = parse_spec(args.trace)
    state["mult"] = MULT[(args.batch, s.k)]
    r = c.compare_decode_step(cfg, part, (c.fitted(gpu),))
    rows += r
df = c._errors(rows)
kv = df[df.point.str.endswith("kv")]
print(kv.groupby("experiment").agg(meas=("measured", "mean"), sim=("simulated", "mean"), err=("error_points", lambda e: e.abs().max()), dram=("dram_error_pct", lambda e: e.abs().median())).round(3))
