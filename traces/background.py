"""A ``TraceWriter`` in a child process, fed whole decode steps as dense index arrays.

Capturing from a GPU decode loop must not slow the loop. Encoding a step's rows (validation,
delta + zstd Parquet, fsync) costs milliseconds of CPU; done in a thread of the decoding
process it competes for the GIL with the thread that launches the kernels (measured on the
H200: +68% per decode step in a thread, see docs/results/h200-kernels/). Here it runs in a
spawned process: the parent only sends each step's ``int32 [layers, batch, groups, width]``
array (``-1`` pads a row) through a pipe, which releases the GIL while it copies.

Crash safety is the ``TraceWriter``'s: each finished part is on disk; if the parent dies the
child sees the pipe close, flushes what it has and leaves the trace marked incomplete.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from dsacache.errors import TraceError
from dsacache.traces.format import SelectionBatch, TraceWriter


def rows_from_dense(step: int, positions: np.ndarray, dense: np.ndarray) -> SelectionBatch:
    """Trace rows of one decode step from ``dense`` ``[L, B, G, W]`` indices (``-1``: none),
    ``positions`` ``[L, B]`` the context length of each (layer, request); row order layer,
    request, group (step-major, as the format prefers)."""
    layers, batch, groups, width = dense.shape
    if positions.shape != (layers, batch):
        raise TraceError(f"positions has shape {positions.shape}; expected {(layers, batch)}")
    rows = dense.reshape(-1, width)
    keep = rows >= 0
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=offsets[1:])
    n = len(rows)
    return SelectionBatch(
        request=np.tile(np.repeat(np.arange(batch, dtype=np.int32), groups), layers),
        step=np.full(n, step, np.int32),
        position=np.repeat(positions.reshape(-1), groups).astype(np.int32),
        layer=np.repeat(np.arange(layers, dtype=np.int16), batch * groups),
        group=np.tile(np.arange(groups, dtype=np.int16), layers * batch),
        offsets=offsets,
        indices=rows[keep].astype(np.int32, copy=False),
    )


def _describe(e: BaseException) -> str:
    if isinstance(e, TraceError):
        return str(e)
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


def _send(conn: Connection, msg: tuple) -> None:
    try:
        conn.send(msg)
    except OSError:  # the parent is gone; nobody to tell
        pass


def _serve(conn: Connection, path: str, writer_kwargs: dict[str, Any]) -> None:
    """Child process: open the writer, append each received step, report how long it worked."""
    try:
        writer = TraceWriter(path, **writer_kwargs)
    except BaseException as e:  # e.g. the path exists: the parent raises it
        _send(conn, ("error", _describe(e)))
        return
    _send(conn, ("ready",))
    busy = 0.0
    try:
        while True:
            try:
                header = conn.recv()
            except EOFError:  # the parent closed the pipe or died: keep the parts, incomplete
                writer.flush()
                return
            if header is None:
                break
            step, positions, shape = header
            data = conn.recv_bytes()
            t0 = time.perf_counter()
            dense = np.frombuffer(data, dtype=np.int32).reshape(shape)
            writer.append_batch(rows_from_dense(step, positions, dense))
            busy += time.perf_counter() - t0
        writer.close()
    except BaseException as e:
        try:
            writer.flush()  # the rows accepted before the error stay on disk
        finally:
            _send(conn, ("error", _describe(e)))
        return
    _send(conn, ("closed", {"writer_busy_s": busy, "rows": float(writer.rows_written)}))


class BackgroundWriter:
    """Write a trace from a child process; ``put_step`` per decode step, then ``close``.

    ``path`` and ``writer_kwargs`` are ``TraceWriter``'s (``model``, ``indexer``, ``capture``,
    ``part_rows``, ``overwrite``). Errors of the child (a row that breaks the format, a full
    disk) are raised here as ``TraceError`` by the next ``put_step`` or by ``close``.
    """

    def __init__(self, path: str | os.PathLike, **writer_kwargs: Any) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once CUDA is initialised
        self._conn, child = ctx.Pipe()
        self.path = str(path)
        self._proc = ctx.Process(
            target=_serve, args=(child, self.path, writer_kwargs), name="dsa-trace-writer",
            daemon=True,
        )  # fmt: skip
        self._proc.start()
        child.close()
        self.stats: dict[str, float] = {}
        self._closed = False
        self._expect("ready")

    def _expect(self, kind: str) -> tuple:
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise TraceError(
                f"{self.path}: the trace writer process ended (exit code {self._proc.exitcode})"
            ) from None
        if msg[0] == "error":
            self._closed = True
            self._proc.join(5)
            raise TraceError(f"{self.path}: trace writer failed: {msg[1]}")
        assert msg[0] == kind, msg
        return msg

    def put_step(self, step: int, positions: np.ndarray, dense: np.ndarray) -> None:
        """Queue one step: ``dense`` ``int32 [L, B, G, W]`` (``-1`` pads), ``positions``
        ``[L, B]``. Blocks only while the child is more than a pipe buffer behind."""
        if self._closed:
            raise TraceError(f"{self.path}: writer is closed")
        if self._conn.poll():  # the child only speaks early to report an error
            self._expect("closed")
        dense = np.ascontiguousarray(dense, dtype=np.int32)
        try:
            self._conn.send((int(step), np.asarray(positions, dtype=np.int64), dense.shape))
            self._conn.send_bytes(memoryview(dense).cast("B"))
        except (BrokenPipeError, ConnectionResetError):
            self._expect("closed")  # raises the child's error

    def close(self, complete: bool = True) -> dict[str, float]:
        """Finish the trace (``complete=False``: keep the rows, leave it marked incomplete)
        and wait for the child; returns its stats (``writer_busy_s``, ``rows``)."""
        if self._closed:
            return self.stats
        self._closed = True
        if not complete:
            self._conn.close()  # the child flushes on end-of-file
            self._proc.join()
            return self.stats
        try:
            self._conn.send(None)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child ended early: its message says why
        try:
            self.stats = dict(self._expect("closed")[1])
        finally:
            self._closed = True
            self._proc.join()
            self._conn.close()
        return self.stats
