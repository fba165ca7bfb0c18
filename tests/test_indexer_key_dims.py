"""The lightning indexer's paged fp8 key cache and logits kernel at key dims other than
DeepSeek-V3.2's 128 (the indexer distilled for SmolLM2 has 32-dim keys), on the CPU under the
Triton interpreter. Tolerances as in test_dsa_kernels (same quantised bytes, only the
summation order differs): rtol 1e-4, atol 1e-3."""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dsacache.kernels import paged  # noqa: E402
from dsacache.kernels.indexer import (  # noqa: E402
    INTERPRET,
    indexer_logits,
    indexer_logits_reference,
    select_topk,
    select_topk_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
CTX = [150, 20, 300]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dim", [16, 32, 64, 128])
def test_index_cache_layout_and_logits_at_any_power_of_two_dim(dim):
    keys = [torch.randn((n, dim), generator=_gen(n)) for n in CTX]
    pt = paged.make_page_table(CTX, order="shuffled", seed=3, device=DEVICE)
    cache = paged.build_index_cache([k.to(DEVICE) for k in keys], pt)
    # keys block then scales, per 64-token page: 64 * (dim + 4) bytes
    assert cache.pool.shape == (pt.num_pages, 64 * paged.index_bytes(dim))
    assert cache.dim == dim and paged.index_bytes(dim) == dim + 4
    values, scales = cache.views()
    assert values.shape == (pt.num_pages, 64, dim) and scales.shape == (pt.num_pages, 64)
    for b, k in enumerate(keys):
        got = cache.keys(b, torch.arange(len(k))).cpu()
        scale = k.abs().amax(-1, keepdim=True) / 448.0
        assert ((got - k).abs() <= 2**-4 * k.abs() + scale * 2**-9 + 1e-12).all()
    q = torch.randn((3, 4, dim), generator=_gen(1)).to(torch.bfloat16).to(DEVICE)
    w = torch.rand((3, 4), generator=_gen(2)).to(DEVICE)
    ctx = torch.tensor(CTX, dtype=torch.int32, device=DEVICE)
    got = indexer_logits(q, w, cache, ctx, max(CTX), pages_per_prog=2)
    ref = indexer_logits_reference(q, w, cache, ctx)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    # fp8 queries (dim >= 32): SM90's fp8 tensor-core products accumulate less exactly
    gpu_fp8 = DEVICE == "cuda" and dim >= 32
    tol = {"rtol": 2e-3, "atol": 2e-2} if gpu_fp8 else {"rtol": 1e-4, "atol": 1e-3}
    torch.testing.assert_close(got[fin], ref[fin], **tol)
    sel = select_topk(got, ctx, 32, 2, 4)
    for b, want in enumerate(select_topk_reference(ref, ctx, 32, 2, 4)):
        row = sel[b][sel[b] >= 0].cpu().long()
        assert len(set(row.tolist()) ^ set(want.tolist())) <= 2  # near-ties only


def test_append_at_another_dim():
    pt = paged.make_page_table([70, 10], order="shuffled", seed=4)
    cache = paged.build_index_cache([torch.zeros(70, 32), torch.zeros(10, 32)], pt)
    ctx = torch.tensor([64, 3], dtype=torch.int32)
    key = torch.randn((2, 32), generator=_gen(1))
    paged.append_index_keys(cache, ctx, key)
    torch.testing.assert_close(cache.keys(1, torch.tensor([3]))[0], key[1], rtol=0.07, atol=0.01)
    with pytest.raises(ValueError, match="32"):
        paged.append_index_keys(cache, ctx, torch.zeros(2, 64))


@pytest.mark.parametrize("dim", [8, 48, 0])
def test_bad_key_dims_are_clear_errors(dim):
    pt = paged.make_page_table([70], seed=0)
    with pytest.raises(ValueError, match="power-of-two dim >= 16"):
        paged.build_index_cache([torch.zeros(70, dim)], pt)
    with pytest.raises(ValueError, match="power-of-two dim >= 16"):
        paged.random_index_cache(pt, dim=dim)
    good = paged.build_index_cache([torch.zeros(70, 32)], pt)
    with pytest.raises(ValueError, match="power-of-two dim >= 16|dims but the cached keys"):
        indexer_logits(torch.zeros(1, 4, dim), torch.ones(1, 4), good, torch.tensor([70]))


def test_deepseek_default_unchanged():
    pt = paged.make_page_table([64], seed=0)
    cache = paged.random_index_cache(pt, seed=1)
    assert cache.dim == paged.INDEX_DIM == 128 and paged.INDEX_BYTES == 132
    assert cache.pool.shape == (1, 64 * 132)
