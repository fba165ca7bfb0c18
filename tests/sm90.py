"""Compile a Triton kernel for sm_90 on a machine without a GPU and return its PTX (Triton
compiles ahead of time for a named target), for tests that read the compiled code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

COMPILE = textwrap.dedent(
    """
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    spec = json.loads(sys.argv[1])
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    sig = dict(spec["signature"], **{name: "constexpr" for name in spec["constants"]})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t[0] == "*"}
    src = ASTSource(fn=fn, signature=sig, constexprs=spec["constants"], attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    print(triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options).asm["ptx"])
    """
)


def sm90_ptx(spec: dict, cache_dir) -> str:
    """PTX of ``spec["kernel"]`` compiled for sm_90 in a fresh process (``COMPILE``)."""
    # the interpreter would not compile; a cache of its own keeps other Triton runs out
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode:
        pytest.fail(
            f"compiling {spec['kernel']} for sm_90 failed (exit status {done.returncode}):\n"
            f"{done.stderr[-3000:]}{done.stdout[-500:]}"
        )
    return done.stdout
