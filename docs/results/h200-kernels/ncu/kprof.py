"""One shape of one kernel, launched a few times (ncu measures the last)."""
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "0")
import torch
sys.path.insert(0, "benchmarks")
from tune_kernels import cases, inputs
kernel, b, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gen = torch.Generator(device="cuda").manual_seed(0)
fn, nbytes = cases(kernel, inputs(b, c, gen))
for _ in range(4):
    fn()
torch.cuda.synchronize()
print(kernel, b, c, nbytes)
