"""Device experiment (#7): sparse MLA fp8 with 16 warps per program (never swept), against the
default (8 warps) and FlashMLA, at batch 8 and 64, context 64K; CUDA-graph medians; outputs
compared with the default's."""
import itertools, json, os, sys, time
sys.path.insert(0, "benchmarks")
import torch
import tune_kernels as tk
from dsacache.kernels.flashmla import flashmla_available, flashmla_sparse_decode
from dsacache.kernels import paged
from dsacache.kernels.sparse_decode import mla_sparse_decode

out = os.environ["OUT"]
rows = []
gen = torch.Generator(device="cuda").manual_seed(0)
for bsz in (64, 8):
    x = tk.inputs(bsz, 65536, gen)
    mc = paged.random_mla_cache(x["pt"], True, seed=2, device="cuda")
    qm = torch.randn((bsz, 128, 576), generator=gen, device="cuda").bfloat16()
    ref = mla_sparse_decode(qm, mc, x["sel"], tk.SCALE)[0].float()
    combos = [None] + [dict(num_warps=w, block_n=n, num_stages=s) for w, n, s in
                       itertools.product([16], [64, 32], [1, 2, 3])] + [dict(num_warps=8, block_n=64, num_stages=3)]
    for kw in combos:
        t0 = time.time()
        try:
            fn = lambda kw=kw: mla_sparse_decode(qm, mc, x["sel"], tk.SCALE, **(kw or {}))
            diff = (fn()[0].float() - ref).abs().max().item()
            us = tk.graph_us(fn); err = ""
        except Exception as e:
            us, diff, err = float("nan"), float("nan"), repr(e)[:200]
        rows.append(dict(batch=bsz, kernel="triton", params=str(kw) if kw else "default", us=us, max_abs_diff=diff, error=err))
        print(bsz, rows[-1]["params"], f"{us:.1f} us diff {diff:.3g} ({time.time()-t0:.0f} s) {err}", flush=True)
    if flashmla_available() is None:
        fn = lambda: flashmla_sparse_decode(qm, mc, x["sel"], tk.SCALE)
        us = tk.graph_us(fn); diff = (fn()[0].float() - ref).abs().max().item()
        rows.append(dict(batch=bsz, kernel="flashmla", params="", us=us, max_abs_diff=diff, error=""))
        print(bsz, "flashmla", f"{us:.1f} us diff {diff:.3g}", flush=True)
    del x, mc, qm; torch.cuda.empty_cache()
json.dump(dict(rows=rows, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               command="python .gpurun/mla_warps.py"), open(f"{out}/mla_warps.json", "w"), indent=1)
