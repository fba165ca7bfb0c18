"""Sparse decode attention of DSA: one query token per request attends to its top-k tokens.

- MLA (DeepSeek-V3.2, absorbed form): ``q`` ``[B, H, 576]`` (latent 512 + RoPE 64), every
  head reads the same selected tokens; keys are the whole 576-dim record, values its first
  512 dims. The cache is bf16 (1152 B/token) or DeepSeek-V3.2's fp8 layout (656 B/token,
  ``paged.quantize_mla_fp8``): each tile of fp8 latents is dequantised once in registers
  (times its per-128 scales, to bf16) and feeds both the score and the value product.
- GQA (SmolLM2-135M: 9 query heads, 3 KV heads, head dim 64): one selection per request
  shared by all KV heads (``indices`` ``[B, k]`` or ``[B, 1, k]``) or one per KV head
  (``[B, kv_heads, k]``), as a trace's groups are.

Only the selected tokens are gathered, through the page table (``indices`` hold token
positions, -1 = none). For small batches the selected tokens are split over several programs
(split-K); each writes a partial output and log-sum-exp, merged by ``dsa_merge_splits``.
With ``pdl=True`` (Hopper and later, compiled kernels) the merge is launched as a
programmatic dependent launch: the attention kernel's programs release it as they start
(``griddepcontrol.launch_dependents``), so its programs are scheduled while the attention
kernel's last ones drain, and wait (``griddepcontrol.wait``) for its writes, instead of the
merge starting only after the attention kernel has ended. Off by default: on the H100 it
saved 4-5% of sparse GQA at batch 8 and cost sparse MLA about 1%
(``docs/results/h100-kernels/pdl-1207/``).
Each kernel sits beside its float32 torch reference. Tolerances against it (tests): outputs
within 3e-2 (bf16 output and bf16 tensor-core products); LSE within 1e-3 for bf16 caches and
2e-2 for fp8 ones (the dequantised tile is rounded to bf16 for the tensor cores). The KV
loads take an optional L2 eviction hint (``evict``: "", "evict_first", "evict_last").
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsacache.kernels.indexer import (
    INTERPRET,
    _check_evict,
    _pow2,
    _sm_count,
    pipeline_stages,
)
from dsacache.kernels.paged import (
    MLA_DIM,
    MLA_FP8_BYTES,
    MLA_LATENT,
    GQACache,
    MLACache,
    from_pages,
)

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 128
MLA_PER_SM = 1  # sparse MLA programs resident per SM (255 registers a thread)
MLA_BLOCK_N = 64  # selected tokens per tile of mla_sparse_decode
_LATENT = tl.constexpr(MLA_LATENT)  # a global a Triton kernel may read


@triton.jit
def _dot_in(x, UPCAST: tl.constexpr):
    """Operand type of ``tl.dot``: bf16 on the GPU, float32 under the CPU interpreter (whose
    bf16 ``tl.dot`` returns garbage in Triton 3.6; bf16 products are exact in float32)."""
    if UPCAST:
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _softmax_step(s, m, den):
    """Online-softmax update with scores ``s`` [H, N] (log2 domain, -inf = masked)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    den = den * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, den


@triton.jit
def _finish(acc, m, den, out_ptr, offs, lse_ptr, rows, hm, WRITE_LSE: tl.constexpr):
    """Store ``acc / den`` at ``out_ptr + offs`` (in the output's dtype) and, if asked, the
    natural-log LSE at ``lse_ptr + rows``; rows that saw no token give 0 and -inf."""
    empty = den == 0.0
    o = acc / tl.where(empty, 1.0, den)[:, None]
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=hm[:, None])
    if WRITE_LSE:
        lse = (m + tl.log2(tl.where(empty, 1.0, den))) * 0.6931471805599453
        tl.store(lse_ptr + rows, tl.where(empty, float("-inf"), lse), mask=hm)


@triton.jit
def dsa_mla_sparse_decode(
    q_ptr, kv_bf16, kv_u8, kv_f32, table_ptr, idx_ptr, out_ptr, lse_ptr,
    H, K_SEL, qk_scale, stride_qb, stride_qh, stride_tb, stride_ib,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, PAGE: tl.constexpr,
    IS_FP8: tl.constexpr, EVICT: tl.constexpr, UPCAST: tl.constexpr,
    LAUNCH_MERGE: tl.constexpr,
):  # fmt: skip
    """Program (request x head block, split): attention of BLOCK_H heads over the split's
    ``CHUNK`` selected tokens. Writes rows ``(b * splits + split) * H + h`` of ``out``
    ``[.., 512]`` and ``lse``. ``LAUNCH_MERGE``: let the dependent merge be scheduled."""
    if LAUNCH_MERGE:  # the merge waits for this kernel's end before it reads anything
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_hb = tl.cdiv(H, BLOCK_H)
    b = pid // n_hb
    h = (pid % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    c = tl.arange(0, _LATENT)
    r = tl.arange(0, 64)
    q_row = q_ptr + b * stride_qb + h[:, None] * stride_qh
    q_lat = _dot_in(tl.load(q_row + c[None, :], mask=hm[:, None], other=0.0), UPCAST)
    q_rope = _dot_in(tl.load(q_row + _LATENT + r[None, :], mask=hm[:, None], other=0.0), UPCAST)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, _LATENT], tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, K_SEL)
    for it in range(0, CHUNK // BLOCK_N):  # constexpr trip count (the interpreter needs it)
        n = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
        tok = tl.load(idx_ptr + b * stride_ib + n, mask=n < end, other=-1)
        valid = tok >= 0
        page = tl.load(table_ptr + b * stride_tb + tok // PAGE, mask=valid, other=0)
        slot = page.to(tl.int64) * PAGE + (tok % PAGE)
        if IS_FP8:
            # [tokens, 4 groups, 128] fp8 latents times their group's fp32 scale: the tile is
            # dequantised once in registers and feeds both products
            g = tl.arange(0, 4)
            e = tl.arange(0, 128)
            k8 = tl.load(kv_u8 + slot[:, None, None] * 656 + g[None, :, None] * 128
                         + e[None, None, :], mask=valid[:, None, None], other=0,
                         eviction_policy=EVICT)  # fmt: skip
            sc = tl.load(kv_f32 + slot[:, None] * 164 + 128 + g[None, :], mask=valid[:, None],
                         other=0.0, eviction_policy=EVICT)  # fmt: skip
            k = k8.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc[:, :, None]
            k = _dot_in(tl.reshape(k, (BLOCK_N, _LATENT)), UPCAST)
            rope = kv_bf16 + slot[:, None] * 328 + 264 + r[None, :]
        else:
            k = tl.load(kv_bf16 + slot[:, None] * 576 + c[None, :], mask=valid[:, None], other=0.0,
                        eviction_policy=EVICT)  # fmt: skip
            k = _dot_in(k, UPCAST)
            rope = kv_bf16 + slot[:, None] * 576 + _LATENT + r[None, :]
        k_rope = _dot_in(tl.load(rope, mask=valid[:, None], other=0.0, eviction_policy=EVICT),
                         UPCAST)  # fmt: skip
        s = tl.dot(q_rope, tl.trans(k_rope))
        s = tl.dot(q_lat, tl.trans(k), s)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        p, alpha, m, den = _softmax_step(s, m, den)
        acc = tl.dot(_dot_in(p, UPCAST), k, acc * alpha[:, None])
    row = (b * tl.num_programs(1) + split) * H + h
    _finish(acc, m, den, out_ptr, row.to(tl.int64)[:, None] * _LATENT + c[None, :], lse_ptr,
            row, hm, True)  # fmt: skip


@triton.jit
def dsa_gqa_sparse_decode(
    q_ptr, k_ptr, v_ptr, table_ptr, idx_ptr, out_ptr, lse_ptr,
    HQ, HKV, GROUP, K_SEL, qk_scale, stride_qb, stride_qh, stride_tb, stride_ib, stride_ig,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
    PAGE: tl.constexpr, EVICT: tl.constexpr, UPCAST: tl.constexpr, LAUNCH_MERGE: tl.constexpr,
):  # fmt: skip
    """Program (request x KV head, split): the GROUP query heads of one KV head over the
    split's selected tokens. K/V pools are contiguous ``[P, PAGE, HKV, D]``.
    ``LAUNCH_MERGE`` as in ``dsa_mla_sparse_decode``."""
    if LAUNCH_MERGE:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    g = pid % HKV
    hh = tl.arange(0, BLOCK_H)
    hm = hh < GROUP
    h = g * GROUP + hh
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=hm[:, None],
                other=0.0)  # fmt: skip
    q = _dot_in(q, UPCAST)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    idx_row = idx_ptr + b * stride_ib + g * stride_ig
    start = split * CHUNK
    end = start + CHUNK
    if end > K_SEL:
        end = K_SEL
    for it in range(0, CHUNK // BLOCK_N):
        n = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
        tok = tl.load(idx_row + n, mask=n < end, other=-1)
        valid = tok >= 0
        page = tl.load(table_ptr + b * stride_tb + tok // PAGE, mask=valid, other=0)
        rec = ((page.to(tl.int64) * PAGE + (tok % PAGE)) * HKV + g) * D
        kv_off = rec[:, None] + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0, eviction_policy=EVICT)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0, eviction_policy=EVICT)
        s = tl.dot(q, tl.trans(_dot_in(k, UPCAST)))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        p, alpha, m, den = _softmax_step(s, m, den)
        acc = tl.dot(_dot_in(p, UPCAST), _dot_in(v, UPCAST), acc * alpha[:, None])
    row = (b * tl.num_programs(1) + split) * HQ + h
    _finish(
        acc, m, den, out_ptr, row.to(tl.int64)[:, None] * D + d[None, :], lse_ptr, row, hm, True
    )


@triton.jit
def dsa_merge_splits(o_part, lse_part, out_ptr, lse_ptr, H, S, DV: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                     WAIT_PRIOR: tl.constexpr):  # fmt: skip
    """Program (request x head, block of BLOCK_D output dims): merge the S splits,
    ``out = sum_s exp(lse_s - lse) o_s`` with ``lse = log sum_s exp(lse_s)``; one tile load.
    ``WAIT_PRIOR``: launched dependent on the attention kernel, wait for its partials."""
    if WAIT_PRIOR:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)  # b * H + h
    dblk = tl.program_id(1)
    b = row // H
    h = row % H
    s = tl.arange(0, BLOCK_S)
    sm = s < S
    part = (b * S + s) * H + h
    lse = tl.load(lse_part + part, mask=sm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx)
    total = tl.sum(w, axis=0)
    empty = total == 0.0
    c = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    o = tl.load(o_part + part.to(tl.int64)[:, None] * DV + c[None, :], mask=sm[:, None], other=0.0)
    acc = tl.sum(o * w[:, None], axis=0) / tl.where(empty, 1.0, total)
    tl.store(out_ptr + row.to(tl.int64) * DV + c, acc.to(out_ptr.dtype.element_ty))
    if dblk == 0:
        lse_out = tl.where(empty, float("-inf"), mx + tl.log(tl.where(empty, 1.0, total)))
        tl.store(lse_ptr + row, lse_out)


# -- launchers ----------------------------------------------------------------------------------
def plan_splits(work: int, k_sel: int, block_n: int, sms: int,
                num_splits: int | None, per_sm: int) -> tuple[int, int]:  # fmt: skip
    """(splits, tokens per split) for ``work`` programs before the split on ``sms`` SMs:
    enough splits for one wave of ``per_sm`` programs per SM (no more: a second wave and the
    merge of more partials cost more than they hide), but at least ``MIN_SPLIT_TOKENS``
    tokens per split (each program also loads its query heads). The simulator sizes the
    split-K partials with it (``decode_step.split_partial_bytes``)."""
    if num_splits is None:
        most = max(1, k_sel // max(block_n, MIN_SPLIT_TOKENS))
        num_splits = max(1, min(per_sm * sms // work, most))
    chunk = -(-k_sel // max(1, num_splits))
    chunk = -(-chunk // block_n) * block_n
    return max(1, -(-k_sel // chunk)), chunk


def dependent_launch(pdl: bool, device: torch.device) -> bool:
    """Whether to launch a kernel as a programmatic dependent launch when ``pdl`` asks for it:
    only compiled kernels on an NVIDIA GPU of compute capability 9.0 or later (the CPU
    interpreter runs kernels one after another and cannot execute ``griddepcontrol``; ROCm
    has no such launch)."""
    return (
        pdl
        and not INTERPRET
        and device.type == "cuda"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def _merge(
    o_part: torch.Tensor, lse_part: torch.Tensor, out_dtype: torch.dtype, dependent: bool = False
):
    """The split merge's launch; ``dependent``: as a programmatic dependent launch (the
    launcher's ``dependent_launch``)."""
    b, s, h, dv = o_part.shape
    out = torch.empty((b, h, dv), dtype=out_dtype, device=o_part.device)
    lse = torch.empty((b, h), dtype=torch.float32, device=o_part.device)
    block_s = max(2, _pow2(s))
    block_d = min(dv, max(16, 8192 // block_s))  # a [BLOCK_S, BLOCK_D] tile of <= 8K floats
    extra = {"launch_pdl": True} if dependent else {}
    dsa_merge_splits[(b * h, dv // block_d)](
        o_part, lse_part, out, lse, h, s, DV=dv, BLOCK_S=block_s, BLOCK_D=block_d,
        WAIT_PRIOR=dependent, **extra,
    )  # fmt: skip
    return out, lse


def _outputs(b: int, splits: int, h: int, dv: int, device: torch.device):
    if splits == 1:
        return (torch.empty((b, h, dv), dtype=torch.bfloat16, device=device),
                torch.empty((b, h), dtype=torch.float32, device=device))  # fmt: skip
    return (torch.empty((b, splits, h, dv), dtype=torch.float32, device=device),
            torch.empty((b, splits, h), dtype=torch.float32, device=device))  # fmt: skip


def mla_head_block(heads: int) -> int:
    """Query heads per program of ``mla_sparse_decode`` by default: up to 64 (a program holds
    a ``[BLOCK_H, 512]`` float32 accumulator), at least 16 (the smallest ``tl.dot``)."""
    return min(64, max(16, _pow2(heads)))


def mla_sparse_decode(
    q: torch.Tensor,
    cache: MLACache,
    indices: torch.Tensor,
    sm_scale: float,
    *,
    evict: str = "",
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int = MLA_BLOCK_N,
    num_warps: int = 8,
    num_stages: int = 2,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decode: ``(out bf16 [B, H, 512], lse float32 [B, H])`` (natural log).

    ``q`` ``[B, H, 576]`` bf16; ``indices`` int32 ``[B, k]`` (or ``[B, 1, k]``) token
    positions, -1 = none; ``sm_scale`` multiplies ``q . k``. ``num_splits`` (split-K over the
    k tokens) defaults to one wave of programs, one per SM. ``evict``: the L2 hint of the KV
    loads ("", "evict_first", "evict_last"); a hinted launch runs with one pipeline stage,
    since a pipelined load drops the hint (``pipeline_stages``). ``pdl``: launch the split
    merge as a programmatic dependent launch (module docstring).
    """
    bsz, h, d = q.shape
    if d != MLA_DIM:
        raise ValueError(f"MLA queries have {MLA_DIM} dims per head, got {d}")
    indices = indices.reshape(bsz, -1)
    k_sel = indices.shape[1]
    block_h = block_h or mla_head_block(h)
    n_hb = -(-h // block_h)
    # a program holds a [BLOCK_H, 512] float32 accumulator: 8 warps fill an SM's registers
    splits, chunk = plan_splits(
        bsz * n_hb, k_sel, block_n, _sm_count(q.device), num_splits, per_sm=MLA_PER_SM
    )
    out, lse = _outputs(bsz, splits, h, MLA_LATENT, q.device)
    dependent = splits > 1 and dependent_launch(pdl, q.device)
    pool = cache.pool
    fp8 = cache.fp8
    if fp8 and pool.shape[-1] != MLA_FP8_BYTES:
        raise ValueError(f"fp8 MLA pool must be uint8 [P, page, {MLA_FP8_BYTES}]")
    kv_u8 = pool if fp8 else pool.view(torch.uint8)
    kv_f32 = pool.view(torch.float32)
    kv_bf16 = pool.view(torch.bfloat16)
    table = cache.pages.table
    dsa_mla_sparse_decode[(bsz * n_hb, splits)](
        q, kv_bf16, kv_u8, kv_f32, table, indices, out, lse,
        h, k_sel, sm_scale * LOG2E, q.stride(0), q.stride(1), table.stride(0),
        indices.stride(0), BLOCK_H=block_h, BLOCK_N=block_n, CHUNK=chunk,
        PAGE=cache.pages.page_size, IS_FP8=fp8, EVICT=_check_evict(evict), UPCAST=INTERPRET,
        LAUNCH_MERGE=dependent,
        num_warps=num_warps, num_stages=pipeline_stages(evict, num_stages),
    )  # fmt: skip
    if splits == 1:
        return out, lse
    return _merge(out, lse, torch.bfloat16, dependent)


def gqa_sparse_decode(
    q: torch.Tensor,
    cache: GQACache,
    indices: torch.Tensor,
    sm_scale: float | None = None,
    *,
    evict: str = "",
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse GQA decode: ``(out bf16 [B, HQ, D], lse float32 [B, HQ])``.

    ``q`` ``[B, HQ, D]`` bf16; ``indices`` int32 ``[B, k]``, ``[B, 1, k]`` (one selection
    shared by all KV heads) or ``[B, kv_heads, k]`` (one per KV head); -1 = none.
    ``sm_scale`` defaults to ``D ** -0.5``; ``block_n`` (tokens per tile) to 256 when the
    requests' KV heads fill the SMs, else 128. ``evict`` and ``pdl`` as in
    ``mla_sparse_decode``.
    """
    bsz, hq, d = q.shape
    hkv = cache.kv_heads
    if hq % hkv or d != cache.head_dim:
        raise ValueError(
            f"{hq} query heads of dim {d} do not fit {hkv} KV heads of {cache.head_dim}"
        )
    if not (cache.k.is_contiguous() and cache.v.is_contiguous()):
        raise ValueError("GQA K/V pools must be contiguous [P, page, kv_heads, head_dim]")
    if indices.dim() == 2:
        indices = indices[:, None, :]
    if indices.shape[1] not in (1, hkv):
        raise ValueError(f"indices have {indices.shape[1]} selections per request; need 1 or {hkv}")
    indices = indices.contiguous()
    k_sel = indices.shape[2]
    group = hq // hkv
    if block_n is None:  # H200 sweep (tune_kernels.csv): 256 tokens per tile is 5% faster
        block_n = 256 if bsz * hkv >= _sm_count(q.device) else 128  # once programs fill the SMs
    # small programs, several resident per SM (3 per SM measured best on the H200)
    splits, chunk = plan_splits(
        bsz * hkv, k_sel, block_n, _sm_count(q.device), num_splits, per_sm=3
    )
    out, lse = _outputs(bsz, splits, hq, d, q.device)
    dependent = splits > 1 and dependent_launch(pdl, q.device)
    table = cache.pages.table
    scale = d**-0.5 if sm_scale is None else sm_scale
    dsa_gqa_sparse_decode[(bsz * hkv, splits)](
        q, cache.k, cache.v, table, indices, out, lse,
        hq, hkv, group, k_sel, scale * LOG2E, q.stride(0), q.stride(1), table.stride(0),
        indices.stride(0), indices.stride(1) if indices.shape[1] > 1 else 0,
        BLOCK_H=max(16, _pow2(group)), BLOCK_N=block_n, CHUNK=chunk, D=d,
        PAGE=cache.pages.page_size, EVICT=_check_evict(evict), UPCAST=INTERPRET,
        LAUNCH_MERGE=dependent,
        num_warps=num_warps, num_stages=pipeline_stages(evict, num_stages),
    )  # fmt: skip
    if splits == 1:
        return out, lse
    return _merge(out, lse, torch.bfloat16, dependent)


# -- references (float32 torch) -----------------------------------------------------------------
def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """Softmax attention of ``q`` [H, Dk] over ``keys`` [n, Dk] -> (out [H, Dv], lse [H])."""
    if len(keys) == 0:
        return q.new_zeros(q.shape[0], values.shape[1]), q.new_full((q.shape[0],), -math.inf)
    s = q @ keys.T * scale
    return torch.softmax(s, dim=-1) @ values, torch.logsumexp(s, dim=-1)


def mla_sparse_reference(
    q: torch.Tensor, cache: MLACache, indices: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 reference of ``mla_sparse_decode``: tokens read through the page table and
    dequantised exactly; returns ``(out float32 [B, H, 512], lse [B, H])``."""
    bsz = q.shape[0]
    indices = indices.reshape(bsz, -1)
    outs, lses = [], []
    for b in range(bsz):
        sel = indices[b][indices[b] >= 0].long()
        kv = cache.tokens(b, sel.cpu()).to(q.device)
        o, lse = _attend(q[b].float(), kv, kv[:, :MLA_LATENT], sm_scale)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def gqa_sparse_reference(
    q: torch.Tensor, cache: GQACache, indices: torch.Tensor, sm_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 reference of ``gqa_sparse_decode``: ``(out [B, HQ, D], lse [B, HQ])``."""
    bsz, hq, d = q.shape
    hkv = cache.kv_heads
    group = hq // hkv
    scale = d**-0.5 if sm_scale is None else sm_scale
    if indices.dim() == 2:
        indices = indices[:, None, :]
    out = torch.zeros((bsz, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.zeros((bsz, hq), dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for g in range(hkv):
            row = indices[b, g if indices.shape[1] > 1 else 0]
            sel = row[row >= 0].long().cpu()
            k = from_pages(cache.k, cache.pages, b, sel)[:, g].float().to(q.device)
            v = from_pages(cache.v, cache.pages, b, sel)[:, g].float().to(q.device)
            heads = slice(g * group, (g + 1) * group)
            out[b, heads], lse[b, heads] = _attend(q[b, heads].float(), k, v, scale)
    return out, lse
