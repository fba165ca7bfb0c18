"""DeepSeek-V3.2's lightning indexer for decode: scores of every cached token, then top-k.

For one query token per request, token ``t`` of request ``b`` scores

    logit[b, t] = scale[t] * sum_h w[b, h] * ReLU(q[b, h] . key_fp8[t])

(64 indexer heads of dim 128 in DeepSeek-V3.2; keys fp8 e4m3 with one fp32 scale per token;
``scale * ReLU(x) = ReLU(scale * x)`` since scales are positive). The Triton kernel reads the
paged keys (``paged.IndexKeyCache``) two 64-token pages per step (a page's keys are one
8 KiB block; the loads carry an optional L2 eviction hint) and multiplies keys by queries on
the tensor cores in fp8: the query is quantised to fp8 e4m3 per head, its scale folded into
the head's weight, as DeepGEMM's fp8 MQA-logits kernels that DeepSeek-V3.2 uses take it
(``query_fp8=False`` keeps bf16 queries). The key dim ``D`` is 128 by default; any power of
two >= 16 works (the lightning indexer distilled for SmolLM2 has 32-dim keys), with the same
page layout (keys block, then scales). ``select_topk`` then keeps the k best tokens per
request (radix select, ``kernels/topk.py``), with the first ``sink`` and last ``window``
tokens forced in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsacache.kernels.paged import FP8_MAX, IndexKeyCache, check_index_dim
from dsacache.kernels.topk import radix_topk

INTERPRET = bool(triton.knobs.runtime.interpret)  # decided when the kernels are decorated
EVICT_POLICIES = ("", "evict_first", "evict_last")
_FP8_MAX = tl.constexpr(FP8_MAX)  # a global a Triton kernel may read
FP8_DOT_MIN_DIM = 32  # fp8 tensor-core products need K >= 32: smaller key dims stay bf16
# launch defaults from benchmarks/tune_kernels.py on the H200 (docs/results/h200-kernels/
# tune_kernels.csv): one page per loop step, 4 warps (and then 2 stages) were fastest at
# batch 8-64 x context 64K-128K, 1.07-1.32x faster than 2 pages per step, 3 stages. Since
# each program reads its pages once, before its loop, 3 stages are 7-8% faster than 2 on
# the H100 (docs/results/h100-kernels/pipeline-1208/). Pages per program are sized per grid
# (balanced_pages_per_prog; H100 A/B against the fixed 16 pages of that sweep:
# docs/results/h100-kernels/waves-1207/)
PAGES_PER_STEP = 1
MAX_PAGES_PER_PROG = 32
# Resident programs per SM of the default launch: 4 warps at 94 registers a thread (95 with
# the pages read once, sm_90 build), so the registers allow 5 (ncu on the H100, 2026-12-06).
# 16 pages per program left a batch-8 x 64K grid (512 programs) at 0.78 of one wave of 660,
# with DRAM throughput at 58%.
PROGRAMS_PER_SM = 5
PROGRAM_OVERHEAD_PAGES = 2  # a program's query load and quantisation, in pages of keys


def _check_evict(evict: str) -> str:
    if evict not in EVICT_POLICIES:
        raise ValueError(f"eviction policy {evict!r}: choose one of {EVICT_POLICIES}")
    return evict


def pipeline_stages(evict: str, num_stages: int) -> int:
    """Pipeline stages of a kernel whose tile loads carry the L2 hint ``evict``. Triton 3.6's
    software pipeliner turns the loads it pipelines into ``cp.async`` copies, which carry no
    eviction hint: a hinted load would reach the L2 as a normal one. Hinted launches of the
    decode kernels therefore run unpipelined (one stage). ``tests/test_kernel_hints.py``
    compiles the kernels for sm_90 and checks the PTX."""
    return 1 if _check_evict(evict) else num_stages


@triton.jit
def _e4m3_grid(x):
    """``x`` (float32, ``|x| <= 448``) rounded to the nearest fp8 e4m3 value, ties to even, as
    float32: what ``x.to(tl.float8e4nv)`` gives on the GPU. The CPU interpreter's own
    conversion mis-rounds values just below a power of two (Triton 3.6: 31.6 -> 16)."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum((bits >> 23) & 0xFF, 121)  # exponent, at least e4m3's smallest normal (-6)
    ulp = ((e - 3) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    y = x / ulp  # |y| < 16: adding 1.5 * 2**23 rounds it to an integer, ties to even
    return ((y + 12582912.0) - 12582912.0) * ulp


@triton.jit
def _step_pages(mine, slots, i, t, PAGE: tl.constexpr, PAGES_PER_STEP: tl.constexpr):
    """Page of each token ``t`` of step ``i``, picked from the program's pages ``mine``
    (one pick per step when a step is one page)."""
    if PAGES_PER_STEP == 1:
        page = tl.sum(tl.where(slots == i, mine, 0), axis=0) + tl.zeros_like(t)
    else:
        own = i * PAGES_PER_STEP + t // PAGE
        page = tl.sum(tl.where(slots[None, :] == own[:, None], mine[None, :], 0), axis=1)
    return page


@triton.jit
def _step_scales(keys_f32, mine, slots, pid, i, ctx, t, PAGE: tl.constexpr, D: tl.constexpr,
                 PAGES_PER_PROG: tl.constexpr, PAGES_PER_STEP: tl.constexpr,
                 EVICT: tl.constexpr):  # fmt: skip
    """Per-token key scales of step ``i`` of an indexer program whose pages are ``mine``
    (0 past the context and past the program's last step)."""
    tok = (pid * PAGES_PER_PROG + i * PAGES_PER_STEP) * PAGE + t
    own = i * PAGES_PER_STEP + t // PAGE
    page = _step_pages(mine, slots, i, t, PAGE, PAGES_PER_STEP)
    words = page.to(tl.int64) * (PAGE * (D + 4) // 4) + (PAGE * D) // 4 + t % PAGE
    live = (tok < ctx) & (own < PAGES_PER_PROG)
    return tl.load(keys_f32 + words, mask=live, other=0.0, eviction_policy=EVICT)


@triton.jit
def dsa_indexer_logits(
    q_ptr, w_ptr, keys_u8, keys_f32, table_ptr, ctx_ptr, out_ptr,
    H, stride_qb, stride_qh, stride_wb, stride_tb, stride_ob, max_pages,
    BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, PAGES_PER_PROG: tl.constexpr,
    PAGES_PER_STEP: tl.constexpr, QUERY_FP8: tl.constexpr, QUERY_QUANTISED: tl.constexpr,
    EVICT: tl.constexpr, UPCAST: tl.constexpr, PROG_SLOTS: tl.constexpr,
):  # fmt: skip
    """Logits of ``PAGES_PER_PROG`` pages of one request: program (page block, request), in
    steps of ``PAGES_PER_STEP`` pages. Tokens at or past the request's context length get
    -inf. The product is computed as keys x queries (``[tokens, heads]``) so that the sum over
    heads stays inside each warp. ``UPCAST`` feeds float32 to ``tl.dot`` (only under the CPU
    interpreter, whose bf16 dot is wrong in Triton 3.6). ``QUERY_QUANTISED``: the query
    arrives in fp8 with its per-head scales already folded into the weights."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    t = tl.arange(0, PAGES_PER_STEP * PAGE)
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=h[:, None] < H,
                other=0.0)  # fmt: skip
    if UPCAST or not QUERY_QUANTISED:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + b * stride_wb + h, mask=h < H, other=0.0).to(tl.float32)
    if QUERY_FP8 and not QUERY_QUANTISED:  # per-head scale, folded into the head's weight
        qs = tl.max(tl.abs(q), axis=1) / _FP8_MAX
        qs = tl.where(qs == 0.0, 1.0, qs)
        w = w * qs
        if UPCAST:
            q = _e4m3_grid(q / qs[:, None])
        else:
            q = (q / qs[:, None]).to(tl.float8e4nv)
    elif not QUERY_FP8 and not UPCAST:
        q = q.to(tl.bfloat16)
    q_t = tl.trans(q)
    page_bytes = PAGE * (D + 4)
    # The program's pages, read from the page table once (PROG_SLOTS: PAGES_PER_PROG rounded
    # up to a power of two). Read in the loop, each step's page made that step's key copy
    # and scale load wait for it, and the pipeliner could not issue the keys early.
    slots = tl.arange(0, PROG_SLOTS)
    first_page = pid * PAGES_PER_PROG
    mine = tl.load(
        table_ptr + b * stride_tb + first_page + slots,
        mask=(slots < PAGES_PER_PROG) & ((first_page + slots) * PAGE < ctx),
        other=0,
    )
    # each step's scales are loaded a step ahead: they are first needed after the product
    scale = _step_scales(keys_f32, mine, slots, pid, 0, ctx, t, PAGE, D, PAGES_PER_PROG,
                         PAGES_PER_STEP, EVICT)  # fmt: skip
    for i in range(PAGES_PER_PROG // PAGES_PER_STEP):  # constexpr (the interpreter needs it)
        tok = (pid * PAGES_PER_PROG + i * PAGES_PER_STEP) * PAGE + t
        p = tok // PAGE
        live = tok < ctx
        page = _step_pages(mine, slots, i, t, PAGE, PAGES_PER_STEP)
        base = page.to(tl.int64) * page_bytes
        k = tl.load(keys_u8 + base[:, None] + (t % PAGE)[:, None] * D + d[None, :],
                    mask=live[:, None], other=0, eviction_policy=EVICT)  # fmt: skip
        scale_next = _step_scales(keys_f32, mine, slots, pid, i + 1, ctx, t, PAGE, D,
                                  PAGES_PER_PROG, PAGES_PER_STEP, EVICT)  # fmt: skip
        k = k.to(tl.float8e4nv, bitcast=True)
        if UPCAST:
            k = k.to(tl.float32)
        elif not QUERY_FP8:
            k = k.to(tl.bfloat16)
        s = tl.dot(k, q_t)  # [tokens, heads], float32
        score = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1) * scale
        score = tl.where(live, score, float("-inf"))
        scale = scale_next
        tl.store(out_ptr + b * stride_ob + tok, score, mask=p < max_pages)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SMS: dict[str, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = str(device)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[key]


def balanced_pages_per_prog(
    batch: int, pages: int, pages_per_step: int, device: torch.device
) -> int:
    """Pages per indexer program (whole loop steps, at most ``MAX_PAGES_PER_PROG``) that
    make the grid's waves of ``PROGRAMS_PER_SM`` programs per SM cost least: waves x
    (pages + ``PROGRAM_OVERHEAD_PAGES``), the larger program on a tie. A grid of fixed-size
    programs leaves the last wave's slots idle (at batch 8 x 64K, 16 pages a program filled
    0.78 of a wave; 13 fill 0.96)."""
    slots = PROGRAMS_PER_SM * _sm_count(device)
    best, best_cost = pages_per_step, None
    top = max(pages_per_step, MAX_PAGES_PER_PROG // pages_per_step * pages_per_step)
    for per in range(pages_per_step, top + 1, pages_per_step):
        waves = -(-batch * -(-pages // per) // slots)
        cost = waves * (per + PROGRAM_OVERHEAD_PAGES)
        if best_cost is None or cost <= best_cost:
            best, best_cost = per, cost
        if per >= pages:  # one program covers a request: larger ones only add empty pages
            break
    return best


def indexer_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    cache: IndexKeyCache,
    context_lens: torch.Tensor,
    max_context: int | None = None,
    *,
    evict: str = "",
    query_fp8: bool = True,
    pages_per_prog: int | None = None,
    pages_per_step: int = PAGES_PER_STEP,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Indexer logits ``[B, max_context]`` float32 (-inf past each request's context).

    ``q`` ``[B, H, D]`` (bf16; D = the cache's key dim, 128 for DeepSeek-V3.2, any power of
    two >= 16), ``weights`` ``[B, H]`` (per-head weights, any float), ``context_lens`` int32
    ``[B]`` on the device. A query already in fp8 e4m3 (``quantise_index_query``, as
    DeepSeek-V3.2's inference code quantises it before its indexer kernel) is used as it
    is, its per-head scales being in ``weights``; otherwise each program quantises it.
    ``max_context`` defaults to the page table's capacity (pass it to avoid scoring empty
    pages). ``evict`` is the L2 hint of the key loads ("", "evict_first",
    "evict_last"; a hinted launch runs with one pipeline stage: ``pipeline_stages``).
    ``query_fp8``: quantise the query to fp8 per head (DeepSeek-V3.2's indexer) rather than
    multiply in bf16 (key dims >= 32 only; smaller ones stay bf16).
    ``pages_per_prog``, ``pages_per_step``, ``num_warps``, ``num_stages``: launch parameters
    (``benchmarks/tune_kernels.py`` sweeps them on a GPU).
    """
    b, h, d = q.shape
    check_index_dim(d)
    quantised = q.dtype == torch.float8_e4m3fn
    if quantised and d < FP8_DOT_MIN_DIM:
        raise ValueError(f"fp8 queries need key dims >= {FP8_DOT_MIN_DIM}, got {d}")
    query_fp8 = quantised or (query_fp8 and d >= FP8_DOT_MIN_DIM)
    if d != cache.dim:
        raise ValueError(f"indexer queries have {d} dims but the cached keys {cache.dim}")
    pt = cache.pages
    max_context = pt.capacity if max_context is None else max_context
    max_pages = min(-(-max_context // pt.page_size), pt.table.shape[1])
    if pages_per_step < 1 or pages_per_step & (pages_per_step - 1):
        raise ValueError(f"pages_per_step must be a power of two >= 1, got {pages_per_step}")
    if pages_per_prog is None:
        pages_per_prog = balanced_pages_per_prog(b, max_pages, pages_per_step, q.device)
    if pages_per_prog < 1 or pages_per_prog % pages_per_step:
        raise ValueError(f"pages_per_prog must be a multiple of pages_per_step={pages_per_step}")
    grid = (-(-max_pages // pages_per_prog), b)
    out = torch.empty((b, grid[0] * pages_per_prog * pt.page_size), device=q.device,
                      dtype=torch.float32)  # fmt: skip
    table = pt.table
    dsa_indexer_logits[grid](
        q, weights, cache.pool, cache.pool.view(torch.float32), table, context_lens, out,
        h, q.stride(0), q.stride(1), weights.stride(0), table.stride(0), out.stride(0), max_pages,
        BLOCK_H=max(16, _pow2(h)), D=d, PAGE=pt.page_size, PAGES_PER_PROG=pages_per_prog,
        PAGES_PER_STEP=pages_per_step, QUERY_FP8=query_fp8, QUERY_QUANTISED=quantised,
        EVICT=_check_evict(evict), PROG_SLOTS=_pow2(pages_per_prog),
        UPCAST=INTERPRET, num_warps=num_warps, num_stages=pipeline_stages(evict, num_stages),
    )  # fmt: skip
    return out[:, :max_context]


def quantise_index_query(
    q: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's query in fp8 e4m3, one scale per head (its largest magnitude maps to
    the format's largest finite value), and ``weights`` (float32) times those scales: what
    ``indexer_logits`` computes inside each program, done once per request."""
    qf = q.float()
    qs = qf.abs().amax(-1) / FP8_MAX
    qs = torch.where(qs == 0, 1.0, qs)
    return (qf / qs[..., None]).to(torch.float8_e4m3fn), weights.float() * qs


def indexer_logits_reference(
    q: torch.Tensor,
    weights: torch.Tensor,
    cache: IndexKeyCache,
    context_lens: torch.Tensor,
    max_context: int | None = None,
    *,
    query_fp8: bool = True,
) -> torch.Tensor:
    """Plain torch (float32) reference of ``indexer_logits``: keys read through the pages,
    the query quantised to fp8 per head exactly as the kernel does when ``query_fp8`` (a
    query already in fp8 is taken as it is)."""
    ctx = [int(c) for c in context_lens.tolist()]
    width = max(ctx) if max_context is None else max_context
    out = torch.full((q.shape[0], width), float("-inf"), dtype=torch.float32, device=q.device)
    if q.dtype != torch.float8_e4m3fn and query_fp8 and q.shape[-1] >= FP8_DOT_MIN_DIM:
        q, weights = quantise_index_query(q, weights)
    q, w = q.float(), weights.float()
    for b, n in enumerate(ctx):
        if n == 0:
            continue
        keys = cache.keys(b, torch.arange(n)).to(q.device)  # [n, D] float32
        s = torch.relu(q[b] @ keys.T) * w[b][:, None]
        out[b, :n] = s.sum(0)
    return out


def select_topk(
    logits: torch.Tensor, context_lens: torch.Tensor, k: int, sink: int = 0, window: int = 0
) -> torch.Tensor:
    """Top-k token positions per request: int32 ``[B, k]``, ascending, -1-padded at the end
    when a context holds fewer than k tokens (then all its tokens are chosen).

    The first ``sink`` and last ``window`` tokens of each context are always chosen (they count
    towards k, so ``sink + window <= k``). Non-finite logits (NaN, +-inf) rank below every
    finite one; among equal logits the lower position wins. Runs on the device with no host
    sync (radix select, ``kernels/topk.py``).
    """
    if k < 1 or sink < 0 or window < 0 or sink + window > k:
        raise ValueError(f"need k >= 1 and 0 <= sink + window <= k, got k={k} {sink=} {window=}")
    return radix_topk(logits, context_lens, k, sink, window)


def select_topk_reference(
    logits: torch.Tensor, context_lens: torch.Tensor, k: int, sink: int = 0, window: int = 0
) -> list[torch.Tensor]:
    """Plain reference of ``select_topk``: per request, the sorted chosen positions (int64);
    non-finite scores rank last, ties go to the lower position."""
    out = []
    for b, n in enumerate(int(c) for c in context_lens.tolist()):
        if n <= k:
            out.append(torch.arange(n))
            continue
        forced = set(range(min(sink, n))) | set(range(max(0, n - window), n))
        rest = [t for t in range(n) if t not in forced]
        scores = logits[b, rest].float().cpu()
        scores = torch.where(torch.isfinite(scores), scores, -torch.inf)
        order = torch.argsort(scores, descending=True, stable=True)[: k - len(forced)]
        chosen = sorted(forced | {rest[i] for i in order.tolist()})
        out.append(torch.tensor(chosen, dtype=torch.int64))
    return out
