"""The L2 eviction hints of the decode kernels reach the compiled code.

Triton's software pipeliner turns the loads it pipelines into ``cp.async`` copies, and those
carry no L2 hint: a kernel launched with ``evict="evict_first"`` then streams its tiles as
normal loads. That happened to the indexer's keys and the sparse kernels' KV until
2026-12-02, and the H200 profiles of hinted configurations measured unhinted kernels. These
tests compile each kernel for sm_90 as its launcher would launch it (no GPU needed: Triton
compiles ahead of time for a named target) and read the PTX: no ``cp.async`` may be left,
and the tile loads (vector ``ld.global``) must carry ``L2::cache_hint``. On a GPU the same
check runs on what Triton compiled there through the launchers.
"""

from __future__ import annotations

import inspect
import os
import re

import pytest
from sm90 import sm90_ptx

# As in the other kernel tests: Triton must be imported with the interpreter on (the CPU
# suite runs kernels interpreted), whichever test file pytest collects first.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
torch = pytest.importorskip("torch")

# Each kernel at the shapes its launcher picks for DeepSeek-V3.2 (indexer, MLA) and SmolLM2
# (GQA): argument types and compile-time constants; EVICT is filled in per case.
KERNELS = {
    "indexer": (
        "dsacache.kernels.indexer", "dsa_indexer_logits", "indexer_logits", 4,
        dict(q_ptr="*bf16", w_ptr="*fp32", keys_u8="*u8", keys_f32="*fp32", table_ptr="*i32",
             ctx_ptr="*i32", out_ptr="*fp32", H="i32", stride_qb="i32", stride_qh="i32",
             stride_wb="i32", stride_tb="i32", stride_ob="i32", max_pages="i32"),
        dict(BLOCK_H=64, D=128, PAGE=64, PAGES_PER_PROG=16, PROG_SLOTS=16, PAGES_PER_STEP=1,
             QUERY_FP8=True, QUERY_QUANTISED=False, UPCAST=False),
    ),
    "mla": (
        "dsacache.kernels.sparse_decode", "dsa_mla_sparse_decode", "mla_sparse_decode", 8,
        dict(q_ptr="*bf16", kv_bf16="*bf16", kv_u8="*u8", kv_f32="*fp32", table_ptr="*i32",
             idx_ptr="*i32", out_ptr="*fp32", lse_ptr="*fp32", H="i32", K_SEL="i32",
             qk_scale="fp32", stride_qb="i32", stride_qh="i32", stride_tb="i32", stride_ib="i32"),
        dict(BLOCK_H=64, BLOCK_N=64, CHUNK=256, PAGE=64, IS_FP8=True, UPCAST=False,
             LAUNCH_MERGE=False),
    ),
    "gqa": (
        "dsacache.kernels.sparse_decode", "dsa_gqa_sparse_decode", "gqa_sparse_decode", 4,
        dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", table_ptr="*i32", idx_ptr="*i32",
             out_ptr="*fp32", lse_ptr="*fp32", HQ="i32", HKV="i32", GROUP="i32", K_SEL="i32",
             qk_scale="fp32", stride_qb="i32", stride_qh="i32", stride_tb="i32",
             stride_ib="i32", stride_ig="i32"),
        dict(BLOCK_H=16, BLOCK_N=128, CHUNK=512, D=64, PAGE=64, UPCAST=False,
             LAUNCH_MERGE=False),
    ),
}  # fmt: skip


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
    return sm90_ptx(spec, cache_dir)


@pytest.mark.parametrize("wait_prior", [False, True])
def test_split_merge_waits_for_the_attention_kernel_only_when_launched_dependent(
    wait_prior, tmp_path
):
    """A merge launched as a programmatic dependent launch (``pdl=True``) starts before the
    attention kernel has ended, so it must wait (``griddepcontrol.wait``) before reading the
    partials; launched normally it carries no wait."""
    spec = dict(module="dsacache.kernels.sparse_decode", kernel="dsa_merge_splits",
                signature=dict(o_part="*fp32", lse_part="*fp32", out_ptr="*bf16",
                               lse_ptr="*fp32", H="i32", S="i32"),
                constants=dict(DV=512, BLOCK_S=16, BLOCK_D=256, WAIT_PRIOR=wait_prior),
                num_warps=4, num_stages=2)  # fmt: skip
    ptx = sm90_ptx(spec, tmp_path)
    assert ("griddepcontrol.wait" in ptx) is wait_prior
    assert "ld.global" in ptx  # the kernel itself compiled
    if wait_prior:  # before any read of the partials
        assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_sparse_kernels_release_the_dependent_merge_when_asked(name, tmp_path):
    """With ``LAUNCH_MERGE`` (``pdl=True`` and a split merge) the attention kernel lets the
    merge be scheduled (``griddepcontrol.launch_dependents``); the hint tests check that the
    kernels compiled without it carry no ``griddepcontrol``."""
    module, kernel, _, warps, signature, constants = KERNELS[name]
    spec = dict(module=module, kernel=kernel, signature=signature, num_warps=warps,
                num_stages=2, constants=dict(constants, EVICT="", LAUNCH_MERGE=True))  # fmt: skip
    assert "griddepcontrol.launch_dependents" in sm90_ptx(spec, tmp_path)


def global_loads(ptx: str) -> list[str]:
    """The global-memory load instructions of ``ptx``, with their qualifiers."""
    return re.findall(r"\b(?:ld\.global|cp\.async\.c[ag]\.shared\.global)[.\w:]*", ptx)


def assert_tiles_hinted(name: str, ptx: str, evict: str) -> None:
    """No pipelined copy is left, and the tile loads (vectors) carry an L2 cache hint; no
    dependent-launch instruction where none was asked for (``LAUNCH_MERGE`` off)."""
    assert "griddepcontrol" not in ptx, f"{name}: a dependent-launch instruction unasked"
    loads = global_loads(ptx)
    assert not [x for x in loads if x.startswith("cp.async")], (
        f"{name}: pipelined copies drop the {evict} hint: {sorted(set(loads))}"
    )
    hinted = [x for x in loads if "L2::cache_hint" in x and x.startswith("ld.global")]
    vector = [x for x in hinted if ".v" in x]  # the tiles (keys, KV rows) load as vectors
    assert vector, f"{name}: no vector load carries the {evict} hint: {sorted(set(loads))}"


@pytest.mark.parametrize("evict", ["evict_first", "evict_last"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_hinted_tile_loads_keep_their_hint(name, evict, tmp_path):
    assert_tiles_hinted(name, compiled_ptx(name, evict, tmp_path), evict)


ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("evict", ["evict_first", "evict_last"])
def test_hints_reach_the_kernels_the_gpu_compiles(evict):
    """The same check on what Triton compiled for this GPU through the launchers."""
    from dsacache.kernels import paged
    from dsacache.kernels.indexer import dsa_indexer_logits, indexer_logits
    from dsacache.kernels.sparse_decode import (
        dsa_gqa_sparse_decode,
        dsa_mla_sparse_decode,
        gqa_sparse_decode,
        mla_sparse_decode,
    )

    dev, ctx, k = "cuda", 4096, 256
    pt = paged.make_page_table([ctx, ctx], order="shuffled", seed=0, device=dev)
    lens = torch.full((2,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn((2, 64, 128), device=dev).bfloat16()
    w = torch.rand((2, 64), device=dev)
    index = paged.random_index_cache(pt, seed=1, device=dev)
    indexer_logits(q, w, index, lens, ctx, evict=evict, pages_per_prog=8)  # a real page loop
    sel = torch.stack([torch.randperm(ctx)[:k] for _ in range(2)]).int().to(dev)
    mla = paged.random_mla_cache(pt, True, seed=2, device=dev)
    mla_sparse_decode(
        torch.randn((2, 128, 576), device=dev).bfloat16(), mla, sel, 0.07, evict=evict
    )
    gqa = paged.random_gqa_cache(pt, 3, 64, seed=4, device=dev)
    gqa_sparse_decode(torch.randn((2, 9, 64), device=dev).bfloat16(), gqa, sel, evict=evict)
    torch.cuda.synchronize()
    for fn in (dsa_indexer_logits, dsa_mla_sparse_decode, dsa_gqa_sparse_decode):
        compiled = fn.device_caches[torch.cuda.current_device()][0]  # Triton 3.6: key -> kernel
        hinted = [kernel for key, kernel in compiled.items() if repr(evict) in str(key)]
        assert hinted, f"{fn.__name__}: no variant compiled with {evict}"
        for kernel in hinted:
            assert_tiles_hinted(fn.__name__, kernel.asm["ptx"], evict)


def test_unhinted_kernels_keep_their_pipeline(tmp_path):
    """Without a hint the sparse kernels stay pipelined (the stages are not given up)."""
    loads = global_loads(compiled_ptx("mla", "", tmp_path))
    assert any(x.startswith("cp.async") for x in loads)
    assert not any("cache_hint" in x for x in loads)


def test_indexer_keeps_the_next_steps_keys_in_flight_while_it_computes(tmp_path):
    """At its default launch the indexer's loop waits for a step's key copy with the next
    step's copy still in flight (``cp.async.wait_group 1``). With the page-table entry read
    inside the loop, the pipeliner issued each copy only after that load and waited for
    every copy at once (``wait_group 0``), a third stage or not."""
    ptx = compiled_ptx("indexer", "", tmp_path)
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    assert waits, "the indexer's key loads are no longer cp.async copies"
    assert max(waits) >= 1, f"every wait drains all copies: wait_group {waits}"
