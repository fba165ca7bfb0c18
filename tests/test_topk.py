"""The radix-select top-k kernel (kernels/topk.py) against the plain reference, on the CPU
under ``TRITON_INTERPRET=1`` (small rows) and, marked ``gpu``, at DeepSeek-V3.2 scale."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dsacache.kernels.indexer import select_topk, select_topk_reference  # noqa: E402
from dsacache.kernels.topk import radix_topk  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def _check(logits, ctx, k, sink=0, window=0):
    cl = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    got = radix_topk(logits.to(DEVICE), cl, k, sink, window).cpu()
    assert got.shape == (len(ctx), k) and got.dtype == torch.int32
    for b, want in enumerate(select_topk_reference(logits.cpu(), cl.cpu(), k, sink, window)):
        n = len(want)
        assert torch.equal(got[b, :n].long(), want), f"row {b}"
        assert (got[b, n:] == -1).all()


def test_radix_topk_ranks_ties_nonfinite_and_forced_tokens_as_documented():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((4, 3000), generator=g)
    logits[0, 10:20] = float("nan")
    logits[0, 30] = float("inf")  # non-finite: ranks lowest, like NaN
    logits[0, 31] = float("-inf")
    logits[3, :4] = torch.tensor([float("nan"), -3.4028234663852886e38, float("inf"), -1e30])
    logits[1, 40:400] = 0.5  # a long run of equal scores straddling the k-th: lower positions win
    logits[2, :] = 1.0  # every score equal
    _check(logits, [3000, 2500, 2999, 0], 64, sink=2, window=4)
    # the lowest finite score still ranks above NaN and +-inf; a strided context-length view
    _check(logits[3:, :4], [4], 3)
    strided = torch.tensor([[3000, 0], [2500, 0]], dtype=torch.int32, device=DEVICE)[:, 0]
    got = radix_topk(logits[:2].to(DEVICE), strided, 64, 2, 4).cpu()
    for b, want in enumerate(select_topk_reference(logits[:2], strided.cpu(), 64, 2, 4)):
        assert torch.equal(got[b].long(), want)


def test_radix_topk_places_each_chunk_after_the_chunks_before_it():
    """Rows of several 1024-token chunks: tokens above the k-th in every chunk and a run of
    ties across three chunk boundaries, cut by k inside the third chunk; each row must come
    out whole and ascending (the last pass writes each chunk at an offset counted from the
    chunks before it)."""
    logits = torch.full((2, 5000), -1.0)
    logits[:, 900:3100] = 0.5  # ties spanning chunks 0-3
    logits[:, [50, 2000, 4000, 4500]] = 1.0  # above the k-th, in chunks 0, 1 and 3, 4
    logits[1, 4990:] = float("nan")
    _check(logits, [5000, 4995], 4 + 1500)
    _check(logits, [5000, 4995], 4 + 1500, sink=3, window=7)


def test_radix_topk_counts_few_and_many_keys_sharing_the_prefix_alike():
    """A chunk with at most 32 keys sharing the prefix of the k-th adds them to the
    histograms one atomic each, several on one bin; a chunk with more builds the histogram:
    ties split between such chunks, and keys one last digit above or below the k-th."""
    bits = torch.tensor([0x3F000000, 0x3F000001, 0x3F000002], dtype=torch.int32)
    below, tie, above = bits.view(torch.float32).tolist()  # 0.5 and its next floats up
    logits = torch.full((1, 4096), -1.0)
    logits[0, 100:160] = tie  # 60 ties in chunk 0: its histogram
    logits[0, [1500, 1600, 1700]] = tie  # 3 ties in chunk 1: atomics on one bin
    logits[0, [1550, 3000]] = above
    logits[0, [1650, 3001, 3002]] = below
    logits[0, 2500:2505] = tie  # 5 ties in chunk 2
    for k in (10, 62, 66, 70, 74):
        _check(logits, [4096], k)


@pytest.mark.parametrize("ctx", [[10, 64, 65, 200], [1, 0, 3, 70]])
def test_radix_topk_short_contexts_take_every_token_and_pad(ctx):
    logits = torch.randn((4, 200), generator=torch.Generator().manual_seed(1))
    _check(logits, ctx, 64, sink=4, window=16)


def test_radix_topk_negative_scores_and_k_beyond_the_row():
    logits = -torch.rand((2, 300), generator=torch.Generator().manual_seed(2)) * 1e-30
    logits[1] = -logits[1] * 1e31  # one row of tiny negatives, one of large positives
    _check(logits, [300, 300], 512)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 3),
    width=st.integers(1, 2500),
    k=st.integers(1, 300),
    forced=st.tuples(st.integers(0, 8), st.integers(0, 8)),
    levels=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_radix_topk_equals_reference_on_random_rows(rows, width, k, forced, levels, seed):
    g = torch.Generator().manual_seed(seed)
    sink, window = forced if sum(forced) <= k else (0, 0)
    # few distinct levels: many exact ties around the k-th score
    logits = torch.randint(0, levels, (rows, width), generator=g).float() / levels - 0.5
    ctx = torch.randint(0, width + 1, (rows,), generator=g).tolist()
    _check(logits, ctx, k, sink, window)


def test_select_topk_runs_the_radix_kernel():
    logits = torch.randn((2, 500), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cl = torch.tensor([500, 100], dtype=torch.int32, device=DEVICE)
    assert torch.equal(select_topk(logits, cl, 32, 2, 2), radix_topk(logits, cl, 32, 2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_gpu_radix_topk_deepseek_scale():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn((4, 131072), generator=g)
    logits[1, 5000:9000] = 3.0  # ties at the top
    _check(logits, [131072, 70000, 2048, 100], 2048, sink=4, window=64)


def test_every_histogram_pass_builds_its_histogram_once(tmp_path):
    """Compiled for sm_90, the last histogram pass (which also keeps the chunk's suffix sums)
    votes as often as the first: Triton 3.6 had built its 256-bin histogram twice, once per
    layout its two uses were given, until the chunk's histogram went through its counts row."""
    from sm90 import sm90_ptx

    from dsacache.kernels.topk import PASSES, RADIX_BITS

    signature = dict(logits_ptr="*fp32", ctx_ptr="*i32", hist_ptr="*i32", counts_ptr="*i32",
                     out_ptr="*i32", B="i32", W="i32", K="i32", SINK="i32", WINDOW="i32",
                     stride_lb="i32", stride_ob="i32", n_chunks="i32")  # fmt: skip
    votes = []
    for p in (0, PASSES - 1):
        spec = dict(module="dsacache.kernels.topk", kernel="topk_radix_pass", num_warps=4,
                    num_stages=3, signature=signature,
                    constants=dict(CHUNK=2048, PASS=p, BITS=RADIX_BITS, PAD_STEPS=0))  # fmt: skip
        votes.append(sm90_ptx(spec, tmp_path).count("vote."))
    assert votes[0] > 0 and votes[1] == votes[0]
