"""A ``TraceWriter`` in a child process, fed whole decode steps through shared memory.

Capturing from a GPU decode loop must not slow the loop. Encoding a step's rows (validation,
delta + zstd Parquet, fsync) costs milliseconds of CPU; done in a thread of the decoding
process it competes for the GIL with the thread that launches the kernels (measured on the
H200: +68% per decode step, see docs/results/h200-kernels/), and pushing each step's array
through a pipe from a thread was worse still (+255%: the sending thread re-takes the GIL for
every chunk). Here the parent takes a slot of shared memory (``acquire``), fills it with one
memcpy and hands it over with a message of a few bytes (``submit``); a child process maps the
slot, turns it into rows, frees the slot and encodes while the parent decodes on. (The GPU's
copies cannot land in the slot itself: page-locked with ``cudaHostRegister``, torch still
copied into it synchronously, one device sync per layer, measured on the H200.)

Crash safety is the ``TraceWriter``'s: each finished part is on disk; if the parent dies the
child sees the pipe close, flushes what it has and leaves the trace marked incomplete.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pyarrow as pa

from dsacache.errors import TraceError
from dsacache.traces.format import SelectionBatch, TraceWriter


def rows_from_dense(step: int, positions: np.ndarray, dense: np.ndarray) -> SelectionBatch:
    """Trace rows of one decode step from ``dense`` ``[L, B, G, W]`` indices (``-1``: none),
    ``positions`` ``[L, B]`` the context length of each (layer, request); row order layer,
    request, group (step-major, as the format prefers). The result shares no memory with
    ``dense``."""
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
        indices=rows[keep].astype(np.int32),
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


def _serve(conn: Connection, path: str, slots_dir: str, writer_kwargs: dict[str, Any]) -> None:
    """Child process: open the writer; per message map the slot, take its rows, free it,
    append them; report how long it worked. Removes the slot files if the parent died."""
    # The decode loop comes first: one encoding thread, at a lower priority, so that on a host
    # with few cores the writer takes idle time instead of the launching thread's.
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    with contextlib.suppress(OSError):
        os.nice(5)
    try:
        writer = TraceWriter(path, **writer_kwargs)
    except BaseException as e:  # e.g. the path exists: the parent raises it
        _send(conn, ("error", _describe(e)))
        return
    _send(conn, ("ready",))
    maps: dict[str, mmap.mmap] = {}
    busy = 0.0
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent closed the pipe or died: keep what we have
                writer.flush()
                shutil.rmtree(slots_dir, ignore_errors=True)
                return
            if msg is None:
                break
            slot, file, step, positions, shape = msg
            t0 = time.perf_counter()
            if file not in maps:
                with open(file, "rb") as f:
                    maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            count = int(np.prod(shape))
            dense = np.frombuffer(maps[file], dtype=np.int32, count=count).reshape(shape)
            rows = rows_from_dense(step, positions, dense)
            del dense
            _send(conn, ("free", slot))
            writer.append_batch(rows)
            busy += time.perf_counter() - t0
        writer.close()
    except BaseException as e:
        try:
            writer.flush()  # the rows accepted before the error stay on disk
        finally:
            _send(conn, ("error", _describe(e)))
        return
    _send(conn, ("closed", {"writer_busy_s": busy, "rows": float(writer.rows_written)}))


@dataclass
class _Slot:
    file: str
    mem: mmap.mmap
    array: np.ndarray  # int32 over the whole mapping


class BackgroundWriter:
    """Write a trace from a child process: ``acquire`` a slot, fill it, ``submit`` it; then
    ``close``.

    ``path`` and ``writer_kwargs`` are ``TraceWriter``'s (``model``, ``indexer``, ``capture``,
    ``part_rows``, ``overwrite``). ``slots`` steps can be in flight; ``acquire`` waits for the
    child beyond that. Slots live in ``/dev/shm`` where it exists (else the temp folder);
    space is reserved when a slot is made, so a full ``/dev/shm`` is an ``OSError`` there,
    not a crash later. Errors of the child (a row that breaks the format, a full disk) are
    raised here as ``TraceError`` by the next call.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        slots: int = 4,
        **writer_kwargs: Any,
    ) -> None:
        self.path = str(path)
        self._dir = tempfile.mkdtemp(
            prefix="dsatrace-slots-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self._slots: list[_Slot | None] = [None] * slots
        self._free = list(range(slots))
        self.stats: dict[str, float] = {}
        self._closed = False
        # A plain child process (not multiprocessing's spawn, which re-runs the caller's main
        # module there): it imports only this module and cannot see the GPU, so it never
        # holds a CUDA context that would time-slice the GPU with the decoding process.
        ours, theirs = socket.socketpair()
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(sys.path))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dsacache.traces.background", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env,
        )  # fmt: skip
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send((self.path, self._dir, writer_kwargs))
            self._receive("ready")
        except BaseException:
            self._release_slots()
            raise

    # -- messages from the child -----------------------------------------------------------
    def _receive(self, want: str) -> tuple:
        """Handle messages until one of kind ``want`` arrives (``free`` ones free slots)."""
        while True:
            try:
                msg = self._conn.recv()
            except EOFError:
                self._wait(5)
                self._closed = True
                raise TraceError(
                    f"{self.path}: the trace writer process ended (exit code {self._proc.returncode})"
                ) from None
            if msg[0] == "error":
                self._closed = True
                self._wait(5)
                raise TraceError(f"{self.path}: trace writer failed: {msg[1]}")
            if msg[0] == "free":
                self._free.append(msg[1])
            if msg[0] == want:
                return msg

    def _wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)

    def _poll(self) -> None:
        while self._conn.poll():
            self._receive("free")

    # -- the parent's side of a step --------------------------------------------------------
    def acquire(self, shape: tuple[int, ...], block: bool = True) -> tuple[int, np.ndarray] | None:
        """A free slot and an ``int32`` array of ``shape`` over its shared memory (contents
        undefined), or ``None`` when ``block`` is false and every slot is in flight."""
        if self._closed:
            raise TraceError(f"{self.path}: writer is closed")
        self._poll()
        if not self._free:
            if not block:
                return None
            self._receive("free")
        slot = self._free.pop(0)
        count = int(np.prod(shape))
        have = self._slots[slot]
        if have is None or have.array.size < count:
            if have is not None:
                self._drop(have)
            self._slots[slot] = have = self._make(slot, max(count, 1))
        return slot, have.array[:count].reshape(shape)

    def submit(self, slot: int, step: int, positions: np.ndarray, shape: tuple[int, ...]) -> None:
        """Hand the filled slot to the child: step ``step``, ``positions`` ``[L, B]``."""
        info = self._slots[slot]
        assert info is not None
        try:
            self._conn.send(
                (slot, info.file, int(step), np.asarray(positions, dtype=np.int64), tuple(shape))
            )
        except (BrokenPipeError, ConnectionResetError):
            self._receive("closed")  # raises the child's error

    def close(self, complete: bool = True) -> dict[str, float]:
        """Finish the trace (``complete=False``: keep the rows, leave it marked incomplete)
        and wait for the child; returns its stats (``writer_busy_s``, ``rows``)."""
        if self._closed:
            self._release_slots()
            return self.stats
        self._closed = True
        try:
            if not complete:
                self._conn.close()  # the child flushes on end-of-file
                self._wait()
                return self.stats
            try:
                self._conn.send(None)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the child ended early: its message says why
            self.stats = dict(self._receive("closed")[1])
            self._wait()
            self._conn.close()
            return self.stats
        finally:
            self._release_slots()

    # -- shared memory -------------------------------------------------------------------------
    def _make(self, slot: int, count: int) -> _Slot:
        file = os.path.join(self._dir, f"slot{slot}-{count}")
        with open(file, "wb+") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, 4 * count)
            except OSError as e:
                raise TraceError(
                    f"no room for a {4 * count:,}-byte capture slot in {self._dir} ({e.strerror}); "
                    "free space there or set TMPDIR to a larger folder"
                ) from None
            mem = mmap.mmap(f.fileno(), 4 * count)
        return _Slot(file, mem, np.frombuffer(mem, dtype=np.int32))

    def _drop(self, info: _Slot) -> None:
        info.array = np.empty(0, np.int32)  # the mapping can close once no view is left
        with contextlib.suppress(BufferError):  # a caller still holds a view: the GC closes it
            info.mem.close()
        with contextlib.suppress(FileNotFoundError):  # the child cleaned up after close(False)
            os.unlink(info.file)

    def _release_slots(self) -> None:
        for i, info in enumerate(self._slots):
            if info is not None:
                self._drop(info)
                self._slots[i] = None
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":  # the child: python -m dsacache.traces.background FD
    _conn = Connection(int(sys.argv[1]))
    _path, _slots_dir, _kwargs = _conn.recv()
    _serve(_conn, _path, _slots_dir, _kwargs)
