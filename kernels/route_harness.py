"""Route the query or fetch the KV, for real, between two processes (one per GPU).

Rank 0 is the query's *home*; rank 1 a *peer* that owns part of every request's KV cache
(fp8 MLA, 656 B/token, paged). Per decode step the selection of each request comes from a
trace (the bundled real trace or a DeepSeek-V3.2-shaped synthetic one); the peer owns the
newest part of the context, split where ``share`` of the selected tokens fall on the peer.
Both strategies run on the same inputs and must give the same output:

- **fetch**: home sends the peer its selected positions; the peer gathers those tokens out of
  its pages and sends them; home copies them into landing pages of its own cache and runs
  one sparse attention over its local and the fetched tokens;
- **route**: home sends the query and the positions; the peer runs sparse attention over its
  share and returns the partial output and log-sum-exp; meanwhile home attends over its own
  share; home merges the two partials.

Each configuration is timed on home (median of ``repeats``, barrier before each), and
*predicted* from terms measured separately on this machine: link latency and bandwidth from
a ping-pong, and attend / gather / copy / merge times from a table over token counts (as in
``route_calibrate``). Route overlaps the peer's work with home's own attention, so its
prediction is ``max(home attend, send + peer attend + return) + merge``.

Run on a two-GPU host with ``torchrun --nproc-per-node 2 -m dsacache.kernels.route_harness
--out FILE.parquet`` (NCCL; NVLink multicast stays off), or with ``--device cpu`` as a dry run
on gloo with the Triton interpreter and tiny shapes (``--tiny``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from dsacache.kernels.paged import MLA_DIM, MLA_FP8_BYTES, make_page_table, random_mla_cache
from dsacache.kernels.route_calibrate import merge_partials
from dsacache.kernels.sparse_decode import mla_sparse_decode

HOME, PEER = 0, 1


@dataclass(frozen=True)
class Config:
    """One measured configuration."""

    source: str  # "synthetic" or "bundled"
    k: int
    context: int
    batch: int
    share: float  # share of the selected tokens that the peer owns


def configs(tiny: bool) -> list[Config]:
    """The grid: k x context x batch x peer share on a synthetic trace, plus the bundled one."""
    if tiny:
        return [Config("synthetic", 32, 512, 1, 0.5), Config("bundled", 0, 0, 1, 0.25)]
    grid = itertools.product((512, 2048), (32768, 131072), (1, 4), (0.25, 0.5, 0.75))
    out = [Config("synthetic", k, c, b, s) for k, c, b, s in grid]
    return out + [Config("bundled", 0, 0, b, s) for b in (1, 4) for s in (0.25, 0.5, 0.75)]


def selections(cfg: Config, steps: int, seed: int) -> tuple[list[np.ndarray], int, int]:
    """``steps`` decode steps of layer 0: per step an int64 ``[batch, k]`` array of selected
    positions; also k and the context the cache must hold."""
    from dsacache.traces import MAIN_TRACE, bundled_path, open_trace

    with tempfile.TemporaryDirectory() as tmp:
        if cfg.source == "bundled":
            trace = open_trace(bundled_path(MAIN_TRACE))
        else:
            from dsacache.tracer.synth import preset, synthesize

            synth = preset("deepseek-v3.2", layers=1, steps=steps, context=cfg.context, k=cfg.k,
                           requests=cfg.batch, seed=seed)  # fmt: skip
            trace = open_trace(synthesize(synth, Path(tmp) / "t.dsatrace", progress=False))
        out, context = [], 0
        for part in trace.iter_steps():
            rows = np.flatnonzero((part.layer == 0) & (part.group == 0))
            if len(rows) == 0:
                continue
            picks = [part.row(i).astype(np.int64) for i in rows]
            k = min(len(p) for p in picks)
            sel = np.stack([np.sort(p)[-k:] for p in itertools.islice(itertools.cycle(picks),
                                                                       cfg.batch)])  # fmt: skip
            out.append(sel)
            context = max(context, int(part.position.max()) + 1)
            if len(out) == steps:
                break
    return out, out[0].shape[1], context


def split_at_share(sel: np.ndarray, share: float) -> np.ndarray:
    """Per request, the first position the peer owns: the peer holds the newest tokens, and
    about ``share`` of each request's selection lies at or after the split."""
    k = sel.shape[1]
    n_peer = min(k - 1, max(1, round(share * k)))
    return np.sort(sel, axis=1)[:, k - n_peer]


def _compact(parts: list[np.ndarray]) -> torch.Tensor:
    """Rows of different lengths as int32 ``[batch, max]`` padded with -1 (kernel: no token)."""
    width = max(1, max(len(p) for p in parts))
    out = np.full((len(parts), width), -1, np.int32)
    for b, p in enumerate(parts):
        out[b, : len(p)] = p
    return torch.from_numpy(out)


class Side:
    """One rank's state: its paged cache (identical contents on both ranks, seeded), with
    ``k`` landing slots per request after the context for fetched tokens."""

    def __init__(self, device: torch.device, batch: int, context: int, k: int, heads: int,
                 seed: int) -> None:  # fmt: skip
        self.device, self.context, self.heads = device, context, heads
        self.pt = make_page_table([context + k] * batch, order="shuffled", seed=seed,
                                  device=device)  # fmt: skip
        self.cache = random_mla_cache(self.pt, fp8=True, seed=seed, device=device)
        self.flat = self.cache.pool.view(-1, MLA_FP8_BYTES)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.q = torch.randn((batch, heads, MLA_DIM), generator=gen, device=device)
        self.q = self.q.to(torch.bfloat16)
        self.scale = 1.0 / math.sqrt(MLA_DIM)

    def slots(self, idx: torch.Tensor) -> torch.Tensor:
        """Physical slots (int64, flat) of the valid positions of ``idx`` [batch, n]."""
        return torch.cat([self.pt.slots(b, row[row >= 0]) for b, row in enumerate(idx)])

    def attend(self, idx: torch.Tensor, q: torch.Tensor | None = None):
        return mla_sparse_decode(self.q if q is None else q, self.cache, idx, self.scale)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fetch_step(side: Side, rank: int, home_idx: torch.Tensor, peer_idx: torch.Tensor):
    """The fetch strategy; returns home's output (None on the peer)."""
    batch, width = peer_idx.shape
    if rank == PEER:
        idx = torch.empty_like(peer_idx)
        dist.recv(idx, HOME)
        dist.send(side.flat[side.slots(idx)].contiguous(), HOME)
        return None
    dist.send(peer_idx, PEER)
    counts = (peer_idx >= 0).sum(1)
    got = torch.empty((int(counts.sum()), MLA_FP8_BYTES), dtype=torch.uint8, device=side.device)
    dist.recv(got, PEER)
    landing = [torch.arange(side.context, side.context + int(n), device=side.device)
               for n in counts]  # fmt: skip
    side.flat[torch.cat([side.pt.slots(b, t) for b, t in enumerate(landing)])] = got
    both = [torch.cat((h[h >= 0].long(), t)) for h, t in zip(home_idx, landing, strict=True)]
    return side.attend(_compact([b.cpu().numpy() for b in both]).to(side.device))


def route_step(side: Side, rank: int, home_idx: torch.Tensor, peer_idx: torch.Tensor):
    """The route strategy; returns home's output (None on the peer)."""
    batch = peer_idx.shape[0]
    if rank == PEER:
        q, idx = torch.empty_like(side.q), torch.empty_like(peer_idx)
        dist.recv(q, HOME)
        dist.recv(idx, HOME)
        out, lse = side.attend(idx, q)
        dist.send(out.contiguous(), HOME)
        dist.send(lse.contiguous(), HOME)
        return None
    reqs = [dist.isend(side.q, PEER), dist.isend(peer_idx, PEER)]
    out = torch.empty((batch, side.heads, 512), dtype=torch.bfloat16, device=side.device)
    lse = torch.empty((batch, side.heads), dtype=torch.float32, device=side.device)
    recvs = [dist.irecv(out, PEER), dist.irecv(lse, PEER)]
    local = side.attend(home_idx)  # overlaps the peer's work
    for r in reqs + recvs:
        r.wait()
    return merge_partials([local, (out, lse)])


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``fn`` on every rank (barrier and device sync around each)."""
    result, times = None, []
    for _ in range(repeats + 1):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:])), result  # the first run compiles and warms up


def link_probe(device: torch.device, rank: int, sizes: Sequence[int], repeats: int) -> pd.DataFrame:
    """One-way time of a message of each size (half the median round trip)."""
    rows = []
    for size in sizes:
        buf = torch.zeros(size, dtype=torch.uint8, device=device)

        def ping(buf=buf):
            if rank == HOME:
                dist.send(buf, PEER)
                dist.recv(buf, PEER)
            else:
                dist.recv(buf, HOME)
                dist.send(buf, HOME)

        t, _ = _timed(ping, device, repeats)
        rows.append(dict(bytes=size, seconds=t / 2))
    return pd.DataFrame(rows)


def fit_link(probe: pd.DataFrame) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of ``time = latency + bytes / bandwidth``, least squares."""
    slope, intercept = np.polyfit(probe["bytes"].to_numpy(float), probe["seconds"].to_numpy(), 1)
    return max(float(intercept), 0.0), 1.0 / max(float(slope), 1e-30)


def term_table(side: Side, counts: Sequence[int], repeats: int) -> dict[str, pd.Series]:
    """Home-GPU time of attend / gather / land (scatter into pages) over token counts, and of
    merging two partials, each measured alone."""
    batch = side.q.shape[0]
    rng = np.random.default_rng(0)
    table: dict[str, dict[int, float]] = {"attend": {}, "gather": {}, "land": {}}
    for n in sorted(set(counts)):
        idx = _compact([np.sort(rng.choice(side.context, n, replace=False))
                        for _ in range(batch)]).to(side.device)  # fmt: skip
        slots = side.slots(idx)
        rows = side.flat[slots].clone()
        table["attend"][n] = _local_time(lambda idx=idx: side.attend(idx), side.device, repeats)
        table["gather"][n] = _local_time(lambda s=slots: side.flat[s].contiguous(), side.device,
                                         repeats)  # fmt: skip
        table["land"][n] = _local_time(lambda s=slots, r=rows: side.flat.index_copy_(0, s, r),
                                       side.device, repeats)  # fmt: skip
    a, b = side.attend(idx), side.attend(idx)
    merge = _local_time(lambda: merge_partials([a, b]), side.device, repeats)
    out = {k: pd.Series(v) for k, v in table.items()}
    out["merge"] = pd.Series({2: merge})
    return out


def _local_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def predict(terms: dict[str, pd.Series], link: tuple[float, float], batch: int, heads: int,
            n_home: int, n_peer: int) -> tuple[float, float]:  # fmt: skip
    """Predicted (fetch, route) seconds of one step from the measured terms and link."""
    latency, bandwidth = link

    def term(name: str, n: float) -> float:
        s = terms[name]
        return float(np.interp(n, s.index.to_numpy(float), s.to_numpy()))

    def send(nbytes: float) -> float:
        return latency + nbytes / bandwidth

    idx_bytes = 4 * batch * n_peer
    fetch = (send(idx_bytes) + term("gather", n_peer) + send(batch * n_peer * MLA_FP8_BYTES)
             + term("land", n_peer) + term("attend", n_home + n_peer))  # fmt: skip
    query_bytes = batch * heads * MLA_DIM * 2
    remote = (send(query_bytes) + send(idx_bytes) + term("attend", n_peer)
              + send(batch * heads * 512 * 2) + send(batch * heads * 4))  # fmt: skip
    route = max(term("attend", n_home), remote) + term("merge", 2)
    return fetch, route


def run(device: torch.device, rank: int, cfgs: Sequence[Config], heads: int, steps: int,
        repeats: int, seed: int) -> pd.DataFrame:  # fmt: skip
    """Measure every configuration; rows (home only) with measured and predicted times."""
    probe = link_probe(device, rank, [2**p for p in range(2, 27, 3)], repeats)
    link = fit_link(probe)
    rows = []
    for cfg in cfgs:
        sels, k, context = selections(cfg, steps, seed)
        side = Side(device, cfg.batch, context, k, heads, seed)
        terms = term_table(side, [max(1, k // 8), k // 4, k // 2, 3 * k // 4, k], repeats)
        for step, sel in enumerate(sels):
            split = split_at_share(sel, cfg.share)
            peer = sel >= split[:, None]
            home_idx = _compact([s[~p] for s, p in zip(sel, peer, strict=True)]).to(device)
            peer_idx = _compact([s[p] for s, p in zip(sel, peer, strict=True)]).to(device)
            args = (side, rank, home_idx, peer_idx)
            t_fetch, out_f = _timed(lambda a=args: fetch_step(*a), device, repeats)
            t_route, out_r = _timed(lambda a=args: route_step(*a), device, repeats)
            if rank != HOME:
                continue
            n_peer = int(peer.sum(1).max())
            n_home = int((~peer).sum(1).max())
            p_fetch, p_route = predict(terms, link, cfg.batch, heads, n_home, n_peer)
            diff = (out_f[0].float() - out_r[0].float()).abs().max().item()
            rows.append(dict(**asdict(cfg), k_used=k, context_used=context, step=step,
                             n_home=n_home, n_peer=n_peer, fetch_s=t_fetch, route_s=t_route,
                             fetch_pred_s=p_fetch, route_pred_s=p_route, max_abs_diff=diff,
                             link_latency_s=link[0], link_bandwidth=link[1]))  # fmt: skip
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> dict[str, float]:
    """Mean absolute relative error of the predictions, and how often the predicted faster
    strategy is the measured faster one where the two differ by more than 10%."""
    err = pd.concat([(df.fetch_pred_s - df.fetch_s) / df.fetch_s,
                     (df.route_pred_s - df.route_s) / df.route_s]).abs()  # fmt: skip
    clear = (df.fetch_s - df.route_s).abs() / df[["fetch_s", "route_s"]].min(axis=1) > 0.10
    right = (df.fetch_pred_s < df.route_pred_s) == (df.fetch_s < df.route_s)
    return dict(mean_abs_rel_error=float(err.mean()), configurations=len(df),
                clear_cases=int(clear.sum()), predicate_right=int((right & clear).sum()))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (one process per rank, e.g. under torchrun)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="Small shapes (CPU dry run).")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (device docs)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit(f"route_harness needs exactly 2 ranks, got {dist.get_world_size()}")
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    heads = 8 if args.tiny else 128
    df = run(device, rank, configs(args.tiny), heads, args.steps, args.repeats, args.seed)
    dist.barrier()
    dist.destroy_process_group()
    if rank != HOME:
        return
    from dsacache.kernels.ncu import device_metadata

    meta = device_metadata() if args.device == "cuda" else {"device": "cpu (gloo dry run)"}
    meta["command"] = shlex.join(["torchrun", "--nproc-per-node", "2", "-m",
                                  "dsacache.kernels.route_harness", *argv])  # fmt: skip
    for key, value in meta.items():
        df[f"meta_{key}"] = str(value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(args.out, index=False)
    print(df.drop(columns=[c for c in df if c.startswith("meta_")]).to_string(index=False))
    print(summarize(df))


if __name__ == "__main__":
    main()
