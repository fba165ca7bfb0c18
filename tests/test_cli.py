import subprocess
import sys

import pytest
from click.testing import CliRunner

from dsacache.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, out, *needles):
    assert code == 2, out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert "Traceback" not in out
    text = " ".join(lines)
    for needle in needles:
        assert needle in text, out


def test_help_has_examples():
    for cmd in ("synth", "info", "validate", "replay", "demo", "policies"):
        code, out = run(cmd, "--help")
        assert code == 0 and "Example" in out, cmd


def test_synth_info_validate(tmp_path):
    out_path = tmp_path / "t.dsatrace"
    code, out = run("synth", "--preset", "smollm2-135m", "--steps", 4, "--out", out_path, "--quiet")
    assert code == 0, out
    code, out = run("info", out_path)
    assert code == 0
    for field in ("rows", "steps", "layers", "groups", "k", "bytes per index"):
        assert field in out
    assert "360" in out  # 4 steps x 30 layers x 3 groups
    code, out = run("validate", out_path)
    assert code == 0 and out.startswith("ok:")


def test_unknown_preset(tmp_path):
    code, out = run("synth", "--preset", "gpt-9", "--out", tmp_path / "x.dsatrace")
    assert_one_line_error(code, out, "unknown preset 'gpt-9'", "deepseek-v3.2")


def test_a_plugin_that_is_not_python_is_one_line(small_trace):
    code, out = run("replay", small_trace, "--quiet", "--plugin", f"{small_trace}/manifest.json")
    assert_one_line_error(code, out, "not a Python file (.py)")


def test_a_path_the_system_refuses_is_one_line(tmp_path):
    """An OSError from a path the user gave (here a trace under a file) ends as
    one line and exit 2, like every other input error."""
    (tmp_path / "a-file").write_text("")
    under_a_file = tmp_path / "a-file" / "t.dsatrace"
    code, out = run("synth", "--layers", 2, "--steps", 2, "--k", 8, "--context", 64, "--out",
                    under_a_file, "--quiet")  # fmt: skip
    assert_one_line_error(code, out, "Not a directory", "a-file")


def test_bad_size_is_one_line():
    code, out = run("replay", "nothing.dsatrace", "--cache-size", "50XB")
    assert code == 2 and "50XB" in out and "MiB" in out and "Traceback" not in out


def test_missing_trace(tmp_path):
    code, out = run("info", tmp_path / "none.dsatrace")
    assert_one_line_error(code, out, "no such trace directory")


def test_checksum_error_via_cli(tmp_path):
    path = tmp_path / "t.dsatrace"
    run("synth", "--layers", 2, "--steps", 2, "--k", 8, "--context", 64, "--out", path, "--quiet")
    f = path / "part-00000.parquet"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    code, out = run("validate", path)
    assert_one_line_error(code, out, "checksum mismatch", "part-00000.parquet")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "random:seed=x"], "seed='x' is not an integer"),
        (["--layout", "mla-fp9"], "unknown layout 'mla-fp9'"),
        (["--batch", "5"], "batch 5 is larger than the trace's 2 request(s)"),
        (["--cache-size", "1000"], "not a multiple of ways x line"),
        (["--out", "r.txt"], "use a .parquet or .csv"),
        (["--classes", "index,kv,query", "--heads", "-1"], "heads must be >= 0, got -1"),
        (["--heads", "4"], "add query to the classes"),
        (["--classes", "index,kv,query"], "the trace's model names none; set heads"),
        (["--classes", "index,kv,partials"], "give a backend (triton or flashmla)"),
        (["--out", "no-such-dir/r.parquet"], "its directory no-such-dir does not exist"),
        (["--cache-size", "0"], "cache size 0 B"),  # was the GPU's whole L2, silently
        (["--cache-size", "99999999TiB"], "larger than the 64 GiB the simulator models"),
        (["--cache-size", "1" + "0" * 400], "too large"),
        (["--policy", "brrip:epsilon=nan"], "epsilon=nan is not a finite number"),
        (["--policy", "reserve:admit=frequent,decay=nan"], "decay=nan is not a finite number"),
        (["--policy", "random:seed=9007199254740993"], "beyond +-2**53"),
        (["--page-order", "shuffled", "--seed", "-5"], "seed must be >= 0, got -5"),
        (["--weight-bytes", "1MiB"], "add weights to the classes"),
    ],
)
def test_replay_bad_options(small_trace, args, needle):
    code, out = run("replay", small_trace, "--quiet", *args)
    assert_one_line_error(code, out, needle)


def test_replay_writes_results(small_trace, tmp_path):
    import pandas as pd

    out_file = tmp_path / "r.parquet"
    code, out = run(
        "replay",
        small_trace,
        "--quiet",
        "--cache-size",
        "1MiB",
        "--policy",
        "lru",
        "--policy",
        "fifo",
        "--out",
        out_file,
    )
    assert code == 0, out
    df = pd.read_parquet(out_file)
    assert set(df["policy"]) == {"lru", "fifo"}
    assert "kv_hit_rate" in out


def test_replay_query_class_reads_each_kernels_query(small_trace, tmp_path):
    """The query class adds, per step, layer and request, the indexer's query (64 x 128 bf16)
    and the attention query (4 heads x 64, the GQA width), in a class of its own: the other
    classes' counters do not change."""
    import pandas as pd

    got = {}
    query = ["--classes", "index,kv,append,query", "--heads", 4]
    for name, extra in (("plain", []), ("queries", query)):
        out_file = tmp_path / f"{name}.parquet"
        code, out = run("replay", small_trace, "--quiet", "--batch", 2, "--out", out_file, *extra)
        assert code == 0, out
        got[name] = pd.read_parquet(out_file).groupby("class", observed=True)["bytes"].sum()
    reads = 6 * 3 * 2  # steps x layers x requests
    assert got["queries"]["query"] == reads * (64 * 128 * 2 + 4 * 64 * 2)
    attrs = pd.read_parquet(tmp_path / "queries.parquet").attrs  # the saved result says so
    assert attrs["classes"] == "index,kv,append,query"
    assert list(attrs["query_bytes"]) == [64 * 128 * 2, 4 * 64 * 2]
    plain = got["plain"][got["plain"] > 0]
    assert (got["queries"][plain.index] == plain).all()


def test_replay_kv_loads_apart_reads_the_mla_parts_separately(tmp_path):
    """With --kv-loads-apart an MLA fp8 token is read as its 512-B latent, 16 B of scales and
    128-B RoPE: the same KV bytes, more line accesses (a part may start a line of its own)."""
    import pandas as pd

    from dsacache.tracer import SynthConfig, synthesize

    cfg = SynthConfig(layers=2, requests=1, context=600, steps=3, k=64, seed=1,
                      model={"name": "tiny-mla", "attention": "MLA", "heads": 16})  # fmt: skip
    small_trace = synthesize(cfg, tmp_path / "mla.dsatrace")
    got = {}
    for name, extra in (("record", []), ("apart", ["--kv-loads-apart"])):
        out_file = tmp_path / f"{name}.parquet"
        code, out = run("replay", small_trace, "--quiet", "--layout", "mla-fp8", "--classes",
                        "kv", "--out", out_file, *extra)  # fmt: skip
        assert code == 0, out
        got[name] = pd.read_parquet(out_file).sum(numeric_only=True)
    assert got["apart"]["bytes"] == got["record"]["bytes"]
    assert got["apart"]["accesses"] > got["record"]["accesses"]


def test_policies_lists_registered():
    code, out = run("policies")
    assert code == 0 and "lru" in out and "fifo" in out and "seed=" in out


def test_console_entry_point_exits_2():
    out = subprocess.run(
        [sys.executable, "-m", "dsacache.cli", "info", "/nonexistent.dsatrace"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("dsacache: error:")


def test_import_does_not_load_torch():
    code = "import sys, dsacache, dsacache.cli; assert 'torch' not in sys.modules and 'triton' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
