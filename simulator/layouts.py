"""KV-cache layouts: how many bytes one token occupies per layer, and how they are arranged.

A layout is a list of *planes*. A plane is a per-token record stored in its own paged pool
(GQA keeps K and V in two planes, as vLLM's ``[blocks, block_size, kv_heads, head_dim]``
tensors do). A *grouped* plane is split evenly over the KV groups, so a selection made per
KV group reads only its group's slice; an ungrouped plane (MLA latent, RoPE key shared by
all heads) is read whole by every selection.

Bytes per token per layer (DESIGN.md; GTA/GLA from Zadouri, Strauss & Dao, arXiv 2505.21487):
MLA bf16 (512 + 64) x 2 = 1152; MLA fp8 as in DeepSeek-V3.2 512 + 4x4 + 64x2 = 656;
DSA indexer keys 128 + 4 = 132; GQA 2 x kv_heads x head_dim x dtype; GTA kv_heads x head_dim
x dtype (K and V tied) + rope_dim x dtype; GLA groups x latent x dtype + rope_dim x dtype,
of which one device holds latent x dtype + rope_dim x dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsacache.errors import DsacacheError
from dsacache.units import parse_spec


@dataclass(frozen=True)
class Plane:
    """One per-token record of a layout, stored in its own paged pool."""

    name: str
    bytes_per_token: int
    grouped: bool = False  # split evenly over KV groups
    # (offset, bytes) of the parts a decode kernel may load apart, in its order (every part
    # of a block of tokens, then the next); a workload with ``kv_loads_apart`` reads them so
    loads: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class KVLayout:
    """A KV layout: its planes, and the number of KV groups its grouped planes split into."""

    name: str
    planes: tuple[Plane, ...]
    groups: int = 1
    spec: str = ""
    query_dim: int = 0  # per-head width of the attention query the kernel reads (bf16)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer (all planes)."""
        return sum(p.bytes_per_token for p in self.planes)

    def read_bytes(self, plane: Plane, selection_groups: int) -> int:
        """Bytes of ``plane`` one selection reads per token, for a trace with that many groups."""
        if plane.grouped and selection_groups > 1:
            return plane.bytes_per_token // selection_groups
        return plane.bytes_per_token

    def plane_loads(
        self, plane: Plane, selection_groups: int, apart: bool
    ) -> tuple[tuple[int, int], ...]:
        """(offset, bytes) of each load a selection's read of ``plane`` makes per token: its
        parts (``Plane.loads``) when the kernel loads them ``apart``, else one load."""
        size = self.read_bytes(plane, selection_groups)
        whole = size == plane.bytes_per_token
        return plane.loads if apart and plane.loads and whole else ((0, size),)

    def selection_bytes(self, selection_groups: int) -> int:
        """Bytes one selection reads per token and layer (its group's slice of grouped planes)."""
        return sum(self.read_bytes(p, selection_groups) for p in self.planes)

    def query_bytes(self, heads: int) -> int:
        """Bytes of one request's attention query for ``heads`` query heads, in bf16."""
        return heads * self.query_dim * 2

    def check_groups(self, selection_groups: int) -> None:
        """Raise unless a trace with ``selection_groups`` groups can be replayed on this layout."""
        if selection_groups <= 1:
            return
        if not any(p.grouped for p in self.planes):
            raise DsacacheError(
                f"layout {self.spec or self.name} has no per-group planes, but the trace selects "
                f"per KV group ({selection_groups} groups); use gqa, gta or gla"
            )
        if self.groups != selection_groups:
            raise DsacacheError(
                f"layout {self.spec or self.name} has {self.groups} KV group(s), but the trace "
                f"selects per KV group with {selection_groups}; set kv_heads={selection_groups}"
            )


def _int(params: dict[str, str], key: str, default: int, layout: str) -> int:
    raw = params.pop(key, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DsacacheError(f"layout {layout}: {key}={raw!r} is not an integer") from None
    if value < 1:
        raise DsacacheError(f"layout {layout}: {key} must be >= 1, got {value}")
    return value


def _mla_bf16(p: dict[str, str], model: dict[str, Any]) -> KVLayout:
    latent = _int(p, "latent", int(model.get("kv_lora_rank", 512)), "mla-bf16")
    rope = _int(p, "rope", int(model.get("rope_dim", 64)), "mla-bf16")
    # our kernel loads the latent and the RoPE part apart (kernels/sparse_decode.py)
    loads = ((0, latent * 2), (latent * 2, rope * 2))
    return KVLayout(
        "mla-bf16", (Plane("latent+rope", (latent + rope) * 2, loads=loads),),
        query_dim=latent + rope,
    )  # fmt: skip


def _mla_fp8(p: dict[str, str], model: dict[str, Any]) -> KVLayout:
    latent = _int(p, "latent", int(model.get("kv_lora_rank", 512)), "mla-fp8")
    rope = _int(p, "rope", int(model.get("rope_dim", 64)), "mla-fp8")
    tile = _int(p, "scale_tile", 128, "mla-fp8")
    # fp8 latent, one fp32 scale per 128-wide tile, bf16 RoPE part (DeepSeek-V3.2 FlashMLA);
    # our kernel and FlashMLA's load the three apart: the sector where two meet is read twice
    scales = 4 * (latent // tile)
    loads = ((0, latent), (latent, scales), (latent + scales, rope * 2))
    return KVLayout(
        "mla-fp8",
        (Plane("latent+scales+rope", latent + scales + rope * 2, loads=loads),),
        query_dim=latent + rope,
    )


def _indexer(p: dict[str, str], model: dict[str, Any]) -> KVLayout:
    dim = _int(p, "dim", 128, "indexer")
    return KVLayout("indexer", (Plane("key+scale", dim + 4),), query_dim=dim)


def _gqa(p: dict[str, str], model: dict[str, Any]) -> KVLayout:
    kv_heads = _int(p, "kv_heads", int(model.get("kv_heads", 8)), "gqa")
    head_dim = _int(p, "head_dim", int(model.get("head_dim", 128)), "gqa")
    dtype = _int(p, "dtype_bytes", 2, "gqa")
    rec = kv_heads * head_dim * dtype
    planes = (Plane("K", rec, True), Plane("V", rec, True))
    return KVLayout("gqa", planes, groups=kv_heads, query_dim=head_dim)


def _gta(p: dict[str, str], model: dict[str, Any]) -> KVLayout:
    kv_heads = _int(p, "kv_heads", int(model.get("kv_heads", 8)), "gta")
    head_dim = _int(p, "head_dim", int(model.get("head_dim", 128)), "gta")
    rope = _int(p, "rope", max(head_dim // 2, 1), "gta")
    dtype = _int(p, "dtype_bytes", 2, "gta")
    planes = (Plane("tied KV", kv_heads * head_dim * dtype, True), Plane("rope", rope * dtype))
    return KVLayout("gta", planes, groups=kv_heads, query_dim=head_dim + rope)


def _gla(p: dict[str, str], model: dict[str, Any]) -> KVLayout:
    groups = _int(p, "groups", 2, "gla")
    latent = _int(p, "latent", 256, "gla")
    rope = _int(p, "rope", 64, "gla")
    dtype = _int(p, "dtype_bytes", 2, "gla")
    devices = _int(p, "devices", 1, "gla")
    if groups % devices:
        raise DsacacheError(
            f"layout gla: groups ({groups}) must be a multiple of devices ({devices})"
        )
    local = groups // devices  # latent groups held by one device; the RoPE key is on every one
    planes = (Plane("latent", local * latent * dtype, True), Plane("rope", rope * dtype))
    return KVLayout("gla", planes, groups=local, query_dim=latent + rope)


LAYOUTS = {
    "mla-bf16": (_mla_bf16, "MLA latent + RoPE in bf16 (DeepSeek-V3): 1152 B/token"),
    "mla-fp8": (
        _mla_fp8,
        "DeepSeek-V3.2 sparse FP8 cache: 512 fp8 + 16 B scales + 64 bf16 = 656 B",
    ),
    "indexer": (_indexer, "DSA lightning-indexer keys, fp8 + fp32 scale: 132 B/token"),
    "gqa": (_gqa, "K and V planes, kv_heads x head_dim x dtype each"),
    "gta": (_gta, "grouped-tied attention: tied K/V per group + shared RoPE key"),
    "gla": (_gla, "grouped latent attention; devices=N gives one device's shard"),
}


def trace_layout(trace: Any, layout: str | None = None) -> KVLayout:
    """The KV layout named by ``layout``, or the one the trace's model implies."""
    return make_layout(layout or default_layout(trace.model), trace.model)


def make_layout(spec: str, model: dict[str, Any] | None = None) -> KVLayout:
    """Build a layout from ``name:key=value,...``; unspecified sizes come from the trace's model."""
    parsed = parse_spec(spec, "layout")
    if parsed.name not in LAYOUTS:
        raise DsacacheError(f"unknown layout {parsed.name!r}; choose one of: {', '.join(LAYOUTS)}")
    params = dict(parsed.params)
    layout = LAYOUTS[parsed.name][0](params, dict(model or {}))
    if params:
        raise DsacacheError(f"layout {parsed.name}: unknown parameter(s) {', '.join(params)}")
    return KVLayout(layout.name, layout.planes, layout.groups, str(parsed), layout.query_dim)


def default_layout(model: dict[str, Any]) -> str:
    """The layout a trace's model implies when the user names none."""
    if model.get("layout") in LAYOUTS:
        return str(model["layout"])
    return {"MLA": "mla-bf16", "GQA": "gqa", "GTA": "gta", "GLA": "gla"}.get(
        str(model.get("attention", "")).upper(), "mla-fp8"
    )
