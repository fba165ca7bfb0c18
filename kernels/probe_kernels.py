"""Triton kernels of the L2 probes (see ``probes``). Measured kernels are named ``l2probe_*``."""

import triton
import triton.language as tl


@triton.jit
def l2probe_read(src, partial, n, BLOCK: tl.constexpr, EVICT: tl.constexpr):
    """Sum BLOCK float32 values per program: one pass over the buffer's bytes. ``EVICT`` is
    the L2 eviction hint of the loads ("", "evict_first" or "evict_last")."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src + offs, mask=offs < n, other=0.0, eviction_policy=EVICT)
    tl.store(partial + pid, tl.sum(x, axis=0))


@triton.jit
def l2probe_gather(
    pool, idx, out, n_idx, row_words, ROWS: tl.constexpr, WORDS: tl.constexpr, EVICT: tl.constexpr
):
    """Sum each selected row (``row_words`` int32 words) of the pool: a DSA top-k gather."""
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)
    rmask = r < n_idx
    tok = tl.load(idx + r, mask=rmask, other=0).to(tl.int64)
    w = tl.arange(0, WORDS)
    ptrs = pool + tok[:, None] * row_words + w[None, :]
    x = tl.load(
        ptrs, mask=rmask[:, None] & (w[None, :] < row_words), other=0, eviction_policy=EVICT
    )
    tl.store(out + r, tl.sum(x, axis=1), mask=rmask)
