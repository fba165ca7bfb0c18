"""Sweep the launch parameters of our DSA decode kernels on the GPU; print the best per shape.

For the indexer logits (pages per program and per loop step, warps, pipeline stages), the
sparse GQA decode and the sparse MLA fp8 decode (heads and tokens per tile, warps, stages,
split-K), at the shapes where ``bench_kernels.py`` found them furthest from their goals, every
combination is timed from a CUDA graph (median, ``do_bench_cudagraph``) on the same inputs,
beside the defaults the library picks. Combinations that do not compile or run (shared
memory, registers) are recorded with their error. The defaults in ``kernels/`` come from
this script's results (``docs/results/h200-kernels/tune_kernels.csv``).

    python benchmarks/tune_kernels.py [--kernels indexer,gqa,mla] [--shapes 64x65536] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from dsacache.kernels import paged  # noqa: E402
from dsacache.kernels.indexer import indexer_logits, select_topk  # noqa: E402
from dsacache.kernels.sparse_decode import gqa_sparse_decode, mla_sparse_decode  # noqa: E402

K = 2048
SCALE = (128 + 64) ** -0.5
SHAPES = {  # (batch, context) per kernel
    "indexer": [(8, 65536), (8, 131072), (64, 65536), (64, 131072)],
    "gqa": [(8, 65536), (64, 65536), (64, 131072)],
    "mla": [(8, 65536), (64, 65536)],
}
GRIDS = {
    "indexer": {"pages_per_step": [1, 2, 4], "pages_per_prog": [8, 13, 16, 25, 32],
                "num_warps": [4, 8], "num_stages": [2, 3, 4]},
    "gqa": {"block_n": [64, 128, 256], "num_warps": [4, 8], "num_stages": [2, 3],
            "num_splits": [None, 1, 2, 4, 8, 16, 32, 64]},
    "mla": {"block_h": [32, 64], "block_n": [32, 64], "num_warps": [4, 8, 16],
            "num_stages": [1, 2, 3], "num_splits": [None, 1, 2, 4]},
}  # fmt: skip


def graph_us(fn: Callable[[], object]) -> float:
    return 1e3 * do_bench_cudagraph(fn, rep=20, return_mode="median")


def inputs(bsz: int, ctx: int, gen: torch.Generator) -> dict:
    """Caches and queries of one shape: shuffled pages, DeepSeek-V3.2 indexer and MLA
    shapes, SmolLM2's GQA shape; the selection is the indexer's real top-k."""
    pt = paged.make_page_table([ctx] * bsz, order="shuffled", seed=0, device="cuda")
    cl = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")
    ic = paged.random_index_cache(pt, seed=1, device="cuda")
    qi = torch.randn((bsz, 64, 128), generator=gen, device="cuda").bfloat16()
    w = torch.rand((bsz, 64), generator=gen, device="cuda")
    sel = select_topk(indexer_logits(qi, w, ic, cl, ctx), cl, K, 4, 64)
    return {"pt": pt, "cl": cl, "ic": ic, "qi": qi, "w": w, "sel": sel, "gen": gen}


def cases(kernel: str, x: dict) -> tuple[Callable[..., object], int]:
    """(call taking the swept keywords, bytes the kernel must move)."""
    bsz, ctx, gen = x["cl"].shape[0], int(x["cl"][0]), x["gen"]
    if kernel == "indexer":
        return (lambda **kw: indexer_logits(x["qi"], x["w"], x["ic"], x["cl"], ctx, **kw),
                bsz * ctx * (132 + 4))  # fmt: skip
    if kernel == "gqa":
        gc = paged.random_gqa_cache(x["pt"], 3, 64, seed=4, device="cuda")
        qg = torch.randn((bsz, 9, 64), generator=gen, device="cuda").bfloat16()
        return lambda **kw: gqa_sparse_decode(qg, gc, x["sel"], **kw), bsz * K * 768
    mc = paged.random_mla_cache(x["pt"], True, seed=2, device="cuda")
    qm = torch.randn((bsz, 128, 576), generator=gen, device="cuda").bfloat16()
    return lambda **kw: mla_sparse_decode(qm, mc, x["sel"], SCALE, **kw), bsz * K * 656


def sweep(kernel: str, shapes: list[tuple[int, int]], budget_s: float) -> list[dict]:
    grid = GRIDS[kernel]
    combos = [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
    if kernel == "indexer":  # a program runs whole loop steps
        combos = [kw for kw in combos if kw["pages_per_prog"] % kw["pages_per_step"] == 0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict] = []
    for bsz, ctx in shapes:
        fn, nbytes = cases(kernel, inputs(bsz, ctx, gen))
        t0 = time.time()
        mine: list[dict] = []
        for kw in [None, *combos]:  # None: the library's defaults
            if time.time() - t0 > budget_s / len(shapes):
                break
            try:
                us, err = graph_us(lambda kw=kw, fn=fn: fn(**(kw or {}))), ""
            except Exception as e:  # out of shared memory / registers: keep going
                us, err = float("nan"), repr(e)[:200]
            mine.append({"kernel": kernel, "batch": bsz, "context": ctx,
                         "params": str(kw) if kw else "default", "us": us,
                         "GBps": nbytes / us / 1e3, "error": err})  # fmt: skip
        rows += mine
        ok = [r for r in mine if r["us"] == r["us"]]
        base = mine[0]["us"]
        tried = f"{len(mine) - 1} of {len(combos)} combinations"
        if not ok:
            print(f"{kernel:8s} b={bsz:3d} ctx={ctx:6d}: nothing ran ({tried})", flush=True)
            continue
        best = min(ok, key=lambda r: r["us"])
        print(f"{kernel:8s} b={bsz:3d} ctx={ctx:6d} default {base:7.1f} us; best "
              f"{best['us']:7.1f} us ({best['GBps']:5.0f} GB/s) {best['params']}; {tried}",
              flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="indexer,gqa,mla")
    p.add_argument("--shapes", help="BATCHxCONTEXT,... instead of each kernel's own list")
    p.add_argument("--budget-s", type=float, default=120, help="per kernel, split over its shapes")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_kernels needs a CUDA GPU")
    import pandas as pd

    rows = []
    for kernel in args.kernels.split(","):
        shapes = SHAPES[kernel]
        if args.shapes:
            shapes = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
        rows += sweep(kernel, shapes, args.budget_s)
    df = pd.DataFrame(rows)
    df["gpu"] = torch.cuda.get_device_name()
    df["command"] = " ".join([sys.executable, *sys.argv])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(args.out) / "tune_kernels.csv", index=False)


if __name__ == "__main__":
    main()
