"""Indexer, sparse MLA and GQA: unhinted (pipelined) vs hinted (one stage) times, same inputs.

Ran on the H200 from the repository root: `OUT=DIR python3 docs/results/h200-kernels/hint_cost.py`
(writes DIR/c/hint_cost.json; the log is hint_cost.log)."""
import json, os, sys
os.environ.setdefault("TRITON_INTERPRET", "0")
import torch
sys.path.insert(0, "benchmarks")
from tune_kernels import cases, graph_us, inputs
rows = []
gen = torch.Generator(device="cuda").manual_seed(0)
for kernel, shapes in [("indexer", [(8, 65536), (8, 131072), (64, 131072)]), ("mla", [(8, 65536), (64, 65536)]), ("gqa", [(8, 65536), (64, 65536)])]:
    for bsz, ctx in shapes:
        fn, nbytes = cases(kernel, inputs(bsz, ctx, gen))
        for evict in ["", "evict_first", "evict_last"]:
            us = graph_us(lambda: fn(evict=evict))
            rows.append(dict(kernel=kernel, batch=bsz, context=ctx, evict=evict or "none", us=us, GBps=nbytes / us / 1e3))
            print(f"{kernel} b{bsz} ctx{ctx} evict={evict or 'none'}: {us:.1f} us ({nbytes/us/1e3:.0f} GB/s)", flush=True)
        torch.cuda.empty_cache()
meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, command=" ".join([sys.executable, *sys.argv]))
json.dump(dict(meta=meta, rows=rows), open(os.environ["OUT"] + "/c/hint_cost.json", "w"), indent=1)
