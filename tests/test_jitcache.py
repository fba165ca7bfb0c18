"""Compiled replay loops are kept on disk: a second process loads them, with the same results,
and a changed policy plug-in is compiled afresh (simulator/jitcache.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from numba import njit

from dsacache.simulator.jitcache import _KeyedCache, persist

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from dsacache.policies import load_plugin, make_policy
    from dsacache.simulator import simulate_addresses
    from dsacache.simulator.engine import CacheConfig, _kernel
    policy = sys.argv[1]
    if len(sys.argv) > 2:
        load_plugin(sys.argv[2])
    addrs = np.random.default_rng(0).integers(0, 4096, 20000) * 128
    out = simulate_addresses(addrs, size="64KiB", ways=16, policy=policy, nbytes=128)
    kernel = _kernel(make_policy(policy), CacheConfig.of("64KiB", ways=16))
    print(json.dumps({"misses": out["line_misses"],
                      "loaded": sum(kernel.stats.cache_hits.values())}))
    """
)

PLUGIN = textwrap.dedent(
    """
    import numpy as np
    from numba import njit
    from dsacache.policies import PolicyType, register
    from dsacache.policies.lru import init, tail, to_front

    @njit(inline="always")
    def pick(line_state, set_state, glob, s, ways, clock, params):
        return WAY

    register(PolicyType(name="fixed-way", description="always evicts one way",
                        init=init, on_hit=to_front, on_fill=to_front, victim=pick,
                        line_dtype=np.int32, line_words=2, set_words=2, set_major=False))
    """
)


def _child(tmp_path, *args, env=None, stderr=None) -> dict:
    environ = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "numba")} | (env or {})
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if stderr is not None:
        stderr.append(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_compiled_loop(tmp_path):
    first = _child(tmp_path, "lru")
    second = _child(tmp_path, "lru")
    assert first["loaded"] == 0
    assert second["loaded"] == 1
    assert second["misses"] == first["misses"] > 0


def test_a_damaged_cache_entry_is_compiled_afresh(tmp_path):
    first = _child(tmp_path, "lru")
    damaged = list((tmp_path / "numba").rglob("*.nbc"))
    assert damaged
    for path in damaged:
        path.write_bytes(b"not a compiled loop")
    errors: list[str] = []
    again = _child(tmp_path, "lru", stderr=errors)
    assert again == first  # same result, nothing loaded
    assert "compiling afresh, the cached build is unreadable" in errors[0]


def test_opting_out_compiles_in_every_process(tmp_path):
    _child(tmp_path, "lru")
    again = _child(tmp_path, "lru", env={"DSACACHE_JIT_CACHE": "0"})
    assert again["loaded"] == 0


def test_changed_plugin_is_compiled_afresh(tmp_path):
    plugin = tmp_path / "fixed_way.py"
    plugin.write_text(PLUGIN.replace("WAY", "0"))
    way0 = _child(tmp_path, "fixed-way", str(plugin))
    assert _child(tmp_path, "fixed-way", str(plugin)) == way0 | {"loaded": 1}
    plugin.write_text(PLUGIN.replace("WAY", "15"))
    way15 = _child(tmp_path, "fixed-way", str(plugin))
    assert way15["loaded"] == 0  # a stale build would have been loaded and counted
    assert way15["misses"] != way0["misses"]  # and the new victim choice is what ran


OPT_PLUGIN = textwrap.dedent(
    """
    import dataclasses
    from dsacache.policies import register
    from dsacache.policies.belady import BELADY
    register(dataclasses.replace(BELADY, name="opt2", needs_future=NEEDS))
    """
)


def test_a_plugin_changing_only_what_the_loop_reads_is_compiled_afresh(tmp_path):
    """Belady's hooks registered from a plug-in: the hooks' files do not change when the
    plug-in turns ``needs_future`` on, but the compiled loop does (it reads the future only
    then), so the build without it must not be loaded for it."""
    plugin = tmp_path / "opt2.py"
    plugin.write_text(OPT_PLUGIN.replace("NEEDS", "False"))
    _child(tmp_path, "opt2", str(plugin))
    plugin.write_text(OPT_PLUGIN.replace("NEEDS", "True"))
    with_future = _child(tmp_path, "opt2", str(plugin))
    assert with_future["loaded"] == 0
    assert with_future["misses"] == _child(tmp_path, "belady")["misses"]


def test_hooks_without_a_source_file_are_compiled_in_every_process(tmp_path):
    """A hook typed into ``python -c`` has no file to digest: editing it must not load the
    earlier build."""
    code = CHILD.replace("if len(sys.argv) > 2:\n    load_plugin(sys.argv[2])", PLUGIN)
    results = []
    for way in ("0", "15"):
        done = subprocess.run(
            [sys.executable, "-c", code.replace("WAY", way), "fixed-way"],
            capture_output=True,
            text=True,
            env=os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "numba")},
            cwd=tmp_path,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [r["loaded"] for r in results] == [0, 0]
    assert results[0]["misses"] != results[1]["misses"]


def test_a_data_file_of_another_build_is_not_loaded(tmp_path):
    """Two processes saving at once can leave one build's data under another's name: the
    data carries its key, and a mismatch compiles afresh."""
    fifo = _child(tmp_path, "fifo")
    sieve = _child(tmp_path, "sieve")
    loops = (tmp_path / "numba").rglob("engine._kernel.locals.run-*.nbc")
    data = sorted(loops, key=lambda p: p.stat().st_mtime)  # fifo's, then sieve's
    assert len(data) == 2
    data[1].write_bytes(data[0].read_bytes())  # sieve's file now holds fifo's build
    again = _child(tmp_path, "sieve")
    assert again == sieve | {"loaded": 0}
    assert fifo["misses"] != sieve["misses"]


def test_closures_are_not_kept_on_disk():
    def make(k):
        @njit(inline="always")
        def hook(x):
            return x + k

        return hook

    @njit
    def plain(x):
        return x

    hooked = persist(njit(lambda x: x), "closure", (make(1),))
    assert not isinstance(hooked._cache, _KeyedCache)
    if os.environ.get("DSACACHE_JIT_CACHE", "1") == "0":
        pytest.skip("the file cache is turned off in this environment")
    assert isinstance(persist(plain)._cache, _KeyedCache)
