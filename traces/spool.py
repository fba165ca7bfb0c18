"""A raw, append-only spool of decode steps, turned into a trace after the capture.

Encoding rows (validation, delta + zstd Parquet) costs milliseconds of CPU per decode step,
and on the machines measured that time is taken from the launch-bound decode loop wherever
it runs: in a thread it holds the GIL, in another process it shares the CPU (see
docs/results/h200-kernels/README.md). While the GPU decodes, the capture therefore only
appends steps' dense index arrays to ``TRACE.spool`` beside the trace (one ``writev`` per
batch of steps, which releases the GIL); ``to_trace`` encodes the spool into the trace's
Parquet parts afterwards.

Even the copy of those arrays into the page cache slowed the decode: on the H100 (batch 8 x
8 layers, CUDA graphs, 2026-12-07) the whole capture cost +14% a step, +1.7% with its writes
sent to /dev/null, +10.7% with a plain memory copy in their place, +3.5% with O_DIRECT
(docs/results/h100-kernels/capture/spool-1207/). So records are laid out for direct I/O:
a record is a batch of ``n`` steps of one shape ``(L, B, G, W)``: a meta block (``int32``
header ``[magic, n, L, B, G, W, stride, 0]``, the ``n`` step numbers, positions ``[n, L,
B]``) zero-padded to ``ALIGN`` bytes, then ``int32 [n, stride]`` rows, each a step's
indices ``[L, B, G, W]`` flattened and padded to ``ALIGN`` bytes (``-1`` pads a row of
indices; the padding after it is never read). Aligned rows are written with O_DIRECT where
the file system allows it, other writes through the page cache.

A process that dies loses nothing it wrote. Against a machine crash a background thread
fsyncs the spool every ``sync_seconds`` (1 s) while steps arrive, so a crash loses at most
the last second or so of steps. The decode loop never waits for the disk: an fsync in
``append`` every 8 steps cost +16% per decode step on the H200 (batch 8 x 8 layers, 6.80 vs
5.86 ms; 5.89 without fsync), and one at close, of every step not yet synced, cost +21% over
a 64-step capture (docs/results/h200-kernels/capture/). Close does not fsync: the spool is
encoded into the trace right away, and the trace's writer makes the trace durable.
``sync_seconds=0`` fsyncs in every ``append`` instead (no thread). After a crash,
``recover(trace_path)`` (``dsacache recover TRACE``) writes every complete record into the
trace and completes it.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from dsacache.errors import TraceError
from dsacache.traces.format import SelectionBatch, TraceWriter, open_trace

MAGIC = 0x44534232  # "DSB2": a batch record (the older per-step "DSAS" spool is refused)
_OLD_MAGIC = 0x44534153
INT32_MAX = np.iinfo(np.int32).max
HEADER = 8  # int32: magic, steps, layers, batch, groups, width, row stride, 0
ALIGN = 4096  # bytes: records, and the rows handed to append_batch, for O_DIRECT
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # (none on macOS: buffered writes there)


def spool_path(trace_path: str | os.PathLike) -> Path:
    """Where the spool of the trace at ``trace_path`` lives (beside it)."""
    return Path(f"{os.fspath(trace_path).rstrip('/')}.spool")


def _padded(values: int) -> int:
    """``values`` int32 values rounded up to a whole number of ``ALIGN``-byte blocks."""
    return -(-values * 4 // ALIGN) * ALIGN // 4


def record_stride(shape: tuple[int, ...]) -> int:
    """int32 values a step of ``shape`` ``(L, B, G, W)`` takes in a spool record: its indices,
    padded to ``ALIGN`` bytes."""
    return _padded(int(np.prod(shape)))


def aligned_empty(count: int) -> np.ndarray:
    """An ``int32 [count]`` array whose memory starts on an ``ALIGN``-byte boundary (an
    anonymous mapping: zeroed, page-aligned)."""
    return np.frombuffer(mmap.mmap(-1, max(4 * count, 1)), np.int32, count)


def _meta_values(count: int, layers: int, batch: int) -> int:
    """int32 values of a record's meta block (header, steps, positions), padded to ALIGN."""
    return _padded(HEADER + count + count * layers * batch)


class StepSpool:
    """Append decode steps to a spool file (created; an existing one is refused), fsynced by a
    background thread every ``sync_seconds`` (``0``: by every ``append``)."""

    def __init__(self, path: str | os.PathLike, sync_seconds: float = 1.0) -> None:
        if sync_seconds < 0:
            raise ValueError(f"sync_seconds={sync_seconds}: must be >= 0")
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            raise TraceError(
                f"{self.path} exists: a capture was interrupted; recover it with "
                "`dsacache recover TRACE` or remove it"
            ) from None
        self._direct = -1  # the same file opened for O_DIRECT writes; -1: none
        if _O_DIRECT:
            try:
                self._direct = os.open(self.path, os.O_WRONLY | os.O_APPEND | _O_DIRECT)
            except OSError:  # the file system has no direct I/O (tmpfs): buffered writes
                pass
        self._meta = aligned_empty(0)  # the records' meta blocks, grown as needed
        self._lock = threading.Lock()  # one append at a time (they share _meta)
        self.sync_seconds = sync_seconds
        self._dirty = False  # written since the last fsync
        self._error: OSError | None = None  # the fsync thread's, raised by append / close
        self._torn: BaseException | None = None  # a write that failed: no record after it
        self._stop = threading.Event()
        self._syncer = None
        if sync_seconds > 0:
            self._syncer = threading.Thread(target=self._sync_loop, name="dsa-spool-fsync",
                                            daemon=True)  # fmt: skip
            self._syncer.start()

    @property
    def direct(self) -> bool:
        """Whether aligned records are written with O_DIRECT."""
        return self._direct >= 0

    def _sync_loop(self) -> None:
        fd = self._fd  # the file's, whatever an append writes through
        while not self._stop.wait(self.sync_seconds):
            if self._dirty:
                self._dirty = False
                try:
                    os.fsync(fd)  # releases the GIL; appends go on meanwhile
                except OSError as e:
                    self._error = e
                    return

    def _raise(self) -> None:
        if self._error is not None:
            raise TraceError(f"{self.path}: fsync failed: {self._error}") from self._error

    def append(self, step: int, positions: np.ndarray, dense: np.ndarray) -> None:
        """Write one step: ``positions`` ``[L, B]``, ``dense`` ``int32 [L, B, G, W]``."""
        rows = aligned_empty(record_stride(dense.shape)).reshape(1, -1)
        rows[0, : dense.size] = dense.ravel()
        self.append_batch([step], np.asarray(positions)[None], rows, dense.shape)

    def append_batch(self, steps: Sequence[int], positions: np.ndarray, rows: np.ndarray,
                     shape: tuple[int, ...]) -> None:  # fmt: skip
        """Write ``len(steps)`` steps of one ``shape`` ``(L, B, G, W)`` as one record, with one
        system call: ``positions`` ``[n, L, B]``; ``rows`` ``int32 [n, record_stride(shape)]``,
        C-contiguous, each row a step's indices ``[L, B, G, W]`` flattened, then padding.

        ``rows`` that start on an ``ALIGN``-byte boundary go to the disk with O_DIRECT where
        the file system takes it: no copy by the CPU. A copy into the page cache, even in
        this thread with the GIL released, slowed a launch-bound decode loop on the H100 as
        much as the rest of the capture (docs/results/h100-kernels/capture/spool-1207/)."""
        with self._lock:
            self._append_batch(steps, positions, rows, shape)

    def _append_batch(self, steps: Sequence[int], positions: np.ndarray, rows: np.ndarray,
                      shape: tuple[int, ...]) -> None:  # fmt: skip
        self._raise()
        if self._torn is not None:  # a record after a torn one would be misread
            raise TraceError(f"{self.path}: an earlier write failed ({self._torn}); its record "
                             "may be torn, so nothing more is appended") from self._torn  # fmt: skip
        layers, batch, groups, width = (int(v) for v in shape)
        count, stride = len(steps), record_stride(shape)
        if rows.shape != (count, stride) or rows.dtype != np.int32 or not rows.flags.c_contiguous:
            raise ValueError(f"rows must be C-contiguous int32 [{count}, {stride}], got "
                             f"{rows.dtype} {list(rows.shape)}")  # fmt: skip
        if np.shape(positions) != (count, layers, batch):
            raise ValueError(f"positions must be [{count}, {layers}, {batch}], got "
                             f"{list(np.shape(positions))}")  # fmt: skip
        for name, values in (("step", steps), ("position", positions)):
            values = np.asarray(values, np.int64)
            if values.size and (values.min() < 0 or values.max() > INT32_MAX):
                bad = values.min() if values.min() < 0 else values.max()
                raise ValueError(f"{name} {bad} does not fit the spool's int32 (0..{INT32_MAX})")
        need = _meta_values(count, layers, batch)
        if self._meta.size < need:
            self._meta = aligned_empty(need)
        meta = self._meta[:need]
        meta[:HEADER] = (MAGIC, count, layers, batch, groups, width, stride, 0)
        meta[HEADER : HEADER + count] = steps
        meta[HEADER + count : HEADER + count + count * layers * batch] = np.ravel(positions)
        meta[HEADER + count + count * layers * batch :] = 0
        try:
            self._write([meta, rows])
        except BaseException as e:
            self._torn = e
            raise
        if self._syncer is None:
            os.fsync(self._fd)
        else:
            self._dirty = True

    def _write(self, parts: list[np.ndarray]) -> None:
        """Append ``parts`` (the meta block, the rows) with one system call, direct if the
        rows are aligned and the file system takes it."""
        meta, rows = parts
        if self._direct >= 0 and rows.ctypes.data % ALIGN == 0:
            try:
                written = os.writev(self._direct, parts)  # the GIL is released during it
            except OSError:  # nothing written (alignment the device refuses, a file system
                os.close(self._direct)  # that takes O_DIRECT at open only): buffered from now
                self._direct = -1  # on, where a real I/O error raises again
                written = os.writev(self._fd, parts)
        else:
            written = os.writev(self._fd, parts)
        if written < 4 * (meta.size + rows.size):  # cut short (a signal, a full disk): finish
            rest = memoryview(b"".join(p.tobytes() for p in parts))[written:]
            while len(rest):
                rest = rest[os.write(self._fd, rest) :]

    def close(self) -> None:
        """Stop the fsync thread and close the spool (no final fsync: see the module doc)."""
        if self._fd < 0:
            return
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        os.close(self._fd)
        self._fd = -1
        self._raise()


def read_spool(path: str | os.PathLike) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The steps of a spool's complete records as ``(step, positions, dense)``; a record cut
    short by a crash ends the iteration."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            raw = f.read(4 * HEADER)
            if len(raw) < 4 * HEADER:
                return
            header = np.frombuffer(raw, np.int32)
            if header[0] == _OLD_MAGIC:
                raise TraceError(f"{path}: a spool of dsacache before 2026-12-07 (one record "
                                 "per step); recover it with that version")  # fmt: skip
            count, layers, batch, groups, width, stride = (int(v) for v in header[1:7])
            shape = (layers, batch, groups, width)
            if header[0] != MAGIC or min(header[1:7]) < 0 or stride != record_stride(shape):
                raise TraceError(f"{path}: not a dsacache step spool (bad record header)")
            meta_bytes = 4 * (_meta_values(count, layers, batch) - HEADER)
            if meta_bytes + 4 * count * stride > size - f.tell():  # cut short (or a count
                return  # beyond the file): not read, so a damaged header costs no memory
            meta, rows = f.read(meta_bytes), f.read(4 * count * stride)
            values = np.frombuffer(meta, np.int32)
            positions = values[count : count + count * layers * batch].reshape(count, layers, batch)
            dense = np.frombuffer(rows, np.int32).reshape(count, stride)[:, : int(np.prod(shape))]
            for i, step in enumerate(values[:count].tolist()):
                yield step, positions[i], dense[i].reshape(shape)


def to_trace(spool: str | os.PathLike, writer: TraceWriter) -> int:
    """Append every complete record of ``spool`` to ``writer``; returns the steps written."""
    steps = 0
    for step, positions, dense in read_spool(spool):
        writer.append_batch(SelectionBatch.from_dense(step, positions, dense))
        steps += 1
    return steps


def recover(trace_path: str | os.PathLike, part_rows: int = 65536) -> int:
    """Finish a capture that died before its spool was encoded: rewrite the trace from the
    spool's complete records (parts written by an encoding cut short are replaced), mark it
    complete and remove the spool. Returns the steps recovered."""
    spool = spool_path(trace_path)
    if not spool.exists():
        raise TraceError(f"no spool {spool} to recover")
    m = open_trace(trace_path).manifest
    with TraceWriter(trace_path, model=m["model"], indexer=m["indexer"], capture=m["capture"],
                     part_rows=part_rows, overwrite=True) as writer:  # fmt: skip
        steps = to_trace(spool, writer)
    spool.unlink()
    return steps
