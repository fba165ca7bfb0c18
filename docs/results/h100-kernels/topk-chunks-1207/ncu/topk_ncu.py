"""One radix top-k at batch 64 x 128K (after a warm-up call), for ncu."""
import torch
from dsacache.kernels.topk import radix_topk
x = torch.randn((64, 131072), device="cuda")
cl = torch.full((64,), 131072, dtype=torch.int32, device="cuda")
radix_topk(x, cl, 2048, 4, 64)
torch.cuda.synchronize()
radix_topk(x, cl, 2048, 4, 64)
torch.cuda.synchronize()
