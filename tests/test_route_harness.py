"""The two-GPU route-vs-fetch harness: its pieces by hand, and a dry run of both strategies
between two real processes on gloo (the Triton kernels under the interpreter)."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("triton")
from dsacache.kernels import route_harness as rh  # noqa: E402


def test_split_puts_the_asked_share_of_each_selection_on_the_peer():
    sel = np.array([[1, 5, 9, 13], [2, 3, 4, 100]])
    split = rh.split_at_share(sel, 0.5)
    assert split.tolist() == [9, 4]
    assert ((sel >= split[:, None]).sum(1) == 2).all()
    assert (rh.split_at_share(sel, 0.0) == sel[:, -1]).all()  # at least one token on the peer
    assert (rh.split_at_share(sel, 1.0) == sel[:, 1]).all()  # at least one stays home


def test_prediction_adds_the_terms_and_overlaps_home_attention_with_the_route():
    terms = {
        "attend": pd.Series({0: 10e-6, 1000: 20e-6}),
        "gather": pd.Series({0: 2e-6, 1000: 3e-6}),
        "land": pd.Series({0: 1e-6, 1000: 2e-6}),
        "merge": pd.Series({2: 5e-6}),
    }
    latency, bandwidth = 10e-6, 1e9  # 1 byte per ns
    fetch, route = rh.predict(terms, (latency, bandwidth), batch=1, heads=2, n_home=500,
                              n_peer=500)  # fmt: skip
    send = lambda b: latency + b / bandwidth  # noqa: E731
    want_fetch = send(2000) + 2.5e-6 + send(500 * 656) + 1.5e-6 + 20e-6
    assert fetch == pytest.approx(want_fetch)
    remote = send(2 * 576 * 2) + send(2000) + 15e-6 + send(2 * 512 * 2) + send(2 * 4)
    assert route == pytest.approx(max(15e-6, remote) + 5e-6)


def test_link_fit_recovers_latency_and_bandwidth():
    sizes = np.array([4, 4096, 1 << 20, 1 << 24])
    probe = pd.DataFrame({"bytes": sizes, "seconds": 3e-6 + sizes / 50e9})
    latency, bandwidth = rh.fit_link(probe)
    assert latency == pytest.approx(3e-6, rel=1e-6) and bandwidth == pytest.approx(50e9, rel=1e-6)


def test_grid_has_at_least_twelve_configurations_per_the_validation_plan():
    grid = rh.configs(tiny=False)
    assert len(grid) >= 12
    assert {c.source for c in grid} == {"synthetic", "bundled"}


def test_dry_run_on_two_processes_gives_the_same_output_for_both_strategies(tmp_path):
    out = tmp_path / "harness.parquet"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dsacache.kernels.route_harness", "--device", "cpu", "--tiny", "--steps", "1",
           "--repeats", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == 2 and set(df.source) == {"synthetic", "bundled"}
    assert (df.max_abs_diff < 0.05).all()  # route + merge == fetch + one attention (bf16)
    assert (df.n_peer > 0).all() and (df.n_home > 0).all()
    for col in ("fetch_s", "route_s", "fetch_pred_s", "route_pred_s"):
        assert (df[col] > 0).all()
    assert "route_harness" in df.meta_command.iloc[0]
    summary = rh.summarize(df)
    assert summary["configurations"] == 2
