"""GPU timings of the DSA decode kernels against the roofline measured in the same run.

For batch 1/8/64 and context 8K/64K/128K (k = 2048 selected tokens, DeepSeek-V3.2 shapes:
indexer 64 heads x 128, MLA 128 heads x 576; GQA at SmolLM2-135M shapes: 9 query heads,
3 KV heads x 64): each kernel's median time (``triton.testing.do_bench``, L2 cleared before
every repetition; launch gaps included, which dominate at batch 1) and replayed from a CUDA
graph (``time_us_graph``: no launch overhead, but L2 warm across repetitions), the bytes it
must move and its FLOPs, and its fraction of the roofline bound
``max(bytes / copy bandwidth, FLOPs / bf16 matmul peak)``, both peaks measured here
(device-to-device copy of 2 GiB counting read + write; 8192^3 bf16 matmul). Top-k is timed
twice: ``topk_torch`` (plain ``torch.topk`` + sort, the baseline) and ``topk_radix`` (ours,
what ``select_topk`` runs; its bytes count its passes over the logits). DeepSeek's
FlashMLA sparse fp8 decode (``kernels/flashmla.py`` over the ``tokenspeed-flashmla`` wheel)
is timed as a reference row when it imports, alone and as the decode step's attention
(``decode_step_flashmla``), and its output is compared with the Triton kernel's on the same
cache bytes (``max_abs_diff``).

Writes ``bench_kernels.csv`` and ``.parquet`` (one row per kernel x config, GPU metadata
in ``meta_*`` columns) and ``bench_kernels_meta.json`` to ``--out`` (default ``$OUT``).
With ``--tests`` it first runs ``tests/test_dsa_kernels.py`` on the GPU (TRITON_INTERPRET=0)
and keeps its log and JUnit XML there too.

    OUT=results python benchmarks/bench_kernels.py --tests
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from dsacache.kernels import paged  # noqa: E402
from dsacache.kernels.flashmla import flashmla_available, flashmla_sparse_decode  # noqa: E402
from dsacache.kernels.indexer import indexer_logits, select_topk  # noqa: E402
from dsacache.kernels.sparse_decode import gqa_sparse_decode, mla_sparse_decode  # noqa: E402
from dsacache.kernels.topk import PASSES  # noqa: E402

K = 2048
MLA_HEADS = 128
INDEX_HEADS = 64
GQA_HEADS, GQA_KV, GQA_DIM = 9, 3, 64
SCALE = (128 + 64) ** -0.5
BUDGET_S = 420  # stop starting new configurations after this long (the run must stay < 8 min)


def median_us(fn) -> float:
    """Median time per call, L2 cleared before each call; launch gaps included."""
    return 1e3 * do_bench(fn, warmup=10, rep=50, return_mode="median")


def graph_us(fn) -> float:
    """Median time per call replayed from a CUDA graph: no launch overhead, L2 left warm."""
    try:
        return 1e3 * do_bench_cudagraph(fn, rep=10, return_mode="median")
    except Exception as e:
        print(f"CUDA-graph timing failed: {e!r}"[:200])
        return float("nan")


def torch_topk(logits: torch.Tensor, context_lens: torch.Tensor, k: int, sink: int,
               window: int) -> torch.Tensor:  # fmt: skip
    """The baseline of ``select_topk`` in plain torch (``torch.topk`` then a sort), same
    forced sink/window tokens and ranking of invalid scores (ties in any order)."""
    width = logits.shape[1]
    ctx = context_lens.to(logits.device, torch.int64)[:, None]
    pos = torch.arange(width, device=logits.device)[None, :]
    lowest = torch.finfo(torch.float32).min
    score = torch.nan_to_num(logits.float(), nan=lowest, neginf=lowest, posinf=lowest)
    score = torch.where((pos < sink) | (pos >= ctx - window), torch.inf, score)
    score = torch.where(pos < ctx, score, -torch.inf)
    top = torch.topk(score, min(k, width), dim=1, sorted=False).indices
    top = torch.sort(torch.where(top < ctx, top, width), dim=1).values
    return torch.where(top < width, top, -1).to(torch.int32)


def peaks() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second), the bf16 matmul
    peak, and for reference (not in the bound) the read-only bandwidth of a float32 sum."""
    n = 2 * 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median") * 1e-3
    words = src.view(torch.float32).zero_()
    t_read = do_bench(lambda: words.sum(), warmup=10, rep=50, return_mode="median") * 1e-3
    a = torch.randn((8192, 8192), device="cuda", dtype=torch.bfloat16)
    b = torch.randn((8192, 8192), device="cuda", dtype=torch.bfloat16)
    tm = do_bench(lambda: a @ b, warmup=10, rep=50, return_mode="median") * 1e-3
    return {"copy_GBps": 2 * n / t / 1e9, "matmul_TFLOPs": 2 * 8192**3 / tm / 1e12,
            "read_GBps": n / t_read / 1e9}  # fmt: skip


def bench(args) -> list[dict]:
    t_start = time.time()
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    bmax, cmax = max(batches), max(contexts)
    pk = peaks()
    print(f"copy {pk['copy_GBps']:.0f} GB/s, bf16 matmul {pk['matmul_TFLOPs']:.0f} TFLOP/s, "
          f"read-only (float32 sum) {pk['read_GBps']:.0f} GB/s")  # fmt: skip
    # one pool per layout at the largest size; smaller configs use a corner of its page table
    full = paged.make_page_table([cmax] * bmax, order="shuffled", seed=0, device="cuda")
    icache = paged.random_index_cache(full, seed=1, device="cuda")
    fp8 = paged.random_mla_cache(full, True, seed=2, device="cuda")
    bf16 = paged.random_mla_cache(full, False, seed=3, device="cuda") if not args.no_bf16 else None
    gqa = paged.random_gqa_cache(full, GQA_KV, GQA_DIM, seed=4, device="cuda")
    print(f"caches built in {time.time() - t_start:.0f} s")
    torch.cuda.empty_cache()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict] = []
    for bsz in batches:
        for ctx in contexts:
            if time.time() - t_start > BUDGET_S:
                print(f"time budget reached; skipping batch {bsz} context {ctx}")
                continue
            caches = (full, icache, fp8, bf16, gqa)
            rows += bench_config(bsz, ctx, caches, pk, gen, args)
    return rows


def bench_config(bsz: int, ctx: int, caches, pk: dict, gen, args) -> list[dict]:
    """Rows of one (batch, context): every kernel timed on the same inputs."""
    full, icache, fp8, bf16, gqa = caches
    pt = paged.PageTable(full.table[:bsz, : ctx // 64].contiguous(), full.num_pages)
    cl = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")
    qi = torch.randn((bsz, INDEX_HEADS, 128), generator=gen, device="cuda").bfloat16()
    w = torch.rand((bsz, INDEX_HEADS), generator=gen, device="cuda")
    qm = torch.randn((bsz, MLA_HEADS, 576), generator=gen, device="cuda").bfloat16()
    qg = torch.randn((bsz, GQA_HEADS, GQA_DIM), generator=gen, device="cuda").bfloat16()
    ic = paged.IndexKeyCache(icache.pool, pt)
    logits = indexer_logits(qi, w, ic, cl, ctx)
    sel = select_topk(logits, cl, K, 4, 64)
    mc8 = paged.MLACache(fp8.pool, pt)
    gc = paged.GQACache(gqa.k, gqa.v, pt)
    q_b, out_b = bsz * MLA_HEADS * 576 * 2, bsz * MLA_HEADS * (512 * 2 + 4)
    mla_flops = 2 * bsz * MLA_HEADS * K * (576 + 512)
    idx_bytes = bsz * K * 4 + bsz * (ctx // 64) * 4
    mla8_bytes = bsz * K * 656 + q_b + out_b + idx_bytes
    step_bytes = bsz * ctx * (132 + 8) + bsz * K * 656 + q_b + out_b
    step_flops = mla_flops + 2 * bsz * ctx * INDEX_HEADS * 128

    def step():
        sel = select_topk(indexer_logits(qi, w, ic, cl, ctx), cl, K, 4, 64)
        return mla_sparse_decode(qm, mc8, sel, SCALE)

    cases = [
        ("indexer_logits", "index-fp8", lambda: indexer_logits(qi, w, ic, cl, ctx),
         bsz * ctx * (132 + 4) + bsz * INDEX_HEADS * (128 * 2 + 4),
         2 * bsz * ctx * INDEX_HEADS * 128),
        ("topk_torch", "-", lambda: torch_topk(logits, cl, K, 4, 64),
         bsz * ctx * 4 + bsz * K * 4, 0),
        ("topk_radix", "-", lambda: select_topk(logits, cl, K, 4, 64),
         (PASSES + 2) * bsz * ctx * 4 + bsz * K * 4, 0),
        ("mla_sparse_triton", "mla-fp8", lambda: mla_sparse_decode(qm, mc8, sel, SCALE),
         mla8_bytes, mla_flops),
        ("gqa_sparse_triton", "gqa-bf16", lambda: gqa_sparse_decode(qg, gc, sel),
         bsz * K * 768 + bsz * GQA_HEADS * (GQA_DIM * 4 + 4) + idx_bytes,
         2 * bsz * GQA_HEADS * K * 2 * GQA_DIM),
        ("decode_step_triton", "mla-fp8", step, step_bytes, step_flops),
    ]  # fmt: skip
    if bf16 is not None:
        mc16 = paged.MLACache(bf16.pool, pt)
        cases.insert(3, ("mla_sparse_triton", "mla-bf16",
                         lambda: mla_sparse_decode(qm, mc16, sel, SCALE),
                         bsz * K * 1152 + q_b + out_b + idx_bytes, mla_flops))  # fmt: skip
    for hint in filter(None, args.hints.split(",")):
        cases.append((f"mla_sparse_triton[{hint}]", "mla-fp8",
                      lambda h=hint: mla_sparse_decode(qm, mc8, sel, SCALE, evict=h),
                      mla8_bytes, mla_flops))  # fmt: skip
    extra: dict[str, dict] = {}
    why = "skipped (--no-flashmla)" if args.no_flashmla else flashmla_available()
    if why is None:

        def step_flashmla():
            sel = select_topk(indexer_logits(qi, w, ic, cl, ctx), cl, K, 4, 64)
            return flashmla_sparse_decode(qm, mc8, sel, SCALE)

        ours = mla_sparse_decode(qm, mc8, sel, SCALE)[0].float()
        theirs = flashmla_sparse_decode(qm, mc8, sel, SCALE)[0].float()
        extra["flash_mla_sparse_fp8"] = {"max_abs_diff": float((ours - theirs).abs().max())}
        cases += [
            ("flash_mla_sparse_fp8", "mla-fp8", lambda: flashmla_sparse_decode(qm, mc8, sel, SCALE),
             mla8_bytes, mla_flops),
            ("decode_step_flashmla", "mla-fp8", step_flashmla, step_bytes, step_flops),
        ]  # fmt: skip
    else:
        extra["note"] = {"flash_mla": why}
    rows = []
    for name, layout, fn, nbytes, flops in cases:
        try:
            us = median_us(fn)
            err = ""
        except Exception as e:  # keep the other rows
            us, err = float("nan"), repr(e)[:300]
        us_graph = graph_us(fn) if not err else float("nan")
        bound_mem = nbytes / (pk["copy_GBps"] * 1e9) * 1e6
        bound_cmp = flops / (pk["matmul_TFLOPs"] * 1e12) * 1e6
        bound = max(bound_mem, bound_cmp)
        row = {
            "kernel": name, "layout": layout, "batch": bsz, "context": ctx, "k": K,
            "time_us": us, "bytes": nbytes, "flops": flops,
            "GBps": nbytes / us / 1e3, "TFLOPs": flops / us / 1e6,
            "bound_us": bound, "bound_by": "memory" if bound_mem >= bound_cmp else "compute",
            "roofline_fraction": bound / us, "time_us_graph": us_graph,
            "roofline_fraction_graph": bound / us_graph, **pk, "error": err,
            **extra.get(name, {}), **extra.get("note", {}),
        }  # fmt: skip
        rows.append(row)
        print(f"b={bsz:3d} ctx={ctx:6d} {name:30s} {layout:9s} {us:8.1f} us "
              f"(graph {us_graph:8.1f} us) {row['GBps']:6.0f} GB/s  "
              f"{row['roofline_fraction']:.2f} of roofline ({row['roofline_fraction_graph']:.2f}) "
              f"{err}")  # fmt: skip
    return rows


def run_tests(out: Path) -> int:
    """The kernel tests on the GPU (compiled Triton); log and JUnit XML into ``out``."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_dsa_kernels.py",
           f"--junitxml={out / 'tests_dsa_kernels.xml'}"]  # fmt: skip
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "tests_dsa_kernels.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    print(f"tests ({time.time() - t:.0f} s, exit {proc.returncode}): {' | '.join(tail)}")
    return proc.returncode


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--contexts", default="8192,65536,131072")
    p.add_argument("--hints", default="evict_first", help="extra MLA rows with these KV hints")
    p.add_argument("--tests", action="store_true", help="run the GPU kernel tests first")
    p.add_argument("--no-flashmla", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 MLA cache (memory)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("give --out or set OUT")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tests_rc = run_tests(out) if args.tests else None
    rows = bench(args)
    from dsacache.kernels.ncu import device_metadata

    meta = device_metadata()
    meta.update(command=" ".join([sys.executable, *sys.argv]), tests_exit=tests_rc,
                triton=triton.__version__, torch=torch.__version__,
                seconds=round(time.time() - t0, 1))  # fmt: skip
    import pandas as pd

    df = pd.DataFrame(rows)
    for key, value in meta.items():
        df[f"meta_{key}"] = str(value)
    df.to_csv(out / "bench_kernels.csv", index=False)
    try:
        df.to_parquet(out / "bench_kernels.parquet", index=False)
    except Exception as e:  # pyarrow missing: the CSV has everything
        print(f"parquet not written: {e!r}")
    (out / "bench_kernels_meta.json").write_text(json.dumps(meta, indent=1, default=str))
    print(f"{len(df)} rows -> {out}/bench_kernels.csv ({time.time() - t0:.0f} s in all)")
    if tests_rc:
        sys.exit(f"kernel tests failed (exit {tests_rc}); see {out}/tests_dsa_kernels.log")


if __name__ == "__main__":
    main()
