"""Same-process A/B of the indexer: HEAD (ix_head.py) against pages read once per program and
scales a step ahead (ix_pf.py), 2 and 3 stages; batch 8/64 x 64K and 8 x 128K; CUDA-graph
medians, 3 repetitions in turn; max |diff| against HEAD."""
import importlib.util, json, os, statistics, sys
sys.path.insert(0, "benchmarks")
import torch
import tune_kernels as tk

def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), name + ".py"))
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod

specs = ["ix_head:2", "ix_pf:2", "ix_pf:3", "ix_head:3"]
mods = {n.split(":")[0]: load(n.split(":")[0]) for n in specs}
rows = []
gen = torch.Generator(device="cuda").manual_seed(0)
for bsz, ctx in ((8, 65536), (64, 65536), (8, 131072)):
    x = tk.inputs(bsz, ctx, gen)
    fns = {n: (lambda m=mods[n.split(":")[0]], st=int(n.split(":")[1]):
               m.indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx, num_stages=st)) for n in specs}
    ref = fns[specs[0]]()
    diffs = {n: (f() - ref).nan_to_num(0, 0, 0).abs().max().item() for n, f in fns.items()}
    same_inf = {n: torch.equal(torch.isinf(f()), torch.isinf(ref)) for n, f in fns.items()}
    for rep in range(3):
        for n, f in fns.items():
            rows.append(dict(batch=bsz, context=ctx, impl=n, rep=rep, us=tk.graph_us(f), max_abs_diff=diffs[n], same_inf=same_inf[n]))
    med = {n: statistics.median(r["us"] for r in rows if r["batch"] == bsz and r["context"] == ctx and r["impl"] == n) for n in specs}
    print(f"indexer b{bsz} x {ctx}: " + "; ".join(f"{n} {u:.2f} us ({u / med[specs[0]]:.3f})" for n, u in med.items()), "diffs", diffs, same_inf, flush=True)
    del x; torch.cuda.empty_cache()
json.dump(dict(rows=rows, gpu=torch.cuda.get_device_name(), torch=torch.__version__, command="python .gpurun/ix_ab.py"),
          open(f"{os.environ['OUT']}/ix_ab.json", "w"), indent=1)
