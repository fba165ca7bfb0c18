"""Same-process A/B of the radix top-k: e3a5709's kernel (2048-token chunks; the fourth pass
builds its histogram twice, every chunk builds every histogram) against the working tree's
(histogram once, atomics for chunks with <= 32 keys sharing the prefix), and bare
torch.topk. CUDA-graph medians, 3 repetitions in turn; equality checked. $OUT/topk_ab2.csv."""
import os, sys
import pandas as pd, torch
from triton.testing import do_bench_cudagraph
sys.path.insert(0, os.path.dirname(__file__))
import topk_chunks_only as old
from dsacache.kernels.topk import radix_topk
K = 2048
rows = []
g = torch.Generator(device="cuda").manual_seed(0)
for b in (1, 8, 64):
    for ctx in (8192, 65536, 131072):
        for data in ("randn", "ties"):
            x = torch.randn((b, ctx), generator=g, device="cuda")
            if data == "ties":
                x = (x * 4).round()
            cl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            same = torch.equal(old.radix_topk(x, cl, K, 4, 64), radix_topk(x, cl, K, 4, 64))
            fns = {"e3a5709": lambda: old.radix_topk(x, cl, K, 4, 64),
                   "new": lambda: radix_topk(x, cl, K, 4, 64),
                   "torch": lambda: torch.topk(x, K, dim=1)}
            for rep in range(3):
                for name, fn in fns.items():
                    us = 1e3 * do_bench_cudagraph(fn, rep=20, return_mode="median")
                    rows.append(dict(batch=b, context=ctx, data=data, impl=name, rep=rep, us=us, same=same))
            print(b, ctx, data, same, flush=True)
df = pd.DataFrame(rows)
df["gpu"] = torch.cuda.get_device_name()
df.to_csv(os.path.join(os.environ["OUT"], "topk_ab2.csv"), index=False)
med = df.groupby(["batch", "context", "data", "impl"])["us"].median().unstack("impl")
med["new/e3a5709"] = med["new"] / med["e3a5709"]
print(med.round(3).to_string())
print("same:", df["same"].all())
