import pytest

from dsacache.errors import DsacacheError
from dsacache.simulator import make_layout
from dsacache.simulator.layouts import default_layout


@pytest.mark.parametrize(
    "spec,model,bytes_per_token",
    [
        ("mla-bf16", {}, (512 + 64) * 2),  # 1152
        ("mla-fp8", {}, 512 + 4 * 4 + 64 * 2),  # 656, DeepSeek-V3.2
        ("indexer", {}, 128 + 4),  # 132
        ("gqa", {"kv_heads": 3, "head_dim": 64}, 2 * 3 * 64 * 2),  # SmolLM2-135M: 768
        ("gqa:kv_heads=4,head_dim=128", {}, 2048),  # Zadouri et al.: GQA-4
        ("gta:kv_heads=4,head_dim=128", {}, 1152),  # GTA-4
        ("gla:groups=2,latent=256,rope=64", {}, 1152),  # GLA-2
        ("gla:groups=2,latent=256,rope=64,devices=2", {}, 640),  # GLA-2 per GPU at TP=2
    ],
)
def test_bytes_per_token(spec, model, bytes_per_token):
    assert make_layout(spec, model).bytes_per_token == bytes_per_token


@pytest.mark.parametrize(
    "spec,model,heads,query_bytes",
    [
        ("mla-fp8", {}, 128, 128 * 576 * 2),  # DeepSeek-V3.2: 128 heads x (512 + 64), bf16
        ("mla-bf16", {}, 16, 16 * 576 * 2),
        ("gqa", {"kv_heads": 3, "head_dim": 64}, 9, 9 * 64 * 2),  # SmolLM2-135M: 1,152 B
        ("gta:kv_heads=4,head_dim=128", {}, 8, 8 * (128 + 64) * 2),
        ("gla:groups=2,latent=256,rope=64", {}, 8, 8 * 320 * 2),
    ],
)
def test_query_bytes(spec, model, heads, query_bytes):
    assert make_layout(spec, model).query_bytes(heads) == query_bytes


def test_gqa_splits_per_group():
    layout = make_layout("gqa", {"kv_heads": 3, "head_dim": 64})
    assert [layout.read_bytes(p, 3) for p in layout.planes] == [128, 128]
    assert [layout.read_bytes(p, 1) for p in layout.planes] == [384, 384]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("mla-fp9", "unknown layout 'mla-fp9'"),
        ("gqa:heads=3", "unknown parameter(s) heads"),
        ("gqa:kv_heads=x", "kv_heads='x' is not an integer"),
        ("gla:groups=3,devices=2", "multiple of devices"),
    ],
)
def test_bad_layouts(spec, needle):
    with pytest.raises(DsacacheError) as e:
        make_layout(spec)
    assert needle in str(e.value)


def test_group_mismatch():
    with pytest.raises(DsacacheError, match="has 3 KV group"):
        make_layout("gqa:kv_heads=3,head_dim=64").check_groups(2)
    with pytest.raises(DsacacheError, match="no per-group planes"):
        make_layout("mla-fp8").check_groups(3)


def test_default_layout():
    assert default_layout({"layout": "mla-fp8"}) == "mla-fp8"
    assert default_layout({"attention": "GQA"}) == "gqa"


def test_mla_records_load_as_the_kernel_loads_their_parts():
    """Our sparse MLA kernel loads an fp8 token's 512-B latent, 16 B of scales and 128-B RoPE
    apart (the bf16 token's latent and RoPE), each a block of tokens at a time; a workload
    with ``kv_loads_apart`` reads those parts, others the whole record."""
    fp8, bf16 = make_layout("mla-fp8"), make_layout("mla-bf16")
    (plane,) = fp8.planes
    assert fp8.plane_loads(plane, 1, True) == ((0, 512), (512, 16), (528, 128))
    assert sum(n for _, n in plane.loads) == plane.bytes_per_token == 656
    assert fp8.plane_loads(plane, 1, False) == ((0, 656),)
    assert bf16.plane_loads(bf16.planes[0], 1, True) == ((0, 1024), (1024, 128))
    gqa = make_layout("gqa:kv_heads=2,head_dim=64")
    assert gqa.plane_loads(gqa.planes[0], 2, True) == ((0, 128),)  # a group's slice, whole
