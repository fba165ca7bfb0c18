"""L2 probe kernels (Triton) and the probe workloads used to calibrate the cache model.

Known-answer experiments, run under Nsight Compute with ``--cache-control none
--replay-mode application`` so that reuse across kernels is measured:

- ``reuse``: read a buffer of S bytes, then read it again; the second read's L2 hit rate as
  a function of S shows the capacity the L2 really offers to reuse (not the 50 MiB it reports).
- ``hint``: read a buffer of S bytes with an L2 eviction hint, stream X bytes of other data,
  read the buffer again (no hint): how much of a hinted buffer other traffic leaves, as a
  function of S and X (what evict_last on the KV gathers does between decode steps).
- ``gather``: gather the rows a DSA selection picks from a paged KV pool (656-byte tokens, as
  DeepSeek-V3.2's FP8 cache), for step t, then optionally stream X bytes of other traffic
  (the indexer's keys), then gather step t+1's selection: the hit rate of the second gather
  is what a token reservation is meant to raise.
- ``beside``: per layer, write a normal buffer (as the query projection leaves a decode
  step's queries in the L2), read that layer's KV with an L2 eviction hint, read the normal
  buffer back: what a hinted KV stream leaves of the normal lines written just before it,
  layer after layer (evict_last KV beside an attention kernel's query).
- ``twice``: every selected row read twice, by two programs of one kernel at about the same
  time, and by two kernels one after the other: whether a read that arrives while the other
  read's miss is in flight counts as a hit (what two 64-head programs of a sparse MLA kernel
  do when they gather one token together).

Only kernels whose name starts with ``l2probe_`` are measured; a torch kernel writing a
256 MiB buffer evicts the L2 between experiments. Every kernel also runs under ``TRITON_INTERPRET=1`` on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np

FLUSH_BYTES = 256 * 2**20
READ_BLOCK = 4096  # float32 elements per program


def read(buf, evict: str = ""):
    """Sum a float32 buffer block by block (one pass over its bytes)."""
    import torch

    from dsacache.kernels.probe_kernels import l2probe_read

    n = buf.numel()
    grid = (-(-n // READ_BLOCK),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=buf.device)
    l2probe_read[grid](buf, partial, n, BLOCK=READ_BLOCK, EVICT=evict)
    return partial


def gather(pool_words, idx, row_words: int, evict: str = ""):
    """Sum each selected row of an int32 ``pool_words`` [tokens * row_words] buffer."""
    import torch

    from dsacache.kernels.probe_kernels import l2probe_gather

    n = idx.numel()
    out = torch.empty(n, dtype=torch.int32, device=idx.device)
    rows = 16
    words = 1 << (row_words - 1).bit_length()
    grid = (-(-n // rows),)
    l2probe_gather[grid](pool_words, idx, out, n, row_words, ROWS=rows, WORDS=words, EVICT=evict)
    return out


def flush(buf) -> None:
    """Evict the L2 by writing a buffer much larger than it (a torch kernel, not measured)."""
    buf.add_(1.0)


@dataclass
class Launch:
    """One measured kernel launch of a probe, in launch order."""

    experiment: str
    role: str
    bytes: int
    other_bytes: int = 0
    k: int = 0
    overlap: float = float("nan")
    layer: int = -1
    step: int = -1


def run_reuse(sizes: list[int], device: str = "cuda") -> list[Launch]:
    """For each size: flush, read, read again. Returns the measured launches in order."""
    import torch

    flush_buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    launches = []
    for size in sizes:
        buf = torch.rand(size // 4, dtype=torch.float32, device=device)
        flush(flush_buf)
        read(buf)
        read(buf)
        launches += [Launch("reuse", "first", size), Launch("reuse", "second", size)]
        del buf
    return launches


def run_hint(
    sizes: list[int], between: list[int], evict: str, device: str = "cuda"
) -> list[Launch]:
    """For each size S and volume X: flush, read S bytes with the ``evict`` hint, read X bytes
    of another buffer (no hint), read the S bytes again (no hint). Returns the measured
    launches in order (``bytes`` S, ``other_bytes`` X)."""
    import torch

    flush_buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    other = torch.rand(max(between, default=0) // 4, dtype=torch.float32, device=device)
    launches = []
    for size in sizes:
        buf = torch.rand(size // 4, dtype=torch.float32, device=device)
        for x in between:
            flush(flush_buf)
            read(buf, evict)
            if x:
                read(other[: x // 4])
            read(buf)
            launches.append(Launch("hint", "first", size, x))
            if x:
                launches.append(Launch("hint", "between", x, x))
            launches.append(Launch("hint", "second", size, x))
        del buf
    return launches


BESIDE_KV_ROLES = ("kv", "kv again")  # the beside probe's KV reads of a layer, in order


def check_beside(sizes: list[int], beside: int, layers: int, kv_reads: int) -> None:
    """Refuse a ``beside`` probe whose launches the model could not tell apart or place: KV
    sizes and the normal buffer in whole float32 words (>= 4 B), sizes distinct, >= 1 layer,
    1 or 2 KV reads."""
    odd = [b for b in (*sizes, beside) if b < 4 or b % 4]
    if odd or not sizes or len(set(sizes)) < len(sizes) or layers < 1 or kv_reads not in (1, 2):
        raise ValueError(
            f"sizes={sizes}, beside={beside} B, layers={layers}, kv_reads={kv_reads}: need "
            "distinct sizes and a beside buffer in multiples of 4 B (>= 4), >= 1 layer and 1 "
            "or 2 KV reads"
        )


def run_beside(
    sizes: list[int], beside: int, layers: int, evict: str, kv_reads: int = 1,
    device: str = "cuda",
) -> list[Launch]:  # fmt: skip
    """For each KV size S: flush, then for each layer write ``beside`` bytes of that layer's
    normal buffer (a torch fill, not measured), read the layer's S bytes of KV ``kv_reads``
    times (1 or 2) with the ``evict`` hint (roles ``BESIDE_KV_ROLES``: the second read is a
    sparse kernel's second program reading its tokens again) and the normal buffer unhinted
    (role ``normal``). Returns the measured launches in order (``bytes``: what the launch
    reads; ``other_bytes``: the other buffer's bytes per layer)."""
    import torch

    check_beside(sizes, beside, layers, kv_reads)
    flush_buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    normal = torch.empty(layers, beside // 4, dtype=torch.float32, device=device)
    launches = []
    for size in sizes:
        kv = torch.rand(layers, size // 4, dtype=torch.float32, device=device)
        flush(flush_buf)
        for layer in range(layers):
            normal[layer].fill_(float(layer))
            for role in BESIDE_KV_ROLES[:kv_reads]:
                read(kv[layer], evict)
                launches.append(Launch("beside", role, size, beside, layer=layer))
            read(normal[layer])
            launches.append(Launch("beside", "normal", beside, size, layer=layer))
        del kv
    return launches


def dsa_selections(
    k: int, context: int, keep: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two consecutive DSA top-k selections from the synthetic selection process."""
    from dsacache.tracer.synth import SynthConfig, _Selector

    cfg = SynthConfig(layers=1, context=context, steps=2, k=k, keep=keep, seed=seed)
    sel = _Selector(cfg, keep, np.random.default_rng(seed))
    return sel.next(context), sel.next(context + 1)


def _gather_inputs(k: int, context: int, keep: float, row_bytes: int, device: str):
    """A gather probe's KV pool (int32 words), words per row, flush buffer and two
    consecutive selections."""
    import torch

    if row_bytes <= 0 or row_bytes % 4:
        raise ValueError(f"row_bytes={row_bytes}: must be a positive multiple of 4")
    row_words = row_bytes // 4
    pool = torch.randint(0, 1 << 20, ((context + 2) * row_words,), dtype=torch.int32, device=device)
    flush_buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    return pool, row_words, flush_buf, dsa_selections(k, context, keep)


def run_gather(
    k: int, context: int, keep: float, between: list[int], row_bytes: int = 656,
    device: str = "cuda",
) -> list[Launch]:  # fmt: skip
    """Gather step t's rows, stream ``x`` bytes of other data, gather step t+1's rows."""
    import torch

    pool, row_words, flush_buf, (a, b) = _gather_inputs(k, context, keep, row_bytes, device)
    ia = torch.as_tensor(a, dtype=torch.int32, device=device)
    ib = torch.as_tensor(b, dtype=torch.int32, device=device)
    overlap = len(np.intersect1d(a, b)) / len(b)
    launches = []
    for x in between:
        flush(flush_buf)
        gather(pool, ia, row_words)
        if x:
            other = torch.rand(x // 4, dtype=torch.float32, device=device)
            read(other)
        gather(pool, ib, row_words)
        launches.append(Launch("gather", "first", len(a) * row_bytes, x, k, overlap))
        if x:
            launches.append(Launch("gather", "between", x, x, k, overlap))
        launches.append(Launch("gather", "second", len(b) * row_bytes, x, k, overlap))
    return launches


def run_twice(
    k: int, context: int, keep: float, row_bytes: int = 656, device: str = "cuda"
) -> list[Launch]:
    """A DSA selection's rows read twice from a flushed L2: by one gather of the selection
    followed by itself (its two halves run in different programs of one wave: role
    ``together``), then, after another flush, by two gathers one after the other (``first``,
    ``second``)."""
    import torch

    pool, row_words, flush_buf, (a, _) = _gather_inputs(k, context, keep, row_bytes, device)
    once = torch.as_tensor(a, dtype=torch.int32, device=device)
    both = torch.cat([once, once])  # written before the flush, as the model assumes
    flush(flush_buf)
    gather(pool, both, row_words)
    flush(flush_buf)
    gather(pool, once, row_words)
    gather(pool, once, row_words)
    rows = len(a) * row_bytes
    return [Launch("twice", "together", 2 * rows, k=k), Launch("twice", "first", rows, k=k),
            Launch("twice", "second", rows, k=k)]  # fmt: skip


def decode_config(layers: int, context: int, steps: int, k: int, keep: float, seed: int = 0):
    """The synthetic DeepSeek-V3.2-shaped trace the ``decode`` probe replays (deterministic)."""
    from dsacache.tracer.synth import preset

    return preset(
        "deepseek-v3.2", layers=layers, context=context, steps=steps, k=k, keep=keep, seed=seed
    )


def run_decode(
    layers: int, context: int, steps: int, k: int, keep: float, seed: int = 0,
    device: str = "cuda", index_evict: str = "", kv_evict: str = "", kv_first_from: int = -1,
    persist_layers: int = 0, hit_ratio: float = 1.0, set_aside: int = 0,
) -> list[Launch]:  # fmt: skip
    """Decode steps as DSA issues them, per layer: the indexer reads every cached token's key
    (132 B each), then the sparse kernel gathers the selected 656-byte KV rows. Same trace,
    pools and order as ``dsacache replay --layout mla-fp8 --classes index,kv`` with batch 1.
    ``kv_first_from`` >= 0 loads the KV of layers from that one on with evict_first: the
    hardware form of reserving the L2 for the KV of the first layers only. ``persist_layers``
    > 0 runs the decode on a stream whose L2 persisting access-policy window covers the KV of
    the first ``persist_layers`` layers (``hit_ratio``, ``set_aside`` bytes set aside; the KV
    of all layers lives in one buffer, layer after layer)."""
    import tempfile

    import torch

    from dsacache.tracer.synth import synthesize
    from dsacache.traces import open_trace

    cfg = decode_config(layers, context, steps, k, keep, seed)
    with tempfile.TemporaryDirectory() as tmp:
        trace = open_trace(synthesize(cfg, f"{tmp}/t.dsatrace"))
        step_rows = list(trace.iter_steps())
    max_tokens = context + steps + 1
    per_layer = max_tokens * 164  # int32 words of one layer's 656-byte rows
    kv_all = torch.randint(0, 1 << 20, (layers * per_layer,), dtype=torch.int32, device=device)
    kv = [kv_all[i * per_layer : (i + 1) * per_layer] for i in range(layers)]
    index = [torch.rand(max_tokens * 33, dtype=torch.float32, device=device) for _ in range(layers)]
    flush_buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    flush(flush_buf)
    launches = []

    def decode() -> None:
        for rows in step_rows:
            for i in range(len(rows)):
                layer, step, pos = int(rows.layer[i]), int(rows.step[i]), int(rows.position[i])
                read(index[layer][: pos * 33], index_evict)
                # a copy: rows may be read-only views of the trace's part
                idx = torch.tensor(rows.row(i), dtype=torch.int32, device=device)
                hint = "evict_first" if 0 <= kv_first_from <= layer else kv_evict
                gather(kv[layer], idx, 164, hint)
                launches.append(Launch("decode", "index", pos * 132, k=k, layer=layer, step=step))
                launches.append(Launch("decode", "kv", len(idx) * 656, k=k, layer=layer, step=step))

    if persist_layers <= 0:
        decode()
        return launches
    from dsacache.kernels.l2persist import persisting_window

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the flush and the buffers first
    window = persisting_window(stream.cuda_stream, kv_all.data_ptr(),
                               persist_layers * per_layer * 4, hit_ratio, set_aside)  # fmt: skip
    with torch.cuda.stream(stream), window:
        decode()
        stream.synchronize()
    return launches


def parser() -> argparse.ArgumentParser:
    """The probes' command line; ``calibration`` reads a measurement's command back with it."""
    p = argparse.ArgumentParser(prog="python -m dsacache.kernels.probes")
    p.add_argument("experiment", choices=["reuse", "hint", "beside", "gather", "twice", "decode"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sizes", default="4MiB,8MiB,16MiB,24MiB,32MiB,40MiB,48MiB,64MiB")
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--keep", type=float, default=0.45)
    p.add_argument("--between", default="0,4MiB,8MiB,16MiB,24MiB,32MiB,48MiB")
    p.add_argument("--row-bytes", type=int, default=656, help="gather: bytes per token row")
    p.add_argument("--evict", default="evict_last", choices=["", "evict_first", "evict_last"],
                   help="hint: the first read's L2 hint; beside: the KV's")  # fmt: skip
    p.add_argument("--beside", default="1MiB", help="beside: normal bytes per layer")
    p.add_argument("--kv-reads", type=int, default=1, help="beside: KV reads per layer (1, 2)")
    p.add_argument("--index-evict", default="", choices=["", "evict_first", "evict_last"])
    p.add_argument("--kv-evict", default="", choices=["", "evict_first", "evict_last"])
    p.add_argument("--kv-first-from", type=int, default=-1)
    p.add_argument("--persist-layers", type=int, default=0)
    p.add_argument("--hit-ratio", type=float, default=1.0)
    p.add_argument("--set-aside", default="0")
    p.add_argument("--plan", required=True, help="JSON file to write the launch plan to")
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m dsacache.kernels.probes reuse|hint|beside|gather|twice|decode ... --plan FILE``
    (run under ncu)."""
    from dsacache.units import parse_size

    args = parser().parse_args(argv)
    if args.experiment == "reuse":
        launches = run_reuse([parse_size(s) for s in args.sizes.split(",")])
    elif args.experiment == "hint":
        launches = run_hint([parse_size(s) for s in args.sizes.split(",")],
                            [parse_size(s) for s in args.between.split(",")], args.evict)  # fmt: skip
    elif args.experiment == "beside":
        launches = run_beside([parse_size(s) for s in args.sizes.split(",")],
                              parse_size(args.beside), args.layers, args.evict,
                              args.kv_reads)  # fmt: skip
    elif args.experiment == "gather":
        between = [parse_size(s) for s in args.between.split(",")]
        launches = run_gather(args.k, args.context, args.keep, between, args.row_bytes)
    elif args.experiment == "twice":
        launches = run_twice(args.k, args.context, args.keep, args.row_bytes)
    else:
        launches = run_decode(
            args.layers, args.context, args.steps, args.k, args.keep,
            index_evict=args.index_evict, kv_evict=args.kv_evict, kv_first_from=args.kv_first_from,
            persist_layers=args.persist_layers, hit_ratio=args.hit_ratio,
            set_aside=parse_size(args.set_aside),
        )  # fmt: skip
    import torch

    torch.cuda.synchronize()
    with open(args.plan, "w") as f:
        json.dump([asdict(x) for x in launches], f)
    print(f"{len(launches)} measured launches", file=sys.stderr)


if __name__ == "__main__":
    main()
