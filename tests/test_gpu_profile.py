"""`dsacache calibrate`: GPU profiles fit to the bundled probes, and the simulator using them."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dsacache import calibration
from dsacache.cli import main
from dsacache.errors import DsacacheError
from dsacache.simulator.presets import bundled_profile, gpu_preset, load_profile

DATA = calibration.DATA_DIR


def _calibrate(tmp_path, *args):
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["calibrate", *args, "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return load_profile(out)


def test_flush_as_stale_lines_gives_the_hits_of_the_256_mib_flush():
    """simulate_reuse models the probe's flush with a quarter of the accesses; the hits must
    be those of the flush itself (written, never read again)."""
    model = calibration.H200_FIT
    sizes = [16 * 2**20, 32 * 2**20, 48 * 2**20]
    flushed = []
    for size in sizes:
        sim = calibration._Sim(model)
        sim.stream(0, 256 * 2**20, write=True)
        sim.stream(1, size)
        flushed.append(sim.stream(1, size))
    assert np.array_equal(calibration.simulate_reuse(sizes, model), np.array(flushed))


def test_calibrate_finds_the_bundled_h200_model_and_its_fill_unit(tmp_path):
    """A narrowed search over the bundled H200 probes picks the bundled fit; the gathers' DRAM
    bytes pick 64-B fills (32-B sectors undercount 656-B rows, 128-B lines overcount)."""
    prof = _calibrate(tmp_path, "--gpu", "h200", "--capacities", "32-34", "--ways", "16,24",
                      "--set-hashes", "hash,mix")  # fmt: skip
    bundled = load_profile(bundled_profile("h200"))
    assert prof["l2_model"] == bundled["l2_model"]
    assert prof["l2_model"]["capacity"] == 33 * 2**20 and prof["l2_model"]["set_hash"] == "mix"
    errors = prof["fit"]["fill_dram_error_pct"]
    assert errors["64"] < 1.0 < errors["32"] and errors["64"] < errors["128"]
    assert prof["fit"]["reuse_mae_points"] < 2.0
    assert prof["gpu"]["name"] == "NVIDIA H200" and prof["gpu"]["l2_bytes"] == 62914560
    files = [m["file"] for m in prof["measurements"]]
    assert files[0] == "l2-reuse.parquet" and "l2-gather-rows-656.parquet" in files
    assert all("ncu" in m["command"] for m in prof["measurements"])
    mem = prof["hierarchy"]
    assert 2e12 < mem["hbm_bandwidth"] < 4.8e12 < mem["l2_bandwidth"]  # below the HBM3e peak


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_bundled_profiles_are_the_fitted_models(gpu):
    """The bundled profiles are what `calibrate --gpu GPU` writes (their command says so), and
    they are the models every comparison uses."""
    prof = load_profile(bundled_profile(gpu))
    assert prof["command"].startswith(f"dsacache calibrate --gpu {gpu}")
    assert calibration.Model.from_profile(prof) == calibration.fitted(gpu)
    reuse = calibration.measured(gpu, "reuse")
    assert prof["hierarchy"] == pytest.approx(calibration.hierarchy_coefficients(reuse))


def test_replay_with_a_profile_simulates_its_l2(tmp_path):
    from dsacache import Workload, replay
    from dsacache.traces import open_trace

    prof = _calibrate(tmp_path, "--gpu", "h200", "--capacities", "33-33", "--ways", "24",
                      "--set-hashes", "mix")  # fmt: skip
    preset = gpu_preset(str(tmp_path / "profile.json"))
    assert (preset.l2_bytes, preset.ways, preset.set_hash, preset.fill) == (
        prof["l2_model"]["capacity"], 24, "mix", 64)  # fmt: skip
    assert preset.hbm_bandwidth == prof["hierarchy"]["hbm_bandwidth"]
    trace = open_trace("smollm2-135m-oracle-k256")
    mla = Workload(layout="mla-fp8")
    mine = replay(trace, gpu=str(tmp_path / "profile.json"), workload=mla)
    bundled = replay(trace, gpu="h200-calibrated", workload=mla)
    nominal = replay(trace, gpu="h200", workload=mla)
    assert (mine.attrs["cache_bytes"], mine.attrs["set_hash"]) == (33 * 2**20, "mix")
    assert nominal.attrs["cache_bytes"] == 60 * 2**20 and nominal.attrs["set_hash"] == "mod"
    assert mine["sector_misses"].sum() == bundled["sector_misses"].sum()
    assert mine["sector_misses"].sum() > nominal["sector_misses"].sum()  # 33 MiB, not 60
    forced = replay(trace, gpu="h200-calibrated", workload=mla, set_hash="mod")
    assert forced.attrs["set_hash"] == "mod"


def test_replay_cli_takes_a_calibrated_gpu(tmp_path):
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["replay", "smollm2-135m-oracle-k64", "--gpu",
                                       "h100-calibrated", "--out", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_the_h100_keeps_evict_last_lines_without_a_set_aside():
    """The H100's evict_last hint probe reads no DRAM for 4-8 MiB kept through 64 MiB of other
    reads, and about 9.4 MiB of 16-24 MiB; the model without kept ways misses that by 42
    points of the bytes read, the fitted 6 of 16 ways (the bundled profile's) by under 6."""
    probe = calibration.measured("h100", "hint-evict_last")
    errors = calibration.fit_evict_last([probe], calibration.fitted("h100")).set_index(
        "evict_last_ways"
    )["dram_error_points"]
    assert errors.idxmin() == calibration.fitted("h100").last_ways == 6
    assert errors[6] < 6 and errors[0] > 35
    # a replay on the calibrated H100 keeps them too, for a hints policy with an evict_last
    # level, unless the spec names its own ways or the geometry is not the fitted one
    h100 = gpu_preset("h100-calibrated")
    assert h100.policy("hints:kv=last").label == "hints:kv=last,persist_ways=6"
    assert h100.policy("hints:kv=last,persist_ways=0").label == "hints:kv=last"
    assert h100.policy("hints:index=first").label == "hints:index=first"
    assert h100.policy("hints:kv=last", ways=32).label == "hints:kv=last"
    assert h100.policy("lru").label == "lru"
    assert gpu_preset("h200-calibrated").policy("hints:kv=last").label == "hints:kv=last"
    assert calibration.hint_policy(calibration.fitted("h100"), "evict_last").policy == (
        "hints:kv=last,persist_ways=6"
    )


def test_a_gpu_policy_default_fills_only_what_the_spec_leaves_out():
    from dsacache.policies import make_policy

    defaults = {"persist_ways": 6}
    assert make_policy("hints:kv=last", defaults).label == "hints:kv=last,persist_ways=6"
    assert make_policy("hints:kv=last,persist_ways=2", defaults).label == (
        "hints:kv=last,persist_ways=2"
    )
    assert make_policy("lru", defaults).label == "lru"  # a policy without it ignores it
    with pytest.raises(DsacacheError, match=r"persist_ways=-1 is outside \[0"):
        make_policy("hints:kv=last", {"persist_ways": -1})  # checked as a spec's value is


def test_a_profile_with_impossible_evict_last_ways_is_refused(tmp_path):
    prof = load_profile(bundled_profile("h100"))
    prof["l2_model"]["evict_last_ways"] = 16
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(prof))
    with pytest.raises(DsacacheError, match="evict_last_ways=16 must be an integer from 0 to"):
        gpu_preset(str(bad))


def test_bad_profiles_and_names_get_clear_errors(tmp_path):
    with pytest.raises(DsacacheError, match="unknown GPU preset 'h300'.*h200-calibrated"):
        gpu_preset("h300")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DsacacheError, match="not a dsacache GPU profile"):
        gpu_preset(str(bad))
    prof = load_profile(bundled_profile("h200"))
    del prof["l2_model"]["ways"], prof["hierarchy"]["l2_bandwidth"]
    bad.write_text(json.dumps(prof))
    with pytest.raises(DsacacheError, match="lacks l2_model.ways, hierarchy.l2_bandwidth"):
        load_profile(bad)
    with pytest.raises(DsacacheError, match="cannot read GPU profile"):
        gpu_preset(str(tmp_path / "missing.json"))


def test_calibrate_refuses_inputs_it_cannot_fit(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "p.json")
    result = runner.invoke(main, ["calibrate", "--out", out])
    assert result.exit_code == 2 and "exactly one of --run, --gpu or --reuse" in result.output
    gather = str(DATA / "h200" / "l2-gather-rows-656.parquet")
    result = runner.invoke(main, ["calibrate", "--reuse", gather, "--out", out])
    assert result.exit_code == 2 and "probe reuse" in result.output, result.output
    reuse = str(DATA / "h200" / "l2-reuse.parquet")
    result = runner.invoke(main, ["calibrate", "--reuse", reuse, "--gather", reuse, "--out", out])
    assert result.exit_code == 2 and "probe gather" in result.output, result.output
    unhinted = str(DATA / "h100" / "l2-hint-none.parquet")
    result = runner.invoke(main, ["calibrate", "--reuse", reuse, "--hint", unhinted, "--out", out])
    assert result.exit_code == 2 and "--evict evict_last" in result.output, result.output
    result = runner.invoke(main, ["calibrate", "--gpu", "h100", "--hint", unhinted, "--out", out])
    assert result.exit_code == 2 and "go with --reuse" in result.output, result.output
    for flag, value, message in (("--capacities", "40-30", "LOW <= HIGH"),
                                 ("--set-hashes", "md5", "choose from"),
                                 ("--ways", "8,x", "comma-separated integers"),
                                 ("--ways", "0", "integers >= 1")):  # fmt: skip
        result = runner.invoke(main, ["calibrate", "--gpu", "h200", flag, value, "--out", out])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(main, ["calibrate", "--gpu", "b200", "--out", out])
    assert result.exit_code == 2 and "no bundled reuse probe for 'b200'" in result.output
    result = runner.invoke(main, ["calibrate", "--gpu", "h200", "--out", str(tmp_path / "h200")])
    assert result.exit_code == 2 and "ends in .json" in result.output
    reuse = calibration.measured("h200", "reuse")
    one_size = reuse[reuse["bytes"] == reuse["bytes"].iloc[0]]
    with pytest.raises(DsacacheError, match="two sizes or more"):
        calibration.hierarchy_coefficients(one_size)
    with pytest.raises(DsacacheError, match="search is empty"):
        calibration.fit_reuse(reuse, capacities_mib=[], ways=(16,))


def test_profile_values_are_checked_and_paths_accepted(tmp_path):
    from pathlib import Path

    assert gpu_preset(Path(bundled_profile("h200"))).set_hash == "mix"
    prof = load_profile(bundled_profile("h200"))
    prof["hierarchy"]["l2_bandwidth"] = float("inf")
    bad = tmp_path / "inf.json"
    bad.write_text(json.dumps(prof))
    with pytest.raises(DsacacheError, match="l2_bandwidth=inf must be finite and positive"):
        gpu_preset(bad)


def test_report_and_sweep_resolve_the_calibrated_l2(tmp_path):
    from dsacache.report import _cache_model
    from dsacache.simulator.sweep import canonical, cell_key

    for gpu in ("h200", "h200-calibrated", str(bundled_profile("h200"))):
        cache = _cache_model(gpu, None)
        assert cache["l2_bytes"] == 60 * 2**20 and cache["effective"] == 33 * 2**20, gpu
        assert cache["model"].startswith("calibrated: lru 33MiB 24-way mix")
    nominal = _cache_model("a100", None)
    assert nominal["effective"] is None and "uncalibrated" in nominal["model"]
    assert canonical({})["set_hash"] == "mod"  # the nominal preset's: old sweeps' keys hold
    assert canonical({"gpu": "h200-calibrated"})["set_hash"] == "mix"
    assert canonical({"gpu": "h200-calibrated", "set_hash": "xor"})["set_hash"] == "xor"
    mine = tmp_path / "mine.json"
    mine.write_text(bundled_profile("h200").read_text())
    cfg = canonical({"gpu": str(mine)})
    assert cfg["gpu"] == str(mine.resolve()) and cfg["set_hash"] == "mix"
    before = cell_key(cfg, "t")
    prof = load_profile(mine)
    prof["l2_model"]["capacity"] = 32 * 2**20
    mine.write_text(json.dumps(prof))
    assert cell_key(cfg, "t") != before  # an edited profile is replayed again on --resume
