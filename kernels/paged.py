"""Paged KV caches of DSA decode (64-token pages) and their quantisation.

Layouts (bytes per token per layer, as ``simulator/layouts.py`` counts them):

- MLA bf16 (DeepSeek-V3): ``[num_pages, 64, 576]`` bf16, latent 512 then RoPE 64: 1152 B.
- MLA fp8 (DeepSeek-V3.2 sparse decode, FlashMLA's layout): ``[num_pages, 64, 656]`` uint8;
  bytes 0-511 the latent in fp8 e4m3, 512-527 four fp32 scales (one per 128 latent values,
  ``value = fp8 * scale``), 528-655 the RoPE part in bf16 (not quantised): 656 B.
- Indexer keys (lightning indexer): 128 fp8 e4m3 values and one fp32 scale per token, 132 B.
  A page is ``[64 * 132]`` uint8 stored key-major: the 64 keys (64 x 128 B) first, then the 64
  scales (64 x 4 B), so a page's keys are one contiguous 8 KiB block (as DeepGEMM's paged
  MQA-logits kernels read them). Other key dims ``D`` (a power of two >= 16, e.g. the 32-dim
  keys of the lightning indexer distilled for SmolLM2) keep this layout: ``[64 * (D + 4)]``
  per page, keys block then scales.
- GQA K/V (SmolLM2-135M: 3 KV heads x 64 dims): two pools ``[num_pages, 64, kv_heads,
  head_dim]`` bf16 (vLLM's arrangement): 2 x 3 x 64 x 2 = 768 B.

A ``PageTable`` maps request ``b``'s token ``t`` to the physical slot
``table[b, t // 64] * 64 + t % 64``; unused entries are -1. Pages are allocated contiguously
or from a shuffled free list (a workload parameter: it changes L2 set conflicts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAGE_SIZE = 64
MLA_LATENT = 512
MLA_ROPE = 64
MLA_DIM = MLA_LATENT + MLA_ROPE  # 576: q and k head dim of DeepSeek's absorbed MLA
FP8_GROUP = 128  # latent values per fp32 scale
MLA_BF16_BYTES = MLA_DIM * 2  # 1152
MLA_FP8_BYTES = MLA_LATENT + 4 * (MLA_LATENT // FP8_GROUP) + 2 * MLA_ROPE  # 656
INDEX_DIM = 128  # DeepSeek-V3.2's indexer key dim (the default; any power of two >= 16 works)
INDEX_BYTES = INDEX_DIM + 4  # 132
FP8_MAX = 448.0  # largest finite float8 e4m3fn
PAGE_ORDERS = ("contiguous", "shuffled")


@dataclass
class PageTable:
    """Page table of a batch: ``table[b, i]`` is the physical page of request b's i-th page."""

    table: torch.Tensor  # int32 [batch, max_pages], -1 where no page
    num_pages: int
    page_size: int = PAGE_SIZE

    @property
    def batch(self) -> int:
        return self.table.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens a request can hold (``max_pages * page_size``)."""
        return self.table.shape[1] * self.page_size

    def slots(self, b: int, tokens: torch.Tensor) -> torch.Tensor:
        """Physical slots (int64) of request ``b``'s token positions ``tokens``."""
        tokens = tokens.to(self.table.device, torch.int64)
        pages = self.table[b].to(torch.int64)[tokens // self.page_size]
        if (pages < 0).any():
            raise IndexError(f"request {b}: a token lies beyond the pages allocated to it")
        return pages * self.page_size + tokens % self.page_size

    def to(self, device: torch.device | str) -> PageTable:
        return PageTable(self.table.to(device), self.num_pages, self.page_size)


def make_page_table(
    tokens_per_request: Sequence[int],
    *,
    order: str = "shuffled",
    seed: int = 0,
    page_size: int = PAGE_SIZE,
    device: torch.device | str = "cpu",
) -> PageTable:
    """Allocate ``ceil(tokens / page_size)`` pages per request from one pool.

    ``order="contiguous"`` gives request 0 the first pages, request 1 the next, ...;
    ``"shuffled"`` draws every page from a randomly permuted free list (seeded).
    """
    if order not in PAGE_ORDERS:
        raise ValueError(f"page order {order!r}: choose one of {', '.join(PAGE_ORDERS)}")
    counts = [-(-int(n) // page_size) for n in tokens_per_request]
    if any(n < 0 for n in tokens_per_request):
        raise ValueError(f"token counts must be >= 0, got {list(tokens_per_request)}")
    total = sum(counts)
    if order == "shuffled":
        gen = torch.Generator().manual_seed(seed)
        free = torch.randperm(total, generator=gen, dtype=torch.int64)
    else:
        free = torch.arange(total, dtype=torch.int64)
    table = torch.full((len(counts), max(counts, default=0) or 1), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(counts):
        table[b, :n] = free[start : start + n].to(torch.int32)
        start += n
    return PageTable(table.to(device), total, page_size)


def to_pages(rows: Sequence[torch.Tensor], pt: PageTable) -> torch.Tensor:
    """Scatter per-request token rows ``rows[b]`` ``[L_b, *record]`` into a page pool
    ``[num_pages, page_size, *record]`` (same dtype); unwritten slots are zero."""
    record = tuple(rows[0].shape[1:])
    pool = torch.zeros(
        (pt.num_pages * pt.page_size, *record), dtype=rows[0].dtype, device=rows[0].device
    )
    for b, r in enumerate(rows):
        if len(r):
            pool[pt.slots(b, torch.arange(len(r))).to(r.device)] = r
    return pool.view(pt.num_pages, pt.page_size, *record)


def from_pages(pool: torch.Tensor, pt: PageTable, b: int, tokens: torch.Tensor) -> torch.Tensor:
    """Token records of request ``b`` at positions ``tokens``, read through the page table."""
    flat = pool.reshape(pt.num_pages * pt.page_size, *pool.shape[2:])
    return flat[pt.slots(b, tokens).to(pool.device)]


# -- fp8 quantisation ---------------------------------------------------------------------------
def _fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_mla_fp8(kv: torch.Tensor) -> torch.Tensor:
    """Pack MLA tokens ``[..., 576]`` (latent 512 + RoPE 64) into the 656-byte fp8 layout."""
    if kv.shape[-1] != MLA_DIM:
        raise ValueError(f"MLA tokens have {MLA_DIM} values, got last dim {kv.shape[-1]}")
    lead = kv.shape[:-1]
    groups = kv[..., :MLA_LATENT].float().unflatten(-1, (-1, FP8_GROUP))
    scale = _fp8_scale(groups.abs().amax(-1))  # [..., 4]
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = torch.empty((*lead, MLA_FP8_BYTES), dtype=torch.uint8, device=kv.device)
    out[..., :MLA_LATENT] = q.flatten(-2).view(torch.uint8)
    out[..., MLA_LATENT : MLA_LATENT + 16] = scale.contiguous().view(torch.uint8)
    out[..., MLA_LATENT + 16 :] = (
        kv[..., MLA_LATENT:].to(torch.bfloat16).contiguous().view(torch.uint8)
    )
    return out


def dequantize_mla_fp8(packed: torch.Tensor) -> torch.Tensor:
    """Float32 MLA tokens ``[..., 576]`` from the 656-byte fp8 layout (exact: no rounding)."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != MLA_FP8_BYTES:
        raise ValueError(
            f"expected uint8 [..., {MLA_FP8_BYTES}], got {packed.dtype} {packed.shape}"
        )
    packed = packed.contiguous()
    latent = packed[..., :MLA_LATENT].view(torch.float8_e4m3fn).float()
    scale = packed[..., MLA_LATENT : MLA_LATENT + 16].contiguous().view(torch.float32)
    latent = (latent.unflatten(-1, (-1, FP8_GROUP)) * scale[..., None]).flatten(-2)
    rope = packed[..., MLA_LATENT + 16 :].contiguous().view(torch.bfloat16).float()
    return torch.cat([latent, rope], dim=-1)


def check_index_dim(dim: int) -> int:
    """Return ``dim`` if it is a valid indexer key dim (a power of two >= 16, what the Triton
    kernel's ``tl.dot`` takes), else raise ``ValueError``."""
    if not isinstance(dim, int) or dim < 16 or dim & (dim - 1):
        raise ValueError(
            f"indexer keys must have a power-of-two dim >= 16 (DeepSeek-V3.2: {INDEX_DIM}), "
            f"got {dim}"
        )
    return dim


def index_bytes(dim: int = INDEX_DIM) -> int:
    """Bytes per token of an indexer key cache with ``dim``-dim keys (fp8 values + fp32 scale)."""
    return check_index_dim(dim) + 4


def quantize_index_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer keys ``[..., D]`` (D = 128 in DeepSeek-V3.2; any power of two >= 16) -> (fp8
    e4m3 values as uint8 ``[..., D]``, fp32 scale ``[...]``), one scale per token
    (``key = fp8 * scale``)."""
    check_index_dim(keys.shape[-1])
    scale = _fp8_scale(keys.float().abs().amax(-1))
    q = (keys.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), scale


def dequantize_index_keys(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 keys from fp8 values (uint8) and per-token scales (exact)."""
    return values.contiguous().view(torch.float8_e4m3fn).float() * scale[..., None].float()


# -- caches -------------------------------------------------------------------------------------
@dataclass
class MLACache:
    """One layer's MLA latent cache: ``pool`` is bf16 ``[P, 64, 576]`` or uint8 ``[P, 64, 656]``."""

    pool: torch.Tensor
    pages: PageTable

    @property
    def fp8(self) -> bool:
        return self.pool.dtype == torch.uint8

    @property
    def bytes_per_token(self) -> int:
        return MLA_FP8_BYTES if self.fp8 else MLA_BF16_BYTES

    def tokens(self, b: int, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 ``[n, 576]`` records of request ``b``'s tokens (dequantised)."""
        rec = from_pages(self.pool, self.pages, b, tokens)
        return dequantize_mla_fp8(rec) if self.fp8 else rec.float()


@dataclass
class IndexKeyCache:
    """One layer's indexer keys: uint8 ``[P, 64 * (D + 4)]`` (64 fp8 keys, then 64 fp32
    scales); ``D`` = 128 (132 bytes per token) for DeepSeek-V3.2."""

    pool: torch.Tensor
    pages: PageTable

    @property
    def dim(self) -> int:
        """Key dim ``D`` (from the pool's width)."""
        width = self.pool.shape[1]
        page = self.pages.page_size
        if width % page:
            raise ValueError(f"indexer key pool width {width} is not a multiple of {page}")
        return check_index_dim(width // page - 4)

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 values as uint8 ``[P, 64, D]``, fp32 scales ``[P, 64]``) viewing the pool."""
        page = self.pages.page_size
        p, d = self.pool.shape[0], self.dim
        values = self.pool[:, : page * d].view(p, page, d)
        scales = self.pool[:, page * d :].view(torch.float32)
        return values, scales

    def keys(self, b: int, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 ``[n, D]`` keys of request ``b``'s tokens (dequantised)."""
        values, scales = self.views()
        v = from_pages(values, self.pages, b, tokens)
        s = from_pages(scales.unsqueeze(-1), self.pages, b, tokens)[:, 0]
        return dequantize_index_keys(v, s)


@dataclass
class GQACache:
    """One layer's GQA cache: K and V pools, bf16 ``[P, 64, kv_heads, head_dim]`` each."""

    k: torch.Tensor
    v: torch.Tensor
    pages: PageTable

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]


def build_mla_cache(rows: Sequence[torch.Tensor], pt: PageTable, fp8: bool) -> MLACache:
    """MLA cache from per-request tokens ``rows[b]`` ``[L_b, 576]`` (bf16 or float32)."""
    if fp8:
        return MLACache(to_pages([quantize_mla_fp8(r) for r in rows], pt), pt)
    return MLACache(to_pages([r.to(torch.bfloat16) for r in rows], pt), pt)


def build_index_cache(keys: Sequence[torch.Tensor], pt: PageTable) -> IndexKeyCache:
    """Indexer key cache from per-request keys ``keys[b]`` ``[L_b, D]`` (D = 128 for
    DeepSeek-V3.2; any power of two >= 16)."""
    page = pt.page_size
    dim = check_index_dim(int(keys[0].shape[-1]))
    quant = [quantize_index_keys(k) for k in keys]
    values = to_pages([v for v, _ in quant], pt)  # [P, page, D] uint8
    scales = to_pages([s for _, s in quant], pt)  # [P, page] float32
    pool = torch.cat(
        [values.reshape(pt.num_pages, -1), scales.contiguous().view(torch.uint8)], dim=1
    )
    assert pool.shape[1] == page * index_bytes(dim)
    return IndexKeyCache(pool.contiguous(), pt)


def build_gqa_cache(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], pt: PageTable
) -> GQACache:
    """GQA cache from per-request ``keys[b]``, ``values[b]`` ``[L_b, kv_heads, head_dim]``."""
    k = to_pages([x.to(torch.bfloat16) for x in keys], pt)
    v = to_pages([x.to(torch.bfloat16) for x in values], pt)
    return GQACache(k, v, pt)


def random_mla_cache(
    pt: PageTable, fp8: bool, *, seed: int = 0, device: torch.device | str = "cpu",
    chunk_pages: int = 4096,
) -> MLACache:  # fmt: skip
    """A cache of random tokens filling every page (for benchmarks), built chunk by chunk so
    large pools never need a float32 copy."""
    gen = torch.Generator(device=device).manual_seed(seed)
    width = MLA_FP8_BYTES if fp8 else MLA_DIM
    dtype = torch.uint8 if fp8 else torch.bfloat16
    pool = torch.empty((pt.num_pages, pt.page_size, width), dtype=dtype, device=device)
    for p0 in range(0, pt.num_pages, chunk_pages):
        p1 = min(p0 + chunk_pages, pt.num_pages)
        x = torch.randn(
            (p1 - p0, pt.page_size, MLA_DIM), generator=gen, device=device, dtype=torch.float32
        )
        pool[p0:p1] = quantize_mla_fp8(x) if fp8 else x.to(torch.bfloat16)
    return MLACache(pool, pt)


def random_index_cache(
    pt: PageTable, *, seed: int = 0, device: torch.device | str = "cpu", chunk_pages: int = 4096,
    dim: int = INDEX_DIM,
) -> IndexKeyCache:  # fmt: skip
    """An indexer key cache of random ``dim``-dim keys filling every page (for benchmarks)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    page = pt.page_size
    pool = torch.empty((pt.num_pages, page * index_bytes(dim)), dtype=torch.uint8, device=device)
    for p0 in range(0, pt.num_pages, chunk_pages):
        p1 = min(p0 + chunk_pages, pt.num_pages)
        x = torch.randn((p1 - p0, page, dim), generator=gen, device=device)
        v, s = quantize_index_keys(x)
        pool[p0:p1, : page * dim] = v.reshape(p1 - p0, -1)
        pool[p0:p1, page * dim :] = s.view(torch.uint8)
    return IndexKeyCache(pool, pt)


def random_gqa_cache(
    pt: PageTable, kv_heads: int = 3, head_dim: int = 64, *, seed: int = 0,
    device: torch.device | str = "cpu",
) -> GQACache:  # fmt: skip
    """A GQA cache of random K and V filling every page (for benchmarks)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (pt.num_pages, pt.page_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
    v = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
    return GQACache(k, v, pt)


def append_mla(cache: MLACache, context_lens: torch.Tensor, kv: torch.Tensor) -> None:
    """Write each request's new token ``kv[b]`` ``[576]`` at position ``context_lens[b]``
    (in place; a torch scatter of one record per request, quantised for the fp8 layout)."""
    slots = _append_slots(cache.pages, context_lens)
    rec = quantize_mla_fp8(kv) if cache.fp8 else kv.to(torch.bfloat16)
    cache.pool.view(-1, cache.pool.shape[-1])[slots] = rec


def append_index_keys(cache: IndexKeyCache, context_lens: torch.Tensor, keys: torch.Tensor) -> None:
    """Write each request's new indexer key ``keys[b]`` ``[D]`` at ``context_lens[b]`` (a
    device-side scatter, no host sync)."""
    if keys.shape[-1] != cache.dim:
        raise ValueError(f"new indexer keys have {keys.shape[-1]} dims, the cache {cache.dim}")
    slots = _append_slots(cache.pages, context_lens)
    values, scales = cache.views()
    v, s = quantize_index_keys(keys)
    page = cache.pages.page_size
    values[slots // page, slots % page] = v
    scales[slots // page, slots % page] = s


def _append_slots(pt: PageTable, context_lens: torch.Tensor) -> torch.Tensor:
    pos = context_lens.to(pt.table.device, torch.int64)
    rows = torch.arange(pt.batch, device=pt.table.device)
    pages = pt.table[rows, pos // pt.page_size].to(torch.int64)
    return pages * pt.page_size + pos % pt.page_size
