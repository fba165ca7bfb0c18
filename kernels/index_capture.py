"""Capture the indices the DSA kernels read, during the decode, into a trace.

Each step's index tensors are copied into a ring of step slots on their own device; when half
of a ring is full, one transfer on a side stream moves that half to a pinned host buffer, a
thread appends its steps to a raw spool beside the trace (``dsacache.traces.spool``), and
``close`` encodes the spool into the trace. Inside a CUDA graph the copy itself is part of
the graph (``IndexCapture.graph_store``): a kernel reads the slot from a counter on the
device, so a replay fills the next slot without the host.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from dsacache.traces.spool import ALIGN, StepSpool, record_stride, spool_path, to_trace

# a ring of 2 x R step slots per step shape: at most this many bytes, at most
# MAX_STEPS_PER_COPY steps per half (a process that dies loses the steps not yet moved)
RING_BYTES = 256 << 20
MAX_STEPS_PER_COPY = 16
_STORE_BLOCK = 1024


@triton.jit
def _ring_store(src_ptr, ring_ptr, counter_ptr, n, stride, slots, BLOCK: tl.constexpr):
    """Copy ``n`` int32 values from ``src`` into slot ``counter % slots`` of the ring (slots
    ``stride`` values apart)."""
    slot = tl.load(counter_ptr) % slots
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    values = tl.load(src_ptr + offs, mask=mask)
    tl.store(ring_ptr + slot * stride + offs, values.to(tl.int32), mask=mask)


@triton.jit
def _ring_advance(counter_ptr):
    tl.store(counter_ptr, tl.load(counter_ptr) + 1)


def _copy_event() -> Any:
    """A CUDA event that a host wait sleeps on."""
    return torch.cuda.Event(blocking=True)


def _step_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, checked: ``(layers, batch, groups, width)``, each >= 1."""
    dims = tuple(int(s) for s in shape)
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(
            f"a step's shape is (layers, batch, groups, width), each >= 1; got {shape}"
        )
    return dims


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
class _StepRecord:
    step: int
    positions: np.ndarray  # int64 [L, B]
    written: np.ndarray  # int64 [L, 2]: (groups, width) each layer's copy wrote; (0, 0) none


@dataclass
class _Batch:
    """Steps copied from a ring to one host buffer with one transfer."""

    steps: list[_StepRecord]
    shape: tuple[int, ...]  # (L, B, G, W)
    host: torch.Tensor | None  # int32 [R, stride] (spool rows), pinned on CUDA; len(steps) used
    pool: queue.Queue | None = None  # where the thread returns the host buffer
    done: Any = None  # CUDA event after the transfer (None: already on the host)
    failed: bool = False  # the transfer raised: nothing to spool


@dataclass
class _Ring:
    """2R step slots of one shape ``(L, B, G, W)`` on a device; R steps per transfer."""

    shape: tuple[int, ...]
    per_copy: int
    data: torch.Tensor  # int32 [2R, stride]: a slot per row, as the spool's rows are laid out
    slots: list[torch.Tensor]  # data's slots as [L, B, G, W] views (indexing costs the loop ~us)
    counter: torch.Tensor  # int64 [1]: the slot graph_store writes next (mod 2R)
    full: np.ndarray  # int64 [L, 2]: every layer written whole
    transferred: list[Any]  # per half: CUDA event after its last transfer (empty on the CPU)
    waits: list[bool] = field(default_factory=lambda: [False, False])  # per half: one pending
    half: int = 0  # the half the next step goes to
    free: queue.Queue = field(default_factory=queue.Queue)  # its host buffers not in use
    made: int = 0  # its host buffers
    graph: bool = False  # filled by graph_store (the device counter)
    compiled: bool = False  # graph_store's kernels compiled for it (reserve(graph=True))
    added: bool = False  # filled by add / add_all (the host's position); never both


class IndexCapture:
    """Capture the kernels' index tensors during a decode and write them to a trace.

    Two ways to feed it, one per kind of step:
    - Launched from Python: per step ``begin_step``, then ``add(layer, indices)`` per layer
      or ``add_all`` once for every layer, then ``end_step``. Each ``add`` is one copy
      kernel into the step's ring slot on the launching stream (no sync, no transfer).
    - Replayed from a CUDA graph: ``reserve`` the step's shape, call ``graph_store(indices)``
      while capturing the graph (the copy then runs in every replay, into the slot a counter
      on the device names), and after each replay ``stored(step, positions, shape)``.

    When half of a ring is full, one transfer on a side stream moves its steps to a pinned
    host buffer, and a thread waits for it, appends the steps to a raw spool beside the
    trace with one system call and frees the buffer; the launching stream waits (on the
    GPU) for a half's transfer before it writes that half again. ``close`` encodes the spool.

    Why: copying every step to the host, with an event and a hand-over to the thread, cost
    +37% per step with CUDA graphs on the H100 (batch 8 x 8 layers, 2026-12-07); the ring
    with reserved buffers +18% to +45%, the launching thread's calls most of it
    (docs/results/h100-kernels/capture/ring-1207/); with the copy inside the graph, the
    spool's copy into the page cache (hence O_DIRECT: ``StepSpool.append_batch``), then
    3-8% while the driver's loop was bound by its own host work, and +1.0-1.1% (batch 8 and
    64) once it was bound by the GPU (docs/results/h100-kernels/capture/staging-1207/;
    launched eagerly +7.9%, the calls above taking 0.08-0.1 ms a step). ``steps_per_copy``
    (default: as many steps as fit ``RING_BYTES`` per ring, at most ``MAX_STEPS_PER_COPY``)
    trades that against what a dying process loses: the steps still in the rings, up to
    ``2 * steps_per_copy``. Each step shape has its own ring and ``buffers`` host buffers
    (default 3), kept until ``close`` (a CUDA graph holds the ring's address); the launching
    thread waits only when all of a shape's host buffers are in use. Rows a copy left out
    (narrower groups or width, layers never added) are written as empty. ``path`` and
    ``writer_kwargs`` are ``TraceWriter``'s; if the process dies before ``close``,
    ``dsacache recover PATH`` finishes the spool.
    ``cuda``: the indices live on a CUDA device (pinned host buffers).
    """

    def __init__(self, path: str, cuda: bool, buffers: int = 3, steps_per_copy: int | None = None,
                 **writer_kwargs: Any) -> None:  # fmt: skip
        from dsacache.traces import TraceWriter

        if steps_per_copy is not None and steps_per_copy < 1:
            raise ValueError(f"IndexCapture needs steps_per_copy >= 1, got {steps_per_copy}")
        if buffers < 1:
            raise ValueError(f"IndexCapture needs at least 1 host buffer, got buffers={buffers}")
        self.writer = TraceWriter(path, **writer_kwargs)
        self._spool = StepSpool(spool_path(path))
        self._cuda = cuda
        self._buffers = buffers
        self._steps_per_copy = steps_per_copy
        self._rings: dict[tuple[int, ...], _Ring] = {}
        self._ring: _Ring | None = None  # the ring of the steps in _pending
        self._pending: list[_StepRecord] = []  # steps in the current half of _ring
        self._side: Any = None  # the transfers' CUDA stream
        self._copied: Any = None  # CUDA event after a half's copies (made once, recorded again)
        self._todo: queue.Queue[_Batch | None] = queue.Queue()
        self._error: BaseException | None = None
        self._spool_failed = False
        self._current: _StepRecord | None = None
        self._current_shape: tuple[int, ...] = ()
        # seconds: launcher_s all the launching thread spent in the capture's calls, of which
        # launcher_wait_s blocked for a free host buffer; the thread waiting for transfers
        # (copy_wait_s) and writing the spool (spool_s); close encoding the spool (encode_s)
        self.stats = {"launcher_s": 0.0, "launcher_wait_s": 0.0, "copy_wait_s": 0.0,
                      "spool_s": 0.0, "encode_s": 0.0}  # fmt: skip
        self._thread = threading.Thread(target=self._work, name="dsa-index-capture", daemon=True)
        self._thread.start()

    @property
    def steps_per_copy(self) -> int:
        """Steps moved to the host per transfer (known once a step's shape is)."""
        ring = self._ring or next(iter(self._rings.values()), None)  # current, or reserved
        return ring.per_copy if ring is not None else self._steps_per_copy or 1

    # -- steps launched from Python ------------------------------------------------------------
    @_launcher_time
    def begin_step(self, step: int, positions: np.ndarray, shape: tuple[int, ...]) -> None:
        """Start a step: ``positions`` ``[L, B]`` context lengths, ``shape`` ``(L, B, G, W)``."""
        self._raise()
        assert self._current is None, "end_step first"
        self._current_shape = _step_shape(shape)
        self._current = _StepRecord(step, np.array(positions, dtype=np.int64),
                                    np.zeros((self._current_shape[0], 2), np.int64))  # fmt: skip

    def add(self, layer: int, indices: torch.Tensor) -> None:
        """Queue the copy of one layer's indices (``[B, W]`` or ``[B, G, W]``)."""
        self._queue(layer, indices if indices.dim() == 3 else indices[:, None, :])

    def add_all(self, indices: torch.Tensor) -> None:
        """Queue one copy of every layer's indices (``[L, B, W]`` or ``[L, B, G, W]``): one
        copy per step when the selections of all layers exist in one tensor."""
        self._queue(slice(None), indices if indices.dim() == 4 else indices[:, :, None, :])

    @_launcher_time
    def _queue(self, layers: int | slice, idx: torch.Tensor) -> None:
        self._raise()
        cur = self._current
        assert cur is not None, "begin_step first"
        assert not cur.written[layers, 1].any(), "a layer's indices are copied once per step"
        ring = self._added_ring(idx.device)
        dest = ring.slots[ring.half * ring.per_copy + len(self._pending)]
        if layers != slice(None):
            dest = dest[layers]
        groups, width = idx.shape[-2], idx.shape[-1]
        if dest.shape != idx.shape:  # a narrower copy: the thread empties the rest on the host
            dest = dest[..., :groups, :width]
        if dest.is_cuda:
            # an elementwise kernel, not copy_'s device-to-device memcpy: CUDA lets no command
            # of another stream run beside one issued after such a memcpy, so every transfer
            # on the side stream would stall the decode until it finished
            torch.mul(idx, 1, out=dest)
        else:
            dest.copy_(idx)
        cur.written[layers] = (groups, width)

    @_launcher_time
    def end_step(self) -> None:
        """Finish the step; when it fills a half of its ring, move that half to the host."""
        cur, self._current = self._current, None
        assert cur is not None
        self._raise()  # a step whose copy failed is not written
        default = torch.device("cuda" if self._cuda else "cpu")  # a step without copies
        self._append(self._added_ring(default), cur)

    def _added_ring(self, device: torch.device) -> _Ring:
        """The current step's ring, for steps added from Python (never a graph's)."""
        ring = self._ring_for(self._current_shape, device)
        if ring.graph:
            raise RuntimeError(f"steps of shape {ring.shape} are stored by a CUDA graph")
        ring.added = True
        return ring

    # -- steps replayed from a CUDA graph --------------------------------------------------------
    def graph_store(self, indices: torch.Tensor) -> None:
        """Launch, on the current stream, the copy of every layer's indices (``[L, B, W]`` or
        ``[L, B, G, W]``, contiguous) into the slot of their shape's ring that its device
        counter names, then the counter's advance. Call it while capturing a CUDA graph (the
        shape ``reserve``d before); after each replay, ``stored``."""
        self._raise()
        idx = indices if indices.dim() == 4 else indices[:, :, None, :]
        ring = self._rings.get(tuple(idx.shape))
        if ring is None or not ring.compiled:
            raise ValueError(f"reserve({tuple(idx.shape)}, device, graph=True) first")
        if not idx.is_contiguous() or idx.device != ring.data.device:
            raise ValueError(f"graph_store needs contiguous indices on {ring.data.device}")
        if ring.added:
            raise RuntimeError(f"steps of shape {ring.shape} are added from Python")
        ring.graph = True
        self._launch_store(idx, ring, ring.counter)

    @staticmethod
    def _launch_store(idx: torch.Tensor, ring: _Ring, counter: torch.Tensor) -> None:
        n = idx.numel()
        _ring_store[(triton.cdiv(n, _STORE_BLOCK),)](
            idx, ring.data, counter, n, ring.data.shape[1], 2 * ring.per_copy, BLOCK=_STORE_BLOCK
        )
        _ring_advance[(1,)](counter)

    @_launcher_time
    def stored(self, step: int, positions: np.ndarray, shape: tuple[int, ...]) -> None:
        """Note a replay of the graph that stored a step of ``shape`` (``(L, B, G, W)``, as
        given to ``graph_store``): ``positions`` ``[L, B]`` context lengths."""
        self._raise()
        shape = _step_shape(shape)
        ring = self._rings.get(shape)
        if ring is None or not ring.graph:
            raise ValueError(f"no graph_store of shape {shape} to note")
        self._append(self._ring_for(shape, ring.data.device),
                     _StepRecord(step, np.array(positions, dtype=np.int64), ring.full))  # fmt: skip

    # -- rings and hand-overs --------------------------------------------------------------------
    def reserve(self, shape: tuple[int, ...], device: torch.device | str,
                graph: bool = False) -> None:  # fmt: skip
        """Allocate the ring and the pinned host buffers for steps of ``shape`` ``(L, B, G,
        W)`` on ``device`` now, before the decode (else the first step does it: allocating
        pinned memory takes milliseconds and stalls the GPU's queue). ``graph``: the steps
        will be stored by ``graph_store`` in a CUDA graph: its kernels are compiled now, as
        loading a module while a graph is being captured is not allowed."""
        shape = _step_shape(shape)
        ring = self._rings.get(shape) or self._make_ring(shape, torch.device(device))
        if graph and not ring.compiled:  # (a scratch counter; slot 0 is written again)
            self._launch_store(torch.zeros(shape, dtype=torch.int32, device=ring.data.device),
                               ring, torch.zeros_like(ring.counter))  # fmt: skip
            ring.compiled = True

    def _ring_for(self, shape: tuple[int, ...], device: torch.device) -> _Ring:
        """The ring of ``shape``, made if new; the steps of another shape are handed over
        first, so that steps reach the spool in order."""
        ring = self._ring
        if ring is not None and ring.shape == shape:
            return ring
        self._hand_over()
        self._ring = self._rings.get(shape) or self._make_ring(shape, device)
        return self._ring

    def _append(self, ring: _Ring, record: _StepRecord) -> None:
        self._pending.append(record)
        if len(self._pending) == ring.per_copy:
            self._hand_over()

    def _make_ring(self, shape: tuple[int, ...], device: torch.device) -> _Ring:
        try:
            return self._allocate(shape, device)
        except BaseException as e:  # (out of memory) raised now and by every later call
            self._error = self._error or e
            raise

    def _allocate(self, shape: tuple[int, ...], device: torch.device) -> _Ring:
        numel = int(np.prod(shape))
        per_copy = self._steps_per_copy or max(
            1, min(MAX_STEPS_PER_COPY, RING_BYTES // (2 * 4 * numel))
        )
        # each slot a spool row (zero padding, never written again: a transfer moves whole rows)
        data = torch.zeros((2 * per_copy, record_stride(shape)), dtype=torch.int32, device=device)
        counter = torch.zeros(1, dtype=torch.int64, device=device)
        full = np.tile(np.array(shape[2:], np.int64), (shape[0], 1))
        transferred = []
        if data.is_cuda:
            if self._side is None:
                self._side = torch.cuda.Stream(device)
                self._copied = _copy_event()
            transferred = [_copy_event(), _copy_event()]
        slots = [row[:numel].view(shape) for row in data.unbind(0)]
        ring = _Ring(shape, per_copy, data, slots, counter, full, transferred)
        self._rings[shape] = ring
        while ring.made < self._buffers:  # its host buffers too, up front
            ring.free.put(self._new_host_buffer(ring))
        return ring

    def _new_host_buffer(self, ring: _Ring) -> torch.Tensor:
        """``int32 [R, stride]`` host rows starting on an ``ALIGN``-byte boundary (the spool
        writes them with O_DIRECT), pinned on CUDA."""
        count = ring.data[: ring.per_copy].numel()
        raw = torch.empty(count + ALIGN // 4, dtype=torch.int32, pin_memory=self._cuda)
        skip = (-raw.data_ptr() % ALIGN) // 4
        ring.made += 1
        return raw[skip : skip + count].view(ring.per_copy, -1)

    def _host_buffer(self, ring: _Ring) -> torch.Tensor:
        if ring.made < self._buffers:
            try:
                return ring.free.get_nowait()
            except queue.Empty:
                return self._new_host_buffer(ring)
        t0 = time.perf_counter()
        buf = ring.free.get()  # the thread is behind: wait for a buffer
        self.stats["launcher_wait_s"] += time.perf_counter() - t0
        return buf

    def _hand_over(self) -> None:
        """Move the current half's steps to a host buffer (one transfer, on the side stream
        after the copies) and give them to the thread; the next step starts the other half."""
        ring = self._ring
        if not self._pending or ring is None:
            return
        steps, self._pending = self._pending, []
        first = ring.half * ring.per_copy
        batch = None
        try:
            batch = _Batch(steps, ring.shape, self._host_buffer(ring), ring.free)
            self._transfer(ring, first, batch)
        except BaseException as e:
            if batch is not None:
                batch.failed = True
            self._error = self._error or e  # the steps are lost: the trace stays incomplete
            raise
        finally:
            if batch is not None:
                self._todo.put(batch)  # even after an error: the thread frees its buffer
            ring.half = 1 - ring.half
        # before any later step writes the other half (a graph replay too), the launching
        # stream waits for that half's last transfer; a graph's counter moves there as well
        if ring.waits[ring.half]:
            torch.cuda.current_stream(ring.data.device).wait_event(ring.transferred[ring.half])
            ring.waits[ring.half] = False
        if ring.graph and len(steps) < ring.per_copy:
            self._check_counter(ring, (1 - ring.half) * ring.per_copy + len(steps))
            ring.counter.fill_(ring.half * ring.per_copy)

    def _transfer(self, ring: _Ring, first: int, batch: _Batch) -> None:
        """Copy the batch's steps from ``ring``'s slots ``first...`` to its host buffer."""
        src, dst = ring.data[first : first + len(batch.steps)], batch.host[: len(batch.steps)]
        if not ring.data.is_cuda:
            dst.copy_(src)
            return
        self._copied.record(torch.cuda.current_stream(src.device))  # after the copies
        self._side.wait_event(self._copied)  # (takes its state now: free to record again)
        with torch.cuda.stream(self._side):
            dst.copy_(src, non_blocking=True)
        # recorded again for the half's next transfer, perhaps before the thread waits for
        # it: the thread then waits for that later transfer too, never too little
        batch.done = ring.transferred[ring.half]
        batch.done.record(self._side)
        ring.waits[ring.half] = True

    def close(self, complete: bool = True) -> None:
        """Wait for the thread to spool every queued step, encode the spool into the trace and
        remove it (``complete=False``, or after an error: keep the rows, leave the trace marked
        incomplete); re-raises the thread's error."""
        try:
            ring = self._ring
            if ring is not None and ring.graph and not self._pending:  # else _hand_over checks
                self._check_counter(ring, ring.half * ring.per_copy)
            self._hand_over()  # records an event: after a CUDA error this raises too
        except BaseException as e:
            self._error = self._error or e
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

    def _check_counter(self, ring: _Ring, noted: int) -> None:
        """A graph ring's device counter must name the slot after the ``noted`` steps (a
        replay without its ``stored`` call, or one noted twice, shifts every later step);
        checked where a partial hand-over resets it, and at close."""
        slot = int(ring.counter.item()) % (2 * ring.per_copy)
        if slot != noted % (2 * ring.per_copy):
            self._error = self._error or RuntimeError(
                f"the ring of shape {ring.shape} was written up to slot {slot}, noted up to "
                f"slot {noted}: graph replays and stored() calls differ, so the captured "
                "steps may be shifted"
            )
            raise self._error

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"index capture failed: {self._error!r}") from self._error

    def _work(self) -> None:
        while True:
            batch = self._todo.get()
            if batch is None:
                return
            self._spool_batch(batch)

    def _spool_batch(self, batch: _Batch) -> None:
        """Wait for the batch's transfer, empty the rows its copies left out, append its steps
        to the spool and free its buffer; an error is kept for the next ``begin_step`` /
        ``close`` to raise."""
        try:
            t0 = time.perf_counter()
            if batch.done is not None:
                batch.done.synchronize()
            t1 = time.perf_counter()
            if not batch.failed and not self._spool_failed:
                n, shape = len(batch.steps), batch.shape
                rows = batch.host.numpy()[:n]
                written = np.stack([s.written for s in batch.steps])  # [n, L, 2]
                short = (written[..., 0] < shape[2]) | (written[..., 1] < shape[3])
                for i, layer in zip(*np.nonzero(short), strict=True):
                    groups, width = written[i, layer]
                    dense = rows[i, : int(np.prod(shape))].reshape(shape)  # a view of the row
                    dense[layer, :, groups:] = -1
                    dense[layer, :, :groups, width:] = -1
                positions = np.stack([s.positions for s in batch.steps])
                self._spool.append_batch([s.step for s in batch.steps], positions, rows, shape)
            self.stats["copy_wait_s"] += t1 - t0
            self.stats["spool_s"] += time.perf_counter() - t1
        except BaseException as e:
            self._spool_failed = True  # later batches are not spooled: the spool may be torn
            self._error = self._error or e
        finally:
            host, batch.host = batch.host, None  # the pool's alone
            batch.pool.put(host)
