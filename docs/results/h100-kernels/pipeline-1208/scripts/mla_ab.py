"""Same-process A/B of sparse MLA fp8: HEAD's kernel (sd_head.py) against the variant with
the positions and pages of each tile loaded ahead (sd_pf2.py), FlashMLA beside; batch 8/64 x
64K, k 2048; CUDA-graph medians, 3 repetitions in turn; max |diff| against HEAD."""
import importlib.util, json, os, sys
sys.path.insert(0, "benchmarks")
import torch
import tune_kernels as tk
from dsacache.kernels import paged
from dsacache.kernels.flashmla import flashmla_available, flashmla_sparse_decode

def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), name + ".py"))
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod

specs = sys.argv[1:] or ["sd_head:2", "sd_pf2:1"]  # module:num_stages
mods = {n.split(":")[0]: load(n.split(":")[0]) for n in specs}
impls = {n: (mods[n.split(":")[0]], int(n.split(":")[1])) for n in specs}
out = os.environ["OUT"]
rows = []
gen = torch.Generator(device="cuda").manual_seed(0)
for bsz in (64, 8):
    x = tk.inputs(bsz, 65536, gen)
    gc = paged.random_gqa_cache(x["pt"], 3, 64, seed=4, device="cuda")
    qg = torch.randn((bsz, 9, 64), generator=gen, device="cuda").bfloat16()
    gfns = {"gqa:" + n: (lambda m=m, st=st: m.gqa_sparse_decode(qg, gc, x["sel"], num_stages=st))
            for n, (m, st) in impls.items()}
    gref = gfns["gqa:" + specs[0]]()[0].float()
    for rep in range(3):
        for n, f in gfns.items():
            us = tk.graph_us(f)
            rows.append(dict(batch=bsz, impl=n, rep=rep, us=us, max_abs_diff=(f()[0].float() - gref).abs().max().item()))
            print(bsz, n, rep, f"{us:.2f} us", flush=True)
    del gc, qg
    mc = paged.random_mla_cache(x["pt"], True, seed=2, device="cuda")
    qm = torch.randn((bsz, 128, 576), generator=gen, device="cuda").bfloat16()
    fns = {n: (lambda m=m, st=st: m.mla_sparse_decode(qm, mc, x["sel"], tk.SCALE, num_stages=st))
           for n, (m, st) in impls.items()}
    if flashmla_available() is None:
        fns["flashmla"] = lambda: flashmla_sparse_decode(qm, mc, x["sel"], tk.SCALE)
    ref = fns[specs[0]]()[0].float()
    diffs = {}
    for n, f in list(fns.items()):
        try:
            diffs[n] = (f()[0].float() - ref).abs().max().item()
        except Exception as e:
            print(bsz, n, "failed:", repr(e)[:300], flush=True); del fns[n]
    for rep in range(3):
        for n, f in fns.items():
            us = tk.graph_us(f)
            rows.append(dict(batch=bsz, impl=n, rep=rep, us=us, max_abs_diff=diffs[n]))
            print(bsz, n, rep, f"{us:.1f} us diff {diffs[n]:.3g}", flush=True)
    del x, mc, qm; torch.cuda.empty_cache()
json.dump(dict(rows=rows, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               command="python .gpurun/mla_ab.py " + " ".join(sys.argv[1:])), open(f"{out}/mla_ab.json", "w"), indent=1)
import statistics
for bsz in (64, 8):
    med = {r["impl"]: statistics.median(x["us"] for x in rows if x["batch"] == bsz and x["impl"] == r["impl"]) for r in rows if r["batch"] == bsz}
    for pre in ("", "gqa:"):
        base = med[pre + specs[0]]
        print(f"batch {bsz} {pre or 'mla'}: " + "; ".join(f"{n} {u:.2f} us ({u / base:.3f})" for n, u in med.items() if n.startswith("gqa:") == bool(pre)), flush=True)
    print("max diffs:", {r["impl"]: r["max_abs_diff"] for r in rows if r["batch"] == bsz}, flush=True)
