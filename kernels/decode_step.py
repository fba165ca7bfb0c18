"""One DSA decode step on the GPU (indexer -> top-k -> sparse attention), and a driver that
replays a trace's decode steps through the real kernels: the workload ``dsacache profile``
measures under Nsight Compute.

``run_trace`` builds paged caches of random data for ``batch`` requests and some layers,
then for each decode step of the trace and each layer runs the indexer over every cached key
of each request and the sparse attention over the trace's selection (or, with
``use_trace_selection=False``, over the indexer's own top-k). With ``capture=PATH`` the
indices the attention kernels read are written to a new trace: each layer's index tensor is
copied to pinned host memory with ``non_blocking=True`` (no device-wide sync per layer); a
background thread waits for the step's CUDA event and appends the step to a raw spool, which
``close`` encodes into the trace (``dsacache.traces.spool``).

Command line (the workload to profile)::

    python -m dsacache.kernels.decode_step TRACE --layout mla-fp8 --batch 4 --steps 8 \
        --layers 4 --index-evict evict_first --capture replayed.dsatrace
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dsacache.errors import DsacacheError
from dsacache.kernels.flashmla import flashmla_sparse_decode
from dsacache.kernels.indexer import indexer_logits, select_topk
from dsacache.kernels.paged import (
    MLA_DIM,
    MLA_FP8_BYTES,
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
from dsacache.kernels.sparse_decode import gqa_sparse_decode, mla_head_block, mla_sparse_decode
from dsacache.simulator.workload import INDEXER_HEADS
from dsacache.tracer.synth import SPEC_PREFIX, materialize

# FlashMLA's SM90 sparse FP8 decode (128 heads), as the model takes it (FlashMLA 9241ae3,
# csrc/sm90/decode/sparse_fp8/splitkv_mla.cuh; docs/decode_compare.md). Its grid is
# (2, 1, partitions): a cluster of two 64-head CTAs that split each 64-token block and share
# the halves through distributed shared memory, so the source reads each selected token once.
# Measured alone on the H200 it reads 1.12-1.14 sectors per selected sector (1.46 at batch 1
# x k 2048), and its query again per split part (docs/results/h200-decode/flashmla-parts.
# parquet). The model takes 2 all the same: with 1 (and the query once) the hit rates at
# batch 1 fall 11-23 points below the measured ones, and with 1 and the query read again per
# part as measured, the batch-8/64 ones fall 20-43 points below (docs/results/h100-decode/
# flashmla_tiling_experiment.py): the within-step hits most likely come from its 256-B L2
# prefetch, which the engine cannot model yet. An empirical stand-in until it can.
FLASHMLA_READS = 2
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


# -- index capture without a sync per layer ------------------------------------------------------
def _copy_event() -> Any:
    """The CUDA event a step's copies are waited on with (tests replace it)."""
    return torch.cuda.Event(blocking=True)


def _launcher_time(method: Callable) -> Callable:
    """Add the time the launching thread spends in an ``IndexCapture`` method to its
    ``stats["launcher_s"]``."""

    @functools.wraps(method)
    def timed(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.stats["launcher_s"] += time.perf_counter() - t0

    return timed


@dataclass
class _StepCapture:
    step: int
    positions: np.ndarray  # int64 [L, B]
    host: torch.Tensor  # int32 [L, B, G, W], pinned on CUDA, filled by non_blocking copies
    added: np.ndarray  # bool [L]: layers whose copy is queued
    event: Any = None  # torch.cuda.Event recorded after the last copy (None on the CPU)


class IndexCapture:
    """Copy the kernels' index tensors to pinned host buffers as they are produced, append
    each finished step to a raw spool beside the trace (``dsacache.traces.spool``), and let
    ``close`` encode the spool into the trace.

    Per layer: ``add(layer, indices)`` queues a device-to-host copy (non-blocking; or once per
    step for every layer, ``add_all``); every ``steps_per_wake`` steps ``end_step()`` records
    one CUDA event and hands those steps to a thread, which waits for the event and writes
    them with one system call. Waking once per batch of steps was meant to take the GIL from
    the launch-bound loop less often, but on the H100 it measured no better than every step
    (batch 8 x 8 layers, two runs: +5.6% and +7.9% vs +3.4% and +5.7%, intervals overlapping;
    docs/results/h100-kernels/capture/) while a crash loses more steps, so the default is 1.
    The launching thread waits only when all ``buffers`` (default: two batches, at least 3)
    are in use. Measured with ``benchmarks/bench_capture.py`` on
    the H200 (docs/results/h200-kernels/capture/): spooling from the launching thread
    instead, when a step's event had fired, cost more (+13.6% vs +9.7% per step at batch 8 x
    8 layers; +9.0% vs +1.4% at batch 64 x 16 layers, where the writes take 2 ms per step).
    Encoding rows during the decode cost +68% per step; it runs after the decode, in
    ``close``. ``path`` and ``writer_kwargs`` are ``TraceWriter``'s. If the process dies
    before ``close``, the spool is left beside the trace: ``dsacache recover PATH`` finishes
    it.
    """

    def __init__(self, path: str, cuda: bool, buffers: int | None = None,
                 steps_per_wake: int = 1, **writer_kwargs: Any) -> None:  # fmt: skip
        from dsacache.traces import TraceWriter
        from dsacache.traces.spool import StepSpool, spool_path

        if steps_per_wake < 1:
            raise ValueError(f"IndexCapture needs steps_per_wake >= 1, got {steps_per_wake}")
        buffers = max(3, 2 * steps_per_wake) if buffers is None else buffers
        if buffers < 1:
            raise ValueError(f"IndexCapture needs at least 1 host buffer, got buffers={buffers}")
        self.writer = TraceWriter(path, **writer_kwargs)
        self._spool = StepSpool(spool_path(path))
        self._cuda = cuda  # pinned buffers
        self._events = cuda  # a CUDA event per step marks its copies done
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._buffers = buffers
        self._made = 0
        self._todo: queue.Queue[list[_StepCapture] | None] = queue.Queue()
        self._steps_per_wake = steps_per_wake
        self._pending: list[_StepCapture] = []  # finished steps not yet handed to the thread
        self._spare_events: list[Any] = []  # events the thread is done with (reused: creating
        # one per hand-over cost the launching thread more than recording it)
        self._error: BaseException | None = None
        self._current: _StepCapture | None = None
        # seconds: the launching thread blocked for a free buffer; the thread waiting for the
        # copies, then writing the spool; close encoding the spool into the trace
        # launcher_s: all the launching thread spent in begin_step, add/add_all and end_step
        self.stats = {"launcher_s": 0.0, "launcher_wait_s": 0.0, "copy_wait_s": 0.0,
                      "spool_s": 0.0, "encode_s": 0.0}  # fmt: skip
        self._thread = threading.Thread(target=self._work, name="dsa-index-capture", daemon=True)
        self._thread.start()

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        while True:
            if self._made < self._buffers:
                try:
                    buf = self._free.get_nowait()
                except queue.Empty:
                    self._made += 1
                    return torch.empty(shape, dtype=torch.int32, pin_memory=self._cuda)
            else:
                try:
                    buf = self._free.get_nowait()
                except queue.Empty:
                    self._hand_over()  # the buffers may all be in steps not yet handed over
                    t0 = time.perf_counter()
                    buf = self._free.get()  # the writer is behind: wait for a buffer
                    self.stats["launcher_wait_s"] += time.perf_counter() - t0
            if tuple(buf.shape) == shape:
                return buf
            self._made -= 1  # the width changed: drop this buffer, make another

    @_launcher_time
    def begin_step(self, step: int, positions: np.ndarray, shape: tuple[int, ...]) -> None:
        """Start a step: ``positions`` ``[L, B]`` context lengths, ``shape`` ``(L, B, G, W)``."""
        self._raise()
        assert self._current is None, "end_step first"
        host = self._buffer(shape)
        self._current = _StepCapture(step, np.asarray(positions, dtype=np.int64), host,
                                     np.zeros(shape[0], bool))  # fmt: skip

    def add(self, layer: int, indices: torch.Tensor) -> None:
        """Queue the copy of one layer's indices (``[B, W]`` or ``[B, G, W]``)."""
        self._queue(layer, indices if indices.dim() == 3 else indices[:, None, :])

    def add_all(self, indices: torch.Tensor) -> None:
        """Queue one copy of every layer's indices (``[L, B, W]`` or ``[L, B, G, W]``): one
        transfer per step when the selections of all layers exist before the layers run."""
        self._queue(slice(None), indices if indices.dim() == 4 else indices[:, :, None, :])

    @_launcher_time
    def _queue(self, layers: int | slice, idx: torch.Tensor) -> None:
        cur = self._current
        assert cur is not None, "begin_step first"
        assert not cur.added[layers].any(), "a layer's indices are copied once per step"
        host = cur.host if layers == slice(None) else cur.host[layers]
        if idx.shape != host.shape:  # a narrower copy: pad the rest
            host.numpy().fill(-1)  # before the copy is queued (it is asynchronous)
            host = host[..., : idx.shape[-2], : idx.shape[-1]]
        host.copy_(idx, non_blocking=idx.is_cuda)  # (each torch indexing costs the loop ~us)
        cur.added[layers] = True

    @_launcher_time
    def end_step(self) -> None:
        """Finish the step; every ``steps_per_wake`` steps, hand them to the thread."""
        cur, self._current = self._current, None
        assert cur is not None
        # layers no copy wrote hold a previous step's rows: mark them empty (numpy, as torch's
        # fill_ wakes its thread pool, ms on a busy host); filling every buffer up front cost
        # the launching thread a pass over the whole buffer per step
        if not cur.added.all():
            cur.host.numpy()[~cur.added] = -1
        self._pending.append(cur)
        if len(self._pending) >= self._steps_per_wake:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the pending steps to the thread, with a CUDA event recorded after their copies
        (no wait; the copies of one stream finish in order, so one event covers them all)."""
        if not self._pending:
            return
        if self._events:
            # blocking: a wait for the copies sleeps instead of spinning a CPU (the loop's time
            # on the H200 was the same either way: capture/capexp4_b8_l8.json)
            event = self._spare_events.pop() if self._spare_events else _copy_event()
            self._pending[-1].event = event
            event.record()
        self._todo.put(self._pending)
        self._pending = []

    def close(self, complete: bool = True) -> None:
        """Wait for the thread to spool every queued step, encode the spool into the trace and
        remove it (``complete=False``, or after an error: keep the rows, leave the trace marked
        incomplete); re-raises the thread's error."""
        from dsacache.traces.spool import to_trace

        try:
            self._hand_over()  # records an event: after a CUDA error this raises too
        except BaseException as e:
            self._error = self._error or e
            self._pending = []
        finally:
            self._todo.put(None)
        self._thread.join()
        t0 = time.perf_counter()
        finished = False
        try:
            self._spool.close()  # raises a failed fsync; the writer still keeps its rows
            to_trace(self._spool.path, self.writer)
            finished = complete and self._error is None
        finally:
            if finished:
                self.writer.close()
            else:
                self.writer.flush()  # keep what was written; the trace stays incomplete
        self.stats["encode_s"] += time.perf_counter() - t0
        self._spool.path.unlink()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"index capture failed: {self._error!r}") from self._error

    def _work(self) -> None:
        while True:
            steps = self._todo.get()
            if steps is None:
                return
            self._spool_steps(steps)

    def _spool_steps(self, steps: list[_StepCapture]) -> None:
        """Wait for the steps' copies, append them to the spool and free their buffers; an
        error is kept for the next ``begin_step`` / ``close`` to raise."""
        try:
            t0 = time.perf_counter()
            if steps[-1].event is not None:
                steps[-1].event.synchronize()
                self._spare_events.append(steps[-1].event)  # waited for: free to record again
            t1 = time.perf_counter()
            if self._error is None:
                self._spool.append_many([(s.step, s.positions, s.host.numpy()) for s in steps])
            self.stats["copy_wait_s"] += t1 - t0
            self.stats["spool_s"] += time.perf_counter() - t1
        except BaseException as e:
            self._error = e
        finally:
            for item in steps:
                self._free.put(item.host)


class _StepGraph:
    """One decode step's kernels captured as a CUDA graph over static inputs, the selections
    ``[L, B, G, W]`` and context lengths ``[L, B]``, which ``replay`` copies in first."""

    def __init__(self, launch: Callable[[torch.Tensor, torch.Tensor, int], list[torch.Tensor]],
                 shape: tuple[int, ...], max_context: int, device: torch.device) -> None:  # fmt: skip
        self.sel = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.ctx = torch.ones(shape[:2], dtype=torch.int32, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compiles the kernels and fills the allocator, unrecorded
            launch(self.sel, self.ctx, max_context)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.read = launch(self.sel, self.ctx, max_context)

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
    seconds: float  # the step loop, from after the trace's first step was read to the last sync
    backend: str = "triton"
    step_seconds: list[float] = field(default_factory=list)  # each step's launches (no sync)
    index_bytes: int = 0  # indexer key bytes read (all steps and layers)
    kv_bytes: int = 0  # KV bytes gathered
    capture: str | None = None
    capture_stats: dict[str, float] = field(default_factory=dict)  # IndexCapture.stats


def kv_reads_per_token(backend: str, layout: str, heads: int) -> int:
    """How many CTAs of the sparse attention kernel read each selected token per step (the
    tiling the simulator's ``Workload.reads_per_token`` models). Ours: one program per block
    of up to 64 heads reads the whole token (``mla_sparse_decode``); GQA: one program per KV
    head reads that head's K and V, each byte once. FlashMLA: see ``FLASHMLA_READS``."""
    if layout == "gqa":
        return 1
    if backend == "flashmla":
        return FLASHMLA_READS
    return -(-heads // mla_head_block(heads))


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


def _step_tensors(rows, batch: int, requests: int, layers: int, groups: int, width: int):
    """Selections ``[L, B, G, W]`` (-1 padded) and context lengths ``[L, B]`` of one step."""
    sel = np.full((layers, batch, groups, width), -1, dtype=np.int32)
    pos = np.ones((layers, batch), dtype=np.int64)
    slot_of = {}  # trace request -> batch slots that replay it
    for b in range(batch):
        slot_of.setdefault(b % requests, []).append(b)
    for i in range(len(rows)):
        layer, g = int(rows.layer[i]), int(rows.group[i])
        if layer >= layers or g >= groups:
            continue
        idx = rows.row(i)[:width]
        for b in slot_of.get(int(rows.request[i]), ()):
            sel[layer, b, g, : len(idx)] = idx
            pos[layer, b] = int(rows.position[i])
    return sel, pos


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
    capture_steps_per_wake: int = 1,
    attn_options: dict[str, Any] | None = None,
    backend: str = "triton",
    persist: Persist | None = None,
    cuda_graph: bool = False,
) -> RunResult:
    """Run ``steps`` decode steps of ``trace`` (a path, a bundled trace's name, a
    ``synth:PRESET:KNOB=VALUE,...`` spec or an opened trace) through the kernels.

    Batch slot ``b`` replays trace request ``b % requests`` (on its own pages). Per step and
    layer: the indexer reads every cached key of each slot (``position`` tokens), then sparse
    attention gathers the trace's selection (``use_trace_selection``) or the indexer's top-k
    (k, sink and window from the trace's indexer). Caches hold random data. ``heads``
    overrides the model's attention heads (e.g. fewer for a small GPU); ``capture`` writes
    the indices the attention kernels read to a new trace at that path (see
    ``IndexCapture``; its thread wakes every ``capture_steps_per_wake`` steps). ``backend``:
    the sparse attention kernel, ours ("triton") or DeepSeek's FlashMLA ("flashmla", mla-fp8).
    ``persist`` runs the decode on a stream whose L2 persisting access-policy window covers
    the KV pools of the first layers (MLA layouts). ``cuda_graph`` launches each step's
    layers as one CUDA graph (our kernels, no window), as serving engines run decode: the
    indexer then scores the page table's whole capacity (tokens past a context are masked,
    not read) and the loop is bound by the GPU rather than by its Python. The L2 is flushed
    before the first step, so every run starts from the same state.
    """
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
                               steps_per_wake=capture_steps_per_wake,
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

        graphs: dict[int, _StepGraph] = {}  # by selection width
        if cuda_graph:  # the usual width, built before the flush and the clock
            graphs[k] = _StepGraph(launch, (n_layers, batch, groups, k), capacity, dev)
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
                width = max(k, int(rows.lengths.max()) if len(rows) else 0)
                sel_np, pos_np = _step_tensors(rows, batch, requests, n_layers, groups, width)
                sel_all = torch.from_numpy(sel_np)
                ctx_all = torch.from_numpy(pos_np.astype(np.int32))
                if dev.type == "cuda":
                    sel_all = sel_all.pin_memory()
                    ctx_all = ctx_all.pin_memory()
                if cuda_graph:
                    if width not in graphs:
                        graphs[width] = _StepGraph(launch, sel_np.shape, capacity, dev)
                    read = graphs[width].replay(sel_all, ctx_all)
                    sel_all = graphs[width].sel
                else:
                    sel_all = sel_all.to(dev, non_blocking=True)
                    read = launch(sel_all, ctx_all.to(dev, non_blocking=True), int(pos_np.max()))
                if cap is not None:
                    out_groups = groups if use_trace_selection else 1
                    out_width = width if use_trace_selection else k
                    cap.begin_step(step, pos_np, (n_layers, batch, out_groups, out_width))
                    if use_trace_selection:  # the selections every layer reads: one copy
                        cap.add_all(sel_all)
                    else:
                        for layer, indices in enumerate(read):
                            cap.add(layer, indices)
                    cap.end_step()
                result.index_bytes += int(pos_np.sum()) * 132
                result.kv_bytes += int((sel_np >= 0).sum()) * kv_tok
                result.steps += 1
                result.step_seconds.append(time.perf_counter() - t0)  # launch time (no sync)
            sync()
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
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", choices=BACKENDS, default="triton", help="sparse attention kernel")
    p.add_argument("--persist-layers", type=int, default=0,
                   help="L2 persisting window over the KV of the first N layers (MLA)")  # fmt: skip
    p.add_argument("--hit-ratio", type=float, default=1.0, help="the window's hitRatio")
    p.add_argument("--set-aside", default="0", help="persisting L2 set-aside, e.g. 30MiB")
    p.add_argument("--cuda-graph", action="store_true",
                   help="launch each step's layers as one CUDA graph (triton backend)")  # fmt: skip
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
            backend=args.backend, seed=args.seed, persist=persist, cuda_graph=args.cuda_graph,
        )  # fmt: skip
    except (DsacacheError, ValueError) as e:  # run_trace's checks of its options raise ValueError
        raise SystemExit(f"error: {e}") from None
    summary = asdict(res)
    summary.pop("step_seconds")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
