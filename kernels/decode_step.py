"""One DSA decode step on the GPU (indexer -> top-k -> sparse attention), and a driver that
replays a trace's decode steps through the real kernels: the workload ``dsacache profile``
measures under Nsight Compute.

``run_trace`` builds paged caches of random data for ``batch`` requests and some layers,
then for each decode step of the trace and each layer runs the indexer over every cached key
of each request and the sparse attention over the trace's selection (or, with
``use_trace_selection=False``, over the indexer's own top-k). With ``capture=PATH`` the
indices the attention kernels read are written to a new trace: each step's index tensors are
copied into a ring on the GPU (no sync, no host transfer per step); every few steps one
transfer moves them to pinned host memory, and a background thread appends them to a raw
spool, which ``close`` encodes into the trace (``IndexCapture``, ``dsacache.traces.spool``).

Command line (the workload to profile)::

    python -m dsacache.kernels.decode_step TRACE --layout mla-fp8 --batch 4 --steps 8 \
        --layers 4 --index-evict evict_first --capture replayed.dsatrace
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dsacache.errors import DsacacheError
from dsacache.kernels.flashmla import flashmla_sparse_decode
from dsacache.kernels.index_capture import IndexCapture
from dsacache.kernels.indexer import indexer_logits, select_topk
from dsacache.kernels.paged import (
    MLA_DIM,
    MLA_FP8_BYTES,
    MLA_LATENT,
    GQACache,
    IndexKeyCache,
    MLACache,
    PageTable,
    make_page_table,
    random_gqa_cache,
    random_index_cache,
    random_mla_cache,
)
from dsacache.kernels.probes import FLUSH_BYTES, flush
from dsacache.kernels.sparse_decode import (
    MLA_BLOCK_N,
    MLA_PER_SM,
    gqa_sparse_decode,
    mla_head_block,
    mla_sparse_decode,
    plan_splits,
)
from dsacache.simulator.layouts import trace_layout
from dsacache.simulator.workload import INDEXER_HEADS, Workload
from dsacache.tracer.synth import SPEC_PREFIX, materialize

# FlashMLA's SM90 sparse FP8 decode (128 heads), as the model takes it (FlashMLA 9241ae3,
# csrc/sm90/decode/sparse_fp8/splitkv_mla.cuh; docs/decode_compare.md). A cluster of two
# 64-head CTAs splits each 64-token block and shares the halves through distributed shared
# memory, so each selected token is read once. Four lanes of a producer warp read a token,
# 16 B each per ld.global.nc: the scales (issued a block ahead), the 512-B latent as eight
# 64-B loads, the RoPE as two; what the L1 already holds of the token (the sector two loads
# share) does not reach the L2 (Workload.kv_loads). Replayed so, the batch-1 and batch-64
# profiles come within 2-7 points where two whole-record reads (the stand-in before
# 2026-12-07) were 10-17 points off (docs/results/h100-decode/flashmla_loads_experiment.py).
FLASHMLA_LOADS = ((512, 16), *((64 * d, 64) for d in range(8)), (528, 64), (592, 64))
# Reads of each request's query per call, measured alone on the H200 with an empty selection
# (docs/results/h200-decode/flashmla-parts.parquet): the split parts load it again.
FLASHMLA_QUERY_READS = {(1, 512): 5.1, (1, 2048): 9.3, (8, 256): 1.8, (8, 2048): 6.8,
                        (64, 2048): 1.1}  # fmt: skip


def flashmla_query_reads(batch: int, k: int) -> float:
    """FlashMLA's reads of a request's query per call at ``batch`` x ``k``: as measured
    (``FLASHMLA_QUERY_READS``), else the measured shape nearest in log2 batch and log2 k (an
    estimate: the shapes were measured on one GPU)."""
    if (batch, k) in FLASHMLA_QUERY_READS:
        return FLASHMLA_QUERY_READS[batch, k]
    near = min(FLASHMLA_QUERY_READS,
               key=lambda s: abs(math.log2(s[0] / batch)) + abs(math.log2(s[1] / k)))  # fmt: skip
    return FLASHMLA_QUERY_READS[near]


def split_partial_bytes(backend: str, layout: str, batch: int, k: int, heads: int, sms: int) -> int:
    """Bytes of fp32 split-K partial outputs (``heads`` x 512 per split) the sparse MLA kernel
    writes per request and layer when it splits a request's selection (0 when it does not):
    ours as ``plan_splits`` plans it on ``sms`` SMs; FlashMLA's scheduler
    (get_decoding_sched_meta.cu) spreads each request's 64-token blocks plus 5 of overhead
    over ``sms / (heads / 64)`` parts, so a request's blocks fall into ceil(blocks / blocks
    per part) parts (32, 8, 2, 7 and 1 at the five shapes measured, 128 heads). GQA: 0 (a
    few KB)."""
    if layout == "gqa":
        return 0
    if backend == "flashmla":
        blocks = -(-k // 64)
        per_part = -(-batch * (blocks + 5) // max(1, sms // max(1, heads // 64)))
        splits = -(-blocks // per_part)
    else:
        work = batch * -(-heads // mla_head_block(heads))
        splits, _ = plan_splits(work, k, MLA_BLOCK_N, sms, None, MLA_PER_SM)
    return splits * heads * MLA_LATENT * 4 if splits > 1 else 0


# Its query is loaded by TMA with EVICT_FIRST (splitkv_mla.cuh:151, 279); a repeated call on
# the same selection reads about its query again from DRAM (docs/results/h200-decode/
# flashmla-repeat.parquet), where ours reads nothing. calibration.query_hint carries it.
FLASHMLA_QUERY_EVICT = "evict_first"
INDEX_HEADS = INDEXER_HEADS  # the indexer's heads in run_trace (128 dims each)
LAYOUTS = ("mla-fp8", "mla-bf16", "gqa")
BACKENDS = ("triton", "flashmla")  # the sparse attention kernel; the indexer is ours in both
DEEPSEEK_SM_SCALE = (128 + 64) ** -0.5  # DeepSeek-V3.2: qk head dim 192 before absorption


@dataclass(frozen=True)
class Hints:
    """L2 eviction hints per load class ("", "evict_first", "evict_last")."""

    index: str = ""  # the indexer's key loads
    kv: str = ""  # the sparse attention's KV gathers


@dataclass(frozen=True)
class Persist:
    """An L2 persisting access-policy window over the KV pools of the first ``layers`` layers:
    ``hit_ratio`` of its lines persist, in ``set_aside`` bytes of L2 set aside for them."""

    layers: int
    hit_ratio: float = 1.0
    set_aside: int = 0


@dataclass
class LayerCaches:
    """One layer's caches: the indexer keys and the attention KV (MLA or GQA)."""

    index: IndexKeyCache
    kv: MLACache | GQACache


@dataclass
class StepOutput:
    """What one decode step of one layer returns."""

    out: torch.Tensor  # bf16 [B, H, Dv]
    lse: torch.Tensor  # float32 [B, H]
    indices: torch.Tensor  # int32 [B, k] or [B, G, k], ascending, -1 padded: what attention read
    logits: torch.Tensor  # float32 [B, T]: the indexer's scores


def check_backend(backend: str, layout: str, hints: Hints, attn_options: dict | None) -> None:
    """Raise ``ValueError`` unless ``backend`` can run the sparse attention of ``layout`` with
    these hints and options (FlashMLA: the mla-fp8 layout only, no KV hint, no options)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "flashmla" and (layout != "mla-fp8" or hints.kv or attn_options):
        raise ValueError(
            f"backend flashmla runs the mla-fp8 layout without KV hints or kernel options, got "
            f"layout {layout!r}"
            + (f" and KV hint {hints.kv!r}" if hints.kv else "")
            + (f" and options {attn_options}" if attn_options else "")
        )


def decode_step(
    q_index: torch.Tensor,
    index_weights: torch.Tensor,
    q_attn: torch.Tensor,
    caches: LayerCaches,
    context_lens: torch.Tensor,
    *,
    k: int = 2048,
    sink: int = 0,
    window: int = 0,
    sm_scale: float | None = None,
    hints: Hints = Hints(),
    max_context: int | None = None,
    selection: torch.Tensor | None = None,
    attn_options: dict[str, Any] | None = None,
    backend: str = "triton",
) -> StepOutput:
    """Indexer -> top-k -> sparse attention for one layer and a batch (no host sync).

    ``q_index`` ``[B, Hi, 128]`` bf16 and ``index_weights`` ``[B, Hi]``: the indexer's query;
    ``q_attn``: ``[B, H, 576]`` (MLA) or ``[B, HQ, D]`` (GQA) bf16; ``context_lens`` int32
    ``[B]`` on the device (tokens each request has cached). The indexer always runs (its key
    reads are part of the step); ``selection`` (int32 ``[B, k]`` / ``[B, G, k]``, -1 padded)
    replaces its top-k, e.g. with a trace's selection. ``backend="flashmla"`` runs the sparse
    attention with DeepSeek's FlashMLA (fp8 MLA caches, no L2 hints; ``kernels/flashmla.py``).
    """
    opts = attn_options or {}
    kv = caches.kv
    layout = ("mla-fp8" if kv.fp8 else "mla-bf16") if isinstance(kv, MLACache) else "gqa"
    check_backend(backend, layout, hints, opts)
    logits = indexer_logits(
        q_index, index_weights, caches.index, context_lens, max_context, evict=hints.index
    )
    if selection is None:
        selection = select_topk(logits, context_lens, k, sink, window)
    if isinstance(kv, MLACache):
        scale = DEEPSEEK_SM_SCALE if sm_scale is None else sm_scale
        if backend == "flashmla":
            out, lse = flashmla_sparse_decode(q_attn, kv, selection, scale)
        else:
            out, lse = mla_sparse_decode(q_attn, kv, selection, scale, evict=hints.kv, **opts)
    else:
        out, lse = gqa_sparse_decode(q_attn, kv, selection, sm_scale, evict=hints.kv, **opts)
    return StepOutput(out, lse, selection, logits)


# -- a decode step as one CUDA graph -------------------------------------------------------------
class _StepGraph:
    """One decode step's kernels captured as a CUDA graph over static inputs, the selections
    ``[L, B, G, W]`` and context lengths ``[L, B]``, which ``replay`` copies in first.
    ``store(indices_of(sel, read))``, if given, is captured after the layers (the index
    capture's copy into its ring; ``indices_of`` also runs in the warm-up, so that nothing
    is loaded for the first time while the graph is captured)."""

    def __init__(self, launch: Callable[[torch.Tensor, torch.Tensor, int], list[torch.Tensor]],
                 shape: tuple[int, ...], max_context: int, device: torch.device,
                 store: Callable[[torch.Tensor], None] | None = None,
                 indices_of: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None,
                 ) -> None:  # fmt: skip
        self.sel = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.ctx = torch.ones(shape[:2], dtype=torch.int32, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compiles the kernels and fills the allocator, unrecorded
            read = launch(self.sel, self.ctx, max_context)
            if store is not None:
                indices_of(self.sel, read)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the capture's thread may wait on an event meanwhile (a new width mid-run)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.read = launch(self.sel, self.ctx, max_context)
            if store is not None:
                store(indices_of(self.sel, self.read))

    def replay(self, sel: torch.Tensor, ctx: torch.Tensor) -> list[torch.Tensor]:
        """Run the step on ``sel`` and ``ctx`` (host or device tensors of the static shapes);
        returns the indices each layer's attention read (the graph's own tensors)."""
        self.sel.copy_(sel, non_blocking=True)
        self.ctx.copy_(ctx, non_blocking=True)
        self.graph.replay()
        return self.read


# -- the trace-driven workload --------------------------------------------------------------------
@dataclass
class RunResult:
    """Summary of ``run_trace``."""

    steps: int
    layers: int
    batch: int
    layout: str
    seconds: float  # from after the trace's first step was read to the end (capture closed)
    backend: str = "triton"
    step_seconds: list[float] = field(default_factory=list)  # each step's launches (no sync)
    index_bytes: int = 0  # indexer key bytes read (all steps and layers)
    kv_bytes: int = 0  # KV bytes gathered
    capture: str | None = None
    capture_stats: dict[str, float] = field(default_factory=dict)  # IndexCapture.stats
    decode_seconds: float = 0.0  # the step loop to its last kernel (before the capture's close)


def kv_reads_per_token(backend: str, layout: str, heads: int) -> int:
    """How many CTAs of the sparse attention kernel read each selected token per step (the
    tiling the simulator's ``Workload.reads_per_token`` models). Ours: one program per block
    of up to 64 heads reads the whole token (``mla_sparse_decode``); GQA: one program per KV
    head reads that head's K and V, each byte once. FlashMLA: one cluster reads each token
    once (``FLASHMLA_LOADS``)."""
    if layout == "gqa" or backend == "flashmla":
        return 1
    return -(-heads // mla_head_block(heads))


def kernel_tiling(backend: str, layout: str, batch: int, k: int, heads: int, sms: int) -> dict:
    """The ``Workload`` fields that make a replayed stream read the KV, query and split-K
    partials as the attention kernel of ``backend`` does at ``batch`` x ``k`` with ``heads``
    query heads on a GPU of ``sms`` SMs (the model the decode comparison checks against ncu):
    ``reads_per_token``, ``kv_loads_apart``, ``kv_loads``, ``query_reads`` and
    ``partial_bytes``."""
    if backend not in BACKENDS:
        raise DsacacheError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if layout not in LAYOUTS or (backend == "flashmla" and layout != "mla-fp8"):
        allowed = "mla-fp8" if backend == "flashmla" else ", ".join(LAYOUTS)
        raise DsacacheError(f"backend {backend} reads the layouts {allowed}, got {layout!r}")
    if min(batch, k, heads, sms) < 1:
        raise DsacacheError(f"need batch, k, heads and sms >= 1, got {batch}, {k}, {heads}, {sms}")
    flashmla = backend == "flashmla"
    return {
        "reads_per_token": kv_reads_per_token(backend, layout, heads),
        "kv_loads_apart": not flashmla,
        "kv_loads": FLASHMLA_LOADS if flashmla else (),
        "query_reads": flashmla_query_reads(batch, k) if flashmla else 1.0,
        "partial_bytes": split_partial_bytes(backend, layout, batch, k, heads, sms),
    }


def with_kernel_tiling(workload: Workload, trace: Any, backend: str, sms: int) -> Workload:
    """``workload`` reading the trace's selections as ``backend``'s attention kernel does
    (``kernel_tiling``): its layout (or the trace model's), batch and query heads (0: the
    model's), the trace's k. The split-K partials count only where ``workload`` streams the
    ``partials`` class."""
    layout = trace_layout(trace, workload.layout).name
    heads = workload.heads or int(trace.model.get("heads", 128))
    k = int(trace.indexer.get("k", 2048))
    tiling = kernel_tiling(backend, layout, workload.batch, k, heads, sms)
    if "partials" not in workload.classes:
        tiling["partial_bytes"] = 0
    return replace(workload, **tiling)


def backend_workload(workload: Workload, trace: Any, backend: str, gpu: str) -> Workload:
    """``workload`` with ``backend``'s kernel tiling (``with_kernel_tiling``), its split-K plan
    on the SMs of ``gpu`` (a preset or profile name); refuses a tiling already set by hand."""
    from dsacache.simulator.presets import gpu_preset

    if workload.reads_per_token != 1 or workload.kv_loads_apart or workload.kv_loads:
        raise DsacacheError(
            f"backend {backend} sets the kernel tiling; leave reads_per_token at 1 and the "
            "KV loads unset"
        )
    sms = gpu_preset(gpu).sms
    if sms < 1:
        raise DsacacheError(f"GPU {gpu!r} gives no SM count, which a backend needs for its splits")
    return with_kernel_tiling(workload, trace, backend, sms)


def _persisted_pools(pt: PageTable, layout: str, layers: int, dev: torch.device) -> torch.Tensor:
    """One buffer holding ``layers`` MLA pools back to back (a window covers one range)."""
    fp8 = layout == "mla-fp8"
    width, dtype = (MLA_FP8_BYTES, torch.uint8) if fp8 else (MLA_DIM, torch.bfloat16)
    return torch.empty((layers, pt.num_pages, pt.page_size, width), dtype=dtype, device=dev)


def _kv_bytes_per_token(layout: str, kv_heads: int, head_dim: int, groups: int) -> int:
    if layout == "mla-fp8":
        return 656
    if layout == "mla-bf16":
        return 1152
    per_head = 2 * head_dim * 2
    return per_head if groups > 1 else per_head * kv_heads


class StepStaging:
    """The host side of each step's inputs: selections ``[L, B, G, W]`` (-1 padded) and
    context lengths ``[L, B]`` built from the trace's rows with array operations (no Python
    loop over rows when they are full), in buffers reused round robin. On CUDA the buffers
    are pinned, so the copies to the device need no staging copy, and a buffer is written
    again only once its last copy has run (``copied`` records the event). Batch slot ``b``
    replays trace request ``b % requests``; rows of other layers, groups or requests are
    left out; a request's groups share its context length. Why: the launching thread's host
    work per step bounded the decode loop in CUDA graphs (a loop over the rows, then a pinning
    copy: 0.77 ms a step against 0.51 now on the H100), and the capture's host work competed
    with it (docs/results/h100-kernels/capture/staging-1207/)."""

    def __init__(self, batch: int, requests: int, layers: int, groups: int,
                 device: torch.device, buffers: int = 3) -> None:  # fmt: skip
        self.shape = (layers, batch, groups)
        self.requests = requests
        self.slot_request = np.arange(batch) % requests
        self.pinned = device.type == "cuda"
        self._count = buffers
        self._buffers: dict[int, list[list[Any]]] = {}  # width -> [sel, ctx, event] each
        self._turn = 0
        self._last: list[Any] | None = None

    def reserve(self, width: int) -> None:
        """Allocate the buffers for steps of ``width`` now (pinning memory takes milliseconds)."""
        if width not in self._buffers:
            layers, batch, groups = self.shape
            self._buffers[width] = [
                [torch.empty((layers, batch, groups, width), dtype=torch.int32,
                             pin_memory=self.pinned),
                 torch.empty((layers, batch), dtype=torch.int32, pin_memory=self.pinned), None]
                for _ in range(self._count)
            ]  # fmt: skip

    def fill(self, rows: Any, min_width: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
        """One step's ``(selections, context lengths)`` as host tensors, the selections
        ``min_width`` wide or as wide as the longest row, the context lengths as int64 numpy
        ``[L, B]`` as well, and how many selected tokens they hold (-1s left out). The
        tensors stay valid until ``fill`` has been called ``buffers`` times more."""
        n = len(rows)
        lengths = rows.lengths
        width = max(min_width, int(lengths.max()) if n else 0)
        self.reserve(width)
        self._last = entry = self._buffers[width][self._turn]
        self._turn = (self._turn + 1) % self._count
        if entry[2] is not None:
            entry[2].synchronize()  # this buffer's copy to the device has run
        sel_t, ctx_t = entry[0], entry[1]
        sel = sel_t.numpy().reshape(-1, width)
        layers, _batch, groups = self.shape
        row_of = np.full((layers, groups, self.requests), -1, np.int64)
        keep = np.flatnonzero((rows.layer < layers) & (rows.group < groups)
                              & (rows.request >= 0) & (rows.request < self.requests))  # fmt: skip
        row_of[rows.layer[keep], rows.group[keep], rows.request[keep]] = keep
        grid = row_of[:, :, self.slot_request].transpose(0, 2, 1)  # [L, B, G]: row or -1
        missing = grid < 0
        cells = np.maximum(grid, 0).reshape(-1)
        if n and lengths.min() == width == lengths.max():  # every row full: a view of them
            padded = rows.indices.reshape(n, width)
            valid = np.full(n, width) if rows.indices.min() >= 0 else (padded >= 0).sum(1)
        else:
            padded = np.full((max(n, 1), width), -1, np.int32)
            for i in np.unique(grid[~missing]):  # only the rows a slot replays
                row = rows.row(int(i))
                padded[i, : len(row)] = row
            valid = (padded >= 0).sum(1)
        np.take(padded, cells, axis=0, out=sel, mode="clip")
        if missing.any():
            sel[missing.reshape(-1)] = -1
        position = np.where(missing, -1, rows.position[cells].reshape(grid.shape) if n else -1)
        pos = position.max(axis=2)
        pos[pos < 0] = 1
        ctx_t.numpy()[:] = pos
        return sel_t, ctx_t, pos, int(np.where(missing, 0, valid[cells].reshape(grid.shape)).sum())

    def copied(self) -> None:
        """Note that the copies of the last ``fill``'s buffers to the device are queued on
        the current stream: that buffer is written again only after they have run."""
        if self.pinned and self._last is not None:
            event = self._last[2] or torch.cuda.Event()
            event.record()
            self._last[2] = event


@contextlib.contextmanager
def opened_trace(trace: Any) -> Iterator[Any]:
    """The trace to run: an opened trace as is, a path or a bundled trace's name opened, a
    ``synth:`` spec generated into a scratch folder that lasts as long as the context."""
    from dsacache.traces import open_trace

    if hasattr(trace, "iter_steps"):
        yield trace
    elif isinstance(trace, str) and trace.startswith(SPEC_PREFIX):
        with tempfile.TemporaryDirectory() as tmp:
            yield open_trace(materialize(trace, tmp))
    else:
        yield open_trace(trace)


def run_trace(
    trace: Any,
    *,
    layout: str = "mla-fp8",
    batch: int = 1,
    steps: int | None = None,
    layers: int | None = None,
    hints: Hints = Hints(),
    device: str = "cuda",
    page_order: str = "shuffled",
    seed: int = 0,
    use_trace_selection: bool = True,
    index_heads: int = INDEX_HEADS,
    heads: int | None = None,
    capture: str | None = None,
    capture_steps_per_copy: int | None = None,
    attn_options: dict[str, Any] | None = None,
    backend: str = "triton",
    persist: Persist | None = None,
    cuda_graph: bool = False,
    reserve: int = 0,
) -> RunResult:
    """Run ``steps`` decode steps of ``trace`` (a path, a bundled trace's name, a
    ``synth:PRESET:KNOB=VALUE,...`` spec or an opened trace) through the kernels.

    Batch slot ``b`` replays trace request ``b % requests`` (on its own pages). Per step and
    layer: the indexer reads every cached key of each slot (``position`` tokens), then sparse
    attention gathers the trace's selection (``use_trace_selection``) or the indexer's top-k
    (k, sink and window from the trace's indexer). Caches hold random data. ``heads``
    overrides the model's attention heads (e.g. fewer for a small GPU); ``capture`` writes
    the indices the attention kernels read to a new trace at that path (see
    ``IndexCapture``, which moves them to the host every ``capture_steps_per_copy`` steps). ``backend``:
    the sparse attention kernel, ours ("triton") or DeepSeek's FlashMLA ("flashmla", mla-fp8).
    ``persist`` runs the decode on a stream whose L2 persisting access-policy window covers
    the KV pools of the first layers (MLA layouts). ``cuda_graph`` launches each step's
    layers as one CUDA graph (our kernels, no window), as serving engines run decode: the
    indexer then scores the page table's whole capacity (tokens past a context are masked,
    not read) and the loop is bound by the GPU rather than by its Python. The L2 is flushed
    before the first step, so every run starts from the same state. ``reserve`` bytes of
    device memory are taken before anything else and held through the run, so that the
    caches lie at other device addresses: how much an L2 hint costs can depend on where they
    lie (docs/results/h100-decode/evict-last-1207/).
    """
    if reserve < 0:
        raise ValueError(f"reserve={reserve} B: must be >= 0")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    check_backend(backend, layout, hints, attn_options)
    if persist is not None and (not layout.startswith("mla") or hints.index or hints.kv):
        raise ValueError("a persisting window runs with an MLA layout and without L2 hints")
    if cuda_graph and (
        backend != "triton" or persist is not None or torch.device(device).type != "cuda"
    ):
        raise ValueError("cuda_graph runs our kernels (backend 'triton') on a CUDA device, "
                         f"without a persisting window; got backend {backend!r}, device "
                         f"{device!r}, persist {persist}")  # fmt: skip
    with opened_trace(trace) as tr:
        model, totals = tr.model, tr.manifest.get("totals", {})
        requests = max(1, int(totals.get("requests", 1)))
        groups = max(1, int(totals.get("groups", 1)))
        n_layers = min(int(totals.get("layers", 1)), layers or 1 << 30)
        k = int(tr.indexer.get("k", 2048))
        sink, window = int(tr.indexer.get("sink", 0)), int(tr.indexer.get("window", 0))
        capacity = int(totals.get("max_position", 1)) + 1
        dev = torch.device(device)
        held = torch.empty(reserve, dtype=torch.uint8, device=dev) if reserve else None  # noqa: F841
        gen = torch.Generator(device=dev).manual_seed(seed)
        mla = layout.startswith("mla")
        if mla and groups > 1:
            raise ValueError(f"the trace selects per KV group ({groups} groups); MLA has one")
        kv_heads = 1 if mla else int(model.get("kv_heads", 3))
        head_dim = MLA_DIM if mla else int(model.get("head_dim", 64))
        n_heads = heads or int(model.get("heads", 128 if mla else 9))
        if not mla and groups > 1 and groups != kv_heads:
            raise ValueError(
                f"trace has {groups} groups per layer but the model {kv_heads} KV heads"
            )

        pt: PageTable = make_page_table([capacity] * batch, order=page_order, seed=seed, device=dev)
        caches = []
        persisted = None  # the KV pools of the window's layers, one after another in one buffer
        if persist is not None:
            persisted = _persisted_pools(pt, layout, min(persist.layers, n_layers), dev)
        for layer in range(n_layers):
            idx_cache = random_index_cache(pt, seed=seed + 2 * layer, device=dev)
            if mla:
                kv = random_mla_cache(
                    pt, layout == "mla-fp8", seed=seed + 2 * layer + 1, device=dev
                )
                if persisted is not None and layer < len(persisted):
                    persisted[layer].copy_(kv.pool)
                    kv = MLACache(persisted[layer], pt)
            else:
                kv = random_gqa_cache(pt, kv_heads, head_dim, seed=seed + 2 * layer + 1, device=dev)
            caches.append(LayerCaches(idx_cache, kv))

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=dev).to(torch.bfloat16)

        q_index = rand(batch, index_heads, 128)
        weights = torch.rand((batch, index_heads), generator=gen, device=dev) / index_heads**0.5
        q_attn = rand(batch, n_heads, head_dim)

        cap = None
        if capture:
            from dsacache.kernels.ncu import device_metadata

            meta = {"tool": "dsacache.kernels.decode_step", "layout": layout, "batch": batch,
                    "backend": backend,
                    "hints": {"index": hints.index, "kv": hints.kv},
                    "selection": "trace" if use_trace_selection else "indexer top-k (random data)",
                    "source_trace": str(getattr(tr, "path", trace)), **device_metadata()}  # fmt: skip
            # parts of 8 whole steps: the writer takes them without splitting or gathering rows
            rows_per_step = n_layers * batch * (groups if use_trace_selection else 1)
            cap = IndexCapture(capture, dev.type == "cuda", model=dict(model),
                               indexer=dict(tr.indexer), capture=meta,
                               steps_per_copy=capture_steps_per_copy,
                               part_rows=8 * rows_per_step)  # fmt: skip
        result = RunResult(0, n_layers, batch, layout, 0.0, backend=backend, capture=capture)
        kv_tok = _kv_bytes_per_token(layout, kv_heads, head_dim if not mla else 0, groups)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def launch(sel: torch.Tensor, ctx: torch.Tensor, max_ctx: int) -> list[torch.Tensor]:
            """Every layer of one step; the indices each layer's attention read."""
            read = []
            for layer in range(n_layers):
                res = decode_step(
                    q_index, weights, q_attn, caches[layer], ctx[layer], k=k, sink=sink,
                    window=window, hints=hints, max_context=max_ctx,
                    selection=sel[layer] if use_trace_selection else None,
                    attn_options=attn_options, backend=backend,
                )  # fmt: skip
                read.append(res.indices)
            return read

        out_groups = groups if use_trace_selection else 1

        def out_shape(width: int) -> tuple[int, int, int, int]:
            """The shape of a step's captured indices."""
            return (n_layers, batch, out_groups, width if use_trace_selection else k)

        def indices_read(sel: torch.Tensor, read: list[torch.Tensor]) -> torch.Tensor:
            """What the step's attention read, for the capture: ``[L, B, G, W]``."""
            return sel if use_trace_selection else torch.stack(read)

        # with CUDA graphs the copy into the capture's ring runs inside each step's graph
        store = cap.graph_store if cap is not None and cuda_graph else None
        if cap is not None:  # its buffers for the usual width, before the graphs and the clock
            cap.reserve(out_shape(k), dev, graph=cuda_graph)
        staging = StepStaging(batch, requests, n_layers, groups, dev)
        staging.reserve(k)
        graphs: dict[int, _StepGraph] = {}  # by selection width
        if cuda_graph:  # the usual width, built before the flush and the clock
            graphs[k] = _StepGraph(launch, (n_layers, batch, groups, k), capacity, dev, store,
                                   indices_read)  # fmt: skip
        if dev.type == "cuda":  # the caches were just written: evict them, as a long decode would
            flush(torch.ones(FLUSH_BYTES // 4, device=dev))
        l2_window = contextlib.ExitStack()  # the persisting window's stream, entered for the loop
        if persisted is not None:
            from dsacache.kernels.l2persist import persisting_window

            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            l2_window.enter_context(torch.cuda.stream(stream))
            l2_window.enter_context(persisting_window(stream.cuda_stream, persisted.data_ptr(),
                                 persisted.numel() * persisted.element_size(), persist.hit_ratio,
                                 persist.set_aside))  # fmt: skip
        # the first step's rows are read before the clock starts: decoding the trace's first
        # part (all of a short trace) is replay overhead, not decode time; later parts are
        # decoded by a worker thread while the GPU runs the steps before them
        trace_steps = tr.iter_steps(read_ahead=True)
        try:
            first = next(trace_steps, None)
            sync()
            t_all = time.perf_counter()
            for rows in itertools.chain([] if first is None else [first], trace_steps):
                if steps is not None and result.steps >= steps:
                    break
                t0 = time.perf_counter()
                step = int(rows.step[0])
                sel_all, ctx_all, pos_np, selected = staging.fill(rows, k)
                width = sel_all.shape[-1]
                if cuda_graph:
                    if width not in graphs:
                        if cap is not None:
                            cap.reserve(out_shape(width), dev, graph=True)
                        graphs[width] = _StepGraph(launch, tuple(sel_all.shape), capacity, dev,
                                                   store, indices_read)  # fmt: skip
                    read = graphs[width].replay(sel_all, ctx_all)
                    sel_all = graphs[width].sel
                else:
                    sel_all = sel_all.to(dev, non_blocking=True)
                    ctx_all = ctx_all.to(dev, non_blocking=True)
                    read = launch(sel_all, ctx_all, int(pos_np.max()))
                staging.copied()
                if cap is not None and cuda_graph:  # the graph stored the step's indices
                    cap.stored(step, pos_np, out_shape(width))
                elif cap is not None:
                    cap.begin_step(step, pos_np, out_shape(width))
                    cap.add_all(indices_read(sel_all, read))  # every layer: one copy
                    cap.end_step()
                result.index_bytes += int(pos_np.sum()) * 132
                result.kv_bytes += selected * kv_tok
                result.steps += 1
                result.step_seconds.append(time.perf_counter() - t0)  # launch time (no sync)
            sync()
            result.decode_seconds = time.perf_counter() - t_all
        except BaseException:
            if cap is not None:
                with contextlib.suppress(Exception):  # the loop's error is the one to report
                    cap.close(complete=False)  # keep the steps captured so far, marked incomplete
            raise
        finally:
            l2_window.close()
            trace_steps.close()  # a step limit leaves a part in the worker: done before the trace closes
        if cap is not None:
            cap.close()
            result.capture_stats = dict(cap.stats)
        result.seconds = time.perf_counter() - t_all
        return result


def parser() -> argparse.ArgumentParser:
    """The driver's command line; ``calibration`` reads a profile's command back with it."""
    p = argparse.ArgumentParser(prog="python -m dsacache.kernels.decode_step")
    p.add_argument("trace", help="trace path, bundled name or synth:PRESET:KNOB=VALUE,...")
    p.add_argument("--layout", choices=LAYOUTS, default="mla-fp8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: model's)")
    p.add_argument("--index-evict", default="", choices=["", "evict_first", "evict_last"])
    p.add_argument("--kv-evict", default="", choices=["", "evict_first", "evict_last"])
    p.add_argument("--page-order", default="shuffled", choices=["shuffled", "contiguous"])
    p.add_argument("--seed", type=int, default=0, help="page order and cache contents")
    p.add_argument("--indexer-topk", action="store_true", help="attend to the indexer's top-k")
    p.add_argument("--capture", default=None, help="write the indices read to this trace")
    p.add_argument("--capture-steps-per-copy", type=int, default=None,
                   help="steps moved to the host per transfer (default: up to 16)")  # fmt: skip
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", choices=BACKENDS, default="triton", help="sparse attention kernel")
    p.add_argument("--persist-layers", type=int, default=0,
                   help="L2 persisting window over the KV of the first N layers (MLA)")  # fmt: skip
    p.add_argument("--hit-ratio", type=float, default=1.0, help="the window's hitRatio")
    p.add_argument("--set-aside", default="0", help="persisting L2 set-aside, e.g. 30MiB")
    p.add_argument("--cuda-graph", action="store_true",
                   help="launch each step's layers as one CUDA graph (triton backend)")  # fmt: skip
    p.add_argument("--pdl", action="store_true",
                   help="launch the split merge of our sparse kernels as a dependent launch")  # fmt: skip
    p.add_argument("--reserve", default="0",
                   help="device memory taken before the caches (e.g. 1543MiB): they lie elsewhere")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m dsacache.kernels.decode_step TRACE ...``: the trace replayed on the GPU."""
    import json
    from dataclasses import asdict

    from dsacache.units import parse_size

    args = parser().parse_args(argv)
    try:  # a bad trace, spec or window: one line, no traceback
        persist = None
        if args.persist_layers > 0:
            persist = Persist(args.persist_layers, args.hit_ratio, parse_size(args.set_aside))
        res = run_trace(
            args.trace, layout=args.layout, batch=args.batch, steps=args.steps,
            layers=args.layers, heads=args.heads, hints=Hints(args.index_evict, args.kv_evict),
            device=args.device, page_order=args.page_order,
            use_trace_selection=not args.indexer_topk, capture=args.capture,
            capture_steps_per_copy=args.capture_steps_per_copy,
            backend=args.backend, seed=args.seed, persist=persist, cuda_graph=args.cuda_graph,
            reserve=parse_size(args.reserve), attn_options={"pdl": True} if args.pdl else None,
        )  # fmt: skip
    except (DsacacheError, ValueError) as e:  # run_trace's checks of its options raise ValueError
        raise SystemExit(f"error: {e}") from None
    summary = asdict(res)
    summary.pop("step_seconds")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
