"""The capture's raw step spool (``traces.spool``): round trip, a crash cut, recovery."""

import threading
import time

import numpy as np
import pytest

from dsacache.errors import TraceError
from dsacache.traces import SelectionBatch, TraceWriter, open_trace
from dsacache.traces.spool import StepSpool, read_spool, recover, spool_path

MODEL = {"name": "test", "layers": 2, "attention": "MLA"}
INDEXER = {"kind": "oracle", "k": 6}


def _step(rng, layers, batch, groups, width):
    positions = rng.integers(width, 50, size=(layers, batch))
    dense = np.full((layers, batch, groups, width), -1, np.int32)
    for (layer, req, grp), _ in np.ndenumerate(dense[..., 0]):
        n = int(rng.integers(0, width + 1))
        dense[layer, req, grp, :n] = np.sort(rng.choice(positions[layer, req], n, replace=False))
    return positions, dense


def test_records_come_back_as_written_and_a_cut_record_is_dropped(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "s.spool"
    spool = StepSpool(path, sync_seconds=0.0)
    sent = [(s, *_step(rng, 2, 3, 1 + s % 2, 4 + s)) for s in range(5)]  # shapes vary
    for step, pos, dense in sent:
        spool.append(step, pos, dense)
    spool.close()
    got = list(read_spool(path))
    assert len(got) == 5
    for (step, pos, dense), (s2, p2, d2) in zip(sent, got, strict=True):
        assert step == s2
        np.testing.assert_array_equal(pos, p2)
        np.testing.assert_array_equal(dense, d2)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # a crash in the middle of the last record
    assert [s for s, _, _ in read_spool(path)] == [0, 1, 2, 3]
    path.write_bytes(b"garbage!" * 4)
    with pytest.raises(TraceError, match="not a dsacache step spool"):
        list(read_spool(path))


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


def test_index_capture_pads_narrow_copies_and_clears_layers_left_out(tmp_path):
    """One host buffer reused for every step: rows of a narrower copy and layers a step
    never wrote must not keep the previous step's indices."""
    import torch

    from dsacache.kernels.decode_step import IndexCapture

    trace = tmp_path / "c.dsatrace"
    cap = IndexCapture(str(trace), cuda=False, buffers=1, model=MODEL,
                       indexer=INDEXER, capture={"tool": "test"})  # fmt: skip
    positions = np.full((3, 2), 40)
    full = torch.arange(16, dtype=torch.int32).reshape(2, 8)
    cap.begin_step(0, positions, (3, 2, 1, 8))
    for layer in range(3):
        cap.add(layer, full + layer)
    cap.end_step()
    cap.begin_step(1, positions, (3, 2, 1, 8))
    cap.add(0, full)
    cap.add(1, torch.tensor([[1, 2, 3], [4, 5, -1]], dtype=torch.int32))  # narrower: padded
    cap.end_step()  # layer 2 left out: its rows are empty
    cap.begin_step(2, positions, (3, 2, 1, 8))
    cap.add_all(torch.arange(36, dtype=torch.int32).reshape(3, 2, 6))  # every layer, narrower
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


@pytest.mark.parametrize(
    ("steps_per_wake", "buffers", "waits"), [(1, 2, 20), (4, None, 5), (4, 2, 10)]
)
def test_index_capture_writes_every_step_when_copies_finish_late(
    tmp_path, monkeypatch, steps_per_wake, buffers, waits
):
    """Copies that finish late (a CUDA event whose wait takes a while), 20 steps, and a
    change of width halfway: every step is spooled once, intact and in order. The thread
    waits once per hand-over: every ``steps_per_wake`` steps, or sooner when the launcher
    runs out of buffers (two here, so batches of two)."""
    import torch

    from dsacache.kernels import decode_step

    class LateEvent:
        waits = 0  # counted per test case (the class is made anew)

        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            LateEvent.waits += 1
            time.sleep(0.002 * (LateEvent.waits % 3))

    monkeypatch.setattr(decode_step, "_copy_event", LateEvent)
    with pytest.raises(ValueError, match="at least 1 host buffer, got buffers=0"):
        decode_step.IndexCapture(str(tmp_path / "none.dsatrace"), cuda=False, buffers=0)
    with pytest.raises(ValueError, match="steps_per_wake >= 1, got 0"):
        decode_step.IndexCapture(str(tmp_path / "none.dsatrace"), cuda=False, steps_per_wake=0)
    trace = tmp_path / "late.dsatrace"
    cap = decode_step.IndexCapture(str(trace), cuda=False, buffers=buffers, model=MODEL,
                                   indexer=INDEXER, capture={},
                                   steps_per_wake=steps_per_wake)  # fmt: skip
    cap._events = True  # as on CUDA, without pinned memory
    sent = {}
    for step in range(20):
        width = 4 if step < 10 else 6
        idx = torch.arange(step, step + 2 * 2 * width, dtype=torch.int32).reshape(2, 2, width)
        cap.begin_step(step, np.full((2, 2), 99), (2, 2, 1, width))
        cap.add_all(idx)
        cap.end_step()
        sent[step] = idx.reshape(4, width).tolist()
    cap.close()
    assert LateEvent.waits == waits
    assert open_trace(trace).manifest["order"] == "step-major"  # spooled in step order
    got = open_trace(trace).read_all()
    assert sorted(set(got.step.tolist())) == list(range(20))
    for step, rows in sent.items():
        mine = got.take(np.flatnonzero(got.step == step))
        assert [mine.row(i).tolist() for i in range(len(mine))] == rows


def test_index_capture_close_stops_its_threads_when_the_last_event_fails(tmp_path, monkeypatch):
    """After a CUDA error, recording the last batch's event raises: close still stops the
    capture's thread, keeps the steps written so far (trace left incomplete) and raises."""
    import torch

    from dsacache.kernels import decode_step

    class BrokenEvent:
        def record(self) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def synchronize(self) -> None:
            pass

    trace = tmp_path / "broken.dsatrace"
    cap = decode_step.IndexCapture(str(trace), cuda=False, model=MODEL, indexer=INDEXER,
                                   capture={}, steps_per_wake=4)  # fmt: skip
    cap._events = True
    monkeypatch.setattr(decode_step, "_copy_event", BrokenEvent)
    for step in range(2):  # pending: not yet handed to the thread
        cap.begin_step(step, np.full((2, 2), 99), (2, 2, 1, 4))
        cap.add_all(torch.zeros((2, 2, 4), dtype=torch.int32))
        cap.end_step()
    with pytest.raises(RuntimeError, match="index capture failed.*illegal memory access"):
        cap.close(complete=False)
    assert not cap._thread.is_alive()
    assert not open_trace(trace).manifest["complete"]
