"""The trace writer in a child process (``traces.background``), used by the GPU capture."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dsacache.errors import TraceError
from dsacache.traces import open_trace
from dsacache.traces.background import BackgroundWriter

MODEL = {"name": "test", "layers": 3, "attention": "MLA"}
INDEXER = {"kind": "oracle", "k": 6}


def _dense_step(rng, layers, batch, groups, width, context):
    """Random sorted selections with -1 padding at the end of some rows."""
    dense = np.full((layers, batch, groups, width), -1, np.int32)
    positions = rng.integers(width, context, size=(layers, batch))
    for (layer, req, grp), _ in np.ndenumerate(dense[..., 0]):
        n = int(rng.integers(0, width + 1))
        dense[layer, req, grp, :n] = np.sort(rng.choice(positions[layer, req], n, replace=False))
    return positions, dense


def _put(w, step, positions, dense):
    slot, array = w.acquire(dense.shape)
    array[...] = dense
    w.submit(slot, step, positions, dense.shape)


def test_steps_round_trip_through_the_child(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "bg.dsatrace"
    w = BackgroundWriter(path, model=MODEL, indexer=INDEXER, part_rows=7)
    sent = []
    for step in range(5):
        width = 6 if step < 3 else 9  # the width may change between steps
        positions, dense = _dense_step(rng, 3, 2, 2, width, 40)
        _put(w, step, positions, dense)
        sent.append((step, positions, dense))
    stats = w.close()
    assert stats["rows"] == 5 * 3 * 2 * 2 and stats["writer_busy_s"] > 0
    trace = open_trace(path)
    assert trace.complete and trace.validate()["rows"] == 60
    got = trace.read_all()
    i = 0
    for step, positions, dense in sent:  # step-major rows: layer, request, group
        for (layer, req, grp), _ in np.ndenumerate(dense[..., 0]):
            row = dense[layer, req, grp]
            assert (got.step[i], got.layer[i], got.request[i], got.group[i]) == (
                step, layer, req, grp
            )  # fmt: skip
            assert got.position[i] == positions[layer, req]
            np.testing.assert_array_equal(got.row(i), row[row >= 0])
            i += 1


def test_a_bad_row_is_raised_in_the_parent_and_earlier_rows_stay(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "bad.dsatrace"
    w = BackgroundWriter(path, model=MODEL, indexer=INDEXER, part_rows=1000)
    positions, dense = _dense_step(rng, 2, 2, 1, 4, 30)
    _put(w, 0, positions, dense)
    dense2 = dense.copy()
    dense2[1, 0, 0, :] = [1, 2, 3, 99]  # 99 >= every position
    _put(w, 1, positions, dense2)
    with pytest.raises(TraceError, match=r"row 2 .*index 99 is outside"):
        w.close()
    trace = open_trace(path)
    assert not trace.complete and trace.rows == 4  # step 0 was flushed, marked incomplete


def test_an_existing_trace_is_refused_at_start(tmp_path):
    path = tmp_path / "x.dsatrace"
    BackgroundWriter(path, model=MODEL, indexer=INDEXER, part_rows=4).close()
    with pytest.raises(TraceError, match="already exists"):
        BackgroundWriter(path, model=MODEL, indexer=INDEXER, part_rows=4)


def test_closing_incomplete_keeps_the_rows(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "inc.dsatrace"
    w = BackgroundWriter(path, model=MODEL, indexer=INDEXER, part_rows=1000)
    _put(w, 0, *_dense_step(rng, 2, 1, 1, 4, 30))
    w.close(complete=False)
    trace = open_trace(path)
    assert not trace.complete and trace.rows == 2 and trace.validate()["rows"] == 2


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # an unreaped zombie has finished
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to watch the orphan")
def test_a_killed_parent_leaves_a_readable_incomplete_trace(tmp_path):
    """SIGKILL of the capturing process: the child sees the pipe close and flushes."""
    path = tmp_path / "killed.dsatrace"
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from dsacache.traces.background import BackgroundWriter
        w = BackgroundWriter({str(path)!r}, model={{"name": "t"}}, indexer={{"k": 4}},
                             part_rows=1000)
        for step in range(3):
            slot, array = w.acquire((2, 1, 1, 4))
            array[...] = np.arange(4)
            w.submit(slot, step, np.full((2, 1), 50), (2, 1, 1, 4))
        print(w._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, timeout=120, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 60
    while _running(child) and time.monotonic() < deadline:  # the orphan finishes on its own
        time.sleep(0.05)
    assert not _running(child)
    trace = open_trace(path)
    assert not trace.complete and trace.rows == 6 and trace.validate()["rows"] == 6
