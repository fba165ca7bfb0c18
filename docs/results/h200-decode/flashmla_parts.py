"""FlashMLA sparse decode at cold L2 with a random selection and with an empty one (all -1:
no KV but one row, so its L2 reads are the query's and the indices'), per shape."""
import json, os
os.environ.setdefault("TRITON_INTERPRET", "0")
import torch
from dsacache.kernels import paged
from dsacache.kernels.flashmla import flashmla_sparse_decode
from dsacache.kernels.probes import FLUSH_BYTES, flush
SCALE = (128 + 64) ** -0.5
CTX = 8192
flush_buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
plan = []
for b, k in ((1, 2048), (1, 512), (8, 256), (8, 2048), (64, 2048)):
    g = torch.Generator(device="cpu").manual_seed(b * 10000 + k)
    pt = paged.make_page_table([CTX] * b, order="shuffled", seed=0, device="cuda")
    mc8 = paged.random_mla_cache(pt, True, seed=2, device="cuda")
    qm = torch.randn((b, 128, 576), generator=g).bfloat16().cuda()
    rand = torch.stack([torch.randperm(CTX, generator=g)[:k].sort().values for _ in range(b)]).int().cuda()
    none = torch.full_like(rand, -1)
    for name, sel in (("random", rand), ("none", none)):
        flashmla_sparse_decode(qm, mc8, sel, SCALE); torch.cuda.synchronize()
        plan.append(dict(batch=b, k=k, selection=name, call="warmup"))
        flush(flush_buf); torch.cuda.synchronize()
        flashmla_sparse_decode(qm, mc8, sel, SCALE); torch.cuda.synchronize()
        plan.append(dict(batch=b, k=k, selection=name, call="cold"))
    del mc8, pt; torch.cuda.empty_cache()
print(json.dumps(plan))
