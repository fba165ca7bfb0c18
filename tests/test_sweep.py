"""Sweeps: grid expansion, rows equal to direct replays, resume after SIGKILL, determinism."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from click.testing import CliRunner
from pandas.testing import assert_frame_equal

from dsacache.cli import main
from dsacache.errors import DsacacheError
from dsacache.simulator import Workload, replay
from dsacache.simulator.sweep import (
    PARAMS,
    expand,
    finished_cells,
    load_grid,
    load_sweep,
    parse_params,
    run_sweep,
    summarize_sweep,
)
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import open_trace

GRID = {"policy": ["lru", "fifo"], "cache_size": ["256KiB", "1MiB"], "batch": [1, 2]}
SORT = ["cell", "step", "layer", "class", "tier"]


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    cfg = SynthConfig(layers=2, requests=2, context=400, steps=5, k=32, seed=7)
    return synthesize(cfg, tmp_path_factory.mktemp("sweep") / "t.dsatrace")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        dashboard_address=":0",
        host="127.0.0.1", protocol="tcp://",
    ) as cluster, Client(cluster) as c:  # fmt: skip
        yield c


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(SORT, kind="stable").reset_index(drop=True)


def test_expand_cross_product_and_reservation():
    cells = expand({"policy": ["lru", "reserve:bytes=1MiB"], "reservation": ["0", "2MiB"]})
    # lru x {0, 2MiB} collapses to one cell: a reservation does not apply to lru
    assert [(c["policy"], c["reservation"]) for c in cells] == [
        ("lru", 0),
        ("reserve:bytes=1MiB", 0),
        ("reserve:bytes=2097152", 2 << 20),
    ]
    # a reservation reaches the policy to the byte, whatever unit it was written in
    odd = expand({"policy": ["reserve"], "reservation": ["12MB", "12582913", "1000KiB"]})
    assert [(c["policy"], c["reservation"]) for c in odd] == [
        ("reserve:bytes=12000000", 12_000_000),
        ("reserve:bytes=12582913", 12_582_913),
        ("reserve:bytes=1024000", 1_024_000),
    ]
    assert all(set(c) == set(PARAMS) for c in cells)
    assert len(expand(GRID)) == 8
    assert expand({"cache_size": "default"})[0]["cache_size"] == 0


def test_param_parsing_keeps_policy_specs_whole(tmp_path):
    grid = parse_params(
        ["policy=lru,reserve:bytes=8MiB,inner=token-lru,fifo", "cache-size=16MiB", "policy=sieve"]
    )
    assert grid == {
        "policy": ["lru", "reserve:bytes=8MiB,inner=token-lru", "fifo", "sieve"],
        "cache_size": ["16MiB"],
    }
    toml = tmp_path / "g.toml"
    toml.write_text('[grid]\npolicy = ["lru", "fifo"]\nbatch = 2\ncache_size = ["8MiB"]\n')
    assert load_grid(toml) == {"policy": ["lru", "fifo"], "batch": [2], "cache_size": ["8MiB"]}
    for bad in (["nope=1"], ["policy"], ["batch="]):
        with pytest.raises(DsacacheError):
            parse_params(bad)
    with pytest.raises(DsacacheError, match="batch='x'"):
        expand({"batch": ["x"]})
    toml.write_text("oops = [1]\n")
    with pytest.raises(DsacacheError, match="oops"):
        load_grid(toml)


def test_bad_cells_fail_before_running(trace_path, tmp_path, client):
    with pytest.raises(DsacacheError, match="batch 3"):
        run_sweep(trace_path, {"batch": [1, 3]}, tmp_path / "a", client=client)
    with pytest.raises(DsacacheError, match="nosuch"):
        run_sweep(trace_path, {"policy": ["nosuch"]}, tmp_path / "b", client=client)
    assert not finished_cells(tmp_path / "a")


def test_rows_equal_direct_replay_and_resume_skips(trace_path, tmp_path, client):
    out = tmp_path / "sw"
    res = run_sweep(trace_path, GRID, out, client=client)
    assert len(res.ran) == 8 and not res.skipped
    df = load_sweep(out)
    cell = df[(df["policy"] == "fifo") & (df["cache_size"] == 1 << 20) & (df["batch"] == 2)]
    direct = replay(
        open_trace(trace_path), policies=["fifo"], cache_size="1MiB", workload=Workload(batch=2)
    )
    ours = cell[list(direct.columns.drop("policy"))].reset_index(drop=True)
    direct = direct.drop(columns=["policy"]).astype({"class": str, "tier": str})
    assert_frame_equal(ours, direct, check_dtype=False)
    # the directory is a plain Parquet dataset too (the manifest is skipped by its "_" prefix)
    assert_frame_equal(_sorted(pd.read_parquet(out)), _sorted(df))
    summary = summarize_sweep(df)
    assert len(summary) == 8 and summary["hit_rate"].between(0, 1).all()
    # resume: nothing to do; an extended grid runs only the new cells
    again = run_sweep(trace_path, GRID, out, client=client, resume=True)
    assert not again.ran and len(again.skipped) == 8
    more = run_sweep(trace_path, {**GRID, "batch": [1, 2, 1]}, out, client=client, resume=True)
    assert not more.ran
    with pytest.raises(DsacacheError, match="--resume or --force"):
        run_sweep(trace_path, GRID, out, client=client)
    assert_frame_equal(load_sweep(out), df)


def test_plugin_policy_cells(trace_path, tmp_path, client):
    from pathlib import Path

    example = Path(__file__).parent.parent / "docs" / "plugin_policy.py"
    rel = os.path.relpath(example)
    res = run_sweep(trace_path, {"policy": ["lru", f"{rel}:lip"]}, tmp_path / "p", client=client)
    df = res.load()
    assert set(df["policy"]) == {"lru", f"{example.resolve()}:lip"}
    direct = replay(open_trace(trace_path), policies=[f"{example}:lip"])
    assert df[df["policy"] != "lru"]["sector_hits"].sum() == direct["sector_hits"].sum()


def test_determinism_one_vs_two_workers(trace_path, tmp_path, client):
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
        host="127.0.0.1", protocol="tcp://",
    ) as cluster, Client(cluster) as one:  # fmt: skip
        a = run_sweep(trace_path, GRID, tmp_path / "one", client=one).load()
    b = run_sweep(trace_path, GRID, tmp_path / "two", client=client).load()
    assert_frame_equal(_sorted(a), _sorted(b), check_exact=True)


def test_resume_after_sigkill_equals_uninterrupted(trace_path, tmp_path, client):
    grid = {"policy": ["lru", "fifo"], "cache_size": ["128KiB", "256KiB", "512KiB", "1MiB"]}
    out = tmp_path / "killed"
    args = ["--param", "policy=lru,fifo", "--param", "cache_size=128KiB,256KiB,512KiB,1MiB"]
    cmd = [sys.executable, "-m", "dsacache.cli", "sweep", str(trace_path), *args]
    cmd += ["--out", str(out), "--jobs", "1", "--quiet"]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not finished_cells(out) and proc.poll() is None:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker processes
        proc.wait()
    done = finished_cells(out)
    assert 1 <= len(done) < 8, "the sweep should have been killed part way"
    # a crash mid-write leaves a temp file; a damaged part must be run again
    (out / ".cell-0000.parquet.tmp").write_bytes(b"partial")
    damaged = out / f"cell-{sorted(done)[0]}.parquet"
    damaged.write_bytes(b"not parquet")
    res = run_sweep(trace_path, grid, out, client=client, resume=True)
    assert len(res.ran) == 8 - len(done) + 1 and len(res.skipped) == len(done) - 1
    ref = run_sweep(trace_path, grid, tmp_path / "whole", client=client).load()
    resumed = load_sweep(out)
    assert len(resumed) == len(ref)  # no duplicated rows
    assert_frame_equal(_sorted(resumed), _sorted(ref), check_exact=True)


def test_cli_sweep(trace_path, tmp_path, client):
    """The CLI with --scheduler (the loopback fixture); the SIGKILL test runs the CLI's
    default local cluster of worker processes."""
    address = client.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    grid = tmp_path / "g.toml"
    grid.write_text('policy = ["lru"]\ncache_size = ["256KiB", "512KiB"]\n')
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["sweep", str(trace_path), "--grid", str(grid), "--out", str(out)]
    args += ["--scheduler", address]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 cell(s): 2 run, 0 already finished" in result.output
    assert "hit_rate" in result.output
    result = runner.invoke(main, [*args, "--resume", "--quiet"])
    assert result.exit_code == 0 and "0 run, 2 already finished" in result.output
    result = runner.invoke(main, ["sweep", str(trace_path), "--param", "bogus=1", "--out", "x"])
    assert result.exit_code == 2 and "bogus" in result.output
    result = runner.invoke(main, ["sweep", str(trace_path), "--out", str(tmp_path / "none")])
    assert result.exit_code == 2 and "--grid" in result.output


def test_an_edited_plugin_changes_its_cell_key(tmp_path):
    from pathlib import Path

    from dsacache.simulator.sweep import canonical, cell_key

    src = Path(__file__).parent.parent / "docs" / "plugin_policy.py"
    plugin = tmp_path / "mine.py"
    plugin.write_text(src.read_text())
    cfg = canonical({"policy": f"{plugin}:lip"})
    before = cell_key(cfg, "trace")
    assert cell_key(cfg, "trace") == before  # stable
    plugin.write_text(src.read_text() + "\n# edited\n")
    assert cell_key(cfg, "trace") != before  # --resume replays the edited plug-in


def test_heads_sweep_sizes_the_query_class(trace_path, tmp_path, client):
    """``heads`` reaches the workload: each cell equals the direct replay with those query
    heads, more heads stream more query bytes, and a query class without any head count
    fails before a worker starts."""
    classes = "index,kv,append,query"
    with pytest.raises(DsacacheError, match="heads"):
        run_sweep(trace_path, {"classes": [classes]}, tmp_path / "none", client=client)
    out = tmp_path / "heads"
    run_sweep(trace_path, {"classes": [classes], "heads": [2, 8]}, out, client=client)
    df = load_sweep(out)
    query_bytes = {}
    for heads in (2, 8):
        cell = df[df["heads"] == heads]
        direct = replay(open_trace(trace_path), policies=["lru"],
                        workload=Workload(classes=tuple(classes.split(",")), heads=heads))  # fmt: skip
        ours = cell[list(direct.columns.drop("policy"))].reset_index(drop=True)
        direct = direct.drop(columns=["policy"]).astype({"class": str, "tier": str})
        assert_frame_equal(ours, direct, check_dtype=False)
        query_bytes[heads] = cell.loc[cell["class"] == "query", "bytes"].sum()
    assert 0 < query_bytes[2] < query_bytes[8]


def test_a_parameter_added_later_keeps_older_sweeps_resumable(trace_path, tmp_path, client):
    """An older sweep directory (cells written before ``heads`` existed) resumes: a cell at
    the new parameter's default keeps the key it had without it, and its rows load with the
    default filled in."""
    import pyarrow.parquet as pq

    from dsacache.simulator.sweep import ADDED_LATER, cell_key

    cfg = expand({"policy": ["lru"]})[0]
    old = {k: v for k, v in cfg.items() if k not in ADDED_LATER}
    assert cell_key(cfg, "t") == cell_key(old, "t") != cell_key({**cfg, "heads": 8}, "t")
    out = tmp_path / "old"
    run_sweep(trace_path, {"policy": ["lru", "fifo"]}, out, client=client)
    for part in out.glob("*.parquet"):  # as written before heads existed
        table = pq.read_table(part)
        pq.write_table(
            table.drop_columns(list(ADDED_LATER)).replace_schema_metadata(table.schema.metadata),
            part,
        )
    again = run_sweep(trace_path, {"policy": ["lru", "fifo"]}, out, client=client, resume=True)
    assert not again.ran and len(again.skipped) == 2
    old_rows = load_sweep(out)
    assert (old_rows["heads"] == 0).all() and (old_rows["backend"] == "").all()


def test_backend_sweep_reads_as_each_kernel(trace_path, tmp_path, client):
    """``backend`` cells equal the direct replay of the workload with that kernel's tiling
    (``backend_workload``); a tiling also set by hand fails before a worker starts."""
    from dsacache.kernels.decode_step import backend_workload

    classes = "index,kv,append,query,partials"
    grid = {"backend": ["triton", "flashmla"], "layout": ["mla-fp8"], "classes": [classes],
            "heads": [128]}  # fmt: skip
    with pytest.raises(DsacacheError, match="leave reads_per_token at 1"):
        run_sweep(trace_path, {**grid, "reads_per_token": [2]}, tmp_path / "bad", client=client)
    with pytest.raises(DsacacheError, match="traffic class partials: .* give a backend"):
        run_sweep(trace_path, {**grid, "backend": [""]}, tmp_path / "unsized", client=client)
    out = tmp_path / "backend"
    run_sweep(trace_path, grid, out, client=client)
    df = load_sweep(out)
    trace = open_trace(trace_path)
    kv_sectors = {}
    for backend in grid["backend"]:
        cell = df[df["backend"] == backend]
        plain = Workload(layout="mla-fp8", classes=tuple(classes.split(",")), heads=128)
        wl = backend_workload(plain, trace, backend, "h100")
        direct = replay(trace, policies=["lru"], workload=wl)
        ours = cell[list(direct.columns.drop("policy"))].reset_index(drop=True)
        direct = direct.drop(columns=["policy"]).astype({"class": str, "tier": str})
        assert_frame_equal(ours, direct, check_dtype=False)
        kv_sectors[backend] = cell.loc[cell["class"] == "kv", "sectors"].sum()
    assert kv_sectors["triton"] > 2 * kv_sectors["flashmla"]
