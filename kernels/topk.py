"""Exact top-k of the indexer's logits by radix select, in Triton.

``torch.topk`` with k = 2048 runs one thread block per row through several passes, so a
decode batch of a few requests leaves the GPU idle (on the H200: ~100 us at batch 1 and
~350 us at batch 64 for 128K tokens). Here every row is split into chunks, many programs per
row, and the k-th largest key is found by a radix select over the order-preserving integer
image of the scores: four histogram passes of 8 bits narrow the k-th key down to one value
``T``. The last of them also keeps per chunk the count of keys above the 24 bits found so
far and the suffix counts of the last digit, from which the fifth and final pass knows, for
every chunk, how many tokens above ``T`` and equal to it the chunks before it hold: it
writes every token above ``T`` plus the lowest-positioned ties needed to make k, each chunk
at its offset, so the row comes out in ascending order without a sort. Each pass derives the
prefix found so far from the previous passes' histograms itself, so no host sync and no extra
launch are needed between passes. (Three passes of 11-bit histograms ran 3.6x slower than
``torch.topk`` at batch 64 x 128K on the H200: Triton's histogram cost grows with the bins.)
At batch 64 x 128K the passes are bound by integer instructions, not memory: about 85 per
key, most of them ``tl.histogram``'s (ncu, docs/results/h100-kernels/topk-chunks-1207/ncu/).

Ranking, as ``indexer.select_topk`` documents it: the first ``sink`` and last ``window``
tokens of each context rank above everything; NaN and infinite scores rank below every
finite one; among equal scores the lower position wins (deterministic, unlike
``torch.topk``); tokens at or past a request's context length are never chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RADIX_BITS = 8  # key bits per histogram pass: 4 passes over 32-bit keys
BINS = 1 << RADIX_BITS
PASSES = 32 // RADIX_BITS
FEW_KEYS = tl.constexpr(32)  # at most this many keys of a chunk to histogram: atomics instead


@triton.jit
def _keys(logits_ptr, b, stride_lb, pos, ctx, SINK, WINDOW, W):
    """Order-preserving uint32 keys of positions ``pos`` and whether each is a candidate."""
    valid = (pos < ctx) & (pos < W)
    x = tl.load(logits_ptr + b * stride_lb + pos, mask=valid, other=0.0).to(tl.float32)
    finite = (x == x) & (tl.abs(x) <= 3.4028234663852886e38)
    bits = x.to(tl.uint32, bitcast=True)
    negative = x < 0
    key = tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # negative: all flipped
    # NaN and +-inf rank below every finite score (the lowest, -FLT_MAX, has key 0x00800000)
    key = tl.where(finite, key, 0)
    forced = (pos < SINK) | (pos >= ctx - WINDOW)
    key = tl.where(forced, 0xFFFFFFFF, key)
    return key, valid


@triton.jit
def _prefix(hist_ptr, b, B, need, PASS: tl.constexpr, BITS: tl.constexpr):
    """Key bits fixed by the passes before ``PASS`` and how many of the k are still to find
    among the keys sharing them."""
    prefix = tl.zeros([], tl.uint32)
    idx = tl.arange(0, 1 << BITS)
    for q in tl.static_range(PASS):
        h = tl.load(hist_ptr + (q * B + b) * (1 << BITS) + idx)
        cs = tl.cumsum(h, 0)
        total = tl.sum(h, 0)
        ge = total - cs + h  # keys in this bin or above
        j = tl.max(tl.where(ge >= need, idx, -1), 0)
        above = tl.sum(tl.where(idx == j, total - cs, 0), 0)
        need = need - above
        prefix = prefix | (j.to(tl.uint32) << (32 - BITS * (q + 1)))
    return prefix, need


@triton.jit
def topk_radix_pass(
    logits_ptr, ctx_ptr, hist_ptr, counts_ptr, out_ptr,
    B, W, K, SINK, WINDOW, stride_lb, stride_ob, n_chunks,
    CHUNK: tl.constexpr, PASS: tl.constexpr, BITS: tl.constexpr, PAD_STEPS: tl.constexpr,
):  # fmt: skip
    """Program (chunk, row). ``PASS`` < 32 / BITS: histogram of the next BITS key bits among
    the keys sharing the prefix found so far; the last of these passes also keeps, per chunk,
    how many keys lie above that prefix and how many of those sharing it have a last digit
    >= each value (``counts`` [B, n_chunks, 2 + 2**BITS]); then: write the chosen positions
    of this chunk in ascending order after those of the chunks before it, and -1 in the
    row's slots past ``min(context, K)``."""
    N_HIST: tl.constexpr = 32 // BITS
    NB: tl.constexpr = 1 << BITS
    ROW: tl.constexpr = 2 + NB  # above the prefix, then digit >= 0 .. NB - 1, then 0
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    ctx = tl.minimum(tl.load(ctx_ptr + b), W)
    need = tl.minimum(ctx, K)
    if (chunk * CHUNK < ctx) & (need > 0):
        pos = chunk * CHUNK + tl.arange(0, CHUNK)
        key, valid = _keys(logits_ptr, b, stride_lb, pos, ctx, SINK, WINDOW, W)
        prefix, rest = _prefix(hist_ptr, b, B, need, PASS, BITS)
        if PASS < N_HIST:
            shift: tl.constexpr = 32 - BITS * (PASS + 1)
            if PASS == 0:
                same = valid
            else:
                same = valid & ((key >> (shift + BITS)) == (prefix >> (shift + BITS)))
            digit = ((key >> shift) & (NB - 1)).to(tl.int32)
            bins = tl.arange(0, NB)
            row = hist_ptr + (PASS * B + b) * NB  # the row's histogram of this pass
            total = row + bins
            # ``tl.histogram`` is most of a pass's instructions (about 75 per key over 256
            # bins). After the first two passes a chunk holds about one key sharing the
            # prefix, and a chunk with at most FEW_KEYS such keys adds them one atomic each.
            n_same = tl.sum(same.to(tl.int32), 0)
            if PASS == N_HIST - 1:
                mine = counts_ptr + (b * n_chunks + chunk) * ROW
                higher = valid & ((key >> BITS) > (prefix >> BITS))
                tl.store(mine, tl.sum(higher.to(tl.int32), 0))
                # The chunk's histogram is built in its counts row (zeroed) and read back for
                # the row's total and the suffix sums: used twice, ``tl.histogram`` would be
                # built twice, once per layout the compiler gives its uses (Triton 3.6).
                if n_same > 0:
                    if n_same > FEW_KEYS:
                        tl.store(mine + 1 + bins, tl.histogram(digit, NB, mask=same))
                    else:
                        tl.atomic_add(mine + 1 + digit, 1, mask=same)
                    tl.debug_barrier()  # the block's writes are visible to all its threads
                    h = tl.load(mine + 1 + bins, cache_modifier=".cg")
                    tl.debug_barrier()  # every thread has read before the row is overwritten
                    tl.atomic_add(total, h, mask=h > 0)
                    tl.store(mine + 1 + bins, tl.sum(h, 0) - tl.cumsum(h, 0) + h)  # >= bin
            elif n_same > FEW_KEYS:
                h = tl.histogram(digit, NB, mask=same)
                tl.atomic_add(total, h, mask=h > 0)
            else:
                tl.atomic_add(row + digit, 1, mask=same)
        else:
            # the k-th key is ``prefix``; its last digit j splits each earlier chunk's keys
            # sharing the first 24 bits into above (digit > j) and tied (digit == j)
            j = (prefix & (NB - 1)).to(tl.int32)
            c = tl.arange(0, 128)  # the row's earlier chunks (n_chunks <= 128)
            rows = counts_ptr + (b * n_chunks + c) * ROW
            before = c < chunk
            ge_j = tl.load(rows + 1 + j, mask=before, other=0)
            ge_next = tl.load(rows + 2 + j, mask=before, other=0)
            above_before = tl.sum(tl.load(rows, mask=before, other=0) + ge_next, 0)
            ties_before = tl.sum(ge_j - ge_next, 0)
            tie = valid & (key == prefix)
            tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), 0) - 1
            take = (valid & (key > prefix)) | (tie & (tie_rank < rest))
            # the lowest-positioned ``rest`` ties are taken, so the chunks before this one
            # took min(ties_before, rest) of theirs
            first = above_before + tl.minimum(ties_before, rest)
            slot = first + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(out_ptr + b * stride_ob + slot, pos, mask=take)
    if PASS == N_HIST:
        if chunk == 0:  # the padding of a context shorter than K
            for i in range(0, PAD_STEPS):  # constexpr trip count (the interpreter needs it)
                slot = i * CHUNK + tl.arange(0, CHUNK)
                tl.store(out_ptr + b * stride_ob + slot, -1, mask=(slot >= need) & (slot < K))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def radix_topk(
    logits: torch.Tensor, context_lens: torch.Tensor, k: int, sink: int = 0, window: int = 0
) -> torch.Tensor:
    """Top-k token positions per request: int32 ``[B, k]``, ascending, -1-padded at the end
    when a context holds fewer than k tokens. Ranking as in the module docstring; no host
    sync. ``logits`` ``[B, W]`` (float, on the device), ``context_lens`` int32 ``[B]``."""
    bsz, width = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    # Small chunks, many programs: the passes are bound by integer instructions in long
    # dependent chains (ncu), which smaller programs, more of them resident, hide better. On
    # the H100, 2048 tokens a chunk beat 4096-8192 by 1.2-1.4x at batch 64 x 64K-128K, and
    # 1024 was best below 512K tokens in all (docs/results/h100-kernels/topk-chunks-1207/).
    # At most 128 chunks a row (the last pass reads that many counts).
    chunk = max(1024 if bsz * width < 2**19 else 2048, _pow2(-(-width // 128)))
    n_chunks = -(-width // chunk)
    n_hist = PASSES * bsz * BINS
    scratch = torch.zeros(n_hist + bsz * n_chunks * (BINS + 2), dtype=torch.int32, device=dev)
    hist, counts = scratch[:n_hist], scratch[n_hist:]
    out = torch.empty((bsz, k), dtype=torch.int32, device=dev)
    ctx = context_lens.to(device=dev, dtype=torch.int32).contiguous()  # read as ctx_ptr + b
    for p in range(PASSES + 1):
        topk_radix_pass[(n_chunks, bsz)](
            logits, ctx, hist, counts, out, bsz, width, k, sink, window,
            logits.stride(0), out.stride(0), n_chunks, CHUNK=chunk, PASS=p, BITS=RADIX_BITS,
            PAD_STEPS=-(-k // chunk) if p == PASSES else 0,
        )  # fmt: skip
    return out
