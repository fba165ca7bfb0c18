"""Trace statistics against a slow pure-Python reference built from the whole trace."""

import json
import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from dsacache.errors import DsacacheError
from dsacache.simulator.analyze import MAX_REUSE_DISTANCE, analyze
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import TraceWriter, open_trace


def _reference(trace, page_tokens, sinks, window, windows):
    """Per-row statistics with sets and dicts, stream by stream."""
    rows = trace.read_all()
    selections = defaultdict(dict)  # (request, layer, group) -> step -> set of indices
    positions = {}
    for i in range(len(rows)):
        key = (int(rows.request[i]), int(rows.layer[i]), int(rows.group[i]))
        selections[key][int(rows.step[i])] = set(rows.row(i).tolist())
        positions[(*key, int(rows.step[i]))] = int(rows.position[i])
    per_row, reuse, recency, ws = [], defaultdict(int), defaultdict(int), defaultdict(list)
    for (r, layer, g), by_step in selections.items():
        last = {}
        prev = None
        steps = sorted(by_step)
        for s in steps:
            cur, pos = by_step[s], positions[(r, layer, g, s)]
            if prev is None:
                jac = reused = math.nan
            else:
                inter = len(cur & by_step[prev])
                jac = inter / len(cur | by_step[prev])
                reused = inter / len(cur)
            pages = {i // page_tokens for i in cur}
            fetched = sum(min(page_tokens, pos - p * page_tokens) for p in pages)
            for i in cur:
                d = min(s - last[i], MAX_REUSE_DISTANCE) if i in last else 0
                reuse[(layer, g, d)] += 1
                recency[(layer, g, (pos - i).bit_length() - 1)] += 1
            ordered = sorted(cur)
            per_row.append(
                {
                    "step": s, "layer": layer, "group": g, "request": r, "jaccard": jac,
                    "reused": reused, "sink_share": sum(i < sinks for i in cur) / len(cur),
                    "window_share": sum(i >= pos - window for i in cur) / len(cur),
                    "recency_median": pos - ordered[(len(ordered) - 1) // 2],
                    "pages": len(pages), "fetched": fetched, "k": len(cur),
                }
            )  # fmt: skip
            for i in cur:
                last[i] = s
            prev = s
            for w in windows:
                if s - steps[0] >= w - 1:
                    seen = set().union(*(by_step[t] for t in steps if s - w < t <= s))
                    ws[(w, s, layer, g)].append(len(seen))
    return pd.DataFrame(per_row), reuse, recency, ws, selections


@pytest.fixture
def gappy_trace(tmp_path):
    """Requests that start at different steps and rows with fewer than k picks."""
    rng = np.random.default_rng(11)
    path = tmp_path / "gappy.dsatrace"
    model = {"name": "t", "layers": 3, "attention": "MLA", "layout": "mla-fp8"}
    with TraceWriter(path, model=model, indexer={"kind": "test", "k": 30}) as w:
        for step in range(9):
            for layer in range(3):
                for request in range(2):
                    if request == 1 and step < 3:
                        continue
                    pos = 150 + step
                    k = int(rng.integers(1, 31))
                    pool = np.r_[np.arange(0, 4), np.arange(100, pos)]  # sticky region
                    idx = np.unique(rng.choice(pool if rng.random() < 0.7 else pos, k))
                    w.append(
                        request=request, step=step, position=pos, layer=layer, group=0, indices=idx
                    )
    return path


@pytest.mark.parametrize("which", ["small", "gappy"])
def test_analyze_matches_reference(small_trace, gappy_trace, which):
    tr = open_trace(small_trace if which == "small" else gappy_trace)
    windows = (1, 2, 3, 5)
    stats = analyze(tr, page_tokens=16, sinks=4, window=24, windows=windows)
    ref, reuse, recency, ws, selections = _reference(tr, 16, 4, 24, windows)

    want = ref.groupby(["step", "layer", "group"]).mean(numeric_only=True)
    got = stats.selections.set_index(["step", "layer", "group"])
    for col in ("jaccard", "reused", "sink_share", "window_share", "recency_median", "pages"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-12, err_msg=col)
    token = stats.meta["token_bytes"]
    sums = ref.groupby(["step", "layer", "group"])[["k", "fetched"]].sum()
    np.testing.assert_array_equal(got["selected_bytes"], sums["k"] * token)
    np.testing.assert_array_equal(got["page_fetch_bytes"], sums["fetched"] * token)

    hist = stats.reuse.set_index(["layer", "group", "distance"])["count"]
    assert hist.sum() == sum(reuse.values())
    for key, n in reuse.items():
        assert hist.loc[key] == n, key
    rec = stats.recency.set_index(["layer", "group", "lo"])["count"]
    assert rec.sum() == sum(recency.values())
    for (layer, g, b), n in recency.items():
        assert rec.loc[(layer, g, 1 << b)] == n

    got_ws = stats.working_set.set_index(["window", "step", "layer", "group"])
    assert len(got_ws) == len(ws)
    for key, counts in ws.items():
        assert got_ws.loc[key, "tokens"] == pytest.approx(np.mean(counts)), key
        assert got_ws.loc[key, "bytes"] == sum(counts) * token

    # cross-layer Jaccard: mean over (request, group, step) where both layers selected
    pairs = defaultdict(list)
    for (r, la, g), by_step in selections.items():
        for (r2, lb, g2), other in selections.items():
            if (r2, g2) == (r, g):
                for s in set(by_step) & set(other):
                    a, b = by_step[s], other[s]
                    pairs[(la, lb)].append(len(a & b) / len(a | b))
    cross = stats.cross_layer.set_index(["layer_a", "layer_b"])
    for key, values in pairs.items():
        assert cross.loc[key, "jaccard"] == pytest.approx(np.mean(values), rel=1e-6), key
        assert cross.loc[key, "pairs"] == len(values)
    assert (np.diagonal(stats.cross_layer.pivot(index="layer_a", columns="layer_b",
                                                values="jaccard")) == 1).all()  # fmt: skip


def test_layer_table_and_summary(small_trace, tmp_path):
    stats = analyze(open_trace(small_trace))
    layers = stats.layers
    assert len(layers) == 3 * 2 and set(layers.columns) >= {
        "jaccard", "reused", "first_selection_share", "reuse_distance_mean",
        "working_set_1", "working_set_16", "page_fetch_amplification", "adjacent_layer_jaccard",
    }  # fmt: skip
    # a window of one step holds exactly one selection
    np.testing.assert_allclose(layers["working_set_1"], layers["k"])
    assert (layers["working_set_2"] >= layers["working_set_1"]).all()
    assert (layers["page_fetch_amplification"] >= 1).all()
    summary = stats.summary()
    assert 0 < summary["jaccard"] < 1 and summary["steps"] == 6
    assert summary["working_set_bytes"][1] == pytest.approx(summary["selected_bytes_per_step"])
    paths = stats.save(tmp_path / "stats")
    assert {p.name for p in paths} >= {"layers.parquet", "summary.json"}
    back = pd.read_parquet(tmp_path / "stats" / "selections.parquet")
    pd.testing.assert_frame_equal(back, stats.selections, check_dtype=False)
    assert json.loads((tmp_path / "stats" / "summary.json").read_text())["layers"] == 3
    stats.save(tmp_path / "csv", fmt="csv")
    assert (tmp_path / "csv" / "reuse.csv").exists()


def test_synthetic_knobs_show_up(tmp_path):
    """keep and sinks of the synthesizer are what the analyzer reads back."""
    cfg = SynthConfig(layers=2, context=2000, steps=12, k=100, keep=0.8, sinks=6,
                      layer_variation=0.0, seed=1, model={"attention": "MLA"})  # fmt: skip
    stats = analyze(open_trace(synthesize(cfg, tmp_path / "s.dsatrace")), sinks=6)
    s = stats.summary()
    assert s["sink_share"] == pytest.approx(0.06)
    assert 0.75 < s["reused"] < 0.95


def test_bad_options(small_trace, tmp_path):
    tr = open_trace(small_trace)
    with pytest.raises(DsacacheError, match="requests 5"):
        analyze(tr, requests=5)
    with pytest.raises(DsacacheError, match="page_tokens"):
        analyze(tr, page_tokens=0)
    with pytest.raises(DsacacheError, match="windows"):
        analyze(tr, windows=(0,))
    with pytest.raises(DsacacheError, match="format"):
        analyze(tr, requests=1).save(tmp_path / "x", fmt="xlsx")


def test_window_zero_in_the_manifest_is_respected(tmp_path):
    from dsacache.simulator.analyze import _defaults
    from dsacache.traces import TraceWriter, open_trace

    path = tmp_path / "w0.dsatrace"
    indexer = {"kind": "oracle", "k": 4, "sink": 2, "window": 0}
    with TraceWriter(path, model={"name": "t", "attention": "MLA"}, indexer=indexer) as w:
        w.append(request=0, step=0, position=10, layer=0, group=0, indices=[0, 1, 5, 9])
    assert _defaults(open_trace(path), None, None) == (2, 0)
