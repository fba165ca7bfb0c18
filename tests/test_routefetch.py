"""Route-vs-fetch cost model: hand-computed terms, the closed-form break-even, evaluation
against a plain per-owner loop, and the CLI."""

import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from dsacache.cli import main
from dsacache.errors import DsacacheError
from dsacache.simulator.layouts import make_layout
from dsacache.simulator.placement import parse_placement, place
from dsacache.simulator.routefetch import (
    Arch,
    CostModel,
    evaluate,
    resolve_arch,
    route_vs_fetch,
)
from dsacache.tracer import SynthConfig, synthesize
from dsacache.tracer.synth import PRESET_MODELS
from dsacache.traces import MAIN_TRACE, bundled, bundled_path, open_trace

# One head of absorbed MLA: query 576 x 2 B = 1152 B, return 512 x 2 + 4 = 1028 B.
ARCH = Arch("MLA", heads=1, qk_dim=576, v_dim=512, move_s_per_token=0.0)
ROUND = {
    "nvlink.probe_s": 2e-6,
    "nvlink.bandwidth": 1e9,  # 1 ns per byte
    "ib.probe_s": 10e-6,
    "ib.bandwidth": 0.5e9,  # 2 ns per byte
    "launch_s": 3e-6,
    "merge_s": 1e-6,
    "compute_s_per_token": 1e-8,
    "move_s_per_token": 1e-7,
}


def model(**extra):
    return CostModel.build(ARCH, 656, "h100-nvlink-ib", {**ROUND, **extra})


def test_terms_by_hand():
    m = model()
    f = {k: float(v) for k, v in m.fetch_terms(100, 1).items()}
    assert f == pytest.approx(
        {
            "probe": 2e-6,
            "transfer": 65.6e-6,
            "move": 10e-6,
            "compute": 1e-6,
            "return": 0,
            "merge": 0,
        }
    )
    r = {k: float(v) for k, v in m.route_terms(100, 1).items()}
    assert r == pytest.approx(
        {
            "probe": 2e-6,
            "transfer": 1.152e-6,
            "move": 0,
            "compute": 4e-6,
            "return": 1.028e-6,
            "merge": 1e-6,
        }
    )
    assert float(m.fetch_cost(100, 1)) == pytest.approx(78.6e-6)
    assert float(m.route_cost(100, 1)) == pytest.approx(9.18e-6)
    # over InfiniBand: probe 10 us, 2 ns per byte
    assert float(m.fetch_cost(10, 2)) == pytest.approx(10e-6 + 13.12e-6 + 1e-6 + 0.1e-6)
    assert float(m.route_cost(10, 2)) == pytest.approx(
        10e-6 + 2.304e-6 + 3e-6 + 0.1e-6 + 2.056e-6 + 1e-6
    )
    # tokens on the query's own GPU cost their compute only, either way
    assert float(m.fetch_cost(100, 0)) == pytest.approx(1e-6)
    assert float(m.route_cost(100, 0)) == pytest.approx(1e-6)


def test_break_even_by_hand():
    m = model()
    # intra: (1152 + 1028 + 1e9 * 4e-6) / (656 + 1e9 * 1e-7) = 6180 / 756
    assert m.break_even(1) == pytest.approx(6180 / 756)
    assert m.break_even("intra") == m.break_even(1)
    # inter: (2180 + 0.5e9 * 4e-6) / (656 + 0.5e9 * 1e-7) = 4180 / 706
    assert m.break_even("inter") == pytest.approx(4180 / 706)
    assert m.break_even(0) == math.inf
    assert m.decide(8, 1) == np.False_ and m.decide(9, 1) == np.True_
    assert m.decide(5, 2) == np.False_ and m.decide(6, 2) == np.True_
    with pytest.raises(DsacacheError, match="remote"):
        m.break_even("remote")


def test_default_coefficients_are_derived():
    m = CostModel.build(ARCH, 656, "h100-nvlink-ib")
    # compute: the roofline of one token (FLOPs vs its bytes from HBM); merge: read one partial
    flops = 2 * 1 * (576 + 512)
    assert m.compute_s_per_token == pytest.approx(max(flops / 400e12, 656 / 2.31e12))
    assert m.merge_s == pytest.approx(1028 / 2.31e12)
    assert m.links[2].probe_s == 16e-6 and m.links[2].bandwidth == 25e9  # Ma et al., IB
    assert "uncalibrated" in m.table().attrs["status"]
    with pytest.raises(DsacacheError, match="nosuch"):
        CostModel.build(ARCH, 656, "h100-nvlink-ib", {"nosuch": 1})
    with pytest.raises(DsacacheError, match="not a number"):
        CostModel.build(ARCH, 656, "h100-nvlink-ib", {"ib.probe_s": "fast"})
    with pytest.raises(DsacacheError, match="positive|> 0"):
        CostModel.build(ARCH, 656, "h100-nvlink-ib", {"ib.bandwidth": 0})
    with pytest.raises(DsacacheError, match="fabric"):
        CostModel.build(ARCH, 656, "tpu-torus")


def test_arch_shapes():
    ds = PRESET_MODELS["deepseek-v3.2"]
    arch = resolve_arch(ds, make_layout("mla-fp8", ds), 1)
    assert (arch.heads, arch.qk_dim, arch.v_dim) == (128, 576, 512)
    assert arch.query_bytes // arch.heads == 1152  # ~1 KB per routed query row (Ma et al.)
    assert arch.return_bytes == 128 * (512 * 2 + 4)
    sm = PRESET_MODELS["smollm2-135m"]
    gqa = resolve_arch(sm, make_layout("gqa", sm), 3)
    assert (gqa.name, gqa.heads, gqa.qk_dim) == ("GQA", 3, 64)  # 9 heads over 3 KV groups
    for name in ("gta", "gla"):
        assert resolve_arch(sm, make_layout(name, sm), 1).name == name.upper()


positive = st.floats(1e-3, 1e3)


@settings(max_examples=300, deadline=None)
@given(
    probe=st.floats(0, 50e-6),
    bw=st.floats(1e8, 1e12),
    b=st.integers(16, 1 << 16),
    q=st.integers(0, 1 << 20),
    r=st.integers(0, 1 << 20),
    launch=st.floats(0, 20e-6),
    merge=st.floats(0, 20e-6),
    move=st.floats(0, 2e-6),
    compute=st.floats(0, 1e-6),
    kind=st.sampled_from([1, 2]),
    scale=st.floats(0.0, 4.0),
)
def test_decision_flips_at_closed_form(
    probe, bw, b, q, r, launch, merge, move, compute, kind, scale
):
    link = "nvlink" if kind == 1 else "ib"
    over = {f"{link}.probe_s": probe, f"{link}.bandwidth": bw, "query_bytes": q,
            "return_bytes": r, "launch_s": launch, "merge_s": merge,
            "move_s_per_token": move, "compute_s_per_token": compute}  # fmt: skip
    m = CostModel.build(ARCH, b, "h100-nvlink-ib", over)
    star = m.break_even(kind)
    assert star >= 0
    eps = 1e-6 * max(star, 1e-3)
    assert not m.decide(max(star - eps, 0.0), kind)  # just below: fetch
    assert m.decide(star + eps, kind)  # just above: route
    n = star * scale  # anywhere else: the predicate is the closed form
    if abs(n - star) > eps:
        assert bool(m.decide(n, kind)) == (n > star)
    # integer token counts
    for k in (math.floor(star), math.floor(star) + 1):
        if abs(k - star) > eps:
            assert bool(m.decide(k, kind)) == (k > star)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    cfg = SynthConfig(
        layers=2, requests=2, context=2000, steps=3, k=96, seed=1,
        model=PRESET_MODELS["deepseek-v3.2"],
    )  # fmt: skip
    return open_trace(synthesize(cfg, tmp_path_factory.mktemp("rf") / "t.dsatrace"))


def test_evaluate_matches_per_owner_loop(trace):
    p = parse_placement("pages:hash,seed=2,page_tokens=16", 4, 2)
    m = CostModel.build(ARCH, 656, "h100-nvlink-ib", ROUND)
    pc = place(trace, p, layout="mla-fp8")
    res = evaluate(pc, m)
    for i in range(len(pc)):
        home = int(pc.home[i])
        fetch = route = best = pc.counts[i, home] * m.compute_s_per_token
        routed = 0
        for o in range(p.owners):
            n = int(pc.counts[i, o])
            if o == home or n == 0:
                continue
            kind = 1 if o // 4 == home // 4 else 2
            f, r = float(m.fetch_cost(n, kind)), float(m.route_cost(n, kind))
            fetch, route, best = fetch + f, route + r, best + min(f, r)
            routed += r < f
        u = res.units.iloc[i]
        assert u["fetch_s"] == pytest.approx(fetch)
        assert u["route_s"] == pytest.approx(route)
        assert u["model_s"] == pytest.approx(best)
        assert u["routed_owners"] == routed
    t = res.totals()
    assert t["saving_vs_fetch_pct"] >= 0 and t["saving_vs_route_pct"] >= 0
    assert res.terms.loc[:, "model"].sum() == pytest.approx(res.units["model_s"].sum())
    assert res.terms.loc[:, "fetch"].sum() == pytest.approx(res.units["fetch_s"].sum())
    steps = res.per_step()
    assert len(steps) == 3
    assert steps["model_ms"].sum() == pytest.approx(res.units["model_s"].sum() * 1e3)


def test_one_owner_has_nothing_remote(trace):
    res = route_vs_fetch(trace, "pages:rr", gpus=1, nodes=1)
    assert (res.units["remote_owners"] == 0).all()
    t = res.totals()
    assert t["fetch_ms_per_step"] == t["route_ms_per_step"] == t["model_ms_per_step"]


@pytest.mark.skipif(MAIN_TRACE not in bundled(), reason="no bundled trace")
def test_cli_route(tmp_path):
    path = bundled_path(MAIN_TRACE)
    runner = CliRunner()
    png = tmp_path / "r.png"
    args = ["route", str(path), "--gpus", "2", "--nodes", "2", "--requests", "1", "--rows", "4"]
    result = runner.invoke(main, [*args, "--plot", str(png), "--coef", "ib.probe_s=8e-6"])
    assert result.exit_code == 0, result.output
    for needle in ("break-even over nvlink", "break-even over ib", "vs always-fetch", "ib.probe_s"):
        assert needle in result.output
    assert png.stat().st_size > 10_000
    for bad, needle in (
        (["--fabric", "x"], "fabric"),
        (["--coef", "nope=1"], "nope"),
        (["--coef", "ib.probe_s"], "NAME=VALUE"),
        (["--nodes", "0"], "--nodes"),
        (["--coef", "nvlink.bandwidth=nan"], "nvlink.bandwidth='nan' is not a finite number"),
        (["--coef", "query_bytes=inf"], "query_bytes='inf' is not a finite number"),
        (["--plot", str(tmp_path / "r.txt")], "use a .png or .pdf or .svg file name"),
        (["--rows", "0"], "0 is not in the range x>=1"),
        (["--requests", "999"], "requests 999 must be between 1 and the trace's"),
    ):
        result = runner.invoke(main, ["route", str(path), *bad])
        assert result.exit_code == 2 and needle in result.output, result.output


@pytest.mark.skipif(MAIN_TRACE not in bundled(), reason="no bundled trace")
def test_cli_route_with_coefficients_measured_on_the_h200():
    from dsacache.calibration import route_coefficients

    path = bundled_path(MAIN_TRACE)
    args = ["route", str(path), "--gpus", "2", "--requests", "1", "--rows", "2"]
    runner = CliRunner()
    result = runner.invoke(main, [*args, "--layout", "mla-fp8", "--calibrated", "h200"])
    assert result.exit_code == 0, result.output
    coef = route_coefficients("h200")
    arch = resolve_arch(open_trace(path).model, make_layout("mla-fp8"), 1)
    m = CostModel.build(arch, 656, overrides=coef)
    assert f"more than {m.break_even(1):.1f} selected tokens" in result.output
    result = runner.invoke(main, [*args, "--calibrated", "h200"])  # the GQA layout of SmolLM2
    assert result.exit_code == 2 and "sparse MLA kernel timings" in result.output
