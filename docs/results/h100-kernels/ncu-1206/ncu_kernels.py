"""Run each decode kernel once inside cudaProfilerStart/Stop (after warm-up) for ncu --set full."""
import sys
import torch
sys.path.insert(0, "benchmarks")
from tune_kernels import inputs, cases  # noqa: E402
from dsacache.kernels import paged
from dsacache.kernels.flashmla import flashmla_sparse_decode

gen = torch.Generator(device="cuda").manual_seed(0)
runs = []
for kernel, bsz, ctx in [("indexer", 8, 65536), ("gqa", 8, 65536), ("indexer", 64, 65536), ("gqa", 64, 65536), ("mla", 64, 8192)]:
    x = inputs(bsz, ctx, gen)
    fn, _ = cases(kernel, x)
    runs.append((f"{kernel} b{bsz} ctx{ctx}", fn))
    if kernel == "mla":
        mc = paged.random_mla_cache(x["pt"], True, seed=2, device="cuda")
        qm = torch.randn((bsz, 128, 576), generator=gen, device="cuda").bfloat16()
        runs.append(("flashmla b64", lambda: flashmla_sparse_decode(qm, mc, x["sel"], (128 + 64) ** -0.5)))
for name, fn in runs:
    for _ in range(3):
        fn()
torch.cuda.synchronize()
torch.cuda.profiler.start()
for name, fn in runs:
    torch.cuda.nvtx.range_push(name)
    fn()
    torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("ran", [n for n, _ in runs])
