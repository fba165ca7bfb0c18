"""Indexer pages per program, same process: the wave-balanced default (``balanced_pages_per_prog``)
against 16 (the old default) and neighbours, 3 repetitions each in turn; GQA at batch 8 with
more splits. CUDA-graph medians (``tune_kernels.graph_us``). Run from the repository root on a
GPU: ``OUT=DIR python docs/results/h100-kernels/waves-1207/indexer_pages_ab.py``."""

import json
import os
import sys

import pandas as pd
import torch

sys.path.insert(0, "benchmarks")
from tune_kernels import cases, graph_us, inputs  # noqa: E402

from dsacache.kernels.indexer import balanced_pages_per_prog  # noqa: E402

gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for bsz, ctx in [(8, 65536), (8, 131072), (64, 65536), (64, 131072)]:
    x = inputs(bsz, ctx, gen)
    fn, nbytes = cases("indexer", x)
    auto = balanced_pages_per_prog(bsz, ctx // 64, 1, torch.device("cuda"))
    for rep in range(3):
        for p in sorted({auto, 16, 13, 20, 32}):
            us = graph_us(lambda p=p, fn=fn: fn(pages_per_prog=p))
            rows.append({"kernel": "indexer", "batch": bsz, "context": ctx, "pages_per_prog": p,
                         "auto": p == auto, "rep": rep, "us": us, "GBps": nbytes / us / 1e3})  # fmt: skip
    del x, fn
    torch.cuda.empty_cache()
x = inputs(8, 65536, gen)
fn, nbytes = cases("gqa", x)
for rep in range(3):
    for kw in [{}, {"block_n": 64, "num_splits": 32}, {"block_n": 32, "num_splits": 64}]:
        us = graph_us(lambda kw=kw: fn(**kw))
        rows.append({"kernel": "gqa", "batch": 8, "context": 65536, "params": json.dumps(kw),
                     "rep": rep, "us": us, "GBps": nbytes / us / 1e3})  # fmt: skip
df = pd.DataFrame(rows)
df["gpu"] = torch.cuda.get_device_name()
df.to_csv(os.path.join(os.environ["OUT"], "indexer_pages_ab.csv"), index=False)
idx = df[df.kernel == "indexer"]
print(idx.groupby(["batch", "context", "pages_per_prog"])["us"].median().unstack().round(1))
print(df[df.kernel == "gqa"].groupby("params")["us"].median().round(2))
