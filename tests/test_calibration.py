"""The model against the H100 and H200 measurements bundled in dsacache/data (real ncu runs)."""

import argparse
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from dsacache import calibration
from dsacache.errors import DsacacheError
from dsacache.tracer.synth import parse_spec
from dsacache.units import parse_size


def _reuse_error(model, gpu="h100"):
    m = calibration.measured(gpu, "reuse")
    second = m[m["role"] == "second"]
    sim = calibration.simulate_reuse(second["bytes"].tolist(), model)
    return np.abs(sim - second["hit"].to_numpy()).mean() * 100


def test_measurements_are_real_and_complete():
    m = calibration.measured("h100", "reuse")
    assert m["meta_gpu"].iloc[0] == "NVIDIA H100 80GB HBM3"
    assert "--cache-control none --replay-mode application" in m["meta_command"].iloc[0]
    second = m[m["role"] == "second"].set_index("bytes")["hit"]
    assert second[16 * 2**20] > 0.95 and second[48 * 2**20] < 0.05  # far below 50 MiB


def test_fitted_capacity_beats_the_nominal_l2():
    assert _reuse_error(calibration.H100_FIT) < 4.0
    assert _reuse_error(calibration.NAIVE) > 10.0


def test_fitted_model_predicts_dsa_decode_within_two_points():
    df = calibration.compare("h100", (calibration.H100_FIT,))
    err = df.groupby("experiment")["error_points"].apply(lambda e: e.abs().mean())
    assert err["decode-small"] < 2.0 and err["decode-large"] < 2.0
    # evict_first on the indexer keys: measured 37-44% KV hits at later steps, predicted ~35%
    hinted = df[
        (df["experiment"] == "decode-large-evict_first-normal") & df["point"].str.endswith("kv")
    ]
    later = hinted[~hinted["point"].str.startswith("step 0")]
    assert (later["measured"] > 0.3).all() and (later["simulated"] > 0.3).all()
    assert (later["error_points"].abs() < 8).all()


def test_unknown_measurement():
    with pytest.raises(DsacacheError, match="no measurement"):
        calibration.measured("h100", "nope")


def test_layer_subset_hints_measured_and_predicted_in_the_same_order():
    df = calibration.compare("h100", (calibration.H100_FIT,))
    kv = df[df["experiment"].str.startswith("decode-48l") & (df["point"] == "step 3 kv")]
    by = kv.set_index("experiment")
    order = ["decode-48l-first-from12", "decode-48l-first-from20", "decode-48l-first-from-1"]
    assert by.loc[order, "measured"].is_monotonic_decreasing
    assert by.loc[order, "simulated"].is_monotonic_decreasing
    assert (
        by.loc["decode-48l-first-from12", "measured"]
        > 4 * by.loc["decode-48l-first-from-1", "measured"]
    )


def test_hierarchy_coefficients_from_measured_kernel_times():
    h = calibration.fit_hierarchy("h100")
    hbm = h.levels["hbm"]
    assert 1.5e12 < hbm.bandwidth < 3.35e12  # below the HBM3 peak, as a read kernel achieves
    assert 0.5e-6 < hbm.latency_s < 10e-6
    assert h.l2_bandwidth > hbm.bandwidth


def test_real_sparse_mla_kernel_on_the_h100_predicted_within_six_points():
    """Our indexer + sparse MLA decode profiled on the H100 (16 layers, 32K, k 2048, batch 1;
    t03 plain, t10 with evict_first keys): the fitted model is within 6 points at every KV
    point and 1% of t03's DRAM bytes, and it sees the hint lift the later steps' KV hits."""
    m = pd.read_parquet(calibration.kernel_measurements("h100")[0])
    two = m[m["config"].isin(["t03", "t10"])]
    rows = [
        r
        for name, part in two.groupby("config")
        for r in calibration.compare_decode_step(
            name, part.reset_index(drop=True), (calibration.H100_FIT,)
        )
    ]
    df = calibration._errors(rows)
    kv = df[df["point"].str.endswith("kv")]
    assert len(kv) == 8 and (kv["error_points"].abs() < 6).all()
    assert (df[df["experiment"] == "t03"]["dram_error_pct"].abs() < 1).all()
    later = kv[~kv["point"].str.startswith("step 0")].set_index("experiment")
    for col in ("measured", "simulated"):
        assert later.loc["t10", col].min() > later.loc["t03", col].max() + 0.04


def test_h200_fit_beats_its_nominal_60_mib_and_predicts_held_out_decode():
    m = calibration.measured("h200", "reuse")
    assert m["meta_gpu"].iloc[0] == "NVIDIA H200" and int(m["meta_l2_bytes"].iloc[0]) == 62914560
    assert _reuse_error(calibration.H200_FIT, "h200") < 4.5
    assert _reuse_error(calibration.NAIVES["h200"], "h200") > 10.0
    df = calibration.compare("h200")  # only the experiments measured on the H200
    assert {"decode-small", "decode-large", "decode-large-persist5"} <= set(df["experiment"])
    fit = df[df["model"] == calibration.H200_FIT.label]
    err = fit.groupby("experiment")["error_points"].apply(lambda e: e.abs().mean())
    assert err["decode-small"] < 2.0 and err["decode-large"] < 2.0


def test_unknown_gpu_has_no_fitted_model():
    with pytest.raises(DsacacheError, match="no calibrated L2 model for gpu 'b200'"):
        calibration.fitted("b200")


def test_persisting_window_on_the_h200_and_its_model():
    # measured: a persisting window over the KV of layers 0-4 lifts their KV hits from ~4%
    m = calibration.measured("h200", "decode-large-persist5")
    kv = m[(m["role"] == "kv") & (m["step"] >= 1)]
    assert kv[kv["layer"] < 5]["hit"].mean() > 0.25 and kv[kv["layer"] >= 5]["hit"].mean() < 0.05
    df = calibration.compare("h200", (calibration.H200_FIT,))
    later = df[df["point"].str.endswith("kv") & ~df["point"].str.startswith("step 0")]
    # hit ratio 1.0: the model is 4-6 points high (the earlier "hash" 31 MiB 8-way fit was 3-4
    # high, but 25.5 points off on the evict_first keys, which the "mix" fit gets within 8.3);
    # fetching 64-B units (neighbours' sectors come along) adds about 0.35 points to both
    for name, tol in (("decode-large-persist5", 6.5), ("decode-large-persist5-half", 1.7)):
        rows = later[later["experiment"] == name]
        assert len(rows) == 3 and rows["error_points"].abs().max() < tol, rows
    # the model ranks the window's hit ratios as the GPU does
    full = later[later["experiment"] == "decode-large-persist5"]["simulated"].mean()
    half = later[later["experiment"] == "decode-large-persist5-half"]["simulated"].mean()
    assert full > half > 0.05


def test_compare_names_the_gpus_that_have_measurements():
    from click.testing import CliRunner

    from dsacache.cli import main

    result = CliRunner().invoke(main, ["compare", "--gpu", "a100"])
    assert result.exit_code == 2
    assert "no bundled measurements for gpu 'a100'; measured: h100, h200" in result.output


def test_evict_first_keys_that_fit_are_still_lost_because_the_l2_is_never_empty():
    """decode-small: 4.3 MB of indexer keys loaded evict_first reuse only 1-11% on both GPUs
    though they fit many times over. Starting the model's L2 full of stale lines (as the
    probe leaves it) predicts that; an empty L2 predicted ~100% (38-39 points off)."""
    name = "decode-small-evict_first-evict_last"
    errors = {}
    for stale in (False, True):
        old, calibration.STALE_L2 = calibration.STALE_L2, stale
        try:
            df = calibration.compare("h100", (calibration.H100_FIT,))
        finally:
            calibration.STALE_L2 = old
        df = df[df["experiment"] == name]
        keys = df[df["point"].str.endswith("index") & ~df["point"].str.startswith("step 0")]
        assert (keys["measured"] < 0.15).all()
        errors[stale] = df["error_points"].abs().mean()
        kv = df[df["point"].str.endswith("kv")]
        assert (kv["error_points"].abs() < 6).all()  # the KV's own reuse: the same either way
    assert errors[False] > 30 and errors[True] < 3


def test_stale_lines_change_nothing_under_lru():
    m = calibration.measured("h100", "decode-small")
    empty_first = calibration.STALE_L2
    try:
        calibration.STALE_L2 = False
        empty = calibration.simulate_decode(m, calibration.H100_FIT)
        calibration.STALE_L2 = True
        stale = calibration.simulate_decode(m, calibration.H100_FIT)
    finally:
        calibration.STALE_L2 = empty_first
    assert np.array_equal(empty["simulated"].to_numpy(), stale["simulated"].to_numpy())


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_dram_bytes_are_predicted_with_64_byte_fill_units(gpu):
    fit = calibration.FITS[gpu]
    assert fit.fill == 64
    df = calibration.compare(gpu, (fit, replace(fit, fill=0)))
    err = df.groupby("model")["dram_error_pct"].apply(lambda e: e.abs().median())
    assert err[fit.label] < 1.0  # issue goal: median within 5%
    cold = df[df["point"].str.startswith("first gather") & df["experiment"].isin(
        ["gather", "gather-rows-656"])]  # fmt: skip
    by_model = cold.groupby("model")["dram_error_pct"]
    assert by_model.max()[fit.label] < 1.0  # 656-B rows: 11 units of 64 B per token
    assert by_model.max()[replace(fit, fill=0).label] < -3.5  # sectors alone: 4% short


def test_dram_error_in_points_of_bytes_read_stays_meaningful_where_dram_is_near_zero():
    """H100, 4-8 MiB read evict_last come back with almost no DRAM reads: there a relative
    DRAM error is huge for either model, while points of the bytes read through the L2 tell
    the fitted model (kept ways) from the naive one."""
    naive, fit = calibration.NAIVES["h100"], calibration.fitted("h100")
    df = calibration.compare("h100", (naive, fit))
    df = df[df["experiment"] == "hint-evict_last"]
    kept = df[df["point"].str.contains(r"second read, [48] MiB") & (df["model"] == fit.label)]
    assert (
        len(kept) > 0 and (kept["measured_dram_bytes"] < 0.05 * kept["measured_read_bytes"]).all()
    )
    diff = kept["simulated_dram_bytes"] - kept["measured_dram_bytes"]
    np.testing.assert_allclose(kept["dram_error_points"], 100 * diff / kept["measured_read_bytes"])
    points = df.groupby("model")["dram_error_points"].apply(lambda e: e.abs().median())
    assert points[fit.label] < 3 < 15 < points[naive.label]


def test_cold_gather_hits_come_from_rows_that_straddle_lines():
    """H200, cold L2: rows of 640 B (whole 128-B lines) hit 0.3% of sectors, as the model
    says; rows of 672 B (whole sectors, but not whole lines) hit 4.9% though no two rows
    share a sector: a warp's 128-B piece of a row spans two lines, and its 64-B fills serve
    the next piece (the model reads a row as one access and misses this)."""
    first = {}
    for row in (640, 656, 672):
        m = calibration.measured("h200", f"gather-rows-{row}")
        first[row] = m[m["role"] == "first"]["hit"].mean()
        assert int(m["bytes"].iloc[0]) == 2048 * row
    assert first[640] < 0.01 and first[672] > 0.04 and first[656] > 0.03
    df = calibration.compare("h200", (calibration.H200_FIT,))
    cold = df[df["point"].str.startswith("first gather")].groupby("experiment")["simulated"]
    assert (cold.max() < 0.01).all()


def test_compare_reads_any_probe_measurement_file(tmp_path):
    """``dsacache compare --measured FILE --out cmp.csv``: a probe's own command says how to
    simulate it (here a bundled H200 decode probe with eviction hints, as a user would have
    measured it); the GPU's fitted model comes from the file's metadata."""
    import pandas as pd
    from click.testing import CliRunner

    from dsacache.cli import main

    name = "decode-small-evict_first-evict_last"
    src = calibration.DATA_DIR / "h200" / f"l2-{name}.parquet"
    out = tmp_path / "cmp.csv"
    result = CliRunner().invoke(main, ["compare", "--measured", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = pd.read_csv(out)
    assert set(got["model"]) == {calibration.H200_FIT.label}
    assert set(got["policy"]) == {"hints:index=first,kv=last"}
    bundled = calibration.compare("h200", (calibration.H200_FIT,))
    bundled = bundled[bundled["experiment"] == name]
    assert len(got) == len(bundled) == 12
    np.testing.assert_allclose(got["simulated"], bundled["simulated"])
    np.testing.assert_allclose(got["error_points"], bundled["error_points"])
    assert got["dram_error_pct"].abs().median() < 1.0


def test_compare_refuses_files_it_cannot_simulate(tmp_path):
    from click.testing import CliRunner

    from dsacache.cli import main

    gone = _kernel_profile("t03", "h100")
    gone["meta_command"] = gone["meta_command"].str.replace(
        r"synth:\S+", "/tmp/not-kept.dsatrace", regex=True
    )
    gone.to_parquet(tmp_path / "gone.parquet")
    result = CliRunner().invoke(main, ["compare", "--measured", str(tmp_path / "gone.parquet")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cannot re-simulate the profiled decode: its trace is not here" in result.output
    probe = calibration.measured("h200", "decode-small").drop(columns=["role"])
    probe.to_parquet(tmp_path / "probe.parquet")
    result = CliRunner().invoke(main, ["compare", "--measured", str(tmp_path / "probe.parquet")])
    assert "lacks the columns bytes, role: not a `dsacache probe` measurement" in result.output
    other = calibration.measured("h200", "decode-small").assign(meta_command="python mine.py")
    other.to_parquet(tmp_path / "other.parquet")
    result = CliRunner().invoke(main, ["compare", "--measured", str(tmp_path / "other.parquet")])
    assert result.exit_code != 0 and "not a probe measurement" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    result = CliRunner().invoke(main, ["compare", "--measured", str(bad)])
    assert result.exit_code != 0 and "lacks the columns" in result.output
    m = calibration.measured("h200", "decode-small").assign(meta_gpu="NVIDIA B200")
    with pytest.raises(DsacacheError, match="no calibrated L2 model for 'NVIDIA B200'; pick"):
        calibration.gpu_of(m)


def test_compare_simulates_the_probe_as_measured(tmp_path):
    """The measurement's own --keep reaches the simulated selections; a window together with
    eviction hints has no model policy; "GH200" is not an H200."""
    m = calibration.measured("h200", "decode-small")
    base = calibration.compare_measurement("d", m, (calibration.H200_FIT,))
    less = m.assign(meta_command=m["meta_command"] + " --keep 0.1")
    other = calibration.compare_measurement("d", less, (calibration.H200_FIT,))
    kv = [(a["simulated"], b["simulated"]) for a, b in zip(base, other, strict=True)
          if a["point"].endswith("kv") and not a["point"].startswith("step 0")]  # fmt: skip
    assert all(b < a for a, b in kv)  # fewer picks kept: fewer KV hits at the next steps
    both = m.assign(meta_command=m["meta_command"] + " --persist-layers 2 --kv-evict evict_last")
    with pytest.raises(DsacacheError, match="persisting window and eviction hints"):
        calibration.compare_measurement("d", both, (calibration.H200_FIT,))
    with pytest.raises(DsacacheError, match="no calibrated L2 model for 'NVIDIA GH200'"):
        calibration.gpu_of(m.assign(meta_gpu="NVIDIA GH200"))
    assert calibration.gpu_of(m) == "h200"


def _kernel_profile(config: str, gpu: str = "h200"):
    m = pd.read_parquet(calibration.kernel_measurements(gpu)[0])
    return m[m["config"] == config].reset_index(drop=True)


@pytest.mark.parametrize("gpu,name", [("h100", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200")])
def test_kernel_profiles_cover_the_grid_and_read_back(gpu, name):
    """The bundled profiles of the real decode kernels: >= 24 configurations spanning
    contexts 8K-128K, k 256-2048, batch 1-64, both backends and GQA, hints and a window."""
    m = pd.read_parquet(calibration.kernel_measurements(gpu)[0])
    args = {c: calibration.driver_args(g) for c, g in m.groupby("config")}
    assert len(args) >= 24
    synth = [parse_spec(a.trace) for a in args.values() if a.trace.startswith("synth:")]
    assert {s.context for s in synth} >= {8192, 32768, 131072}
    assert {s.k for s in synth} >= {256, 2048} and {a.batch for a in args.values()} >= {1, 8, 64}
    assert {a.backend for a in args.values()} == {"triton", "flashmla"}
    assert {a.layout for a in args.values()} == {"mla-fp8", "gqa"}
    assert any(a.persist_layers for a in args.values()) and any(a.kv_evict for a in args.values())
    assert {name} == set(m["meta_gpu"]) and m["meta_command"].str.contains("ncu").all()
    a = args["t15"]
    assert (a.persist_layers, a.hit_ratio, a.set_aside) == (5, 1.0, "30MiB")
    steps = calibration.measured_steps(_kernel_profile("t15", gpu), layers=16)
    assert len(steps) == 8 and (steps["step"].value_counts() == 2).all()  # 4 steps x 2 classes


def test_compare_simulates_a_kernel_profile_from_its_command(tmp_path):
    """`compare --measured` on one profiled configuration: the persisting window's policy comes
    from the driver's command, the trace from its synth spec; the model predicts this one."""
    from click.testing import CliRunner

    from dsacache.cli import main

    _kernel_profile("t15").to_parquet(tmp_path / "t15.parquet")
    out = tmp_path / "cmp.csv"
    result = CliRunner().invoke(
        main, ["compare", "--measured", str(tmp_path / "t15.parquet"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    got = pd.read_csv(out)
    assert len(got) == 8 and set(got["experiment"]) == {"t15"}
    assert set(got["policy"]) == {"persist:window=kv,hit_ratio=1.0,set_aside=17301504"}
    kv = got[got["point"].str.endswith("kv")]
    assert (kv["simulated"].iloc[1:] > kv["simulated"].iloc[0] + 0.05).all()  # the window
    assert got["error_points"].abs().max() < 4
    assert got["dram_error_pct"].abs().median() < 1
    assert (got["raw_measured"] >= got["measured"]).all()  # ncu's rate counts the small reads


def test_query_reads_come_first_in_each_kernels_run(tmp_path):
    """With the ``query`` class each layer's indexer and attention reads are preceded by one
    read of each request's query (DeepSeek-V3.2 sizes: 64 x 128 and 128 x 576 bf16), at
    addresses past every pool, the same at every layer; the comparison counts each in its
    kernel's class (``kernel_classes``)."""
    from dsacache.simulator.stream import build_step, plan_replay
    from dsacache.simulator.workload import CLASS_ID, Workload
    from dsacache.tracer.synth import materialize
    from dsacache.traces import open_trace

    spec = "synth:deepseek-v3.2:context=500,k=32,requests=2,layers=3,steps=1"
    trace = open_trace(materialize(spec, tmp_path))
    rows = next(iter(trace.iter_steps()))
    wl = Workload(layout="mla-fp8", batch=2, classes=("index", "kv"))
    chunk = build_step(plan_replay(trace, wl), rows)
    amap = plan_replay(trace, Workload(**{**wl.__dict__, "classes": ("index", "kv", "query")}))
    raw = build_step(amap, rows)
    assert (amap.index_query_bytes, amap.kv_query_bytes) == (16384, 147456)
    query = raw.cls == CLASS_ID["query"]
    assert len(raw) == len(chunk) + 3 * 2 * 2 and query.sum() == 12
    assert (raw.addr[query] >= amap.query_base).all() and (raw.addr[~query] == chunk.addr).all()
    counted = calibration.kernel_classes(raw, amap)
    assert (counted[~query] == raw.cls[~query]).all() and not (counted == CLASS_ID["query"]).any()
    starts = np.flatnonzero(np.r_[True, (np.diff(raw.layer) != 0) | (np.diff(counted) != 0)])
    for s in starts:  # every kernel's run opens with its two requests' queries
        assert query[s] and query[s + 1] and not query[s + 2]
        size = 16384 if counted[s] == CLASS_ID["index"] else 147456
        assert raw.nbytes[s] == size and raw.addr[s + 1] - raw.addr[s] == size
    assert len({int(a) for a in raw.addr[query]}) == 4  # 2 requests x 2 kernels, all layers
    attention = calibration.attention_query(raw, amap)  # what a FlashMLA profile hints
    assert attention.sum() == 6 and (attention == query & (counted == CLASS_ID["kv"])).all()


def test_flashmla_query_is_simulated_evict_first():
    """FlashMLA loads its query evict_first (FLASHMLA_QUERY_EVICT; the reads are marked by
    ``attention_query``, tested above), and at batch 8 x k 256 (f07) the query fetched again
    at every layer is what brings the KV's DRAM bytes to the measured ones (47% low without
    it). A window cannot be modelled with it: that is refused."""
    m = _kernel_profile("f07")
    args = calibration.driver_args(m)
    assert calibration.query_hint(args) == "evict_first"
    base = calibration.fitted("h200")
    with pytest.raises(DsacacheError, match="persisting window"):
        windowed = argparse.Namespace(**(vars(args) | {"persist_layers": 4}))
        calibration.decode_policy(windowed, base, 62914560)
    policy, first_from = calibration.decode_policy(args, base, int(m["meta_l2_bytes"].iloc[0]))
    assert (policy, first_from) == ("hints:weights=first", -1)
    triton = calibration.driver_args(_kernel_profile("t02"))  # the same shape on our kernel
    assert calibration.decode_policy(triton, base, 62914560)[0] == base.policy
    got = pd.DataFrame(calibration.compare_decode_step("f07", m, (base,)))
    kv = got[got["point"].str.endswith("kv")]
    assert (kv["simulated_dram_bytes"] / kv["measured_dram_bytes"] - 1).abs().max() < 0.05
    assert (kv["simulated"] - kv["measured"]).abs().max() < 0.07  # 6.3 points at worst
    with pytest.raises(DsacacheError, match="profile f07 lacks meta_sms: profile it again"):
        calibration.compare_decode_step("f07", m.drop(columns=["meta_sms"]), (base,))


def _hint_measurement(evict: str) -> pd.DataFrame:
    """A ``hint`` probe measurement as ``dsacache probe hint`` writes it (hit rates made up:
    only the launch plan and the command matter to the simulation)."""
    command = ("ncu --cache-control none --replay-mode application python -m "
               f"dsacache.kernels.probes hint --plan p.json --sizes 256KiB "
               f"--between 0,512KiB,1MiB --evict {evict}")  # fmt: skip
    rows = [("first", 2**18, 0), ("second", 2**18, 0)]
    for x in (2**19, 2**20):
        rows += [("first", 2**18, x), ("between", x, x), ("second", 2**18, x)]
    return pd.DataFrame(
        [{"role": r, "bytes": b, "other_bytes": x, "hit": 0.5, calibration.DRAM: 1e5,
          calibration.READ: b // 32, "meta_command": command} for r, b, x in rows]
    )  # fmt: skip


def test_hint_probe_known_answers_on_a_small_model():
    """A 256 KiB buffer read with a hint, then 0, 512 KiB or 1 MiB of other data, then the
    buffer again, in a 1 MiB L2 full of stale lines: unhinted (and evict_last, which acts as
    normal without a set-aside) the buffer survives until the other data fill the L2; its
    evict_first lines are the first victims of every later fill, the buffer's own included,
    so almost none survive."""
    model = calibration.Model(capacity=2**20, ways=16)
    for evict, survives in (("", [1, 1, 0]), ("evict_last", [1, 1, 0]), ("evict_first", [0, 0, 0])):
        sim = calibration.simulate_hint(_hint_measurement(evict), model)
        assert (sim[sim["role"] == "first"]["simulated"] == 0).all()  # cold
        second = sim[sim["role"] == "second"]["simulated"]
        assert second.tolist() == pytest.approx(survives, abs=0.05)
    rows = calibration.compare_measurement("h", _hint_measurement(""), (model,))
    assert [r["point"] for r in rows][-1] == "second read, 0.25 MiB unhinted, 1 MiB between"
    rows = calibration.compare_measurement("h", _hint_measurement("evict_first"), (model,))
    assert {r["policy"] for r in rows} == {"hints:kv=first"} and len(rows) == 6
    assert {r["model"] for r in rows} == {model.label}  # the base model, as decode rows name it
    cold = rows[0]  # the first read at 0 between: every byte from memory
    assert cold["simulated_dram_bytes"] == 2**18 and cold["measured_dram_bytes"] == 1e5
    assert cold["measured_read_bytes"] == 2**18  # ncu's read sectors x 32 B


def _beside_measurement(
    evict: str, beside: str, layers: int = 3, kv_reads: int = 1, sizes: str = "128KiB"
) -> pd.DataFrame:
    """A ``beside`` probe measurement as ``dsacache probe beside`` writes it (hit rates made
    up: only the launch plan and the command matter to the simulation)."""
    command = ("ncu --cache-control none --replay-mode application python -m "
               f"dsacache.kernels.probes beside --plan p.json --sizes {sizes} --beside {beside} "
               f"--layers {layers} --kv-reads {kv_reads} --evict {evict}")  # fmt: skip
    normal = parse_size(beside)
    rows = []
    for kv in (parse_size(x) for x in sizes.split(",")):
        for layer in range(layers):
            rows += [(role, layer, kv, normal) for role in ("kv", "kv again")[:kv_reads]]
            rows.append(("normal", layer, normal, kv))
    return pd.DataFrame(
        [{"role": r, "layer": n, "bytes": b, "other_bytes": x, "hit": 0.5,
          calibration.DRAM: 1e5, calibration.READ: b // 32, "meta_command": command}
         for r, n, b, x in rows]
    )  # fmt: skip


@pytest.mark.parametrize("evict", ["", "evict_first", "evict_last"])
def test_beside_probe_known_answers_on_a_small_model(evict):
    """Per layer: a normal buffer written, 128 KiB of KV read with a hint, the normal buffer
    read back, in a 1 MiB L2. The KV is never read twice: every KV read is cold and fetches
    its bytes. A 256 KiB normal buffer written just before comes back whole whatever the
    KV's hint (LRU keeps it; evict_first KV lines go first; evict_last lines keep 6 of 16
    ways); a 2 MiB one, twice the L2, streams out before it is read."""
    model = calibration.Model(capacity=2**20, ways=16, last_ways=6)
    for beside, normal_hit in (("256KiB", 1.0), ("2MiB", 0.0)):
        sim = calibration.simulate_beside(_beside_measurement(evict, beside), model)
        kv, normal = sim[sim["role"] == "kv"], sim[sim["role"] == "normal"]
        assert kv["simulated"].tolist() == [0.0] * 3
        assert kv["simulated_dram_bytes"].tolist() == [2**17] * 3
        assert normal["simulated"].tolist() == pytest.approx([normal_hit] * 3, abs=0.01)
    rows = calibration.compare_measurement("b", _beside_measurement(evict, "256KiB"), (model,))
    assert len(rows) == 6 and rows[1]["measured"] == 0.5
    assert rows[-1]["point"] == f"layer 2 normal read, 0.125 MiB {evict or 'unhinted'} KV per layer"
    # read twice, the KV comes back from the L2 unless evict_first made its lines the first
    # victims of their own later fills
    sim = calibration.simulate_beside(_beside_measurement(evict, "256KiB", kv_reads=2), model)
    again = sim[sim["role"] == "kv again"]
    assert again["simulated"].tolist() == pytest.approx(
        [float(evict != "evict_first")] * 3, abs=0.01
    )
    assert (sim[sim["role"] == "normal"]["simulated"] > 0.99).all()


def test_beside_probe_model_gives_each_kv_size_its_own_buffer():
    """The probe allocates each size's KV anew: evict_last lines that the H100 model keeps
    (6 of 16 ways, through the flush) from the size before are not found by the next size's
    reads, which stay cold (a shared buffer found half of them)."""
    m = _beside_measurement("evict_last", "1MiB", layers=24, sizes="256KiB,512KiB")
    sim = calibration.simulate_beside(m, calibration.fitted("h100"))
    kv = sim[sim["role"] == "kv"]
    assert len(kv) == 48 and (kv["simulated"] == 0.0).all()


def test_twice_probe_model_serves_every_repeat_from_the_first_fill():
    """The model has no misses in flight: a selection gathered twice in one kernel hits as
    often as two gathers in a row, half of the first's misses and all the second's."""
    command = ("ncu --cache-control none --replay-mode application python -m "
               "dsacache.kernels.probes twice --plan p.json --k 64 --context 4096")  # fmt: skip
    m = pd.DataFrame({"role": ["together", "first", "second"], "hit": [0.3, 0.0, 1.0],
                      calibration.DRAM: [1e5, 5e4, 0.0], calibration.READ: [8192, 4096, 4096],
                      "meta_command": command})  # fmt: skip
    model = calibration.Model(capacity=2**20, ways=16, fill=64)
    sim = calibration.simulate_twice(m, model).set_index("role")["simulated"]
    assert sim["second"] == 1.0 and sim["first"] < 0.2
    assert sim["together"] == pytest.approx((sim["first"] + sim["second"]) / 2, rel=1e-9)
    rows = calibration.compare_measurement("tw", m, (model,))
    assert [r["point"] for r in rows] == [f"{r} (64 rows read twice)" for r in m["role"]]
    assert rows[0]["measured"] == 0.3 and rows[0]["simulated"] == sim["together"]


def test_compare_in_threads_equals_one_thread():
    one = calibration.compare("h200", (calibration.H200_FIT,), threads=1)
    many = calibration.compare("h200", (calibration.H200_FIT,), threads=3)
    pd.testing.assert_frame_equal(one, many)
