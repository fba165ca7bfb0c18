"""FlashMLA vs our sparse MLA fp8 decode, each called twice on the same random selection after
an L2 flush: per launch (ncu) the first call's DRAM bytes per selected byte (over-fetch) and
the second call's L2 hits (does the KV stay in the L2). Launch order in the printed plan."""
import json, os, sys
os.environ.setdefault("TRITON_INTERPRET", "0")
import torch
from dsacache.kernels import paged
from dsacache.kernels.flashmla import flashmla_sparse_decode
from dsacache.kernels.probes import FLUSH_BYTES, flush
from dsacache.kernels.sparse_decode import mla_sparse_decode
SCALE = (128 + 64) ** -0.5
CTX = 8192
flush_buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
plan = []
for backend in ("flashmla", "triton"):
    for b, k in ((1, 2048), (8, 256), (64, 2048)):
        g = torch.Generator(device="cpu").manual_seed(b * 10000 + k)
        pt = paged.make_page_table([CTX] * b, order="shuffled", seed=0, device="cuda")
        mc8 = paged.random_mla_cache(pt, True, seed=2, device="cuda")
        qm = torch.randn((b, 128, 576), generator=g).bfloat16().cuda()
        sel = torch.stack([torch.randperm(CTX, generator=g)[:k].sort().values for _ in range(b)]).int().cuda()
        fn = (lambda: flashmla_sparse_decode(qm, mc8, sel, SCALE)) if backend == "flashmla" else (lambda: mla_sparse_decode(qm, mc8, sel, SCALE))
        fn(); torch.cuda.synchronize()  # compile / metadata outside the measured pair
        plan.append(dict(backend=backend, batch=b, k=k, call="warmup"))
        flush(flush_buf); torch.cuda.synchronize()
        for call in ("first", "second"):
            fn(); torch.cuda.synchronize()
            plan.append(dict(backend=backend, batch=b, k=k, call=call, kv_bytes=b * k * 656))
        del mc8, pt; torch.cuda.empty_cache()
print(json.dumps(plan))
