"""DeepSeek's FlashMLA sparse fp8 decode (SM90) on dsacache's paged MLA cache.

FlashMLA reads the same 656-byte fp8 token layout as ``paged.quantize_mla_fp8`` and takes
the selection as *physical* slots (``page * 64 + offset``) rather than token positions, so
this wrapper translates the positions through the page table on the device (no host sync)
and returns what ``sparse_decode.mla_sparse_decode`` returns: ``(out bf16 [B, H, 512],
lse float32 [B, H])``. It makes FlashMLA a backend of the decode-step driver
(``decode_step(..., backend="flashmla")``) and of ``benchmarks/bench_kernels.py``.

FlashMLA ships as a wheel for CUDA GPUs of compute capability 9.x; install it with
``pip install --no-deps tokenspeed-flashmla==1.0.0.post20260429`` (see docs/gpu.md).
"""

from __future__ import annotations

from typing import Any

import torch

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


def physical_slots(indices: torch.Tensor, table: torch.Tensor, page_size: int) -> torch.Tensor:
    """Token positions ``[B, k]`` (-1 = none) -> physical slots ``[B, 1, k]`` int32 (-1 kept)."""
    valid = indices >= 0
    pos = indices.clamp_min(0).long()
    page = table.gather(1, pos // page_size).long()
    slots = torch.where(valid, page * page_size + pos % page_size, -1)
    return slots.to(torch.int32)[:, None, :].contiguous()


def flashmla_sparse_decode(
    q: torch.Tensor, cache: MLACache, indices: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse decode over the selected tokens: ``(out bf16 [B, H, 512], lse
    float32 [B, H])``, arguments as ``mla_sparse_decode``'s (fp8 cache only)."""
    if not cache.fp8 or cache.pool.shape[-1] != MLA_FP8_BYTES:
        raise ValueError("FlashMLA's sparse decode reads the fp8 MLA layout (656 B/token) only")
    flash_mla = _flash_mla()
    bsz, heads, _ = q.shape
    indices = indices.reshape(bsz, -1)
    if indices.shape[1] % TOPK_BLOCK:  # FlashMLA takes the selection in blocks of 64
        pad = TOPK_BLOCK - indices.shape[1] % TOPK_BLOCK
        indices = torch.nn.functional.pad(indices, (0, pad), value=-1)
    pages = cache.pages
    slots = physical_slots(indices, pages.table, pages.page_size)
    pool = cache.pool.view(cache.pool.shape[0], pages.page_size, 1, MLA_FP8_BYTES)
    key = (q.device, bsz, heads, pages.page_size, indices.shape[1])
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
