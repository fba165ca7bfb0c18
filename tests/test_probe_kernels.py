"""The GPU probe kernels on the CPU (TRITON_INTERPRET=1) or, with TRITON_INTERPRET=0, on the
GPU; and ncu output parsing."""

import os

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dsacache.kernels import probes  # noqa: E402
from dsacache.kernels.ncu import ncu_command, parse_ncu_csv  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] == "0"
DEVICE = "cuda" if ON_GPU else "cpu"  # the interpreter runs CPU tensors, a GPU its own


@pytest.mark.parametrize("evict", ["", "evict_first", "evict_last"])
def test_read_sums_every_element(evict):
    x = torch.rand(3 * probes.READ_BLOCK + 17, device=DEVICE)
    partial = probes.read(x, evict)
    assert len(partial) == 4
    torch.testing.assert_close(partial.sum(), x.sum(), rtol=1e-5, atol=1e-3)


def test_gather_sums_selected_rows():
    rows, words = 50, 164
    pool = torch.randint(-1000, 1000, (rows * words,), dtype=torch.int32, device=DEVICE)
    idx = torch.tensor([0, 3, 17, 18, 49], dtype=torch.int32, device=DEVICE)
    out = probes.gather(pool, idx, words, "evict_first")
    want = pool.view(rows, words)[idx.long()].sum(1)
    np.testing.assert_array_equal(out.cpu().numpy(), want.cpu().numpy())


@pytest.mark.parametrize("row_bytes", [640, 672])
def test_gather_probe_plans_rows_of_any_width(row_bytes):
    launches = probes.run_gather(32, 500, 0.5, [0, 4096], row_bytes=row_bytes, device=DEVICE)
    assert [x.role for x in launches] == ["first", "second", "first", "between", "second"]
    assert launches[0].bytes == 32 * row_bytes
    with pytest.raises(ValueError, match="row_bytes=658: must be a positive multiple of 4"):
        probes.run_gather(32, 500, 0.5, [0], row_bytes=658, device=DEVICE)


@pytest.fixture
def launched(monkeypatch):
    """The probe kernels a workload launches, in order: ("read", bytes, hint) and
    ("gather", rows, hint); the kernels still run."""
    calls = []
    read, gather = probes.read, probes.gather

    def record_read(buf, evict=""):
        calls.append(("read", buf.numel() * 4, evict))
        return read(buf, evict)

    def record_gather(pool, idx, row_words, evict=""):
        calls.append(("gather", idx.numel(), evict))
        return gather(pool, idx, row_words, evict)

    monkeypatch.setattr(probes, "read", record_read)
    monkeypatch.setattr(probes, "gather", record_gather)
    return calls


def test_hint_probe_plans_what_it_launches(launched):
    size = 4 * probes.READ_BLOCK * 4
    launches = probes.run_hint([size], [0, 8192], "evict_last", device=DEVICE)
    assert [(x.role, x.bytes, x.other_bytes) for x in launches] == [
        ("first", size, 0), ("second", size, 0),
        ("first", size, 8192), ("between", 8192, 8192), ("second", size, 8192),
    ]  # fmt: skip
    assert launched == [("read", size, "evict_last"), ("read", size, ""),
                        ("read", size, "evict_last"), ("read", 8192, ""), ("read", size, "")]  # fmt: skip


def test_beside_probe_plans_what_it_launches(launched):
    kv, normal = 2 * probes.READ_BLOCK * 4, probes.READ_BLOCK * 4
    launches = probes.run_beside([kv], normal, 2, "evict_last", device=DEVICE)
    assert [(x.role, x.layer, x.bytes, x.other_bytes) for x in launches] == [
        ("kv", 0, kv, normal), ("normal", 0, normal, kv),
        ("kv", 1, kv, normal), ("normal", 1, normal, kv),
    ]  # fmt: skip
    assert launched == [("read", kv, "evict_last"), ("read", normal, "")] * 2
    launched.clear()
    twice = probes.run_beside([kv], normal, 1, "evict_last", kv_reads=2, device=DEVICE)
    assert [x.role for x in twice] == ["kv", "kv again", "normal"]
    assert launched == [("read", kv, "evict_last")] * 2 + [("read", normal, "")]
    for sizes, beside in (([kv], 0), ([kv], 6), ([kv, kv], normal), ([2], normal)):
        with pytest.raises(ValueError, match=rf"sizes=\[.*\], beside={beside} B, layers=2"):
            probes.run_beside(sizes, beside, 2, "evict_last", device=DEVICE)


def test_twice_probe_plans_what_it_launches(launched):
    launches = probes.run_twice(32, 500, 0.5, device=DEVICE)
    assert [(x.role, x.bytes) for x in launches] == [
        ("together", 2 * 32 * 656), ("first", 32 * 656), ("second", 32 * 656)
    ]  # fmt: skip
    assert launched == [("gather", 64, ""), ("gather", 32, ""), ("gather", 32, "")]


def test_probe_cli_refuses_a_row_width_it_cannot_read():
    from click.testing import CliRunner

    from dsacache.cli import main

    out = CliRunner().invoke(main, ["probe", "gather", "--row-bytes", "658", "--out", "x.parquet"])
    assert out.exit_code == 2 and "658 is not a multiple of 4" in out.output


@pytest.mark.parametrize(
    "flag, value", [("--sizes", "8MiB,1XB"), ("--between", "0,x"), ("--beside", "-"),
                    ("--set-aside", "30q")]
)  # fmt: skip
def test_probe_cli_refuses_a_size_it_cannot_read(flag, value):
    """Before ncu starts: a bad size would otherwise fail inside the profiled process."""
    from click.testing import CliRunner

    from dsacache.cli import main

    out = CliRunner().invoke(main, ["probe", "beside", flag, value, "--out", "x.parquet"])
    assert out.exit_code == 2 and f"Invalid value for '{flag}'" in out.output
    assert "invalid size" in out.output


def test_beside_probe_cli_refuses_launches_it_could_not_tell_apart():
    from click.testing import CliRunner

    from dsacache.cli import main

    out = CliRunner().invoke(
        main, ["probe", "beside", "--sizes", "1MiB,1024KiB", "--out", "x.parquet"]
    )
    assert out.exit_code == 2 and "sizes=[1048576, 1048576]" in out.output
    assert "distinct sizes" in out.output


def test_decode_probe_plans_what_it_launches():
    launches = probes.run_decode(2, 200, 3, 16, 0.5, device=DEVICE)
    assert [(x.role, x.layer, x.step) for x in launches[:4]] == [
        ("index", 0, 0), ("kv", 0, 0), ("index", 1, 0), ("kv", 1, 0)
    ]  # fmt: skip
    assert len(launches) == 2 * 2 * 3
    assert launches[0].bytes == 200 * 132 and launches[1].bytes == 16 * 656


def test_ncu_command_keeps_cache_state():
    cmd = ncu_command(["python", "x.py"], "^l2probe")
    assert cmd[cmd.index("--cache-control") + 1] == "none"
    assert cmd[cmd.index("--replay-mode") + 1] == "application"
    assert cmd[-2:] == ["python", "x.py"] and "regex:^l2probe" in cmd


def test_parse_ncu_csv_skips_program_output_and_units():
    text = "\n".join([
        "==PROF== Connected to process 1",
        "some program output",
        '"ID","Kernel Name","lts__t_sector_hit_rate.pct","dram__bytes_read.sum"',
        '"","","%","byte"',
        '"0","l2probe_read","30.95","2,099,968"',
        '"1","l2probe_read","99.65","256"',
    ])  # fmt: skip
    df = parse_ncu_csv(text)
    assert df["dram__bytes_read.sum"].tolist() == [2099968, 256]
    assert df["lts__t_sector_hit_rate.pct"].tolist() == [30.95, 99.65]
