"""synth --like: statistics of a real trace carried over to a synthetic one at another scale."""

import pytest
from click.testing import CliRunner

from dsacache.cli import main
from dsacache.tracer import SynthConfig, synthesize
from dsacache.tracer.fit import like, measure
from dsacache.traces import bundled_path, open_trace

TOLERANCE = {"keep": 0.04, "return_weight": 0.05, "recency_weight": 0.05, "layer_variation": 0.05}


@pytest.fixture(scope="module")
def real():
    return open_trace(bundled_path("smollm2-135m-oracle-k64"))


def test_fitted_synthesis_reproduces_real_statistics(real, tmp_path):
    target = measure(real)
    cfg = like(
        real,
        SynthConfig(layers=30, requests=2, context=1024, steps=48, k=64, model=dict(real.model)),
    )
    got = measure(open_trace(synthesize(cfg, tmp_path / "same.dsatrace")))
    for name, tol in TOLERANCE.items():
        assert abs(got[name] - target[name]) < tol, (name, got[name], target[name])


def test_fitted_knobs_carry_to_another_scale(real, tmp_path):
    target = measure(real)
    cfg = like(real, SynthConfig(layers=8, context=8192, steps=12, k=512))
    got = measure(open_trace(synthesize(cfg, tmp_path / "big.dsatrace")))
    assert abs(got["keep"] - target["keep"]) < 0.06
    assert abs(got["return_weight"] - target["return_weight"]) < 0.08


def test_synth_like_cli(real, tmp_path):
    out = tmp_path / "ds.dsatrace"
    args = ["synth", "--preset", "deepseek-v3.2", "--like", str(real.path), "--layers", "2",
            "--steps", "3", "--context", "4096", "--out", str(out), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fitted to" in result.output and open_trace(out).validate()["layers"] == 2
