"""Same-process A/B of the radix top-k: the version of 2691004 (six passes + torch.sort)
against the working tree's (five passes, rows written in order), and torch.topk; CUDA-graph
medians, 3 repetitions in turn. Writes topk_ab.csv to $OUT."""
import os, statistics, sys
import pandas as pd, torch
from triton.testing import do_bench_cudagraph
sys.path.insert(0, os.path.dirname(__file__))
import topk_old
from dsacache.kernels.topk import radix_topk
K = 2048
rows = []
g = torch.Generator(device="cuda").manual_seed(0)
for b in (1, 8, 64):
    for ctx in (8192, 65536, 131072):
        x = torch.randn((b, ctx), generator=g, device="cuda")
        cl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        same = torch.equal(topk_old.radix_topk(x, cl, K, 4, 64), radix_topk(x, cl, K, 4, 64))
        fns = {"old": lambda: topk_old.radix_topk(x, cl, K, 4, 64),
               "new": lambda: radix_topk(x, cl, K, 4, 64),
               "torch": lambda: torch.topk(x, K, dim=1)}
        for rep in range(3):
            for name, fn in fns.items():
                us = 1e3 * do_bench_cudagraph(fn, rep=20, return_mode="median")
                rows.append(dict(batch=b, context=ctx, impl=name, rep=rep, us=us, same=same))
                print(b, ctx, name, rep, round(us, 2), same, flush=True)
df = pd.DataFrame(rows)
df["gpu"] = torch.cuda.get_device_name()
df.to_csv(os.path.join(os.environ["OUT"], "topk_ab.csv"), index=False)
med = df.groupby(["batch", "context", "impl"])["us"].median().unstack("impl")
med["new/old"] = med["new"] / med["old"]
med["new/torch"] = med["new"] / med["torch"]
print(med.round(3).to_string())
print("same:", df.groupby(["batch", "context"])["same"].all().all())
