"""Measure, on one GPU, the terms of the route-vs-fetch cost model and check their sum.

The cost model (``dsacache.simulator.routefetch``) prices a remote owner's ``n`` selected
tokens as either a **fetch** (gather the tokens out of the owner's paged cache, move them over
the link, attend at home) or a **route** (send the query, attend to the owner's shard there,
return the partial output and log-sum-exp, merge at home). One GPU can measure every term
that does not need a second GPU:

- ``attend``: sparse MLA decode over ``n`` selected tokens (our Triton kernel), ``L + n*c``;
- ``gather``: copy ``n`` selected tokens out of the paged pool into a contiguous buffer
  (what a fetch does before the transfer), ``g0 + n*m``;
- ``copy_d2d`` / ``copy_d2h`` / ``copy_h2d``: moving ``n*b`` bytes within the GPU and over
  PCIe to and from pinned host memory, ``P + n*b/B``;
- ``merge``: merging ``s`` partial outputs by their log-sum-exp (the route path's home-side
  step), measured for ``s`` = 2..8 partials.

Composite paths are then timed end to end at token counts that the fit did not see and
compared with the sum of the fitted terms: ``fetch_local`` = gather + device copy + attend
over the fetched buffer; ``route_local`` = attend over the shard + attend over the home part
+ merge of the two partials.

Every timing replays a CUDA graph of ``reps`` calls on different random selections out of a
pool several times the L2, so Python launch overhead is excluded and each call's KV is
mostly cold, as in decode. The median of ``trials`` replays is kept. Run with
``python -m dsacache.kernels.route_calibrate --out FILE.parquet`` on a GPU.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dsacache.calibration import check_paths, fit_terms
from dsacache.kernels.paged import MLA_DIM, make_page_table, random_mla_cache
from dsacache.kernels.sparse_decode import _merge, mla_sparse_decode

FIT_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
CHECK_TOKENS = (96, 384, 1536, 3072, 6144)
MERGE_PARTIALS = (2, 3, 4, 6, 8)
HEADS = 128
LATENT = 512


def _time_per_call(
    calls: Sequence[Callable[[], object]], device: torch.device, trials: int
) -> np.ndarray:
    """Seconds per call for each of ``trials`` runs of all ``calls`` in sequence."""
    for fn in calls:  # warm up (compiles the Triton kernels before capture)
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for fn in calls:
                fn()
            torch.cuda.synchronize(device)
            with torch.cuda.graph(graph, stream=stream):
                for fn in calls:
                    fn()
        torch.cuda.synchronize(device)
        out = []
        for _ in range(trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e-3 / len(calls))
        return np.array(out)
    out = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for fn in calls:
            fn()
        out.append((time.perf_counter() - t0) / len(calls))
    return np.array(out)


class _Bench:
    """The inputs every measurement draws from: a paged fp8 MLA pool and random queries."""

    def __init__(self, device: torch.device, pool_tokens: int, reps: int, seed: int) -> None:
        self.device = device
        self.reps = reps
        self.pt = make_page_table([pool_tokens], order="shuffled", seed=seed, device=device)
        self.cache = random_mla_cache(self.pt, fp8=True, seed=seed, device=device)
        self.bytes_per_token = self.cache.bytes_per_token
        self.pool_tokens = pool_tokens
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.q = torch.randn((1, HEADS, MLA_DIM), generator=gen, device=device).to(torch.bfloat16)
        self.scale = 1.0 / math.sqrt(MLA_DIM)
        self.gen = torch.Generator(device="cpu").manual_seed(seed + 2)

    def selections(self, n: int) -> list[torch.Tensor]:
        """``reps`` independent sorted selections of ``n`` token positions (int32 [1, n])."""
        picks = []
        for _ in range(self.reps):
            idx = torch.randperm(self.pool_tokens, generator=self.gen)[:n].sort().values
            picks.append(idx.to(torch.int32).reshape(1, n).to(self.device))
        return picks

    def contiguous_cache(self, n: int):
        """An empty fp8 MLA cache of ``n`` tokens in contiguous pages (a fetch's landing place)."""
        pt = make_page_table([n], order="contiguous", device=self.device)
        return random_mla_cache(pt, fp8=True, seed=0, device=self.device)

    def slots(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pt.slots(0, idx.reshape(-1).long())


def _measure_tokens(bench: _Bench, n: int, role: str, trials: int) -> list[dict]:
    """Rows for one token count: the single terms (role ``fit``) or the composite paths."""
    device, reps, b = bench.device, bench.reps, bench.bytes_per_token
    flat = bench.cache.pool.view(-1, b)
    sels = bench.selections(n)
    slots = [bench.slots(s) for s in sels]
    landing = bench.contiguous_cache(n)
    received = landing.pool.view(-1, b)[:n]  # the home side's receive buffer
    staged = torch.empty_like(received)  # the owner side's send buffer
    local_idx = torch.arange(n, dtype=torch.int32, device=device).reshape(1, n)

    def attend(idx, cache=bench.cache):
        return mla_sparse_decode(bench.q, cache, idx, bench.scale)

    def gather(sl):
        torch.index_select(flat, 0, sl, out=staged)

    def fetch_local(sl):
        gather(sl)
        received.copy_(staged, non_blocking=True)
        return attend(local_idx, landing)

    def route_local(idx):
        remote = attend(idx)
        home = attend(idx)  # the home part: another attend of the same size
        return merge_partials([remote, home])

    if role == "fit":
        calls = {
            "attend": [lambda s=s: attend(s) for s in sels],
            "gather": [lambda s=s: gather(s) for s in slots],
            "copy_d2d": [lambda: received.copy_(staged, non_blocking=True)] * reps,
        }
        if device.type == "cuda":
            host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
            calls["copy_d2h"] = [lambda: host.copy_(staged, non_blocking=True)] * reps
            calls["copy_h2d"] = [lambda: received.copy_(host, non_blocking=True)] * reps
    else:
        calls = {
            "fetch_local": [lambda s=s: fetch_local(s) for s in slots],
            "route_local": [lambda s=s: route_local(s) for s in sels],
        }
    return [
        dict(term=term, n=n, bytes=n * b, trial=i, seconds=float(t), role=role)
        for term, fns in calls.items()
        for i, t in enumerate(_time_per_call(fns, device, trials))
    ]


def measure(
    device: str | torch.device = "cuda",
    *,
    fit_tokens: Sequence[int] = FIT_TOKENS,
    check_tokens: Sequence[int] = CHECK_TOKENS,
    partials: Sequence[int] = MERGE_PARTIALS,
    pool_tokens: int = 1 << 20,
    reps: int = 16,
    trials: int = 15,
    seed: int = 0,
) -> pd.DataFrame:
    """Time every term and composite path; one row per (term, tokens or partials, trial)."""
    device = torch.device(device)
    bench = _Bench(device, pool_tokens, reps, seed)
    rows: list[dict] = []
    for role, counts in (("fit", fit_tokens), ("check", check_tokens)):
        for n in counts:
            rows += _measure_tokens(bench, n, role, trials)
    for s in partials:
        gen = torch.Generator(device=device).manual_seed(seed + s)
        parts = [
            (torch.randn((1, HEADS, LATENT), generator=gen, device=device).to(torch.bfloat16),
             torch.randn((1, HEADS), generator=gen, device=device))
            for _ in range(s)
        ]  # fmt: skip
        times = _time_per_call([lambda p=parts: merge_partials(p)] * reps, device, trials)
        rows += [dict(term="merge", n=s, bytes=s * HEADS * (2 * LATENT + 4), trial=i,
                      seconds=float(t), role="fit") for i, t in enumerate(times)]  # fmt: skip
    return pd.DataFrame(rows)


def merge_partials(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention outputs ``(out bf16 [B, H, D], lse [B, H])`` over disjoint
    token sets into one, as the query's home GPU does after routing (natural-log LSE)."""
    outs = torch.stack([o for o, _ in parts], 1).float()
    lses = torch.stack([lse for _, lse in parts], 1)
    return _merge(outs, lses, torch.bfloat16)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: measure on the first GPU and write one Parquet file with metadata."""
    from dsacache.kernels.ncu import device_metadata

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trials", type=int, default=15)
    args = ap.parse_args(argv)
    df = measure(args.device, trials=args.trials)
    meta = device_metadata() if args.device.startswith("cuda") else {}
    meta["command"] = shlex.join(["python", "-m", "dsacache.kernels.route_calibrate", *argv])
    for key, value in meta.items():
        df[f"meta_{key}"] = str(value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(args.out, index=False)
    print(fit_terms(df).to_string(index=False))
    for how in ("table", "linear"):
        print(check_paths(df, how).to_string(index=False))


if __name__ == "__main__":
    main()
