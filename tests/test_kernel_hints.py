"""The L2 eviction hints of the decode kernels reach the compiled code.

Triton's software pipeliner turns the loads it pipelines into ``cp.async`` copies, and those
carry no L2 hint: a kernel launched with ``evict="evict_first"`` then streams its tiles as
normal loads. That happened to the indexer's keys and the sparse kernels' KV until
2026-12-02, and the H200 profiles of hinted configurations measured unhinted kernels. These
tests compile each kernel for sm_90 as its launcher would launch it (no GPU needed: Triton
compiles ahead of time for a named target) and read the PTX: every tile load must be a
``ld.global`` with ``L2::cache_hint``, and no ``cp.async`` may be left.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

# As in the other kernel tests: Triton must be imported with the interpreter on (the CPU
# suite runs kernels interpreted), whichever test file pytest collects first.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytest.importorskip("torch")  # the kernels module imports it

# Each kernel at the shapes its launcher picks for DeepSeek-V3.2 (indexer, MLA) and SmolLM2
# (GQA): argument types and compile-time constants; EVICT is filled in per case.
KERNELS = {
    "indexer": (
        "dsacache.kernels.indexer", "dsa_indexer_logits", "indexer_logits", 4,
        dict(q_ptr="*bf16", w_ptr="*fp32", keys_u8="*u8", keys_f32="*fp32", table_ptr="*i32",
             ctx_ptr="*i32", out_ptr="*fp32", H="i32", stride_qb="i32", stride_qh="i32",
             stride_wb="i32", stride_tb="i32", stride_ob="i32", max_pages="i32"),
        dict(BLOCK_H=64, D=128, PAGE=64, PAGES_PER_PROG=16, PAGES_PER_STEP=1, QUERY_FP8=True,
             UPCAST=False),
    ),
    "mla": (
        "dsacache.kernels.sparse_decode", "dsa_mla_sparse_decode", "mla_sparse_decode", 8,
        dict(q_ptr="*bf16", kv_bf16="*bf16", kv_u8="*u8", kv_f32="*fp32", table_ptr="*i32",
             idx_ptr="*i32", out_ptr="*fp32", lse_ptr="*fp32", H="i32", K_SEL="i32",
             qk_scale="fp32", stride_qb="i32", stride_qh="i32", stride_tb="i32", stride_ib="i32"),
        dict(BLOCK_H=64, BLOCK_N=64, CHUNK=256, PAGE=64, IS_FP8=True, UPCAST=False),
    ),
    "gqa": (
        "dsacache.kernels.sparse_decode", "dsa_gqa_sparse_decode", "gqa_sparse_decode", 4,
        dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", table_ptr="*i32", idx_ptr="*i32",
             out_ptr="*fp32", lse_ptr="*fp32", HQ="i32", HKV="i32", GROUP="i32", K_SEL="i32",
             qk_scale="fp32", stride_qb="i32", stride_qh="i32", stride_tb="i32",
             stride_ib="i32", stride_ig="i32"),
        dict(BLOCK_H=16, BLOCK_N=128, CHUNK=512, D=64, PAGE=64, UPCAST=False),
    ),
}  # fmt: skip

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


def compiled_ptx(name: str, evict: str, cache_dir) -> str:
    """PTX of kernel ``name`` with hint ``evict``, at the launcher's default pipeline stages
    (through ``pipeline_stages``, as the launcher passes them)."""
    module, kernel, launcher, warps, signature, constants = KERNELS[name]
    from importlib import import_module

    mod = import_module(module)
    default = inspect.signature(getattr(mod, launcher)).parameters["num_stages"].default
    stages = import_module("dsacache.kernels.indexer").pipeline_stages(evict, default)
    spec = dict(module=module, kernel=kernel, signature=signature, num_warps=warps,
                num_stages=stages, constants=dict(constants, EVICT=evict))  # fmt: skip
    # the interpreter would not compile; a cache of its own keeps other Triton runs out
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode:
        pytest.fail(
            f"compiling {kernel} for sm_90 failed (exit status {done.returncode}):\n"
            f"{done.stderr[-3000:]}{done.stdout[-500:]}"
        )
    return done.stdout


def global_loads(ptx: str) -> list[str]:
    """The global-memory load instructions of ``ptx``, with their qualifiers."""
    return re.findall(r"\b(?:ld\.global|cp\.async\.c[ag]\.shared\.global)[.\w:]*", ptx)


@pytest.mark.parametrize("evict", ["evict_first", "evict_last"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_hinted_tile_loads_keep_their_hint(name, evict, tmp_path):
    loads = global_loads(compiled_ptx(name, evict, tmp_path))
    assert not [x for x in loads if x.startswith("cp.async")], (
        f"{name}: pipelined copies drop the {evict} hint: {sorted(set(loads))}"
    )
    hinted = [x for x in loads if "L2::cache_hint" in x and x.startswith("ld.global")]
    vector = [x for x in hinted if ".v" in x]  # the tiles (keys, KV rows) load as vectors
    assert vector, f"{name}: no vector load carries the {evict} hint: {sorted(set(loads))}"


def test_unhinted_kernels_keep_their_pipeline(tmp_path):
    """Without a hint the sparse kernels stay pipelined (the stages are not given up)."""
    loads = global_loads(compiled_ptx("mla", "", tmp_path))
    assert any(x.startswith("cp.async") for x in loads)
    assert not any("cache_hint" in x for x in loads)
