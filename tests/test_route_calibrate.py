"""The one-GPU route-vs-fetch calibration: term fits, path predictions, a CPU smoke run and
the bundled H200 measurement.

On the CPU the Triton kernels run under the interpreter on tiny shapes; the timings are then
meaningless, but every term and path is exercised end to end.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")
from dsacache import calibration  # noqa: E402
from dsacache.calibration import DATA_DIR  # noqa: E402
from dsacache.kernels import route_calibrate as rc  # noqa: E402
from dsacache.kernels.indexer import INTERPRET  # noqa: E402

# the kernels take CPU tensors only under the interpreter
DEVICE = "cpu" if INTERPRET else "cuda"


def _rows(term, ns, fn, role="fit"):
    return [dict(term=term, n=n, bytes=n, trial=t, seconds=fn(n) * (1 + 0.01 * (t - 1)), role=role)
            for n in ns for t in range(3)]  # fmt: skip


def _synthetic():
    """Terms with known shapes: attend is piecewise linear (a kink at 1024), the rest linear."""

    def attend(n):
        return 20e-6 + 1e-9 * n + (2e-9 * (n - 1024) if n > 1024 else 0.0)

    def gather(n):
        return 2e-6 + 0.6e-9 * n

    def copy(n):
        return 1e-6 + 0.2e-9 * n

    fit = (64, 256, 1024, 4096)
    rows = _rows("attend", fit, attend) + _rows("gather", fit, gather)
    rows += _rows("copy_d2d", fit, copy) + _rows("merge", (2, 4), lambda s: 5e-6 + 1e-6 * s)
    check = (512, 2048)
    rows += _rows("fetch_local", check, lambda n: gather(n) + copy(n) + attend(n), "check")
    rows += _rows("route_local", check, lambda n: 2 * attend(n) + 7e-6, "check")
    return pd.DataFrame(rows), attend


def test_table_prediction_interpolates_medians_and_sums_path_terms():
    df, attend = _synthetic()
    # The medians sit on the middle trial (factor 1.0), so interpolation is exact at the knots
    # and linear in between.
    assert calibration.predict_term(df, "attend", 1024) == pytest.approx(attend(1024))
    assert calibration.predict_term(df, "attend", 2560) == pytest.approx(
        (attend(1024) + attend(4096)) / 2
    )
    checked = calibration.check_paths(df, "table")
    assert set(checked.path) == {"fetch_local", "route_local"}
    # Between 1024 and 4096 the true attend is linear, so the table is exact there; at 512 the
    # path is linear between knots 256 and 1024 as well.
    assert np.abs(checked.error).max() < 1e-9


def test_linear_fit_misses_the_kink_that_the_table_follows():
    df, _ = _synthetic()
    terms = calibration.fit_terms(df).set_index("term")
    assert terms.at["gather", "per_unit_s"] == pytest.approx(0.6e-9, rel=1e-6)
    assert terms.at["gather", "intercept_s"] == pytest.approx(2e-6, rel=1e-6)
    assert terms.at["attend", "median_rel_err"] > 0.01
    linear = calibration.check_paths(df, "linear")
    assert np.abs(linear.error).max() > 0.01
    with pytest.raises(ValueError, match="no measurement of term 'copy_h2d'"):
        calibration.predict_term(df, "copy_h2d", 10)


def test_merge_partials_equals_attention_over_the_union():
    import torch

    torch.manual_seed(0)
    q = torch.randn(4, 16, device=DEVICE)
    k = torch.randn(10, 16, device=DEVICE)
    v = torch.randn(10, 8, device=DEVICE)

    def attend(sel):
        s = q @ k[sel].T
        lse = torch.logsumexp(s, -1)
        return (torch.softmax(s, -1) @ v[sel])[None].to(torch.bfloat16), lse[None]

    parts = [attend(torch.arange(0, 4, device=DEVICE)), attend(torch.arange(4, 10, device=DEVICE))]
    out, lse = rc.merge_partials(parts)
    full, full_lse = attend(torch.arange(10, device=DEVICE))
    torch.testing.assert_close(out.float(), full.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, full_lse, atol=1e-4, rtol=1e-4)


def test_smoke_run_measures_every_term_and_path():
    df = rc.measure(DEVICE, fit_tokens=(64, 128), check_tokens=(96,), partials=(2,),
                    pool_tokens=1024, reps=1, trials=1)  # fmt: skip
    host_copies = {"copy_d2h", "copy_h2d"} if DEVICE == "cuda" else set()  # measured on a GPU
    assert set(df.term) == {"attend", "gather", "copy_d2d", "merge", "fetch_local",
                            "route_local"} | host_copies  # fmt: skip
    assert (df.seconds > 0).all()
    assert set(calibration.check_paths(df).path) == {"fetch_local", "route_local"}


def test_bundled_h200_calibration_predicts_held_out_paths_within_5_percent_on_average():
    df = pd.read_parquet(DATA_DIR / "h200" / "route-calibration.parquet")
    assert df["meta_gpu"].iloc[0] == "NVIDIA H200"
    checked = calibration.check_paths(df, "table")
    assert len(checked) == 10
    assert checked.error.abs().mean() < 0.05
    assert checked.error.abs().max() < 0.06


def test_measured_coefficients_feed_the_cost_model():
    coef = calibration.route_coefficients("h200")
    assert 0 < coef["move_s_per_token"] < 5e-9  # an on-GPU gather: ~0.65 ns per 656-B token
    assert 1e-5 < coef["launch_s"] < 1e-4 and 0 < coef["compute_s_per_token"] < 1e-8
    assert 20e9 < coef["pcie.bandwidth"] < 80e9  # pinned host copies over PCIe
    from dsacache.errors import DsacacheError

    with pytest.raises(DsacacheError, match="no route calibration for gpu 'h100'; measured: h200"):
        calibration.route_coefficients("h100")
