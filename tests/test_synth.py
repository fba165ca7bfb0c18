import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.errors import DsacacheError
from dsacache.tracer import PRESETS, SynthConfig, preset, synthesize
from dsacache.traces import open_trace


def _rows_by_stream(tr):
    b = tr.read_all()
    out = {}
    for i in range(len(b)):
        out.setdefault((b.request[i], b.layer[i], b.group[i]), []).append(set(b.row(i).tolist()))
    return out


def test_knobs_shape_the_trace(tmp_path):
    cfg = SynthConfig(
        layers=2,
        groups=2,
        requests=2,
        context=5000,
        steps=20,
        k=100,
        keep=0.7,
        layer_variation=0.0,
        sinks=3,
        seed=1,
    )
    tr = open_trace(synthesize(cfg, tmp_path / "a.dsatrace"))
    info = tr.validate()
    assert (
        info["rows"],
        info["steps"],
        info["layers"],
        info["groups"],
        info["requests"],
        info["k"],
    ) == (160, 20, 2, 2, 2, 100)
    for sets in _rows_by_stream(tr).values():
        assert all(len(s) == 100 and {0, 1, 2} <= s for s in sets)
        # round(keep * k) picks carry over; fresh picks may re-hit a dropped token now and then
        kept = np.mean(
            [len((a & b) - {0, 1, 2}) / 100 for a, b in zip(sets, sets[1:], strict=False)]
        )
        assert 0.70 <= kept < 0.74


def test_keep_zero_vs_one(tmp_path):
    base = dict(
        layers=1,
        context=20000,
        steps=6,
        k=64,
        layer_variation=0.0,
        sinks=0,
        recency_weight=0.0,
        return_weight=0.0,
    )
    same = _rows_by_stream(
        open_trace(synthesize(SynthConfig(keep=1.0, **base), tmp_path / "a.dsatrace"))
    )
    (sets,) = same.values()
    assert all(s == sets[0] for s in sets)
    fresh = _rows_by_stream(
        open_trace(synthesize(SynthConfig(keep=0.0, **base), tmp_path / "b.dsatrace"))
    )
    (sets,) = fresh.values()
    assert np.mean([len(a & b) for a, b in zip(sets, sets[1:], strict=False)]) < 3


def test_recency_window(tmp_path):
    cfg = SynthConfig(
        layers=1,
        context=50000,
        steps=4,
        k=200,
        keep=0.0,
        recency_weight=1.0,
        return_weight=0.0,
        recency_window=400,
        sinks=0,
    )
    b = open_trace(synthesize(cfg, tmp_path / "r.dsatrace")).read_all()
    assert (b.indices >= 50000 - 400).all()


def test_short_context_selects_everything(tmp_path):
    b = open_trace(
        synthesize(SynthConfig(layers=1, context=10, steps=3, k=64), tmp_path / "s.dsatrace")
    ).read_all()
    assert [b.row(i).tolist() for i in range(3)] == [list(range(10 + i)) for i in range(3)]


def test_deterministic(tmp_path):
    cfg = preset("smollm2-135m", steps=3)
    a = open_trace(synthesize(cfg, tmp_path / "a.dsatrace")).read_all()
    b = open_trace(synthesize(cfg, tmp_path / "b.dsatrace")).read_all()
    np.testing.assert_array_equal(a.indices, b.indices)


def test_presets():
    assert PRESETS["deepseek-v3.2"].layers == 61 and PRESETS["deepseek-v3.2"].k == 2048
    assert PRESETS["smollm2-135m"].layers == 30 and PRESETS["smollm2-135m"].groups == 3
    with pytest.raises(DsacacheError, match="unknown preset"):
        preset("nope")


@pytest.mark.parametrize(
    "field,value", [("k", 0), ("keep", 1.5), ("layers", 0), ("recency_weight", -0.1)]
)
def test_bad_knobs(tmp_path, field, value):
    with pytest.raises(DsacacheError, match=field):
        synthesize(SynthConfig(**{field: value}), tmp_path / "x.dsatrace")


def test_a_synth_spec_names_a_reproducible_trace(tmp_path):
    from dsacache.tracer.synth import materialize, parse_spec

    cfg = parse_spec("synth:deepseek-v3.2:context=300,k=16,requests=2,layers=3,steps=2,keep=0.7")
    assert (cfg.context, cfg.k, cfg.requests, cfg.layers, cfg.steps) == (300, 16, 2, 3, 2)
    assert cfg.keep == 0.7 and cfg.model["layout"] == "mla-fp8"
    assert parse_spec("synth:smollm2-135m").groups == 3  # the preset's knobs
    spec = "synth:deepseek-v3.2:context=300,k=16,requests=2,layers=3,steps=2"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = open_trace(materialize(spec, tmp_path / "a"))
    b = open_trace(materialize(spec, tmp_path / "b"))
    for x, y in zip(a.iter_steps(), b.iter_steps(), strict=True):
        np.testing.assert_array_equal(x.indices, y.indices)
    assert materialize("smollm2-135m-oracle-k64", tmp_path) == "smollm2-135m-oracle-k64"
    for bad, msg in (
        ("synth:gpt-9", "unknown preset 'gpt-9'"),
        ("synth:deepseek-v3.2:ctx=9", "'ctx=9' is not KNOB=VALUE with a knob of: layers"),
        ("synth:deepseek-v3.2:k=lots", "k needs a number, got 'lots'"),
        ("synth:deepseek-v3.2:k=0", "k must be >= 1, got 0"),
        ("deepseek-v3.2", "does not start with 'synth:'"),
    ):
        with pytest.raises(DsacacheError, match=re.escape(msg)):
            parse_spec(bad)


_ALL_FROM_WINDOW_OR_RETURNING = [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3), (0.6, 0.4), (0.5, 0.5)]


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 300),
    context=st.integers(1, 5000),
    keep=st.floats(0.0, 1.0),
    weights=st.one_of(
        st.tuples(st.floats(0.0, 0.9), st.floats(0.0, 1.0)).map(
            lambda w: (w[0], w[1] * (0.9 - w[0]))  # some draws from all positions
        ),
        st.sampled_from(_ALL_FROM_WINDOW_OR_RETURNING),
    ),
    history=st.integers(0, 5),
    sinks=st.integers(0, 8),
    recency_window=st.integers(0, 600),
    advances=st.lists(st.integers(0, 300), min_size=6, max_size=6),
    seed=st.integers(0, 2**31),
)
def test_selector_draws_what_the_set_operation_reference_draws(
    k, context, keep, weights, history, sinks, recency_window, advances, seed
):
    """The selector keeps its sets as masks; the reference (tests/synth_reference.py) uses
    sorted-array set operations. Same generator draws, so the same selections, step by step;
    where every draw comes from the recency window or the returning tokens, the selector
    raises exactly where the reference could never fill the step."""
    from synth_reference import NeverFills, ReferenceSelector

    from dsacache.tracer.synth import _Selector

    cfg = SynthConfig(k=k, context=context, keep=keep, recency_weight=weights[0],
                      return_weight=weights[1], history=history, sinks=sinks,
                      recency_window=recency_window, seed=seed)  # fmt: skip
    fast = _Selector(cfg, keep, np.random.default_rng(seed))
    slow = ReferenceSelector(cfg, keep, np.random.default_rng(seed))
    position = context
    for advance in advances:
        position += advance
        try:
            want = slow.next(position)
        except NeverFills:
            with pytest.raises(DsacacheError, match="lower the weights or widen"):
                fast.next(position)
            return
        got = fast.next(position)
        assert got.dtype == want.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    assert fast.rng.random() == slow.rng.random()  # no draw more or less


def test_a_spec_gives_the_trace_it_gave_when_the_gpu_profiles_were_measured(tmp_path):
    """Profiles bundled in dsacache/data name their traces by synth spec and are compared with
    traces made again from it: a change to the generator must not change what a spec gives."""
    import hashlib

    from dsacache.tracer.synth import materialize

    spec = "synth:deepseek-v3.2:context=3000,k=256,requests=2,layers=3,steps=4"
    got = open_trace(materialize(spec, tmp_path)).read_all()
    digest = hashlib.sha256(
        got.indices.astype("<i8").tobytes() + got.offsets.astype("<i8").tobytes()
    )
    assert digest.hexdigest() == "d7d1cf98387998a48cbe32f0aa69bda592fcbfc7c1fd7d2361b166234ecbf04e"


def test_draws_that_can_never_fill_a_step_are_refused(tmp_path):
    """Every draw from a 16-token recency window, or from it and the few tokens that return:
    a step of k = 64 can never fill. The generator used to loop forever."""
    from dsacache.tracer.synth import _Selector

    cfg = SynthConfig(k=64, context=1000, steps=4, keep=0.5, recency_window=16, sinks=4,
                      recency_weight=1.0, return_weight=0.0)  # fmt: skip
    with pytest.raises(DsacacheError, match=r"recency_weight \+ return_weight = 1 .* widen"):
        synthesize(cfg, tmp_path / "x.dsatrace")
    ok = SynthConfig(k=12, context=1000, steps=4, recency_window=16, sinks=4,
                     recency_weight=1.0, return_weight=0.0)  # fmt: skip
    assert open_trace(synthesize(ok, tmp_path / "y.dsatrace")).validate()["k"] == 12
    mixed = SynthConfig(k=64, context=1000, keep=0.0, recency_window=16, sinks=4, history=2,
                        recency_weight=0.6, return_weight=0.4)  # fmt: skip
    sel = _Selector(mixed, 0.0, np.random.default_rng(0))
    sel.past.append(np.arange(95, 164))
    sel.prev = np.arange(100, 164)
    sel.past.append(sel.prev)  # 5 tokens return; with the window, 21 for the 60 needed
    with pytest.raises(DsacacheError, match="21 of those are left for the 60"):
        sel.next(1000)
    sel.past.clear()  # none return: those draws fall back to all positions
    assert len(sel.next(1000)) == 64
