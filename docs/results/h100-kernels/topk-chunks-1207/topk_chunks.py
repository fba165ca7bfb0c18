"""Radix top-k: the shipped chunk rule (about two programs per SM over the batch, <= 8192)
against fixed chunks of 1024-4096 tokens (4 warps), every shape of bench_kernels; CUDA-graph
medians, 3 repetitions in turn, results checked equal. Writes topk_chunks.csv to $OUT."""
import os, sys
import pandas as pd, torch
from triton.testing import do_bench_cudagraph
sys.path.insert(0, os.path.dirname(__file__))
import topk_var
K = 2048
rows = []
g = torch.Generator(device="cuda").manual_seed(0)
for b in (1, 8, 64):
    for ctx in (8192, 65536, 131072):
        x = torch.randn((b, ctx), generator=g, device="cuda")
        cl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        ref = topk_var.radix_topk(x, cl, K, 4, 64)
        variants = {"shipped": dict()}
        for c in (1024, 2048, 4096):
            if -(-ctx // c) <= 128:
                variants[f"c{c}w4"] = dict(chunk=c, warps=4)
        variants["c1024w2"] = dict(chunk=max(1024, -(-ctx // 128)), warps=2)
        for rep in range(3):
            for name, kw in variants.items():
                same = torch.equal(topk_var.radix_topk(x, cl, K, 4, 64, **kw), ref)
                us = 1e3 * do_bench_cudagraph(lambda: topk_var.radix_topk(x, cl, K, 4, 64, **kw), rep=20, return_mode="median")
                rows.append(dict(batch=b, context=ctx, variant=name, rep=rep, us=us, same=same))
        print(b, ctx, {n: round(r["us"], 1) for n, r in zip(variants, rows[-len(variants):])}, flush=True)
df = pd.DataFrame(rows); df["gpu"] = torch.cuda.get_device_name()
df.to_csv(os.path.join(os.environ["OUT"], "topk_chunks.csv"), index=False)
print(df.groupby(["batch", "context", "variant"])["us"].median().unstack("variant").round(1).to_string())
print("same:", df.same.all())
