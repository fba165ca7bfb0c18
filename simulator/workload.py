"""What a decode step touches: the workload description and the KV cache's address map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsacache.errors import DsacacheError
from dsacache.simulator.layouts import KVLayout, default_layout, make_layout

# Traffic classes; counters are kept per class. In a decode layer: weights, then the
# indexer's query and keys, then the attention kernel's query, KV gathers and split-K
# partial outputs, then appends.
CLASSES = ("weights", "index", "kv", "append", "query", "partials")
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
WRITE_CLASSES = frozenset({"append", "partials"})
DEFAULT_CLASSES = ("index", "kv", "append")
PAGE_ORDERS = ("contiguous", "shuffled")
INDEXER_HEADS = 64  # DeepSeek-V3.2's lightning indexer: 64 heads of 128 dims
POOL_ALIGN = 4096
# Where a missed byte is served from: the GPU's own HBM, a peer GPU, a remote node.
TIERS = ("hbm", "peer", "remote")


def check_partials_backend(classes: tuple[str, ...], backend: str | None) -> None:
    """Refuse the ``partials`` class without an attention kernel to size it: its bytes come
    from the kernel's split plan (``--backend``), and without one it would stream nothing."""
    if "partials" in classes and not backend:
        raise DsacacheError(
            "traffic class partials: the split-K partials are sized by the attention kernel's "
            "split plan; give a backend (triton or flashmla) or drop partials from the classes"
        )


def page_tier(phys_page: np.ndarray, peer_share: float, remote_share: float) -> np.ndarray:
    """Tier (index into ``TIERS``) homing each physical KV page: a hash of the page id picks
    ``peer_share`` of the pages for the peer GPU and ``remote_share`` for the remote node."""
    h = (np.asarray(phys_page, np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    u = h.astype(np.float64) / float(1 << 53)
    return np.where(u < peer_share, 1, np.where(u < peer_share + remote_share, 2, 0)).astype(
        np.int8
    )


def query_repeats(query_reads: float, requests: np.ndarray) -> np.ndarray:
    """Reads of each request's attention query (``Workload.query_reads``): the whole part for
    every request, one more for a share of the requests equal to the fraction, picked by a
    ``round`` sequence over the request ids, so that requests 0..n-1 read ``round(n x
    query_reads)`` times in all (a batch of one reads the nearest whole number)."""
    whole = int(query_reads)
    r = np.asarray(requests, np.int64)
    frac = query_reads - whole
    extra = np.floor((r + 1) * frac + 0.5) - np.floor(r * frac + 0.5)
    return whole + extra.astype(np.int64)


@dataclass(frozen=True)
class Workload:
    """A batched DSA decode workload replayed from a trace.

    ``batch`` requests (trace requests 0..batch-1) decode together; their KV lives in a paged
    cache of ``page_tokens``-token pages allocated ``contiguous`` or from a ``shuffled`` free
    list (seeded). ``reads_per_token`` and ``block_tokens`` describe the attention kernel's
    tiling: how many CTAs read each selected token per step, and how many tokens a CTA
    loads per stage; ``kv_loads_apart``, whether it loads a record's parts with separate
    loads (``Plane.loads``: the MLA latent, scales and RoPE, as our kernels and FlashMLA
    do; token policies see each part as an access of the token). ``kv_loads`` instead lists
    the (offset, bytes) loads a kernel makes per token of a one-plane layout, in its order,
    each reading only the sectors no earlier load of that token read (the SM's L1 keeps
    those: FlashMLA's 16-B-per-lane loads, ``kernels.decode_step.FLASHMLA_LOADS``). The
    ``query`` class
    streams each kernel's query, once per request and layer before the kernel's own reads:
    the indexer's (``index_heads`` x ``indexer_dim``) and the attention kernel's (``heads`` x
    the layout's query width; 0: the trace model's heads), both bf16, at fixed addresses past
    the pools (one query buffer reused by every layer, as a serving engine keeps it);
    ``query_reads`` is how often the attention kernel reads each request's query, back to
    back (FlashMLA's split parts each load it): a fraction is spread over the requests
    (``query_repeats``). The ``partials`` class writes the attention kernel's split-K partial
    outputs after its gathers, ``partial_bytes`` per request and layer, into one scratch
    buffer past the queries that every layer reuses (the merge's reads of them, which find
    what was just written, are left out).
    """

    layout: str = ""
    batch: int = 1
    page_tokens: int = 64
    page_order: str = "contiguous"
    seed: int = 0
    classes: tuple[str, ...] = DEFAULT_CLASSES
    indexer_dim: int = 128
    weight_bytes: int = 0
    reads_per_token: int = 1
    block_tokens: int = 64
    kv_loads_apart: bool = False
    kv_loads: tuple[tuple[int, int], ...] = ()
    query_reads: float = 1.0
    partial_bytes: int = 0
    heads: int = 0
    index_heads: int = INDEXER_HEADS
    peer_share: float = 0.0
    remote_share: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def check(self) -> None:
        """Raise ``DsacacheError`` naming the first field out of range."""
        for name in ("batch", "page_tokens", "indexer_dim", "reads_per_token", "block_tokens"):
            if getattr(self, name) < 1:
                raise DsacacheError(f"workload: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "weight_bytes", "heads", "index_heads", "partial_bytes"):
            if getattr(self, name) < 0:
                raise DsacacheError(f"workload: {name} must be >= 0, got {getattr(self, name)}")
        if not 1.0 <= self.query_reads < 2**20:  # also refuses NaN and inf
            raise DsacacheError(
                f"workload: query_reads must be a number >= 1, got {self.query_reads}"
            )
        if any(not isinstance(v, int | np.integer) for load in self.kv_loads for v in load) or any(
            offset < 0 or size < 1 for offset, size in self.kv_loads
        ):
            raise DsacacheError(
                f"workload: kv_loads must be integer (offset >= 0, bytes >= 1) pairs, got {self.kv_loads}"
            )
        for name in ("peer_share", "remote_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DsacacheError(
                    f"workload: {name} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.peer_share + self.remote_share > 1.0:
            raise DsacacheError("workload: peer_share + remote_share must be <= 1")
        if self.page_order not in PAGE_ORDERS:
            raise DsacacheError(
                f"workload: page order {self.page_order!r} unknown; choose one of: "
                + ", ".join(PAGE_ORDERS)
            )
        if self.partial_bytes and not {"partials", "kv"} <= set(self.classes):
            raise DsacacheError(
                f"workload: partial_bytes={self.partial_bytes} sizes the split-K partials, which "
                "are streamed only with the partials and kv traffic classes; add partials to the "
                "classes"
            )
        if self.weight_bytes and "weights" not in self.classes:
            raise DsacacheError(
                f"workload: weight_bytes={self.weight_bytes} sizes the weights, which are "
                "streamed only with the weights traffic class; add weights to the classes"
            )
        if self.heads and "query" not in self.classes:
            raise DsacacheError(
                f"workload: heads={self.heads} sizes the attention query, which is streamed only "
                "with the query traffic class; add query to the classes"
            )
        bad = [c for c in self.classes if c not in CLASS_ID]
        if bad or not self.classes:
            raise DsacacheError(
                f"workload: traffic class(es) {', '.join(bad) or '(none)'} unknown; choose from: "
                + ", ".join(CLASSES)
            )


@dataclass
class AddressMap:
    """Byte addresses of every KV pool: per layer, one pool per layout plane plus the
    indexer-key pool, then the weights, then the queries (the ``query`` class). Pages are
    mapped through a per-request page table."""

    workload: Workload
    layout: KVLayout
    layers: int
    groups: int
    pages_per_request: int
    page_table: np.ndarray  # [batch, pages_per_request] physical page ids
    plane_base: np.ndarray  # [layers, planes] byte address of each plane's pool
    index_base: np.ndarray  # [layers]
    weights_base: int
    index_bytes: int  # bytes of one indexer key
    query_base: int = 0
    index_query_bytes: int = 0  # one request's indexer query (0: no query class)
    kv_query_bytes: int = 0  # one request's attention query

    def query_address(self, cls: str, request: np.ndarray | int) -> np.ndarray | int:
        """Byte address of request(s)' query of the ``index`` or ``kv`` kernel."""
        if cls == "index":
            return self.query_base + request * self.index_query_bytes
        kv_base = self.query_base + self.workload.batch * self.index_query_bytes
        return kv_base + request * self.kv_query_bytes

    @classmethod
    def build(
        cls, workload: Workload, model: dict[str, Any], layers: int, groups: int, max_position: int
    ) -> AddressMap:
        """Lay out the pools for ``layers`` layers and tokens up to ``max_position`` (inclusive)."""
        workload.check()
        layout = make_layout(workload.layout or default_layout(model), model)
        layout.check_groups(groups)
        if workload.kv_loads:
            record = layout.planes[0].bytes_per_token
            if (
                len(layout.planes) != 1
                or groups > 1
                or any(offset + size > record for offset, size in workload.kv_loads)
            ):
                raise DsacacheError(
                    f"workload: kv_loads {workload.kv_loads} need a one-plane layout read whole "
                    f"and loads inside its {record}-byte record; layout {layout.name} has "
                    f"{len(layout.planes)} plane(s), the trace {groups} group(s)"
                )
        pt = workload.page_tokens
        pages = -(-(max_position + 1) // pt)
        total_pages = pages * workload.batch
        if workload.page_order == "contiguous":
            table = np.arange(total_pages, dtype=np.int64)
        else:
            table = np.random.default_rng(workload.seed).permutation(total_pages).astype(np.int64)
        table = table.reshape(workload.batch, pages)

        def align(x: int) -> int:
            return -(-x // POOL_ALIGN) * POOL_ALIGN

        plane_base = np.zeros((layers, len(layout.planes)), np.int64)
        index_base = np.zeros(layers, np.int64)
        index_bytes = workload.indexer_dim + 4
        addr = 0
        for layer in range(layers):
            for p, plane in enumerate(layout.planes):
                plane_base[layer, p] = addr
                addr = align(addr + total_pages * pt * plane.bytes_per_token)
            index_base[layer] = addr
            addr = align(addr + total_pages * pt * index_bytes)
        query_bytes = (0, 0)
        if "query" in workload.classes:
            heads = workload.heads or int(model.get("heads", 0))
            if heads < 1:
                raise DsacacheError(
                    "workload: the query class needs the attention kernel's query heads, and the "
                    "trace's model names none; set heads (--heads)"
                )
            query_bytes = (
                workload.index_heads * workload.indexer_dim * 2,
                layout.query_bytes(heads),
            )
        return cls(
            workload, layout, layers, groups, pages, table, plane_base, index_base, addr,
            index_bytes, align(addr + layers * workload.weight_bytes), *query_bytes,
        )  # fmt: skip

    @property
    def partials_base(self) -> int:
        """Byte address of the attention kernel's split-K partials (past the queries)."""
        end = self.query_base + self.workload.batch * (self.index_query_bytes + self.kv_query_bytes)
        return -(-end // POOL_ALIGN) * POOL_ALIGN

    def kv_address(self, layer: int, plane: int, request: int, token: int, group: int) -> int:
        """Byte address of a token's record (its group's slice) in one plane; scalar helper."""
        pt = self.workload.page_tokens
        p = self.layout.planes[plane]
        page = int(self.page_table[request, token // pt])
        base = int(self.plane_base[layer, plane]) + (page * pt + token % pt) * p.bytes_per_token
        return base + group * self.layout.read_bytes(p, self.groups) * (
            p.grouped and self.groups > 1
        )
