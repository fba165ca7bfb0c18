"""DSA decode kernels (paged caches, lightning indexer, top-k, sparse MLA/GQA attention, the
trace-driven decode driver) against their plain torch references.

On the CPU they run under the Triton interpreter (TRITON_INTERPRET=1) on small shapes (8 heads
instead of 128, k = 32, contexts of a few hundred tokens, 3 requests with ragged contexts and
shuffled pages). Tests marked ``gpu`` repeat the checks at DeepSeek-V3.2 shapes on a CUDA GPU
(run there with TRITON_INTERPRET=0).

Tolerances (kernel vs float32 reference on the same quantised cache bytes):
- indexer logits: bf16 queries and fp8 keys are exact in float32, only the summation order
  differs: rtol 1e-4, atol 1e-3.
- attention, bf16 and fp8 caches: the output is stored in bf16 (relative rounding 2^-9) and the
  probabilities enter the value product in bf16 (fp8: probabilities times the per-128 scale),
  so |out - ref| <= 3e-2 for outputs of magnitude ~1; the log-sum-exp is float32: 1e-3.
- fp8 quantisation (e4m3, 3 mantissa bits): |dequant - x| <= 2^-4 |x| + scale * 2^-9.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dsacache.kernels import paged  # noqa: E402
from dsacache.kernels.decode_step import (  # noqa: E402
    Hints,
    LayerCaches,
    Persist,
    decode_step,
    run_trace,
)
from dsacache.kernels.flashmla import (  # noqa: E402
    flashmla_available,
    flashmla_sparse_decode,
    slots_for_flashmla,
)
from dsacache.kernels.indexer import (  # noqa: E402
    INTERPRET,
    indexer_logits,
    indexer_logits_reference,
    quantise_index_query,
    select_topk,
    select_topk_reference,
)
from dsacache.kernels.sparse_decode import (  # noqa: E402
    gqa_sparse_decode,
    gqa_sparse_reference,
    mla_sparse_decode,
    mla_sparse_reference,
)

ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
# indexer logits with fp8 queries: the reference quantises the query the same way, but SM90's
# fp8 tensor-core products accumulate less exactly than float32
LOGIT_TOL_GPU = {"rtol": 2e-3, "atol": 2e-2}
_LOGIT_TOL = LOGIT_TOL_GPU if ON_GPU else {"rtol": 1e-4, "atol": 1e-3}
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
CTX = [150, 20, 300]  # ragged; request 1 holds fewer tokens than k
K = 32
SCALE = (128 + 64) ** -0.5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _table(ctx=CTX, order="shuffled", seed=1):
    return paged.make_page_table(ctx, order=order, seed=seed, device=DEVICE)


def _ctx(ctx=CTX):
    return torch.tensor(ctx, dtype=torch.int32, device=DEVICE)


def _bf16(*shape, seed=0):
    return torch.randn(shape, generator=_gen(seed)).to(torch.bfloat16).to(DEVICE)


def _selection(ctx, k, seed=0, sink=2, window=4):
    logits = torch.randn((len(ctx), max(ctx)), generator=_gen(seed)).to(DEVICE)
    return select_topk(logits, _ctx(ctx), k, sink, window)


# -- paged caches -----------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["contiguous", "shuffled"])
def test_page_table_gives_every_request_its_own_pages(order):
    pt = paged.make_page_table([130, 64, 1], order=order, seed=3)
    assert pt.table.dtype == torch.int32 and pt.num_pages == 3 + 1 + 1
    used = pt.table[pt.table >= 0].tolist()
    assert sorted(used) == list(range(pt.num_pages))
    assert (pt.table[1, 1:] == -1).all() and (pt.table[2, 1:] == -1).all()
    if order == "contiguous":
        assert pt.table[0, :3].tolist() == [0, 1, 2]
    slots = pt.slots(0, torch.tensor([0, 63, 64, 129]))
    assert slots.tolist() == [
        int(pt.table[0, 0]) * 64, int(pt.table[0, 0]) * 64 + 63,
        int(pt.table[0, 1]) * 64, int(pt.table[0, 2]) * 64 + 1,
    ]  # fmt: skip
    with pytest.raises(IndexError):
        pt.slots(1, torch.tensor([64]))


def test_pages_round_trip_in_shuffled_order():
    pt = paged.make_page_table(CTX, order="shuffled", seed=5)
    rows = [torch.randn((n, 3, 4), generator=_gen(n)) for n in CTX]
    pool = paged.to_pages(rows, pt)
    assert pool.shape == (pt.num_pages, 64, 3, 4)
    for b, r in enumerate(rows):
        torch.testing.assert_close(paged.from_pages(pool, pt, b, torch.arange(len(r))), r)
    assert not torch.equal(pt.table, paged.make_page_table(CTX, order="contiguous").table)


def test_mla_fp8_layout_is_656_bytes_and_dequantizes_exactly():
    x = (
        torch.randn((5, 576), generator=_gen(0))
        * torch.tensor([0.01, 1.0, 30.0, 500.0, 2.0])[:, None]
    )
    packed = paged.quantize_mla_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, paged.MLA_FP8_BYTES) == (5, 656)
    scales = packed[:, 512:528].contiguous().view(torch.float32)
    amax = x[:, :512].unflatten(-1, (4, 128)).abs().amax(-1)
    torch.testing.assert_close(scales, amax / 448.0)
    rope = packed[:, 528:].contiguous().view(torch.bfloat16)
    assert torch.equal(rope, x[:, 512:].to(torch.bfloat16))
    deq = paged.dequantize_mla_fp8(packed)
    latent_scale = scales.repeat_interleave(128, dim=1)
    err = (deq[:, :512] - x[:, :512]).abs()
    assert (err <= 2**-4 * x[:, :512].abs() + latent_scale * 2**-9 + 1e-12).all()
    assert torch.equal(paged.dequantize_mla_fp8(paged.quantize_mla_fp8(deq)), deq)  # idempotent


def test_index_keys_quantize_per_token_and_pack_132_bytes_per_token():
    keys = [torch.randn((n, 128), generator=_gen(n)) * (1 + n) for n in CTX]
    pt = paged.make_page_table(CTX, seed=2)
    cache = paged.build_index_cache(keys, pt)
    assert cache.pool.shape == (pt.num_pages, 64 * paged.INDEX_BYTES) == (pt.num_pages, 64 * 132)
    for b, k in enumerate(keys):
        got = cache.keys(b, torch.arange(len(k)))
        scale = k.abs().amax(-1, keepdim=True) / 448.0
        assert ((got - k).abs() <= 2**-4 * k.abs() + scale * 2**-9 + 1e-12).all()


def test_appends_write_the_next_token():
    pt = paged.make_page_table([70, 10], order="shuffled", seed=4)
    ctx = torch.tensor([64, 3], dtype=torch.int32)
    for fp8 in (False, True):
        cache = paged.build_mla_cache([torch.zeros(70, 576), torch.zeros(10, 576)], pt, fp8)
        new = torch.randn((2, 576), generator=_gen(9))
        paged.append_mla(cache, ctx, new)
        for b in range(2):
            got = cache.tokens(b, torch.tensor([int(ctx[b])]))[0]
            ref = paged.dequantize_mla_fp8(paged.quantize_mla_fp8(new[b])) if fp8 else new[b]
            torch.testing.assert_close(got, ref.to(torch.bfloat16).float() if not fp8 else ref)
    icache = paged.build_index_cache([torch.zeros(70, 128), torch.zeros(10, 128)], pt)
    key = torch.randn((2, 128), generator=_gen(1))
    paged.append_index_keys(icache, ctx, key)
    torch.testing.assert_close(icache.keys(1, torch.tensor([3]))[0], key[1], rtol=0.07, atol=0.01)


# -- lightning indexer ------------------------------------------------------------------------
@pytest.mark.parametrize("query_fp8", [True, False], ids=["q-fp8", "q-bf16"])
@pytest.mark.parametrize("heads,evict", [(8, ""), (16, "evict_first"), (20, "evict_last")])
def test_indexer_logits_match_reference(heads, evict, query_fp8):
    keys = [torch.randn((n, 128), generator=_gen(n)) for n in CTX]
    cache = paged.build_index_cache([k.to(DEVICE) for k in keys], _table())
    q = _bf16(3, heads, 128, seed=1)
    w = torch.rand((3, heads), generator=_gen(2)).to(DEVICE)
    got = indexer_logits(q, w, cache, _ctx(), max(CTX), evict=evict, pages_per_prog=2,
                         query_fp8=query_fp8)  # fmt: skip
    ref = indexer_logits_reference(q, w, cache, _ctx(), query_fp8=query_fp8)
    assert got.shape == ref.shape == (3, max(CTX))
    assert torch.equal(torch.isinf(got), torch.isinf(ref))  # -inf exactly past each context
    fin = torch.isfinite(ref)
    tol = _LOGIT_TOL if query_fp8 else {"rtol": 1e-4, "atol": 1e-3}
    torch.testing.assert_close(got[fin], ref[fin], **tol)


def _indexer_matches_reference(**launch):
    """Indexer logits of 8 heads over the ragged ``CTX`` (shuffled pages) launched with
    ``launch`` equal the reference's (-inf exactly past each context); returns the inputs
    ``(q, w, cache)``."""
    keys = [torch.randn((n, 128), generator=_gen(n)) for n in CTX]
    cache = paged.build_index_cache([k.to(DEVICE) for k in keys], _table())
    q = _bf16(3, 8, 128, seed=1)
    w = torch.rand((3, 8), generator=_gen(2)).to(DEVICE)
    got = indexer_logits(q, w, cache, _ctx(), max(CTX), **launch)
    ref = indexer_logits_reference(q, w, cache, _ctx())
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], **_LOGIT_TOL)
    return q, w, cache


@pytest.mark.parametrize("pages_per_prog", [1, 3, 5])
def test_indexer_programs_of_any_page_count_read_their_own_pages(pages_per_prog):
    """Each program reads its pages from the page table once (rounded up to a power of two
    of slots) and a step's scales a step ahead: programs of 1, 3 or 5 pages, over shuffled
    pages and contexts that end inside a program, give the reference's logits."""
    _indexer_matches_reference(pages_per_prog=pages_per_prog)


@pytest.mark.parametrize("heads", [8, 20])
def test_indexer_takes_a_query_quantised_beforehand(heads):
    """A query quantised once per request (``quantise_index_query``: fp8 plus scales folded
    into the weights) scores exactly as the kernel's own per-program quantisation; the
    reference takes it as it is. Heads below the program's 16 rows are masked."""
    keys = [torch.randn((n, 128), generator=_gen(n)) for n in CTX]
    cache = paged.build_index_cache([k.to(DEVICE) for k in keys], _table())
    q = _bf16(3, heads, 128, seed=1)
    w = torch.rand((3, heads), generator=_gen(2)).to(DEVICE)
    q8, w8 = quantise_index_query(q, w)
    assert q8.dtype == torch.float8_e4m3fn and w8.dtype == torch.float32
    inside = indexer_logits(q, w, cache, _ctx(), max(CTX), pages_per_prog=2)
    before = indexer_logits(q8, w8, cache, _ctx(), max(CTX), pages_per_prog=2)
    assert torch.equal(torch.isinf(before), torch.isinf(inside))
    fin = torch.isfinite(inside)
    torch.testing.assert_close(before[fin], inside[fin], rtol=1e-5, atol=1e-5)
    ref = indexer_logits_reference(q8, w8, cache, _ctx())
    torch.testing.assert_close(ref, indexer_logits_reference(q, w, cache, _ctx()))
    with pytest.raises(ValueError, match="fp8 queries need key dims >= 32"):
        small = paged.build_index_cache([torch.zeros(n, 16).to(DEVICE) for n in CTX], _table())
        indexer_logits(quantise_index_query(q[..., :16], w)[0], w8, small, _ctx(), max(CTX))


def test_indexer_grid_is_balanced_to_whole_waves(monkeypatch):
    """On 132 SMs of 5 programs: 16 pages a program left batch 8 x 64K at 512 programs, 0.78
    of a wave; the default takes 13 (632 programs, one wave), and 25 at 128K (656) where 16
    made 1.55 waves. Small grids keep programs of one page; sizes stay whole loop steps."""
    from dsacache.kernels import indexer

    monkeypatch.setattr(indexer, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")

    def pick(batch, context, step=1):
        return indexer.balanced_pages_per_prog(batch, context // 64, step, cpu)

    assert pick(8, 65536) == 13 and pick(8, 131072) == 25
    assert pick(1, 8192) == 1 and pick(4, 2048) == 1
    for batch, context, step in [(8, 65536, 2), (64, 131072, 4), (3, 640, 8)]:
        per = pick(batch, context, step)
        assert per % step == 0 and step <= per <= max(step, indexer.MAX_PAGES_PER_PROG)


@pytest.mark.parametrize(
    "pages_per_step",
    [1, 4, pytest.param(32, marks=pytest.mark.skipif(
        ON_GPU, reason="a 32-page step of 128-B keys needs 256 KiB of shared memory; an H100/H200 "
        "SM has 227 KiB (the interpreter has no such limit)"))],
)  # fmt: skip
def test_indexer_default_program_size_holds_whole_steps(pages_per_step):
    """With ``pages_per_prog`` left to the default, any ``pages_per_step`` (even more than
    the default's 16 pages) gives a program of whole loop steps and the same logits."""
    q, w, cache = _indexer_matches_reference(pages_per_step=pages_per_step)
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"power of two >= 1, got {bad}"):
            indexer_logits(q, w, cache, _ctx(), max(CTX), pages_per_step=bad)


@pytest.mark.parametrize(
    "ctx,k,sink,window",
    [
        ([300, 20, 150], 32, 4, 8),  # request 1: k larger than its context
        ([10, 13, 40], 12, 4, 8),  # sink and window overlap (ctx < sink + window), exact fill
        ([200, 200], 16, 0, 0),
        ([64], 1, 1, 0),
    ],
)
def test_select_topk_forces_sink_and_window_and_sorts(ctx, k, sink, window):
    logits = torch.randn((len(ctx), max(ctx)), generator=_gen(k)).to(DEVICE)
    logits[0, 5] = float("nan")  # a broken score ranks last, it is never a crash
    got = select_topk(logits, _ctx(ctx), k, sink, window).cpu()
    ref = select_topk_reference(logits.cpu(), torch.tensor(ctx), k, sink, window)
    assert got.shape == (len(ctx), k) and got.dtype == torch.int32
    for b, n in enumerate(ctx):
        row = got[b]
        chosen = row[row >= 0]
        assert (row[len(chosen) :] == -1).all()  # padding only at the end
        assert len(chosen) == min(k, n)
        assert (chosen[1:] > chosen[:-1]).all() and int(chosen.max()) < n
        forced = set(range(min(sink, n))) | set(range(max(0, n - window), n))
        assert forced <= set(chosen.tolist())
        assert chosen.tolist() == ref[b].tolist()


def test_select_topk_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sink"):
        select_topk(torch.zeros(1, 10), torch.tensor([10]), 4, 3, 2)


# -- sparse attention -------------------------------------------------------------------------
def _mla_cache(fp8: bool, ctx=CTX):
    rows = [torch.randn((n, 576), generator=_gen(100 + n)).to(DEVICE) for n in ctx]
    return paged.build_mla_cache(rows, _table(ctx), fp8)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("splits", [1, 3])
def test_mla_sparse_decode_matches_reference(fp8, splits):
    cache = _mla_cache(fp8)
    assert cache.bytes_per_token == (656 if fp8 else 1152)
    q = _bf16(3, 8, 576, seed=7)
    sel = _selection(CTX, K, seed=3)
    assert (sel[1] == -1).sum() == K - CTX[1]  # the short request pads with -1
    out, lse = mla_sparse_decode(q, cache, sel, SCALE, num_splits=splits, block_n=16,
                                 evict="evict_first")  # fmt: skip
    ref_out, ref_lse = mla_sparse_reference(q, cache, sel, SCALE)
    assert out.shape == (3, 8, 512) and out.dtype == torch.bfloat16 and lse.shape == (3, 8)
    torch.testing.assert_close(out.float(), ref_out, rtol=3e-2, atol=3e-2)
    # fp8 tiles are dequantised to bf16 before the products (the reference keeps float32),
    # so the scores carry bf16 rounding of the keys: LSE within 2e-2 instead of 1e-3
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=2e-2 if fp8 else 1e-3)


def test_mla_sparse_decode_pads_heads_and_reads_only_selected_tokens():
    cache = _mla_cache(True, ctx=[100, 90])
    q = _bf16(2, 20, 576, seed=8)  # 20 heads: two head blocks of 16
    sel = _selection([100, 90], 24, seed=4)
    out, lse = mla_sparse_decode(q, cache, sel, SCALE, num_splits=2, block_n=16, block_h=16)
    # poison every unselected token: the result must not change
    for b in range(2):
        chosen = set(sel[b][sel[b] >= 0].tolist())
        others = torch.tensor([t for t in range(90) if t not in chosen])
        slots = cache.pages.slots(b, others)
        cache.pool.view(-1, 656)[slots.to(DEVICE)] = 0x7F  # fp8 NaN everywhere
    out2, lse2 = mla_sparse_decode(q, cache, sel, SCALE, num_splits=2, block_n=16, block_h=16)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    ref_out, ref_lse = mla_sparse_reference(q, cache, sel, SCALE)
    torch.testing.assert_close(out.float(), ref_out, rtol=3e-2, atol=3e-2)


def _gqa_cache(ctx=CTX, kv_heads=3, dim=64):
    k = [torch.randn((n, kv_heads, dim), generator=_gen(n)).to(DEVICE) for n in ctx]
    v = [torch.randn((n, kv_heads, dim), generator=_gen(n + 1)).to(DEVICE) for n in ctx]
    return paged.build_gqa_cache(k, v, _table(ctx))


@pytest.mark.parametrize("per_group", [False, True], ids=["shared", "per-group"])
@pytest.mark.parametrize("splits", [1, 2])
def test_gqa_sparse_decode_matches_reference(per_group, splits):
    cache = _gqa_cache()
    assert cache.k.shape[1:] == (64, 3, 64) and cache.k.dtype == torch.bfloat16
    q = _bf16(3, 9, 64, seed=5)
    if per_group:
        sel = torch.stack([_selection(CTX, K, seed=s) for s in range(3)], dim=1)
    else:
        sel = _selection(CTX, K, seed=6)
    out, lse = gqa_sparse_decode(q, cache, sel, num_splits=splits, block_n=16, evict="evict_last")
    ref_out, ref_lse = gqa_sparse_reference(q, cache, sel)
    assert out.shape == (3, 9, 64)
    torch.testing.assert_close(out.float(), ref_out, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-3)


def test_dependent_launch_of_the_split_merge_is_only_for_compiled_gpu_kernels():
    """``pdl`` asks for a programmatic dependent launch of the merge; the CPU interpreter
    cannot run one (nor ``griddepcontrol``), so there it is the usual launch, same results."""
    from dsacache.kernels.sparse_decode import dependent_launch

    assert not dependent_launch(True, torch.device("cpu"))
    assert not dependent_launch(False, torch.device(DEVICE))
    cache = _gqa_cache()
    q, sel = _bf16(3, 9, 64, seed=5), _selection(CTX, K, seed=6)
    plain = gqa_sparse_decode(q, cache, sel, num_splits=2, block_n=16)
    dependent = gqa_sparse_decode(q, cache, sel, num_splits=2, block_n=16, pdl=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, dependent, strict=True))


def test_empty_selection_gives_zero_output_and_minus_inf_lse():
    cache = _gqa_cache(ctx=[50], kv_heads=1, dim=32)
    sel = torch.full((1, 16), -1, dtype=torch.int32, device=DEVICE)
    out, lse = gqa_sparse_decode(_bf16(1, 2, 32), cache, sel, num_splits=1, block_n=16)
    assert (out == 0).all() and torch.isneginf(lse).all()


# -- decode step and trace replay ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["mla-fp8", "gqa"])
def test_decode_step_runs_indexer_topk_and_attention(layout):
    keys = [torch.randn((n, 128), generator=_gen(n)).to(DEVICE) for n in CTX]
    caches = LayerCaches(
        paged.build_index_cache(keys, _table()),
        _mla_cache(True) if layout == "mla-fp8" else _gqa_cache(),
    )
    q_index, w = _bf16(3, 8, 128, seed=1), torch.rand((3, 8), generator=_gen(3)).to(DEVICE)
    q = _bf16(3, 8, 576, seed=2) if layout == "mla-fp8" else _bf16(3, 9, 64, seed=2)
    res = decode_step(
        q_index, w, q, caches, _ctx(), k=K, sink=2, window=4, sm_scale=SCALE,
        hints=Hints(index="evict_first", kv="evict_last"), max_context=max(CTX),
        attn_options={"block_n": 16},
    )  # fmt: skip
    ref_logits = indexer_logits_reference(q_index, w, caches.index, _ctx())
    fin = torch.isfinite(ref_logits)
    torch.testing.assert_close(res.logits[fin], ref_logits[fin], **_LOGIT_TOL)
    assert torch.equal(res.indices, select_topk(res.logits, _ctx(), K, 2, 4))
    ref = (mla_sparse_reference if layout == "mla-fp8" else gqa_sparse_reference)(
        q, caches.kv, res.indices, SCALE
    )
    torch.testing.assert_close(res.out.float(), ref[0], rtol=3e-2, atol=3e-2)


def _small_trace(tmp_path, groups=1, model=None):
    from dsacache.tracer import SynthConfig, synthesize

    model = model or {"name": "tiny-mla", "attention": "MLA", "heads": 8}
    cfg = SynthConfig(layers=2, groups=groups, requests=2, context=180, steps=3, k=24, seed=4,
                      model=model)  # fmt: skip
    return synthesize(cfg, tmp_path / f"src{groups}.dsatrace")


def _rows(trace):
    df = trace.to_pandas()
    return {
        (int(r.step), int(r.layer), int(r.request), int(r.group)): (
            int(r.position),
            list(r.indices),
        )
        for r in df.itertuples()
    }


def _staging_oracle(rows, batch, requests, layers, groups, width):
    """What a step's staged inputs must hold, row by row: slot ``b`` replays request
    ``b % requests``; rows of other layers, groups or requests are left out."""
    sel = np.full((layers, batch, groups, width), -1, np.int32)
    pos = np.ones((layers, batch), np.int64)
    for i in range(len(rows)):
        layer, g, req = int(rows.layer[i]), int(rows.group[i]), int(rows.request[i])
        if layer >= layers or g >= groups or not 0 <= req < requests:
            continue
        for b in range(req, batch, requests):
            sel[layer, b, g, : rows.lengths[i]] = rows.row(i)
            pos[layer, b] = rows.position[i]
    return sel, pos


@pytest.mark.parametrize("full", [True, False])
def test_step_staging_builds_what_a_row_by_row_copy_builds(full):
    """The driver's staging (array operations, buffers reused round robin) against a plain
    loop over the rows: ragged and full rows, rows missing, rows the run leaves out, -1s."""
    from dsacache.kernels.decode_step import StepStaging
    from dsacache.traces.format import SelectionBatch

    rng = np.random.default_rng(3 + full)
    layers, groups, requests, batch, width = 3, 2, 3, 5, 16
    staging = StepStaging(batch, requests, layers, groups, torch.device("cpu"), buffers=2)
    kept = []
    for step in range(5):
        keys = [
            (lay, g, r)
            for lay in range(layers + 1)
            for g in range(groups)
            for r in range(requests + 1)
        ]
        keys = [keys[i] for i in rng.permutation(len(keys))[: len(keys) - 4]]  # some missing
        lengths = [width if full else int(rng.integers(0, width + 1)) for _ in keys]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        indices = rng.integers(-1 if step == 2 else 0, 500, offsets[-1]).astype(np.int32)
        rows = SelectionBatch(
            request=np.array([k[2] for k in keys]), step=np.full(len(keys), step),
            position=np.array([7 * k[0] + 31 * k[2] + step + 1 for k in keys]),  # per request
            layer=np.array([k[0] for k in keys]),
            group=np.array([k[1] for k in keys]), offsets=offsets, indices=indices,
        )  # fmt: skip
        # full rows widen a step past a smaller minimum width
        sel, ctx, pos, selected = staging.fill(rows, width // 2 if full else width)
        want_sel, want_pos = _staging_oracle(rows, batch, requests, layers, groups, width)
        np.testing.assert_array_equal(sel.numpy(), want_sel)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(ctx.numpy(), want_pos)
        assert selected == int((want_sel >= 0).sum())
        kept.append((sel, want_sel))
    # two buffers: the step before the last still holds its own inputs
    np.testing.assert_array_equal(kept[-2][0].numpy(), kept[-2][1])


@pytest.mark.parametrize("layout", ["mla-fp8", "mla-bf16"])
def test_run_trace_replays_and_captures_the_trace_selections(tmp_path, layout):
    from dsacache.traces import open_trace
    from dsacache.traces.spool import spool_path

    src = open_trace(_small_trace(tmp_path))
    out = tmp_path / "captured.dsatrace"
    res = run_trace(src, layout=layout, batch=3, device=DEVICE, index_heads=8,
                    hints=Hints(index="evict_first"), capture=str(out))  # fmt: skip
    assert res.steps == 3 and res.layers == 2 and res.batch == 3
    cap = open_trace(out)
    cap.validate()
    assert cap.complete and cap.manifest["capture"]["layout"] == layout
    assert not spool_path(out).exists()  # encoded into the trace at close, then removed
    want, got = _rows(src), _rows(cap)
    # slots 0 and 1 replay requests 0 and 1; slot 2 replays request 0 again
    for (step, layer, req, group), row in got.items():
        assert row == want[(step, layer, req % 2, group)]
    assert len(got) == 3 * 2 * 3
    assert res.kv_bytes == sum(len(v[1]) for v in got.values()) * (656 if "fp8" in layout else 1152)


def test_a_failing_replay_leaves_its_capture_incomplete(tmp_path, monkeypatch):
    """An error mid-run keeps the steps captured so far and does not mark the trace
    complete (it used to be closed as complete)."""
    import dsacache.kernels.decode_step as ds
    from dsacache.traces import open_trace

    src = open_trace(_small_trace(tmp_path))
    real, calls = ds.decode_step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # steps 0 and 1 of 2 layers succeed
            raise RuntimeError("kernel launch failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ds, "decode_step", failing)
    out = tmp_path / "partial.dsatrace"
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        run_trace(src, layout="mla-fp8", batch=2, device=DEVICE, index_heads=8, capture=str(out))
    cap = open_trace(out)
    assert not cap.complete and cap.validate()["rows"] == 2 * 2 * 2


def test_run_trace_gqa_per_group_and_indexer_topk(tmp_path):
    from dsacache.traces import open_trace

    model = {"name": "tiny-gqa", "attention": "GQA", "heads": 4, "kv_heads": 2, "head_dim": 64}
    src = open_trace(_small_trace(tmp_path, groups=2, model=model))
    out = tmp_path / "gqa.dsatrace"
    run_trace(src, layout="gqa", batch=2, device=DEVICE, index_heads=8, capture=str(out))
    assert _rows(open_trace(out)) == _rows(src)
    out2 = tmp_path / "topk.dsatrace"
    run_trace(src, layout="gqa", batch=2, steps=2, device=DEVICE, index_heads=8,
              use_trace_selection=False, capture=str(out2))  # fmt: skip
    got = open_trace(out2).to_pandas()
    assert len(got) == 2 * 2 * 2 and set(got.group) == {0}  # one shared selection per layer
    for r in got.itertuples():
        assert len(r.indices) == min(24, r.position) and np.all(np.diff(r.indices) > 0)


def _check_slots(sel, pt):
    """``slots_for_flashmla`` against the page table's own ``slots``: -1 kept, -1 padding."""
    k = sel.shape[1]
    got = slots_for_flashmla(sel, pt.table, pt.page_size)
    assert got.shape == (len(sel), 1, -(-k // 64) * 64) and got.dtype == torch.int32
    for b in range(len(sel)):
        keep = sel[b] >= 0
        assert torch.equal(got[b, 0, :k][keep].long(), pt.slots(b, sel[b][keep]).to(DEVICE))
        assert (got[b, 0, :k][~keep] == -1).all()
    assert (got[:, :, k:] == -1).all()


def test_slots_for_flashmla_follow_the_page_table():
    pt = _table([150, 70], order="shuffled")
    sel = torch.tensor([[0, 63, 64, 149], [5, 69, -1, -1]], dtype=torch.int32, device=DEVICE)
    _check_slots(sel, pt)


@pytest.mark.parametrize("k", [4, 64, 70])
def test_slots_for_flashmla_padded_to_64(k):
    pt = _table([150, 40, 300], order="shuffled")  # request 1 holds fewer than k = 64, 70
    sel = select_topk(torch.randn((3, 300), generator=_gen(5)).to(DEVICE),
                      torch.tensor([150, 40, 300], dtype=torch.int32, device=DEVICE), k)  # fmt: skip
    _check_slots(sel, pt)


def test_run_trace_with_memory_reserved_first_runs_the_same_workload(tmp_path):
    """``reserve`` only moves the caches (device memory taken first): the same steps and
    bytes; a negative amount is refused by name."""
    from dsacache.traces import open_trace

    src = open_trace(_small_trace(tmp_path))
    plain = run_trace(src, batch=2, device=DEVICE, index_heads=8)
    moved = run_trace(src, batch=2, device=DEVICE, index_heads=8, reserve=2**20)
    assert (moved.steps, moved.kv_bytes, moved.index_bytes) == (
        plain.steps, plain.kv_bytes, plain.index_bytes
    )  # fmt: skip
    with pytest.raises(ValueError, match="reserve=-1 B: must be >= 0"):
        run_trace(src, device=DEVICE, reserve=-1)


def test_run_trace_rejects_backends_it_cannot_run(tmp_path):
    from dsacache.traces import open_trace

    src = open_trace(_small_trace(tmp_path))
    with pytest.raises(ValueError, match="choose one of triton, flashmla"):
        run_trace(src, layout="mla-fp8", device=DEVICE, backend="cutlass")
    with pytest.raises(ValueError, match="mla-fp8 layout without KV hints"):
        run_trace(src, layout="mla-bf16", device=DEVICE, backend="flashmla")
    with pytest.raises(ValueError, match="KV hint 'evict_last'"):
        run_trace(src, device=DEVICE, backend="flashmla", hints=Hints(kv="evict_last"))


def test_cuda_graph_mode_is_refused_where_it_cannot_run(tmp_path):
    from dsacache.traces import open_trace

    src = open_trace(_small_trace(tmp_path))
    with pytest.raises(ValueError, match="cuda_graph runs our kernels .* device 'cpu'"):
        run_trace(src, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="backend 'flashmla'"):
        run_trace(src, device="cuda", backend="flashmla", cuda_graph=True)


@needs_gpu
def test_cuda_graph_steps_read_what_eager_steps_read(tmp_path):
    """Replayed as CUDA graphs, the steps read the trace's selections, and the indexer's own
    top-k (scored over the page table's whole capacity) equals the eager run's."""
    from dsacache.traces import open_trace

    src = open_trace(_small_trace(tmp_path))
    graph = tmp_path / "graph.dsatrace"
    res = run_trace(src, batch=3, device="cuda", index_heads=8, capture=str(graph), cuda_graph=True)
    want, got = _rows(src), _rows(open_trace(graph))
    assert res.steps == 3 and len(got) == 3 * 2 * 3
    for (step, layer, req, group), row in got.items():  # slot 2 replays request 0
        assert row == want[(step, layer, req % 2, group)]
    topk = {}
    for mode in (False, True):
        out = tmp_path / f"topk-{mode}.dsatrace"
        run_trace(src, batch=2, device="cuda", index_heads=8, use_trace_selection=False,
                  capture=str(out), cuda_graph=mode)  # fmt: skip
        topk[mode] = _rows(open_trace(out))
    assert topk[True] == topk[False] and len(topk[True]) == 3 * 2 * 2


def test_run_trace_rejects_group_selections_for_mla(tmp_path):
    from dsacache.traces import open_trace

    src = open_trace(_small_trace(tmp_path, groups=2))
    with pytest.raises(ValueError, match="KV group"):
        run_trace(src, layout="mla-fp8", device=DEVICE)


# -- GPU: DeepSeek-V3.2 shapes --------------------------------------------------------------------
@gpu
@needs_gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_mla_deepseek_shapes(fp8):
    ctx = [8192, 3000, 5000]
    pt = paged.make_page_table(ctx, order="shuffled", seed=0, device="cuda")
    cache = paged.random_mla_cache(pt, fp8, seed=1, device="cuda")
    q = torch.randn((3, 128, 576), device="cuda").to(torch.bfloat16)
    logits = torch.randn((3, max(ctx)), device="cuda")
    sel = select_topk(logits, torch.tensor(ctx, device="cuda", dtype=torch.int32), 2048, 4, 64)
    for splits in (None, 1):
        out, lse = mla_sparse_decode(q, cache, sel, SCALE, num_splits=splits, evict="evict_first")
        ref_out, ref_lse = mla_sparse_reference(q, cache, sel, SCALE)
        torch.testing.assert_close(out.float(), ref_out, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=2e-2 if fp8 else 1e-3)
    # the split merge launched dependent (it waits for the partials): the same bits. Another
    # query runs between, so that a merge reading too early would find its partials in the
    # blocks the allocator hands out again, not this call's
    plain = mla_sparse_decode(q, cache, sel, SCALE, num_splits=8)
    for _ in range(3):
        mla_sparse_decode(-q, cache, sel, SCALE, num_splits=8)
        dependent = mla_sparse_decode(q, cache, sel, SCALE, num_splits=8, pdl=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, dependent, strict=True))


@gpu
@needs_gpu
def test_gpu_indexer_and_gqa_deepseek_smollm_shapes():
    ctx = [8192, 100, 4000]
    cl = torch.tensor(ctx, device="cuda", dtype=torch.int32)
    pt = paged.make_page_table(ctx, order="shuffled", seed=0, device="cuda")
    cache = paged.random_index_cache(pt, seed=2, device="cuda")
    q = torch.randn((3, 64, 128), device="cuda").to(torch.bfloat16)
    w = torch.rand((3, 64), device="cuda")
    got = indexer_logits(q, w, cache, cl, max(ctx), evict="evict_first")
    ref = indexer_logits_reference(q, w, cache, cl)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    # fp8 tensor-core products accumulate with reduced precision on SM90
    torch.testing.assert_close(got[fin], ref[fin], rtol=2e-3, atol=2e-2)
    bf16 = indexer_logits(q, w, cache, cl, max(ctx), query_fp8=False)
    ref16 = indexer_logits_reference(q, w, cache, cl, query_fp8=False)
    torch.testing.assert_close(bf16[fin], ref16[fin], rtol=1e-4, atol=1e-2)
    gcache = paged.random_gqa_cache(pt, 3, 64, seed=3, device="cuda")
    sel = select_topk(got, cl, 2048, 4, 64)
    qg = torch.randn((3, 9, 64), device="cuda").to(torch.bfloat16)
    out, lse = gqa_sparse_decode(qg, gcache, sel)
    ref_out, ref_lse = gqa_sparse_reference(qg, gcache, sel)
    torch.testing.assert_close(out.float(), ref_out, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-3)
    for _ in range(3):  # the split merge launched dependent: the same bits (another query
        gqa_sparse_decode(-qg, gcache, sel)  # between: its partials would be read too early)
        dependent = gqa_sparse_decode(qg, gcache, sel, pdl=True)
        assert torch.equal(dependent[0], out) and torch.equal(dependent[1], lse)


@gpu
@needs_gpu
def test_gpu_flashmla_backend_matches_reference_and_ours(tmp_path):
    why = flashmla_available()
    if why:
        pytest.skip(why)
    from dsacache.traces import open_trace

    ctx = [8192, 3000, 5000, 1000]  # the last one is -1 padded
    pt = paged.make_page_table(ctx, order="shuffled", seed=0, device="cuda")
    cache = paged.random_mla_cache(pt, True, seed=1, device="cuda")
    q = torch.randn((4, 128, 576), device="cuda").to(torch.bfloat16)
    logits = torch.randn((4, max(ctx)), device="cuda")
    sel = select_topk(logits, torch.tensor(ctx, device="cuda", dtype=torch.int32), 2000, 4, 64)
    out, lse = flashmla_sparse_decode(q, cache, sel, SCALE)  # k = 2000: padded to 2048 inside
    ref_out, ref_lse = mla_sparse_reference(q, cache, sel, SCALE)
    torch.testing.assert_close(out.float(), ref_out, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=2e-2)
    ours, ours_lse = mla_sparse_decode(q, cache, sel, SCALE)
    torch.testing.assert_close(out.float(), ours.float(), rtol=3e-2, atol=3e-2)
    # the driver with FlashMLA captures exactly the selections it replays
    src = open_trace(_small_trace(tmp_path, model={"name": "m", "attention": "MLA", "heads": 64}))
    cap = tmp_path / "flashmla.dsatrace"
    res = run_trace(src, batch=2, device="cuda", index_heads=8, capture=str(cap),
                    backend="flashmla")  # fmt: skip
    assert res.backend == "flashmla" and _rows(open_trace(cap)) == _rows(src)


def test_run_trace_takes_a_synth_spec_and_refuses_a_bad_window():
    spec = "synth:deepseek-v3.2:context=200,k=32,requests=2,layers=2,steps=2"
    res = run_trace(spec, layout="mla-fp8", batch=2, device=DEVICE, index_heads=8, heads=16)
    assert (res.steps, res.layers, res.batch) == (2, 2, 2)
    assert res.kv_bytes == 2 * 2 * 2 * 32 * 656  # steps x layers x batch x k tokens
    with pytest.raises(ValueError, match="persisting window runs with an MLA layout"):
        run_trace(spec, layout="gqa", device=DEVICE, persist=Persist(1))


def test_driver_command_line_reports_a_bad_spec_in_one_line(capsys):
    from dsacache.kernels.decode_step import main

    with pytest.raises(SystemExit, match="error: trace spec .* 'ctx=9' is not KNOB=VALUE"):
        main(["synth:deepseek-v3.2:ctx=9", "--device", DEVICE])
    spec = "synth:deepseek-v3.2:context=200,k=32,requests=2,layers=2,steps=2"
    with pytest.raises(SystemExit, match="error: cuda_graph runs our kernels .* device 'cpu'"):
        main([spec, "--device", "cpu", "--cuda-graph"])
    with pytest.raises(SystemExit, match="error: .*options {'pdl': True}"):  # ours only
        main([spec, "--device", DEVICE, "--pdl", "--backend", "flashmla"])
    with pytest.raises(SystemExit, match="error: .*'lots'"):
        main([spec, "--device", DEVICE, "--reserve", "lots"])


def test_kv_reads_per_token_follow_each_kernels_tiling():
    from dsacache.kernels.decode_step import kv_reads_per_token

    assert kv_reads_per_token("triton", "mla-fp8", 128) == 2  # two 64-head programs
    assert kv_reads_per_token("triton", "mla-fp8", 64) == 1
    assert kv_reads_per_token("triton", "mla-fp8", 16) == 1
    assert kv_reads_per_token("triton", "gqa", 9) == 1  # one program per KV head, own bytes
    assert kv_reads_per_token("flashmla", "mla-fp8", 128) == 1  # a cluster shares each token


def test_split_partial_bytes_follow_each_kernels_split_plan():
    from dsacache.kernels.decode_step import split_partial_bytes

    part = 128 * 512 * 4  # one split's fp32 [heads, 512]
    # FlashMLA's scheduler on 132 SMs: 32, 8, 2, 7, 1 parts at the shapes measured
    for (b, k), parts in {(1, 2048): 32, (1, 512): 8, (8, 256): 2, (8, 2048): 7}.items():
        assert split_partial_bytes("flashmla", "mla-fp8", b, k, 128, 132) == parts * part
    assert split_partial_bytes("flashmla", "mla-fp8", 64, 2048, 128, 132) == 0  # one part
    # ours: one wave of 64-head programs, at least 128 tokens a split
    assert split_partial_bytes("triton", "mla-fp8", 1, 2048, 128, 132) == 16 * part
    assert split_partial_bytes("triton", "mla-fp8", 8, 512, 128, 132) == 4 * part
    assert split_partial_bytes("triton", "mla-fp8", 64, 2048, 128, 132) == 0
    assert split_partial_bytes("triton", "gqa", 8, 2048, 9, 132) == 0


def test_kernel_tiling_declares_each_backends_reads_and_refuses_other_layouts():
    from dsacache.errors import DsacacheError
    from dsacache.kernels.decode_step import FLASHMLA_LOADS, kernel_tiling

    part = 128 * 512 * 4
    assert kernel_tiling("flashmla", "mla-fp8", 1, 2048, 128, 132) == {
        "reads_per_token": 1, "kv_loads_apart": False, "kv_loads": FLASHMLA_LOADS,
        "query_reads": 9.3, "partial_bytes": 32 * part,
    }  # fmt: skip
    assert kernel_tiling("triton", "mla-fp8", 1, 2048, 128, 132) == {
        "reads_per_token": 2, "kv_loads_apart": True, "kv_loads": (), "query_reads": 1.0,
        "partial_bytes": 16 * part,
    }  # fmt: skip
    assert kernel_tiling("triton", "gqa", 8, 2048, 9, 132)["partial_bytes"] == 0
    with pytest.raises(
        DsacacheError, match="backend flashmla reads the layouts mla-fp8, got 'gqa'"
    ):
        kernel_tiling("flashmla", "gqa", 1, 2048, 9, 132)
    with pytest.raises(DsacacheError, match="backend triton reads the layouts .*, got 'gla'"):
        kernel_tiling("triton", "gla", 1, 2048, 8, 132)
    with pytest.raises(DsacacheError, match="unknown backend 'cutlass'; known: triton, flashmla"):
        kernel_tiling("cutlass", "mla-fp8", 1, 2048, 128, 132)
    with pytest.raises(DsacacheError, match="sms >= 1, got 1, 2048, 128, 0"):
        kernel_tiling("triton", "mla-fp8", 1, 2048, 128, 0)


def test_replay_backend_streams_the_kernels_reads(tmp_path):
    """``dsacache replay --backend`` replays what a Workload with the kernel's tiling written
    out by hand replays; FlashMLA reads each selected token's sectors once, ours (two 64-head
    programs, the record's parts apart) more than twice as many."""
    import pandas as pd
    from click.testing import CliRunner

    from dsacache.cli import main
    from dsacache.kernels.decode_step import FLASHMLA_LOADS, flashmla_query_reads
    from dsacache.simulator import Workload, replay
    from dsacache.tracer import SynthConfig, synthesize
    from dsacache.traces import open_trace

    model = {"name": "t", "attention": "MLA", "heads": 128}
    cfg = SynthConfig(layers=2, requests=2, context=700, steps=3, k=256, seed=3, model=model)
    path = synthesize(cfg, tmp_path / "t.dsatrace")
    classes = "kv,query,partials"
    sectors = {}
    for backend in ("flashmla", "triton"):
        out = tmp_path / f"{backend}.csv"
        args = ["replay", str(path), "--layout", "mla-fp8", "--batch", "2", "--classes", classes,
                "--backend", backend, "--out", str(out), "--quiet"]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        got = pd.read_csv(out)
        sectors[backend] = got.loc[got["class"] == "kv", "sectors"].sum()
        if backend == "flashmla":
            by_hand = Workload(
                layout="mla-fp8", batch=2, classes=tuple(classes.split(",")),
                kv_loads=FLASHMLA_LOADS, query_reads=flashmla_query_reads(2, 256),
                partial_bytes=4 * 128 * 512 * 4,  # 2 x (4 blocks + 5) over 66 parts: 4 parts
            )  # fmt: skip
            want = replay(open_trace(path), workload=by_hand)
            cols = ["step", "layer", "class", "sectors", "sector_hits", "bytes_from_memory"]
            mine, theirs = (
                f[cols].astype({"class": str}).reset_index(drop=True) for f in (got, want)
            )
            pd.testing.assert_frame_equal(mine, theirs, check_dtype=False)
    assert sectors["triton"] > 2 * sectors["flashmla"]
    bad = CliRunner().invoke(main, [*args[:-1], "--reads-per-token", "2", "--quiet"])
    assert bad.exit_code == 2 and "leave reads_per_token at 1" in bad.output
    gqa = ["--layout", "gqa:kv_heads=2,head_dim=64", "--backend", "flashmla"]
    bad = CliRunner().invoke(main, [*args, *gqa])  # the last of a repeated option counts
    assert bad.exit_code == 2 and "backend flashmla reads the layouts mla-fp8" in bad.output
