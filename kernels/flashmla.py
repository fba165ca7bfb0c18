"""DeepSeek's FlashMLA sparse fp8 decode (SM90) on dsacache's paged MLA cache.

FlashMLA reads the same 656-byte fp8 token layout as ``paged.quantize_mla_fp8`` and takes
the selection as *physical* slots (``page * 64 + offset``) rather than token positions, in
whole blocks of 64, so this wrapper translates the positions through the page table on the
device (one small Triton kernel, no host sync) and returns what ``sparse_decode.mla_sparse_decode`` returns: ``(out bf16 [B, H, 512],
lse float32 [B, H])``. It makes FlashMLA a backend of the decode-step driver
(``decode_step(..., backend="flashmla")``) and of ``benchmarks/bench_kernels.py``.

FlashMLA ships as a wheel for CUDA GPUs of compute capability 9.x; install it with
``pip install --no-deps tokenspeed-flashmla==1.0.0.post20260429`` (see docs/gpu.md).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from dsacache.kernels.paged import MLA_FP8_BYTES, MLA_LATENT, MLACache

WHEEL = "tokenspeed-flashmla==1.0.0.post20260429"
TOPK_BLOCK = 64  # FlashMLA's sparse decode reads k in blocks of 64 (-1 = no token)
_SCHEDULES: dict[tuple[Any, ...], Any] = {}  # FlashMLA's tile-scheduler state per shape


def _flash_mla() -> Any:
    try:
        import flash_mla
    except Exception as e:  # not installed, or built for another CUDA / torch
        raise RuntimeError(
            f"FlashMLA is not importable here ({type(e).__name__}: {e}); "
            f"install it with: pip install --no-deps {WHEEL}"
        ) from None
    return flash_mla


def flashmla_available() -> str | None:
    """``None`` when FlashMLA's sparse decode can run here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        return f"FlashMLA's sparse fp8 decode needs an SM90 GPU, this one is SM{major}x"
    try:
        _flash_mla()
    except RuntimeError as e:
        return str(e)
    return None


@triton.jit
def dsa_positions_to_slots(
    idx_ptr, table_ptr, out_ptr, K, K_OUT, stride_ib, stride_tb,
    PAGE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (block of the selection, request): physical slots of BLOCK token positions
    through the page table; -1 for -1 and for the padding from K up to K_OUT."""
    blk = tl.program_id(0)
    b = tl.program_id(1)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    tok = tl.load(idx_ptr + b * stride_ib + j, mask=j < K, other=-1)
    valid = tok >= 0
    page = tl.load(table_ptr + b * stride_tb + tok // PAGE, mask=valid, other=0)
    tl.store(out_ptr + b * K_OUT + j, tl.where(valid, page * PAGE + tok % PAGE, -1),
             mask=j < K_OUT)  # fmt: skip


def slots_for_flashmla(indices: torch.Tensor, table: torch.Tensor, page_size: int) -> torch.Tensor:
    """Physical slots of token positions ``[B, k]`` (-1 = none, kept) through the page table
    (as ``PageTable.slots``), padded with -1 to whole blocks of ``TOPK_BLOCK``: int32
    ``[B, 1, k']`` as FlashMLA takes the selection."""
    bsz, k = indices.shape
    k_out = -(-k // TOPK_BLOCK) * TOPK_BLOCK
    out = torch.empty((bsz, 1, k_out), dtype=torch.int32, device=indices.device)
    dsa_positions_to_slots[(k_out // TOPK_BLOCK, bsz)](
        indices, table, out, k, k_out, indices.stride(0), table.stride(0),
        PAGE=page_size, BLOCK=TOPK_BLOCK,
    )  # fmt: skip
    return out


def flashmla_sparse_decode(
    q: torch.Tensor, cache: MLACache, indices: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse decode over the selected tokens: ``(out bf16 [B, H, 512], lse
    float32 [B, H])``, arguments as ``mla_sparse_decode``'s (fp8 cache only)."""
    if not cache.fp8 or cache.pool.shape[-1] != MLA_FP8_BYTES:
        raise ValueError("FlashMLA's sparse decode reads the fp8 MLA layout (656 B/token) only")
    flash_mla = _flash_mla()
    bsz, heads, _ = q.shape
    pages = cache.pages
    slots = slots_for_flashmla(indices.reshape(bsz, -1), pages.table, pages.page_size)
    pool = cache.pool.view(cache.pool.shape[0], pages.page_size, 1, MLA_FP8_BYTES)
    key = (q.device, bsz, heads, pages.page_size, slots.shape[2])
    if key not in _SCHEDULES:
        _SCHEDULES[key] = flash_mla.get_mla_metadata()[0]
    out, lse = flash_mla.flash_mla_with_kvcache(
        q[:, None],
        pool.view(torch.float8_e4m3fn),
        None,
        None,
        MLA_LATENT,
        _SCHEDULES[key],
        softmax_scale=sm_scale,
        is_fp8_kvcache=True,
        indices=slots,
    )
    return out[:, 0], lse[:, :, 0]
