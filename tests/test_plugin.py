"""The worked plug-in example of docs/plugin_policy.py, run as a user would."""

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from dsacache.cli import main
from dsacache.simulator import simulate_addresses

EXAMPLE = str(Path(__file__).parent.parent / "docs" / "plugin_policy.py")


def test_plugin_policy_resists_a_scan():
    # 4-way, one set: lines 0-1 reused; a one-time scan of 10 lines in between
    reuse, scan = [0, 1], list(range(10, 20))
    seq = np.array(reuse + scan + reuse) * 128
    lru = simulate_addresses(seq, size=512, ways=4, nbytes=128, policy="lru")
    lip = simulate_addresses(seq, size=512, ways=4, nbytes=128, policy=f"{EXAMPLE}:lip")
    assert lru["line_hits"] == 0
    assert lip["line_hits"] == 2


def test_plugin_policy_from_the_cli(small_trace):
    result = CliRunner().invoke(
        main,
        [
            "replay",
            str(small_trace),
            "--quiet",
            "--cache-size",
            "256KiB",
            "--policy",
            f"{EXAMPLE}:lip",
            "--policy",
            "lru",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lip" in result.output and "lru" in result.output


def test_bad_plugin_path_is_one_line():
    result = CliRunner().invoke(main, ["replay", "x.dsatrace", "--policy", "nope/missing.py:x"])
    assert result.exit_code == 2 and "no such file" in result.output
