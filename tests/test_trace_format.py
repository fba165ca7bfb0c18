import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsacache.errors import TraceError
from dsacache.traces import SelectionBatch, TraceWriter, open_trace

MODEL = {"name": "test", "layers": 2, "attention": "MLA"}
INDEXER = {"kind": "oracle", "k": 8}


def _rows(rng, requests, steps, layers, groups, k, context):
    out = []
    for step in range(steps):
        for layer in range(layers):
            for request in range(requests):
                for group in range(groups):
                    pos = context + step
                    idx = np.sort(rng.choice(pos, min(k, pos), replace=False))
                    out.append((request, step, pos, layer, group, idx))
    return out


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.integers(1, 3),
    steps=st.integers(1, 5),
    layers=st.integers(1, 4),
    groups=st.integers(1, 3),
    k=st.integers(0, 70),
    context=st.integers(1, 500),
    part_rows=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_round_trip(tmp_path_factory, requests, steps, layers, groups, k, context, part_rows, seed):
    path = tmp_path_factory.mktemp("rt") / "t.dsatrace"
    rows = _rows(np.random.default_rng(seed), requests, steps, layers, groups, k, context)
    with TraceWriter(path, model=MODEL, indexer=INDEXER, part_rows=part_rows) as w:
        for r, s, p, layer, g, idx in rows:
            w.append(request=r, step=s, position=p, layer=layer, group=g, indices=idx)
    tr = open_trace(path)
    assert tr.complete and tr.rows == len(rows)
    back = tr.read_all()
    assert len(back) == len(rows)
    for i, (r, s, p, layer, g, idx) in enumerate(rows):
        assert (back.request[i], back.step[i], back.position[i], back.layer[i], back.group[i]) == (
            r,
            s,
            p,
            layer,
            g,
        )
        np.testing.assert_array_equal(back.row(i), idx)
    # iter_steps regroups the same rows step by step
    steps_seen = [int(b.step[0]) for b in tr.iter_steps()]
    assert steps_seen == sorted(set(steps_seen)) and len(steps_seen) == steps
    assert sum(len(b) for b in tr.iter_steps()) == len(rows)
    df = tr.to_pandas()
    assert list(df.columns) == ["request", "step", "position", "layer", "group", "indices"]
    assert tr.validate()["rows"] == len(rows)


def test_iter_steps_sorts_unordered_traces(tmp_path):
    path = tmp_path / "u.dsatrace"
    with TraceWriter(path, model=MODEL, indexer=INDEXER, part_rows=2) as w:
        for step in (2, 0, 1):
            w.append(request=0, step=step, position=10 + step, layer=0, group=0, indices=[1, 2])
    tr = open_trace(path)
    assert tr.manifest["order"] == "unordered"
    assert [int(b.step[0]) for b in tr.iter_steps()] == [0, 1, 2]


@pytest.mark.parametrize("part_rows", [1, 3, 100])  # the two copies in one part or apart
def test_a_row_written_twice_is_refused_by_validate_and_by_every_reader(tmp_path, part_rows):
    """Two rows for one (step, layer, request, group) would be replayed twice (the hit rate
    changed, silently): validate and iter_steps name them."""
    path = tmp_path / "d.dsatrace"
    with TraceWriter(path, model=MODEL, indexer=INDEXER, part_rows=part_rows) as w:
        for layer in (0, 1, 1):
            w.append(request=0, step=0, position=10, layer=layer, group=0, indices=[1, 2])
        w.append(request=0, step=1, position=11, layer=0, group=0, indices=[1, 2])
    tr = open_trace(path)
    needle = "two rows for step 0, layer 1, request 0, group 0"
    with pytest.raises(TraceError, match=needle):
        tr.validate()
    with pytest.raises(TraceError, match=needle):
        list(tr.iter_steps())


def test_bytes_per_index_below_two_on_realistic_rows(tmp_path):
    from dsacache.tracer import preset, synthesize

    path = synthesize(
        preset("deepseek-v3.2", steps=3, layers=8, context=32768), tmp_path / "d.dsatrace"
    )
    info = open_trace(path).validate()
    assert info["bytes_per_index"] < 2.0


def test_writer_rejects_bad_rows_before_writing(tmp_path):
    with pytest.raises(TraceError, match="outside 0 <= index < position"):
        with TraceWriter(tmp_path / "a.dsatrace", model=MODEL, indexer=INDEXER) as w:
            w.append(request=0, step=0, position=5, layer=0, group=0, indices=[1, 5])
    with pytest.raises(TraceError, match="unique and ascending"):
        with TraceWriter(tmp_path / "b.dsatrace", model=MODEL, indexer=INDEXER) as w:
            w.append(request=0, step=0, position=9, layer=0, group=0, indices=[3, 2])


def test_writer_refuses_to_overwrite(tmp_path):
    path = tmp_path / "t.dsatrace"
    TraceWriter(path, model=MODEL, indexer=INDEXER).close()
    with pytest.raises(TraceError, match="already exists"):
        TraceWriter(path, model=MODEL, indexer=INDEXER)


def _write(path, rows=12, part_rows=4):
    with TraceWriter(path, model=MODEL, indexer=INDEXER, part_rows=part_rows) as w:
        for s in range(rows):
            w.append(request=0, step=s, position=20 + s, layer=0, group=0, indices=[0, 3, 7 + s])
    return path


def test_iter_steps_reading_ahead_yields_the_same_steps_and_errors(tmp_path):
    path = _write(tmp_path / "t.dsatrace", rows=12, part_rows=4)  # 3 parts
    tr = open_trace(path)
    plain = [(b.step.tolist(), b.indices.tolist()) for b in tr.iter_steps()]
    ahead = [(b.step.tolist(), b.indices.tolist()) for b in tr.iter_steps(read_ahead=True)]
    assert ahead == plain and len(plain) == 12
    first = next(iter(tr.iter_steps(read_ahead=True)))  # left unfinished: nothing hangs
    assert first.step.tolist() == [0]
    (path / "part-00002.parquet").unlink()
    got = []
    with pytest.raises(TraceError, match="part-00002.parquet: part listed in manifest.json"):
        for b in open_trace(path).iter_steps(read_ahead=True):
            got.append(int(b.step[0]))
    assert got == list(range(7))  # the steps before the missing part (its first step is held)


def test_missing_part(tmp_path):
    path = _write(tmp_path / "t.dsatrace")
    (path / "part-00001.parquet").unlink()
    with pytest.raises(
        TraceError, match="part-00001.parquet: part listed in manifest.json is missing"
    ):
        open_trace(path).validate()


def test_truncated_part(tmp_path):
    path = _write(tmp_path / "t.dsatrace")
    f = path / "part-00002.parquet"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(TraceError, match="truncated"):
        open_trace(path).validate()


def test_checksum_mismatch(tmp_path):
    path = _write(tmp_path / "t.dsatrace")
    f = path / "part-00000.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="checksum mismatch"):
        open_trace(path).validate()


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_unknown_schema_version(tmp_path):
    path = _write(tmp_path / "t.dsatrace")
    _edit_manifest(path, schema_version=99)
    with pytest.raises(TraceError, match="schema_version 99 is not supported"):
        open_trace(path)


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("indexer", "k", "abc"),
        ("indexer", "k", -3),
        ("model", "layers", 0),
        ("model", "layers", 1.5),
    ],
)
def test_a_manifest_with_a_bad_k_or_layer_count_is_refused(tmp_path, section, key, value):
    path = _write(tmp_path / "t.dsatrace")
    m = json.loads((path / "manifest.json").read_text())
    _edit_manifest(path, **{section: {**m[section], key: value}})
    with pytest.raises(TraceError, match=rf"{section}.{key} must be an integer >= 1, got"):
        open_trace(path)


def test_not_a_trace(tmp_path):
    with pytest.raises(TraceError, match="no such trace"):
        open_trace(tmp_path / "nope.dsatrace")
    (tmp_path / "empty.dsatrace").mkdir()
    with pytest.raises(TraceError, match="no manifest.json"):
        open_trace(tmp_path / "empty.dsatrace")


def _rewrite_part(path, table_fn):
    """Replace part 0 with a modified table and fix up its manifest entry (size and sha)."""
    import hashlib

    import pyarrow.parquet as pq

    f = path / "part-00000.parquet"
    table = table_fn(pq.read_table(f))
    pq.write_table(table, f)
    m = json.loads((path / "manifest.json").read_text())
    data = f.read_bytes()
    m["parts"][0].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), rows=table.num_rows
    )
    (path / "manifest.json").write_text(json.dumps(m))


def test_index_out_of_range_in_stored_part(tmp_path):
    import pyarrow as pa

    path = _write(tmp_path / "t.dsatrace")

    def shrink_position(t):
        return t.set_column(2, "position", pa.array([2] * t.num_rows, pa.int32()))

    _rewrite_part(path, shrink_position)
    with pytest.raises(TraceError, match=r"part-00000.parquet: row 0 .*index 3 is outside"):
        open_trace(path).validate()


def test_unsorted_indices_in_stored_part(tmp_path):
    import pyarrow as pa

    path = _write(tmp_path / "t.dsatrace")

    def reverse(t):
        lists = [list(reversed(x)) for x in t.column("indices").to_pylist()]
        return t.set_column(5, "indices", pa.array(lists, pa.list_(pa.int32())))

    _rewrite_part(path, reverse)
    with pytest.raises(TraceError, match="unique and ascending"):
        open_trace(path).validate()


def test_missing_column(tmp_path):
    path = _write(tmp_path / "t.dsatrace")
    _rewrite_part(path, lambda t: t.drop(["layer"]))
    with pytest.raises(TraceError, match="missing column"):
        open_trace(path).validate()


def test_killed_writer_leaves_valid_prefix(tmp_path):
    """SIGKILL a writer mid-capture: every part finished before the kill validates."""
    path = tmp_path / "killed.dsatrace"
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        from dsacache.traces import TraceWriter
        w = TraceWriter({str(path)!r}, model={{"name": "t"}}, indexer={{"k": 16}}, part_rows=50)
        rng = np.random.default_rng(0)
        step = 0
        while True:
            for layer in range(4):
                w.append(request=0, step=step, position=1000 + step, layer=layer, group=0,
                         indices=np.sort(rng.choice(1000 + step, 16, replace=False)))
            step += 1
            if step == 40:
                print("ready", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    tr = open_trace(path)
    assert not tr.complete
    info = tr.validate()
    assert info["parts"] >= 3 and info["rows"] == 50 * info["parts"]
    out = subprocess.run(
        [sys.executable, "-m", "dsacache.cli", "validate", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "incomplete" in out.stdout


def test_selection_batch_take_and_concat():
    b = SelectionBatch(
        request=np.array([0, 1, 2]),
        step=np.zeros(3, int),
        position=np.full(3, 10),
        layer=np.zeros(3, int),
        group=np.zeros(3, int),
        offsets=np.array([0, 2, 2, 5]),
        indices=np.array([1, 2, 3, 4, 5], np.int32),
    )
    t = b.take(np.array([2, 0]))
    assert (
        t.request.tolist() == [2, 0]
        and t.row(0).tolist() == [3, 4, 5]
        and t.row(1).tolist() == [1, 2]
    )
    c = SelectionBatch.concat([t, b])
    assert len(c) == 5 and c.row(4).tolist() == [3, 4, 5] and c.row(3).tolist() == []
    s = b.slice(1, 3)  # views of rows 1 and 2, offsets from 0
    assert s.offsets.tolist() == [0, 0, 3] and s.request.tolist() == [1, 2]
    assert s.row(1).tolist() == [3, 4, 5] and np.shares_memory(s.indices, b.indices)


def test_synth_killed_then_resumed_equals_uninterrupted(tmp_path):
    """SIGKILL a synth mid-run, resume it: the trace equals one written without interruption."""
    from dsacache.tracer import SynthConfig, synthesize

    cfg = SynthConfig(layers=6, groups=2, context=3000, steps=400, k=64, seed=5)
    whole = open_trace(synthesize(cfg, tmp_path / "whole.dsatrace", part_rows=97)).read_all()
    path = tmp_path / "killed.dsatrace"
    script = (
        "from dsacache.tracer import SynthConfig, synthesize\n"
        f"synthesize(SynthConfig(layers=6, groups=2, context=3000, steps=400, k=64, seed=5), {str(path)!r}, part_rows=97)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once a few parts are down, before the end
        manifest = path / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["parts"]) >= 5:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = open_trace(path)
    assert not killed.complete and 0 < killed.rows < len(whole)
    synthesize(cfg, path, part_rows=97, resume=True)
    back = open_trace(path)
    assert back.complete and back.rows == len(whole)
    got = back.read_all()
    for name in ("request", "step", "position", "layer", "group", "offsets", "indices"):
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name))


def test_resume_refuses_other_settings(tmp_path):
    from dsacache.tracer import SynthConfig, synthesize

    path = tmp_path / "t.dsatrace"
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(path, model={"name": "a"}, indexer={"k": 4}, part_rows=1) as w:
            w.append(request=0, step=0, position=9, layer=0, group=0, indices=[1])
            raise KeyboardInterrupt
    with pytest.raises(TraceError, match="different model"):
        TraceWriter(path, model={"name": "b"}, indexer={"k": 4}, resume=True)
    w = TraceWriter(path, model={"name": "a"}, indexer={"k": 4}, resume=True)
    assert w.rows_written == 1
    w.close()
    with pytest.raises(TraceError, match="already complete"):
        synthesize(SynthConfig(), path, resume=True)


def test_scores_round_trip_and_stay_aligned_with_indices(tmp_path):
    path = tmp_path / "scored.dsatrace"
    with TraceWriter(path, model=MODEL, indexer=INDEXER, part_rows=2) as w:
        for step in range(3):
            w.append(request=0, step=step, position=10 + step, layer=0, group=0,
                     indices=[1, 4, 7], scores=[0.5, 0.25, 0.125 * step])  # fmt: skip
    trace = open_trace(path)
    batch = trace.read_all()
    assert batch.scores.dtype == np.float32
    assert batch.scores.tolist() == [0.5, 0.25, 0.0, 0.5, 0.25, 0.125, 0.5, 0.25, 0.25]
    sub = batch.take(np.array([2, 0]))
    assert sub.scores.tolist() == [0.5, 0.25, 0.25, 0.5, 0.25, 0.0]
    assert trace.manifest["scored"] is True
    trace.validate()


def test_scores_must_match_indices_and_be_given_for_every_row(tmp_path):
    with TraceWriter(tmp_path / "a.dsatrace", model=MODEL, indexer=INDEXER) as w:
        with pytest.raises(TraceError, match="2 scores for 3 indices"):
            w.append(request=0, step=0, position=10, layer=0, group=0, indices=[1, 2, 3],
                     scores=[0.1, 0.2])  # fmt: skip
        with pytest.raises(TraceError, match="not finite"):
            w.append(request=0, step=0, position=10, layer=0, group=0, indices=[1],
                     scores=[float("nan")])  # fmt: skip
        w.append(request=0, step=0, position=10, layer=0, group=0, indices=[1], scores=[0.5])
        with pytest.raises(TraceError, match="rows without indexer scores in a trace"):
            w.append(request=0, step=1, position=11, layer=0, group=0, indices=[1])


def test_scores_beyond_float16_are_refused_before_writing(tmp_path):
    with TraceWriter(tmp_path / "big.dsatrace", model=MODEL, indexer=INDEXER) as w:
        with pytest.raises(TraceError, match="score 100000 is too large for the float16"):
            w.append(request=0, step=0, position=10, layer=0, group=0, indices=[1, 2],
                     scores=[1e5, 0.5])  # fmt: skip


def test_bundled_traces_open_by_name():
    from dsacache.traces import MAIN_TRACE, SMALL_TRACE, bundled

    assert {MAIN_TRACE, SMALL_TRACE, "smollm2-135m-lightning-k64"} <= set(bundled())
    trace = open_trace(SMALL_TRACE)
    assert trace.path.name == f"{SMALL_TRACE}.dsatrace" and trace.manifest["scored"] is True
    with pytest.raises(TraceError, match="nor a bundled trace name"):
        open_trace("smollm2-nonexistent")


def _first_bad_row(rows: list[np.ndarray], positions: list[int]) -> int | None:
    """Plain per-row statement of the format's index rules (the oracle for check_rows)."""
    for r, (idx, pos) in enumerate(zip(rows, positions, strict=True)):
        if any(i < 0 or i >= pos for i in idx) or any(
            idx[j + 1] <= idx[j] for j in range(len(idx) - 1)
        ):
            return r
    return None


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(1, 40), st.lists(st.integers(-3, 45), max_size=12)),
        min_size=1,
        max_size=8,
    ),
    int64=st.booleans(),
)
def test_check_rows_agrees_with_per_row_rules(rows, int64):
    """The vectorised validation (first and last index per row after an ascending check)
    rejects exactly the batches a per-row check rejects, naming the same row: empty rows,
    rows at either end, duplicates, negatives and out-of-range values included."""
    from dsacache.traces.format import check_rows

    positions = [p for p, _ in rows]
    values = [np.array(v, dtype=np.int64) for _, v in rows]
    lengths = np.array([len(v) for v in values])
    n = len(rows)
    batch = SelectionBatch(
        request=np.zeros(n, np.int32),
        step=np.zeros(n, np.int32),
        position=np.array(positions, np.int32),
        layer=np.arange(n, dtype=np.int16),
        group=np.zeros(n, np.int16),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        indices=np.concatenate(values).astype(np.int64 if int64 else np.int32),
    )
    bad = _first_bad_row(values, positions)
    if bad is None:
        check_rows(batch, "t")
    else:
        with pytest.raises(TraceError, match=rf"t: row {bad} "):
            check_rows(batch, "t")


def test_every_bundled_trace_is_intact_and_documented():
    """Each bundled trace validates (sha256 of every part, the row rules), has its provenance
    note beside it, and says where it was captured; those captured on a GPU went through the
    Triton kernels on an H100 (issue: traces from real kernels)."""
    from dsacache.traces import DATA_DIR, bundled

    gpu = []
    for name in bundled():
        trace = open_trace(name)
        summary = trace.validate()
        assert summary["complete"] and summary["rows"] == trace.rows > 0, name
        assert (DATA_DIR / f"{name}.md").read_text().startswith(f"# {name}\n"), name
        capture = trace.manifest["capture"]
        assert capture["command"].startswith("dsacache capture"), name
        if capture["config"]["device"].startswith("cuda"):
            assert capture["backend"]["name"] == "triton", name
            gpu.append(trace)
    assert len(gpu) >= 3
    assert all("H100" in t.manifest["capture"]["device"] for t in gpu)  # the GPU
    assert {t.indexer["kind"] for t in gpu} == {"oracle", "lightning"}
    assert max(t.indexer["k"] for t in gpu) == 1024
    assert all(t.manifest["totals"]["requests"] >= 4 for t in gpu)
    assert all(t.manifest["totals"]["max_position"] >= 2048 + 255 for t in gpu)


def test_rows_from_a_dense_step_array():
    """SelectionBatch.from_dense (the GPU capture's [L, B, G, W] copy, -1 padded) against a
    plain loop: step-major order layer, request, group; padding dropped."""
    rng = np.random.default_rng(3)
    layers, batch, groups, width = 3, 2, 2, 6
    positions = rng.integers(width, 40, size=(layers, batch))
    dense = np.full((layers, batch, groups, width), -1, np.int32)
    for (layer, req, grp), _ in np.ndenumerate(dense[..., 0]):
        n = int(rng.integers(0, width + 1))
        dense[layer, req, grp, :n] = np.sort(rng.choice(positions[layer, req], n, replace=False))
    got = SelectionBatch.from_dense(7, positions, dense)
    i = 0
    for (layer, req, grp), _ in np.ndenumerate(dense[..., 0]):
        key = (got.step[i], got.layer[i], got.request[i], got.group[i], got.position[i])
        assert key == (7, layer, req, grp, positions[layer, req])
        row = dense[layer, req, grp]
        np.testing.assert_array_equal(got.row(i), row[row >= 0])
        i += 1
    assert i == len(got)
    with pytest.raises(TraceError, match=r"positions has shape \(2, 2\); expected \(3, 2\)"):
        SelectionBatch.from_dense(7, positions[:2], dense)
