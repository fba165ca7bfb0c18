"""The indexer with its query quantised before the kernel, same process: ``indexer_logits``
on a bf16 query (each program quantises its request's query to fp8 per head) against the
same kernel on a query that ``quantise_index_query`` made fp8 once per request, as
DeepSeek-V3.2's inference code hands its indexer kernel a query quantised by its own
``act_quant``. CUDA-graph medians (``tune_kernels.graph_us``), 3 repetitions in turn, of:
``in-kernel`` (bf16 query); ``quantised before`` (the quantisation outside the graph, as
when the query projection upstream emits fp8); ``quantise + kernel`` (torch's quantisation
ops in the graph as well). Checks that both give the same logits.
Run from the repository root on a GPU:
``OUT=DIR python docs/results/h100-kernels/indexer-prequant-1207/indexer_prequant_ab.py [SHAPES]``
(``BATCHxCONTEXT,...``; default batch 8 and 64 at 64K and 128K).
"""

import os
import sys

import pandas as pd
import torch

sys.path.insert(0, "benchmarks")
from tune_kernels import graph_us, inputs  # noqa: E402

from dsacache.kernels.indexer import indexer_logits, quantise_index_query  # noqa: E402

gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
SHAPES = sys.argv[1] if len(sys.argv) > 1 else "8x65536,8x131072,64x65536,64x131072"
for bsz, ctx in (map(int, s.split("x")) for s in SHAPES.split(",")):
    x = inputs(bsz, ctx, gen)
    nbytes = bsz * ctx * (132 + 4)  # keys and scales read, logits written
    q8, w8 = quantise_index_query(x["qi"], x["w"])
    ref = indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx)
    got = indexer_logits(q8, w8, x["ic"], x["cl"], ctx)
    fin = torch.isfinite(ref)
    same_inf = bool(torch.equal(fin, torch.isfinite(got)))
    rel = float((got[fin] - ref[fin]).abs().max() / ref[fin].abs().max())
    calls = {
        "in-kernel": lambda x=x, ctx=ctx: indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx),
        "quantised before": lambda x=x, q8=q8, w8=w8, ctx=ctx: indexer_logits(
            q8, w8, x["ic"], x["cl"], ctx),
        "quantise + kernel": lambda x=x, ctx=ctx: indexer_logits(
            *quantise_index_query(x["qi"], x["w"]), x["ic"], x["cl"], ctx),
    }  # fmt: skip
    for rep in range(3):
        for name, fn in calls.items():
            us = graph_us(fn)
            rows.append({"variant": name, "batch": bsz, "context": ctx, "rep": rep, "us": us,
                         "GBps": nbytes / us / 1e3, "same_inf": same_inf,
                         "max_rel_diff": rel})  # fmt: skip
    del x, ref, got
    torch.cuda.empty_cache()
df = pd.DataFrame(rows)
df["gpu"] = torch.cuda.get_device_name()
df.to_csv(os.path.join(os.environ["OUT"], "indexer_prequant_ab.csv"), index=False)
med = df.groupby(["batch", "context", "variant"])["us"].median().unstack()
print(med.round(2))
print(med.div(med["in-kernel"], axis=0).round(3))  # time relative to in-kernel quantisation
print(df.groupby(["batch", "context"])[["same_inf", "max_rel_diff"]].first())
