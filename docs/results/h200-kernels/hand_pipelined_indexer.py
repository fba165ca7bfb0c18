"""Old (committed) vs hand-pipelined indexer kernel, same process, same inputs; CUDA-graph medians.

Ran on the H200 with the patch hand_pipelined_indexer.diff applied and the committed kernel
copied to .gpurun/indexer_old.py: `OUT=DIR python3 hand_pipelined_indexer.py`. Not merged:
slower at every shape (hand_pipelined_indexer.log)."""
import importlib.util, itertools, json, os, sys
os.environ.setdefault("TRITON_INTERPRET", "0")
import torch
sys.path.insert(0, "benchmarks")
from tune_kernels import graph_us, inputs
from dsacache.kernels.indexer import indexer_logits
spec = importlib.util.spec_from_file_location("indexer_old", ".gpurun/indexer_old.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
rows = []
gen = torch.Generator(device="cuda").manual_seed(0)
for bsz, ctx in [(8, 65536), (8, 131072), (64, 65536), (64, 131072)]:
    x = inputs(bsz, ctx, gen)
    nbytes = bsz * ctx * 136
    a = old.indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx)
    bnew = indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx)
    diff = (a - bnew).abs().nan_to_num(0).max().item()
    same_inf = bool(((a == float("-inf")) == (bnew == float("-inf"))).all())
    t_old = graph_us(lambda: old.indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx))
    t_new = graph_us(lambda: indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx))
    print(f"b{bsz} ctx{ctx}: old {t_old:.1f} us, new {t_new:.1f} us ({t_old/t_new:.2f}x; {nbytes/t_new/1e3:.0f} GB/s) maxdiff {diff:g} inf-match {same_inf}", flush=True)
    rows.append(dict(batch=bsz, context=ctx, params="old default", us=t_old))
    rows.append(dict(batch=bsz, context=ctx, params="new default", us=t_new, maxdiff=diff))
    for ppp, pps, nw, ns in itertools.product([8, 16, 32], [1], [4, 8], [1, 2]):
        kw = dict(pages_per_prog=ppp, pages_per_step=pps, num_warps=nw, num_stages=ns)
        try:
            t = graph_us(lambda: indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx, **kw))
        except Exception as e:
            t = float("nan"); print("  fail", kw, repr(e)[:120])
        rows.append(dict(batch=bsz, context=ctx, params=str(kw), us=t))
    mine = [r for r in rows if r["batch"] == bsz and r["context"] == ctx and r["us"] == r["us"]]
    best = min(mine, key=lambda r: r["us"])
    print(f"  best {best['us']:.1f} us {best['params']} ({nbytes/best['us']/1e3:.0f} GB/s)", flush=True)
    del x; torch.cuda.empty_cache()
json.dump(rows, open(os.environ["OUT"] + "/b/cmp_indexer.json", "w"), indent=1)
