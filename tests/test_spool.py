"""The capture's raw step spool (``traces.spool``): round trip, a crash cut, recovery; and
``IndexCapture``, which fills it during a decode."""

import os
import threading
import time

import numpy as np
import pytest

from dsacache.errors import TraceError
from dsacache.traces import SelectionBatch, TraceWriter, open_trace
from dsacache.traces.spool import StepSpool, read_spool, recover, spool_path

os.environ.setdefault("TRITON_INTERPRET", "1")  # graph_store's kernels, on the CPU

MODEL = {"name": "test", "layers": 2, "attention": "MLA"}
INDEXER = {"kind": "oracle", "k": 6}


def _step(rng, layers, batch, groups, width):
    positions = rng.integers(width, 50 if width < 50 else 2 * width, size=(layers, batch))
    dense = np.full((layers, batch, groups, width), -1, np.int32)
    for (layer, req, grp), _ in np.ndenumerate(dense[..., 0]):
        n = int(rng.integers(0, width + 1))
        dense[layer, req, grp, :n] = np.sort(rng.choice(positions[layer, req], n, replace=False))
    return positions, dense


@pytest.mark.parametrize("direct", [True, False])
def test_records_come_back_as_written_and_a_cut_record_is_dropped(tmp_path, monkeypatch, direct):
    """Single steps and batches of steps, of varying shapes, from aligned rows (O_DIRECT
    where the file system has it) and from rows that are not: every step comes back; a
    record cut by a crash ends the spool; garbage and the older spool format are refused."""
    from dsacache.traces import spool as spool_mod

    if not direct:
        monkeypatch.setattr(spool_mod, "_O_DIRECT", 0)
    rng = np.random.default_rng(0)
    path = tmp_path / "s.spool"
    spool = StepSpool(path, sync_seconds=0.0)
    assert not direct or spool.direct == _has_direct_io(tmp_path)
    sent = [(s, *_step(rng, 2, 3, 1 + s % 2, 4 + s)) for s in range(5)]  # shapes vary
    for step, pos, dense in sent[:3]:
        spool.append(step, pos, dense)
    batch = [(s, *_step(rng, 3, 2, 1, 2048)) for s in range(5, 8)]  # rows of 6 x 8 KiB
    shape = batch[0][2].shape
    stride = spool_mod.record_stride(shape)
    assert stride == 6 * 2048 and spool_mod.record_stride((2, 3, 1, 5)) == 1024
    aligned = spool_mod.aligned_empty(3 * stride + 1).reshape(-1)
    for rows in (aligned[: 3 * stride].reshape(3, stride),  # on a page boundary
                 aligned[1:].reshape(3, stride)):  # 4 bytes off: written through the cache  # fmt: skip
        rows[:] = 7  # padding: never read back
        for i, (_, _, dense) in enumerate(batch):
            rows[i, : dense.size] = dense.ravel()
        spool.append_batch([b[0] for b in batch], np.stack([b[1] for b in batch]), rows, shape)
    spool.append(4, *sent[4][1:])
    with pytest.raises(ValueError, match=r"rows must be C-contiguous int32 \[1, 12288\]"):
        spool.append_batch(
            [9], batch[0][1][None], aligned[:stride].reshape(1, stride)[:, :-1], shape
        )
    with pytest.raises(ValueError, match=r"positions must be \[1, 3, 2\]"):
        spool.append_batch([9], batch[0][1], aligned[:stride].reshape(1, stride), shape)
    spool.close()
    want = sent[:3] + batch + batch + sent[4:]
    got = list(read_spool(path))
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, pos, dense), (_, p2, d2) in zip(want, got, strict=True):
        np.testing.assert_array_equal(pos, p2)
        np.testing.assert_array_equal(dense, d2)
    data = path.read_bytes()
    assert len(data) % spool_mod.ALIGN == 0
    path.write_bytes(data[:-7])  # a crash in the middle of the last record
    assert [s for s, _, _ in read_spool(path)] == [w[0] for w in want[:-1]]
    path.write_bytes(data[: -7 - 2 * 4096])  # in the middle of a batch: all of it is lost
    assert [s for s, _, _ in read_spool(path)] == [w[0] for w in want[:-4]]
    huge = np.frombuffer(data, np.int32).copy()
    huge[1] = 2**30  # the first record's step count damaged: read as cut, not allocated
    path.write_bytes(huge.tobytes())
    assert list(read_spool(path)) == []
    path.write_bytes(b"garbage!" * 4)
    with pytest.raises(TraceError, match="not a dsacache step spool"):
        list(read_spool(path))
    path.write_bytes(np.array([0x44534153, 0, 1, 1, 1, 1, 0, 0], np.int32).tobytes())
    with pytest.raises(TraceError, match="spool of dsacache before 2026-12-07"):
        list(read_spool(path))


def _has_direct_io(folder) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("refusal", [(22, "Invalid argument"), (95, "Operation not supported")])
def test_a_device_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch, refusal):
    """O_DIRECT writes refused (EINVAL: a device with larger blocks; EOPNOTSUPP: a file system
    that took O_DIRECT at open only): the record is written through the page cache, and so is
    every later one."""
    from dsacache.traces import spool as spool_mod

    spool = StepSpool(tmp_path / "e.spool", sync_seconds=0.0)
    if not spool.direct:
        spool.close()
        pytest.skip("this file system has no direct I/O")
    writev, direct_fd, buffered_fd, calls = os.writev, spool._direct, spool._fd, []

    def picky(fd, parts):
        calls.append(fd)
        if fd == direct_fd:
            raise OSError(*refusal)
        return writev(fd, parts)

    monkeypatch.setattr(spool_mod.os, "writev", picky)
    rng = np.random.default_rng(3)
    sent = [(s, *_step(rng, 2, 2, 1, 1024)) for s in range(3)]
    for step, pos, dense in sent:
        spool.append(step, pos, dense)
    spool.close()
    assert calls == [direct_fd, buffered_fd, buffered_fd, buffered_fd]
    assert not spool.direct
    got = list(read_spool(tmp_path / "e.spool"))
    for (step, _, dense), (s2, _, d2) in zip(sent, got, strict=True):
        assert step == s2
        np.testing.assert_array_equal(dense, d2)


def test_fsync_runs_off_the_appending_thread_and_its_failure_is_raised(tmp_path, monkeypatch):
    from dsacache.traces import spool as spool_mod

    calls = []
    fail = threading.Event()

    def fake_fsync(fd):
        calls.append(threading.current_thread())
        if fail.is_set():
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_mod.os, "fsync", fake_fsync)
    rng = np.random.default_rng(2)
    spool = StepSpool(tmp_path / "a.spool", sync_seconds=0.01)
    spool.append(0, *_step(rng, 1, 2, 1, 4))
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.005)
    assert calls and threading.current_thread() not in calls  # the loop never waits on disk
    time.sleep(0.05)
    synced = len(calls)
    time.sleep(0.05)
    assert len(calls) == synced  # nothing new written: no fsync
    fail.set()
    spool.append(1, *_step(rng, 1, 2, 1, 4))
    while spool._syncer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(TraceError, match="fsync failed: .*Input/output error"):
        spool.append(2, *_step(rng, 1, 2, 1, 4))
    with pytest.raises(TraceError, match="fsync failed"):
        spool.close()
    calls.clear()
    fail.clear()
    inline = StepSpool(tmp_path / "b.spool", sync_seconds=0)  # every append is durable
    inline.append(0, *_step(rng, 1, 2, 1, 4))
    assert calls == [threading.current_thread()]
    inline.close()
    with pytest.raises(ValueError, match="sync_seconds=-1"):
        StepSpool(tmp_path / "c.spool", sync_seconds=-1)


def test_recover_finishes_an_interrupted_capture(tmp_path):
    rng = np.random.default_rng(1)
    trace = tmp_path / "t.dsatrace"
    writer = TraceWriter(trace, model=MODEL, indexer=INDEXER, capture={"tool": "test"})
    spool = StepSpool(spool_path(trace))
    steps = [(s, *_step(rng, 2, 2, 1, 6)) for s in range(3)]
    for step, pos, dense in steps:
        spool.append(step, pos, dense)
    spool.close()
    del writer  # the process "dies": the trace has no parts and is incomplete
    assert not open_trace(trace).complete and open_trace(trace).rows == 0
    with pytest.raises(TraceError, match="a capture was interrupted; recover it"):
        StepSpool(spool_path(trace))
    from click.testing import CliRunner

    from dsacache.cli import main

    out = CliRunner().invoke(main, ["recover", str(trace)])
    assert out.exit_code == 0, out.output
    assert "3 step(s) recovered" in out.output
    done = open_trace(trace)
    assert done.complete and done.validate()["rows"] == 3 * 2 * 2
    assert done.manifest["capture"] == {"tool": "test"}
    want = SelectionBatch.concat([SelectionBatch.from_dense(*s) for s in steps])
    got = done.read_all()
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    assert not spool_path(trace).exists()
    with pytest.raises(TraceError, match="no spool"):
        recover(trace)
    out = CliRunner().invoke(main, ["recover", str(trace)])
    assert out.exit_code != 0 and "no spool" in out.output and "Traceback" not in out.output


def _cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available()


CPU_AND_CUDA = pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not _cuda_ready(), reason="needs a CUDA GPU")])],
)  # fmt: skip
# graph_store's Triton kernels: on CPU tensors only under the interpreter
TRITON_CPU_AND_CUDA = pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton runs on CPU tensors only with TRITON_INTERPRET=1")),
     pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not _cuda_ready(), reason="needs a CUDA GPU")])],
)  # fmt: skip


@pytest.mark.parametrize("steps_per_copy", [1, 2, None])
@CPU_AND_CUDA
def test_index_capture_pads_narrow_copies_and_clears_layers_left_out(
    tmp_path, device, steps_per_copy
):
    """Ring slots and host buffers reused from step to step: rows of a narrower copy and
    layers a step never wrote must not keep an earlier step's indices."""
    import torch

    from dsacache.kernels.index_capture import IndexCapture

    trace = tmp_path / "c.dsatrace"
    cap = IndexCapture(str(trace), cuda=device == "cuda", buffers=1, model=MODEL,
                       indexer=INDEXER, capture={"tool": "test"},
                       steps_per_copy=steps_per_copy)  # fmt: skip
    positions = np.full((3, 2), 40)
    full = torch.arange(16, dtype=torch.int32, device=device).reshape(2, 8)
    cap.begin_step(0, positions, (3, 2, 1, 8))
    for layer in range(3):
        cap.add(layer, full + layer)
    cap.end_step()
    cap.begin_step(1, positions, (3, 2, 1, 8))
    cap.add(0, full)
    cap.add(1, torch.tensor([[1, 2, 3], [4, 5, -1]], dtype=torch.int32, device=device))
    cap.end_step()  # layer 2 left out: its rows are empty
    cap.begin_step(2, positions, (3, 2, 1, 8))
    cap.add_all(torch.arange(36, dtype=torch.int32, device=device).reshape(3, 2, 6))
    cap.end_step()
    cap.close()
    got = open_trace(trace).read_all()
    second = got.take(np.flatnonzero(got.step == 1))
    assert [second.row(i).tolist() for i in range(len(second))] == [
        list(range(8)), list(range(8, 16)), [1, 2, 3], [4, 5], [], []
    ]  # fmt: skip
    first = got.take(np.flatnonzero(got.step == 0))
    assert first.row(5).tolist() == list(range(10, 18))
    third = got.take(np.flatnonzero(got.step == 2))
    assert [third.row(i).tolist() for i in range(6)] == [
        list(range(6 * i, 6 * i + 6)) for i in range(6)
    ]


@CPU_AND_CUDA
@pytest.mark.parametrize(
    ("steps_per_copy", "buffers", "batches"), [(1, 1, 20), (4, 1, 6), (4, 3, 6), (16, 2, 2)]
)
def test_index_capture_writes_every_step_when_the_thread_is_slow(
    tmp_path, monkeypatch, device, steps_per_copy, buffers, batches
):
    """A thread that spools slowly (so the launcher runs out of host buffers and waits), 20
    steps, and a change of width halfway: every step is spooled once, intact and in order,
    in one write per ``steps_per_copy`` steps (the width change ends a batch early)."""
    import torch

    from dsacache.kernels import index_capture
    from dsacache.traces.spool import StepSpool

    writes = []
    append_batch = StepSpool.append_batch

    def slow_append(self, steps, *rest):
        time.sleep(0.002 * (len(writes) % 3))
        writes.append(list(steps))
        append_batch(self, steps, *rest)

    monkeypatch.setattr(StepSpool, "append_batch", slow_append)
    with pytest.raises(ValueError, match="at least 1 host buffer, got buffers=0"):
        index_capture.IndexCapture(str(tmp_path / "none.dsatrace"), cuda=False, buffers=0)
    with pytest.raises(ValueError, match="steps_per_copy >= 1, got 0"):
        index_capture.IndexCapture(str(tmp_path / "none.dsatrace"), cuda=False, steps_per_copy=0)
    trace = tmp_path / "slow.dsatrace"
    cap = index_capture.IndexCapture(str(trace), cuda=device == "cuda", buffers=buffers, model=MODEL,
                                   indexer=INDEXER, capture={},
                                   steps_per_copy=steps_per_copy)  # fmt: skip
    sent = {}
    for step in range(20):
        width = 4 if step < 10 else 6
        idx = torch.arange(step, step + 4 * width, dtype=torch.int32).reshape(2, 2, width)
        cap.begin_step(step, np.full((2, 2), 99), (2, 2, 1, width))
        cap.add_all(idx.to(device))
        cap.end_step()
        sent[step] = idx.reshape(4, width).tolist()
    cap.close()
    assert cap.steps_per_copy == steps_per_copy
    assert len(writes) == batches and sum(writes, []) == list(range(20))
    assert open_trace(trace).manifest["order"] == "step-major"  # spooled in step order
    got = open_trace(trace).read_all()
    assert sorted(set(got.step.tolist())) == list(range(20))
    for step, rows in sent.items():
        mine = got.take(np.flatnonzero(got.step == step))
        assert [mine.row(i).tolist() for i in range(len(mine))] == rows


def test_index_capture_ring_size_follows_the_step_bytes(tmp_path, monkeypatch):
    """By default a transfer moves as many steps as fit half of ``RING_BYTES``, at least one
    and at most ``MAX_STEPS_PER_COPY``."""
    import torch

    from dsacache.kernels import index_capture

    monkeypatch.setattr(index_capture, "RING_BYTES", 2 * 4 * 2 * 2 * 8 * 5)  # five 2x2x1x8 steps
    for shape, want in [((2, 2, 1, 8), 5), ((2, 2, 1, 64), 1), ((1, 1, 1, 1), 16)]:
        cap = index_capture.IndexCapture(str(tmp_path / f"r{want}.dsatrace"), cuda=False,
                                       model=MODEL, indexer=INDEXER, capture={})  # fmt: skip
        cap.begin_step(0, np.full(shape[:2], 1000), shape)
        cap.add_all(torch.arange(np.prod(shape), dtype=torch.int32).reshape(shape))
        cap.end_step()
        cap.close()
        assert cap.steps_per_copy == want


def test_index_capture_close_stops_its_threads_when_the_last_transfer_fails(tmp_path, monkeypatch):
    """After a CUDA error, the last batch's transfer raises: close still stops the capture's
    thread, keeps the steps spooled before (trace left incomplete), drops the failed batch
    and raises."""
    import torch

    from dsacache.kernels import index_capture

    trace = tmp_path / "broken.dsatrace"
    cap = index_capture.IndexCapture(str(trace), cuda=False, model=MODEL, indexer=INDEXER,
                                   capture={}, steps_per_copy=2)  # fmt: skip
    for step in range(3):  # steps 0-1 transferred and spooled, step 2 pending in the ring
        if step == 2:

            def broken(*args):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            monkeypatch.setattr(cap, "_transfer", broken)
        cap.begin_step(step, np.full((2, 2), 99), (2, 2, 1, 4))
        cap.add_all(torch.arange(step, step + 4, dtype=torch.int32).expand(2, 2, 4))
        cap.end_step()
    with pytest.raises(RuntimeError, match="index capture failed.*illegal memory access"):
        cap.close(complete=False)
    assert not cap._thread.is_alive()
    kept = open_trace(trace)
    assert not kept.manifest["complete"]
    assert sorted(set(kept.read_all().step.tolist())) == [0, 1]


@pytest.mark.parametrize("buffers", [1, 3])
def test_index_capture_keeps_its_host_buffer_limit_across_shape_changes(
    tmp_path, monkeypatch, buffers
):
    """The width changing every step while the thread spools slowly: each step shape has at
    most ``buffers`` host buffers alive (made up front with its ring, never more), and every
    step is spooled."""
    import weakref

    import torch

    from dsacache.kernels import index_capture
    from dsacache.traces.spool import StepSpool

    append_batch = StepSpool.append_batch

    def slow_append(self, *args):
        time.sleep(0.003)
        append_batch(self, *args)

    monkeypatch.setattr(StepSpool, "append_batch", slow_append)
    cap = index_capture.IndexCapture(str(tmp_path / "w.dsatrace"), cuda=False, buffers=buffers,
                                     model=MODEL, indexer=INDEXER, capture={},
                                     steps_per_copy=1)  # fmt: skip
    made: dict[tuple, list] = {}
    new_host_buffer = cap._new_host_buffer

    def counted(ring):
        buf = new_host_buffer(ring)
        made.setdefault(ring.shape, []).append(weakref.ref(buf))
        return buf

    monkeypatch.setattr(cap, "_new_host_buffer", counted)
    for step in range(30):
        width = (4, 6, 8)[step % 3]
        cap.begin_step(step, np.full((2, 2), 99), (2, 2, 1, width))
        cap.add_all(torch.arange(4 * width, dtype=torch.int32).reshape(2, 2, width))
        cap.end_step()
    cap.close()
    assert sorted(len(refs) for refs in made.values()) == [buffers] * 3
    assert sorted(set(open_trace(tmp_path / "w.dsatrace").read_all().step.tolist())) == list(
        range(30)
    )


def test_index_capture_failed_host_buffer_leaves_the_trace_incomplete(tmp_path, monkeypatch):
    """A host buffer that cannot be made (pinned memory exhausted; here at a change of
    width): the call raises, every later call raises too (no step is written half empty),
    the capture does not hang, and the trace keeps the steps before, marked incomplete."""
    import torch

    from dsacache.kernels import index_capture

    trace = tmp_path / "oom.dsatrace"
    cap = index_capture.IndexCapture(str(trace), cuda=False, buffers=1, model=MODEL,
                                   indexer=INDEXER, capture={}, steps_per_copy=1)  # fmt: skip
    cap.begin_step(0, np.full((2, 2), 99), (2, 2, 1, 4))
    cap.add_all(torch.arange(16, dtype=torch.int32).reshape(2, 2, 4))
    cap.end_step()
    empty = torch.empty

    def no_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (pinned)")

    cap.begin_step(1, np.full((2, 2), 99), (2, 2, 1, 6))
    monkeypatch.setattr(index_capture.torch, "empty", no_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        cap.add_all(torch.arange(24, dtype=torch.int32).reshape(2, 2, 6))
    monkeypatch.setattr(index_capture.torch, "empty", empty)
    with pytest.raises(RuntimeError, match="index capture failed.*out of memory"):
        cap.end_step()
    with pytest.raises(RuntimeError, match="index capture failed"):
        cap.close()
    assert not cap._thread.is_alive()
    kept = open_trace(trace)
    assert not kept.manifest["complete"]
    assert sorted(set(kept.read_all().step.tolist())) == [0]


@pytest.mark.parametrize("steps_per_copy", [1, 3])
@TRITON_CPU_AND_CUDA
def test_index_capture_graph_store_fills_slots_from_its_device_counter(
    tmp_path, device, steps_per_copy
):
    """``graph_store`` as a CUDA graph replays it (here launched eagerly; on the CPU its
    kernels run under the interpreter): each call copies into the slot the ring's device counter
    names, ``stored`` notes the step. Two shapes alternate in runs (a graph per width), the
    second run of a shape starts after a partial hand-over: every step is spooled once,
    in order, with its own indices."""
    import torch

    from dsacache.kernels import index_capture

    trace = tmp_path / "g.dsatrace"
    cap = index_capture.IndexCapture(str(trace), cuda=device == "cuda", model=MODEL,
                                     indexer=INDEXER, capture={},
                                     steps_per_copy=steps_per_copy)  # fmt: skip
    shapes = {4: (2, 2, 1, 4), 6: (2, 2, 1, 6)}
    static = {}
    for width, shape in shapes.items():
        cap.reserve(shape, device, graph=True)
        # a graph's static input
        static[width] = torch.zeros(shape, dtype=torch.int32, device=device)
    sent = {}
    widths = [4] * 5 + [6] * 2 + [4] * 4 + [6] * 3
    for step, width in enumerate(widths):
        values = torch.arange(step, step + 4 * width, dtype=torch.int32, device=device)
        values = values.reshape(shapes[width])
        static[width].copy_(values)
        cap.graph_store(static[width])  # what a replay of that width's graph runs
        cap.stored(step, np.full((2, 2), 99), shapes[width])
        sent[step] = values.reshape(4, width).tolist()
    with pytest.raises(RuntimeError, match="stored by a CUDA graph"):
        cap.begin_step(99, np.full((2, 2), 99), shapes[4])
        cap.add_all(static[4])
    cap._current = None
    with pytest.raises(ValueError, match="reserve"):
        cap.graph_store(torch.zeros((2, 2, 1, 8), dtype=torch.int32, device=device))
    cap.close()
    got = open_trace(trace).read_all()
    assert sorted(set(got.step.tolist())) == list(range(len(widths)))
    for step, rows in sent.items():
        mine = got.take(np.flatnonzero(got.step == step))
        assert [mine.row(i).tolist() for i in range(len(mine))] == rows


@TRITON_CPU_AND_CUDA
def test_index_capture_close_catches_a_replay_that_was_not_noted(tmp_path, device):
    """A graph replay without its ``stored`` call shifts every later step by a slot: close
    compares the ring's device counter with the host's count, raises and leaves the trace
    incomplete."""
    import torch

    from dsacache.kernels import index_capture

    trace = tmp_path / "shift.dsatrace"
    cap = index_capture.IndexCapture(str(trace), cuda=device == "cuda", model=MODEL,
                                     indexer=INDEXER, capture={}, steps_per_copy=4)  # fmt: skip
    shape = (2, 2, 1, 4)
    cap.reserve(shape, device, graph=True)
    static = torch.arange(16, dtype=torch.int32, device=device).reshape(shape)
    for step in range(3):
        cap.graph_store(static)
        if step != 1:
            cap.stored(step, np.full((2, 2), 99), shape)
    with pytest.raises(RuntimeError, match="graph replays and stored"):
        cap.close()
    assert not open_trace(trace).manifest["complete"]


def test_a_spool_refuses_appends_after_a_failed_write_and_a_capture_bad_shapes(
    tmp_path, monkeypatch
):
    """A write that failed may have left a torn record: a record after it would be misread,
    so the spool refuses more (the records before it still read back). A step shape with a
    zero or missing dimension is refused by name."""
    from dsacache.kernels.index_capture import IndexCapture
    from dsacache.traces import spool as spool_mod

    rng = np.random.default_rng(5)
    path = tmp_path / "t.spool"
    spool = StepSpool(path, sync_seconds=0.0)
    spool.append(0, *_step(rng, 2, 2, 1, 8))
    writev = os.writev

    def full_disk(fd, parts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "writev", full_disk)
    with pytest.raises(OSError, match="No space left"):
        spool.append(1, *_step(rng, 2, 2, 1, 8))
    monkeypatch.setattr(spool_mod.os, "writev", writev)
    with pytest.raises(TraceError, match="an earlier write failed .*nothing more is appended"):
        spool.append(2, *_step(rng, 2, 2, 1, 8))
    spool.close()
    assert [s for s, _, _ in read_spool(path)] == [0]
    cap = IndexCapture(str(tmp_path / "s.dsatrace"), cuda=False, model=MODEL, indexer=INDEXER,
                       capture={})  # fmt: skip
    for shape in [(2, 2, 1, 0), (2, 2, 8)]:
        with pytest.raises(ValueError, match=r"\(layers, batch, groups, width\), each >= 1"):
            cap.begin_step(0, np.full((2, 2), 9), shape)
        with pytest.raises(ValueError, match="each >= 1"):
            cap.reserve(shape, "cpu")
    cap.close()


def test_a_spool_refuses_steps_and_positions_beyond_int32(tmp_path):
    """Steps and positions are stored as int32: one that does not fit is refused by name
    (a position used to wrap to a negative context silently), and nothing is written."""
    rng = np.random.default_rng(6)
    path = tmp_path / "t.spool"
    spool = StepSpool(path, sync_seconds=0.0)
    positions, dense = _step(rng, 2, 2, 1, 8)
    with pytest.raises(ValueError, match="step 2147483648 does not fit the spool's int32"):
        spool.append(2**31, positions, dense)
    far = positions.copy()
    far[1, 0] = 2**31 + 5
    with pytest.raises(ValueError, match="position 2147483653 does not fit"):
        spool.append(0, far, dense)
    with pytest.raises(ValueError, match="position -1 does not fit"):
        spool.append(0, -np.ones_like(positions), dense)
    spool.append(2**31 - 1, positions, dense)
    spool.close()
    [(step, back, _)] = list(read_spool(path))
    assert step == 2**31 - 1 and (back == positions).all()
