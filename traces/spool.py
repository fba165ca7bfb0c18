"""A raw, append-only spool of decode steps, turned into a trace after the capture.

Encoding rows (validation, delta + zstd Parquet) costs milliseconds of CPU per decode step,
and on the machines measured that time is taken from the launch-bound decode loop wherever
it runs: in a thread it holds the GIL, in another process it shares the CPU (see
docs/results/h200-kernels/README.md). While the GPU decodes, the capture therefore only
appends each step's dense index array to ``TRACE.spool`` beside the trace (one ``write``,
which releases the GIL); ``to_trace`` encodes the spool into the trace's Parquet parts
afterwards.

Record: ``int32[6]`` header (magic, step, layers, batch, groups, width), ``int32`` positions
``[layers, batch]``, ``int32`` indices ``[layers, batch, groups, width]`` (``-1`` pads a row).
A process that dies loses nothing it wrote (the page cache keeps it). Against a machine
crash a background thread fsyncs the spool every ``sync_seconds`` (1 s) while steps arrive,
so a crash loses at most the last second or so of steps. The decode loop never waits for
the disk: an fsync in ``append`` every 8 steps cost +16% per decode step on the H200 (batch
8 x 8 layers, 6.80 vs 5.86 ms; 5.89 without fsync), and one at close, of every step not yet
synced, cost +21% over a 64-step capture (docs/results/h200-kernels/capture/). Close does
not fsync: the spool is encoded into the trace right away, and the trace's writer makes
the trace durable. ``sync_seconds=0`` fsyncs in every ``append`` instead (no thread). After
a crash, ``recover(trace_path)`` (``dsacache recover TRACE``) writes every complete record
into the trace and completes it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dsacache.errors import TraceError
from dsacache.traces.format import SelectionBatch, TraceWriter, open_trace

MAGIC = 0x44534153  # "DSAS"
HEADER = 6
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else -1
_IOV_MAX = _IOV_MAX if _IOV_MAX > 0 else 16  # none reported: POSIX's least (_XOPEN_IOV_MAX)


def spool_path(trace_path: str | os.PathLike) -> Path:
    """Where the spool of the trace at ``trace_path`` lives (beside it)."""
    return Path(f"{os.fspath(trace_path).rstrip('/')}.spool")


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
        self.sync_seconds = sync_seconds
        self._dirty = False  # written since the last fsync
        self._error: OSError | None = None  # the fsync thread's, raised by append / close
        self._stop = threading.Event()
        self._syncer = None
        if sync_seconds > 0:
            self._syncer = threading.Thread(target=self._sync_loop, name="dsa-spool-fsync",
                                            daemon=True)  # fmt: skip
            self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_seconds):
            if self._dirty:
                self._dirty = False
                try:
                    os.fsync(self._fd)  # releases the GIL; appends go on meanwhile
                except OSError as e:
                    self._error = e
                    return

    def _raise(self) -> None:
        if self._error is not None:
            raise TraceError(f"{self.path}: fsync failed: {self._error}") from self._error

    def append(self, step: int, positions: np.ndarray, dense: np.ndarray) -> None:
        """Write one step: ``positions`` ``[L, B]``, ``dense`` ``int32 [L, B, G, W]``."""
        self.append_many([(step, positions, dense)])

    def append_many(self, steps: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Write several ``(step, positions, dense)`` records with one system call (one per
        ``IOV_MAX`` buffers, three per record)."""
        self._raise()
        parts = []
        for step, positions, dense in steps:
            layers, batch, groups, width = dense.shape
            parts += [np.array([MAGIC, step, layers, batch, groups, width], np.int32),
                      np.ascontiguousarray(positions, dtype=np.int32),
                      np.ascontiguousarray(dense, dtype=np.int32)]  # fmt: skip
        for first in range(0, len(parts), _IOV_MAX):  # writev takes at most IOV_MAX buffers
            group = parts[first : first + _IOV_MAX]
            written = os.writev(self._fd, group)  # the GIL is released during it
            # a short write (a signal, a full disk): finish it or fail loudly
            if written < sum(p.nbytes for p in group):
                rest = memoryview(b"".join(p.tobytes() for p in group))[written:]
                while len(rest):
                    rest = rest[os.write(self._fd, rest) :]
        if self._syncer is None:
            os.fsync(self._fd)
        else:
            self._dirty = True

    def close(self) -> None:
        """Stop the fsync thread and close the spool (no final fsync: see the module doc)."""
        if self._fd < 0:
            return
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        os.close(self._fd)
        self._fd = -1
        self._raise()


def read_spool(path: str | os.PathLike) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The complete records of a spool as ``(step, positions, dense)``; a record cut short by
    a crash ends the iteration."""
    with open(path, "rb") as f:
        while True:
            raw = f.read(4 * HEADER)
            if len(raw) < 4 * HEADER:
                return
            header = np.frombuffer(raw, np.int32)
            if header[0] != MAGIC or (header[2:] < 0).any():
                raise TraceError(f"{path}: not a dsacache step spool (bad record header)")
            step, layers, batch, groups, width = (int(v) for v in header[1:])
            count = layers * batch
            pos = f.read(4 * count)
            dense = f.read(4 * count * groups * width)
            if len(pos) < 4 * count or len(dense) < 4 * count * groups * width:
                return
            yield (
                step,
                np.frombuffer(pos, np.int32).reshape(layers, batch),
                np.frombuffer(dense, np.int32).reshape(layers, batch, groups, width),
            )


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
