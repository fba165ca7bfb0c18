"""Where the radix top-k's time goes at large batch, and launch variants (chunk, warps,
global atomics in the middle passes). CUDA-graph medians; equality checked against the
shipped kernel. Writes topk_tune.csv to $OUT."""
import os, sys, time
import pandas as pd, torch
from triton.testing import do_bench_cudagraph
sys.path.insert(0, os.path.dirname(__file__))
import topk_var
from dsacache.kernels.topk import radix_topk
K = 2048
rows = []
g = torch.Generator(device="cuda").manual_seed(0)
def t(fn):
    return 1e3 * do_bench_cudagraph(fn, rep=20, return_mode="median")
for b, ctx in ((8, 131072), (64, 65536), (64, 131072)):
    x = torch.randn((b, ctx), generator=g, device="cuda")
    cl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    ref = radix_topk(x, cl, K, 4, 64)
    base = t(lambda: radix_topk(x, cl, K, 4, 64))
    rows.append(dict(batch=b, context=ctx, variant="shipped", us=base, same=True))
    print(b, ctx, "shipped", round(base, 1), flush=True)
    for chunk in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            for hm in (0, 1):
                try:
                    out = topk_var.radix_topk(x, cl, K, 4, 64, chunk=chunk, warps=warps, hist_mode=hm)
                    same = torch.equal(out, ref)
                    us = t(lambda: topk_var.radix_topk(x, cl, K, 4, 64, chunk=chunk, warps=warps, hist_mode=hm))
                except Exception as e:
                    print("fail", chunk, warps, hm, repr(e)[:200]); continue
                rows.append(dict(batch=b, context=ctx, variant=f"c{chunk}w{warps}h{hm}", us=us, same=same))
                print(b, ctx, chunk, warps, hm, round(us, 1), same, flush=True)
df = pd.DataFrame(rows); df["gpu"] = torch.cuda.get_device_name()
df.to_csv(os.path.join(os.environ["OUT"], "topk_tune.csv"), index=False)
for (b, c), d in df.groupby(["batch", "context"]):
    print(b, c, d.sort_values("us").head(6)[["variant", "us", "same"]].to_string(index=False))

# per-pass time of the shipped launch at batch 64 x 128K: each pass replayed from a snapshot
# of the scratch the passes before it left (time of the restore copy subtracted)
import dsacache.kernels.topk as T
b, ctx = 64, 131072
x = torch.randn((b, ctx), generator=g, device="cuda")
cl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
sms = torch.cuda.get_device_properties(0).multi_processor_count
chunk = max(1024, T._pow2(-(-ctx // 128)), min(8192, T._pow2(ctx * b // (2 * sms))))
n_chunks = -(-ctx // chunk)
n_hist = T.PASSES * b * T.BINS
scratch = torch.zeros(n_hist + b * n_chunks * (T.BINS + 2), dtype=torch.int32, device="cuda")
out = torch.empty((b, K), dtype=torch.int32, device="cuda")
def launch(p):
    T.topk_radix_pass[(n_chunks, b)](x, cl, scratch[:n_hist], scratch[n_hist:], out, b, ctx, K, 4, 64,
        x.stride(0), out.stride(0), n_chunks, CHUNK=chunk, PASS=p, BITS=T.RADIX_BITS,
        PAD_STEPS=-(-K // chunk) if p == T.PASSES else 0)
snap = scratch.clone()
copy_us = t(lambda: scratch.copy_(snap))
for p in range(T.PASSES + 1):
    snap.copy_(scratch)
    def one():
        scratch.copy_(snap); launch(p)
    us = t(one) - copy_us
    scratch.copy_(snap); launch(p)
    print("pass", p, "chunk", chunk, round(us, 1), "us", flush=True)
