"""DeepSeek-V3.2's lightning indexer for decode: scores of every cached token, then top-k.

For one query token per request, token ``t`` of request ``b`` scores

    logit[b, t] = scale[t] * sum_h w[b, h] * ReLU(q[b, h] . key_fp8[t])

(64 indexer heads of dim 128 in DeepSeek-V3.2; keys fp8 e4m3 with one fp32 scale per token;
``scale * ReLU(x) = ReLU(scale * x)`` since scales are positive). The Triton kernel reads the
paged keys (``paged.IndexKeyCache``) one 64-token page per step: a page's keys are one 8 KiB
block, the loads carry an optional L2 eviction hint. The key dim ``D`` is 128 by default; any
power of two >= 16 works (the lightning indexer distilled for SmolLM2 has 32-dim keys), with
the same page layout (keys block, then scales). ``select_topk`` then keeps the k best
tokens per request in torch, with the first ``sink`` and last ``window`` tokens forced in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsacache.kernels.paged import IndexKeyCache, check_index_dim

INTERPRET = bool(triton.knobs.runtime.interpret)  # decided when the kernels are decorated
EVICT_POLICIES = ("", "evict_first", "evict_last")


def _check_evict(evict: str) -> str:
    if evict not in EVICT_POLICIES:
        raise ValueError(f"eviction policy {evict!r}: choose one of {EVICT_POLICIES}")
    return evict


@triton.jit
def dsa_indexer_logits(
    q_ptr, w_ptr, keys_u8, keys_f32, table_ptr, ctx_ptr, out_ptr,
    H, stride_qb, stride_qh, stride_wb, stride_tb, stride_ob, max_pages,
    BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, PAGES_PER_PROG: tl.constexpr,
    EVICT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Logits of ``PAGES_PER_PROG`` pages of one request: program (page block, request).
    Tokens at or past the request's context length get -inf. ``UPCAST`` feeds float32 to
    ``tl.dot`` (only under the CPU interpreter, whose bf16 dot is wrong in Triton 3.6)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    t = tl.arange(0, PAGE)
    q = tl.load(
        q_ptr + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=h[:, None] < H, other=0.0
    )
    w = tl.load(w_ptr + b * stride_wb + h, mask=h < H, other=0.0).to(tl.float32)
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(tl.bfloat16)
    page_bytes = PAGE * (D + 4)
    for i in range(PAGES_PER_PROG):
        p = pid * PAGES_PER_PROG + i
        tok = p * PAGE + t
        if p * PAGE < ctx:
            page = tl.load(table_ptr + b * stride_tb + p).to(tl.int64)
            k = tl.load(
                keys_u8 + page * page_bytes + t[:, None] * D + d[None, :], eviction_policy=EVICT
            )
            scale = tl.load(keys_f32 + page * (page_bytes // 4) + (PAGE * D) // 4 + t,
                            eviction_policy=EVICT)  # fmt: skip
            k = k.to(tl.float8e4nv, bitcast=True)
            if UPCAST:
                k = k.to(tl.float32)
            else:
                k = k.to(tl.bfloat16)
            s = tl.dot(q, tl.trans(k))  # [BLOCK_H, PAGE], float32
            s = tl.maximum(s, 0.0) * w[:, None]
            score = tl.sum(s, axis=0) * scale
            score = tl.where(tok < ctx, score, float("-inf"))
        else:
            score = tl.full([PAGE], float("-inf"), tl.float32)
        tl.store(out_ptr + b * stride_ob + tok, score, mask=p < max_pages)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def indexer_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    cache: IndexKeyCache,
    context_lens: torch.Tensor,
    max_context: int | None = None,
    *,
    evict: str = "",
    pages_per_prog: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Indexer logits ``[B, max_context]`` float32 (-inf past each request's context).

    ``q`` ``[B, H, D]`` (bf16; D = the cache's key dim, 128 for DeepSeek-V3.2, any power of
    two >= 16), ``weights`` ``[B, H]`` (per-head weights, any float), ``context_lens`` int32
    ``[B]`` on the device. ``max_context`` defaults to the page table's capacity (pass it to
    avoid scoring empty pages). ``evict`` is the L2 hint of the key loads ("", "evict_first",
    "evict_last").
    """
    b, h, d = q.shape
    check_index_dim(d)
    if d != cache.dim:
        raise ValueError(f"indexer queries have {d} dims but the cached keys {cache.dim}")
    pt = cache.pages
    max_context = pt.capacity if max_context is None else max_context
    max_pages = min(-(-max_context // pt.page_size), pt.table.shape[1])
    if pages_per_prog is None:  # enough programs to fill the GPU, a few pages each
        pages_per_prog = max(1, min(8, (b * max_pages) // 1024))
    grid = (-(-max_pages // pages_per_prog), b)
    out = torch.empty((b, grid[0] * pages_per_prog * pt.page_size), device=q.device,
                      dtype=torch.float32)  # fmt: skip
    table = pt.table
    dsa_indexer_logits[grid](
        q, weights, cache.pool, cache.pool.view(torch.float32), table, context_lens, out,
        h, q.stride(0), q.stride(1), weights.stride(0), table.stride(0), out.stride(0), max_pages,
        BLOCK_H=max(16, _pow2(h)), D=d, PAGE=pt.page_size, PAGES_PER_PROG=pages_per_prog,
        EVICT=_check_evict(evict), UPCAST=INTERPRET, num_warps=num_warps,
    )  # fmt: skip
    return out[:, :max_context]


def indexer_logits_reference(
    q: torch.Tensor,
    weights: torch.Tensor,
    cache: IndexKeyCache,
    context_lens: torch.Tensor,
    max_context: int | None = None,
) -> torch.Tensor:
    """Plain torch (float32) reference of ``indexer_logits``: keys read through the pages."""
    ctx = [int(c) for c in context_lens.tolist()]
    width = max(ctx) if max_context is None else max_context
    out = torch.full((q.shape[0], width), float("-inf"), dtype=torch.float32, device=q.device)
    for b, n in enumerate(ctx):
        if n == 0:
            continue
        keys = cache.keys(b, torch.arange(n)).to(q.device)  # [n, D] float32
        s = torch.relu(q[b].float() @ keys.T) * weights[b].float()[:, None]
        out[b, :n] = s.sum(0)
    return out


def select_topk(
    logits: torch.Tensor, context_lens: torch.Tensor, k: int, sink: int = 0, window: int = 0
) -> torch.Tensor:
    """Top-k token positions per request: int32 ``[B, k]``, ascending, -1-padded at the end
    when a context holds fewer than k tokens (then all its tokens are chosen).

    The first ``sink`` and last ``window`` tokens of each context are always chosen (they count
    towards k, so ``sink + window <= k``). Invalid logits (NaN) rank below every valid token.
    Runs on the device with no host sync (torch.topk + sort).
    """
    if k < 1 or sink < 0 or window < 0 or sink + window > k:
        raise ValueError(f"need k >= 1 and 0 <= sink + window <= k, got k={k} {sink=} {window=}")
    bsz, width = logits.shape
    ctx = context_lens.to(logits.device, torch.int64)[:, None]
    pos = torch.arange(width, device=logits.device)[None, :]
    valid = pos < ctx
    forced = (pos < sink) | (pos >= ctx - window)
    lowest = torch.finfo(torch.float32).min
    score = torch.nan_to_num(logits.float(), nan=lowest, neginf=lowest, posinf=lowest)
    score = torch.where(forced, torch.inf, score)
    score = torch.where(valid, score, -torch.inf)
    kk = min(k, width)
    top = torch.topk(score, kk, dim=1, sorted=False).indices
    top = torch.where(top < ctx, top, width)  # invalid picks (context < k) sort to the end
    top = torch.sort(top, dim=1).values
    top = torch.where(top < width, top, -1).to(torch.int32)
    if kk < k:
        pad = torch.full((bsz, k - kk), -1, dtype=torch.int32, device=logits.device)
        top = torch.cat([top, pad], dim=1)
    return top


def select_topk_reference(
    logits: torch.Tensor, context_lens: torch.Tensor, k: int, sink: int = 0, window: int = 0
) -> list[torch.Tensor]:
    """Plain reference of ``select_topk``: per request, the sorted chosen positions (int64);
    NaN scores rank last."""
    out = []
    for b, n in enumerate(int(c) for c in context_lens.tolist()):
        if n <= k:
            out.append(torch.arange(n))
            continue
        forced = set(range(min(sink, n))) | set(range(max(0, n - window), n))
        rest = [t for t in range(n) if t not in forced]
        scores = torch.nan_to_num(logits[b, rest].float().cpu(), nan=-torch.inf)
        order = torch.argsort(scores, descending=True, stable=True)[: k - len(forced)]
        chosen = sorted(forced | {rest[i] for i in order.tolist()})
        out.append(torch.tensor(chosen, dtype=torch.int64))
    return out
