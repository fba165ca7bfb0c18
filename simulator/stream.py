"""The stream builder: trace rows -> the byte accesses a batched DSA decode step issues.

Per decode step and layer, in kernel order (DESIGN.md "What one decode step touches"):
``weights`` (optional, shared by the batch), ``index`` (the indexer reads the key of every
cached token, request by request, one access per page), ``kv`` (the sparse kernel gathers
each request's selected tokens in blocks of ``block_tokens``; each block is read by
``reads_per_token`` CTAs, plane by plane); with the ``query`` class each of the two kernels
first reads every request's query, ``append`` (the new token's KV record and indexer
key are written). The stream comes in chunks of numpy arrays, one chunk per step, so a
replay never holds the whole stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dsacache.errors import DsacacheError
from dsacache.simulator.layouts import KVLayout, trace_layout
from dsacache.simulator.workload import CLASS_ID, AddressMap, Workload, page_tier
from dsacache.traces import SelectionBatch, Trace


@dataclass
class AccessChunk:
    """A run of accesses: byte address, size, traffic class, step and layer of each."""

    addr: np.ndarray  # int64
    nbytes: np.ndarray  # int64
    cls: np.ndarray  # int8, index into workload.CLASSES
    step: np.ndarray  # int32
    layer: np.ndarray  # int16
    tier: np.ndarray  # int8, index into workload.TIERS (who serves a miss)
    score: np.ndarray  # float32, the indexer's score of a KV gather's token (NaN: none)

    def __len__(self) -> int:
        return len(self.addr)

    @staticmethod
    def concat(parts: list[AccessChunk]) -> AccessChunk:
        if not parts:
            z = np.zeros(0, np.int64)
            return AccessChunk(
                z, z, z.astype(np.int8), z.astype(np.int32), z.astype(np.int16), z.astype(np.int8),
                z.astype(np.float32),
            )  # fmt: skip
        return AccessChunk(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in AccessChunk.__dataclass_fields__
            )
        )


def _piece(addr, nbytes, cls: str, step: int, layer: int, tier=None, score=None) -> AccessChunk:
    n = len(addr)
    return AccessChunk(
        np.asarray(addr, np.int64),
        np.broadcast_to(np.asarray(nbytes, np.int64), (n,)).copy(),
        np.full(n, CLASS_ID[cls], np.int8),
        np.full(n, step, np.int32),
        np.full(n, layer, np.int16),
        np.zeros(n, np.int8) if tier is None else np.asarray(tier, np.int8),
        np.full(n, np.nan, np.float32) if score is None else np.asarray(score, np.float32),
    )


def _index_reads(amap: AddressMap, layer: int, requests: np.ndarray, positions: np.ndarray):
    pt = amap.workload.page_tokens
    npages = -(-positions // pt)
    req = np.repeat(requests, npages)
    page = np.arange(npages.sum()) - np.repeat(np.cumsum(npages) - npages, npages)
    tokens = np.minimum(pt, np.repeat(positions, npages) - page * pt)
    phys = amap.page_table[req, page]
    addr = amap.index_base[layer] + phys * pt * amap.index_bytes
    return addr, tokens * amap.index_bytes


def _kv_gathers(amap: AddressMap, layer: int, rows: SelectionBatch):
    wl, layout = amap.workload, amap.layout
    pt = wl.page_tokens
    lengths = rows.lengths
    row_of = np.repeat(np.arange(len(rows)), lengths)
    rank = np.arange(len(rows.indices)) - np.repeat(rows.offsets[:-1], lengths)
    block = rank // wl.block_tokens
    tok = rows.indices.astype(np.int64)
    phys = amap.page_table[rows.request[row_of], tok // pt]
    slot_global = phys * pt + tok % pt
    tier = page_tier(phys, wl.peer_share, wl.remote_share)
    group = rows.group[row_of].astype(np.int64)
    addrs, sizes, keys = [], [], []
    for p, plane in enumerate(layout.planes):
        size = layout.read_bytes(plane, amap.groups)
        addr = amap.plane_base[layer, p] + slot_global * plane.bytes_per_token
        if plane.grouped and amap.groups > 1:
            addr = addr + group * size
        for part, (offset, nbytes) in enumerate(
            layout.plane_loads(plane, amap.groups, wl.kv_loads_apart)
        ):
            for rep in range(wl.reads_per_token):
                addrs.append(addr + offset)
                sizes.append(np.full(len(addr), nbytes, np.int64))
                keys.append((rank, np.full(len(addr), part), np.full(len(addr), p),
                             np.full(len(addr), rep), block, row_of))  # fmt: skip
    score = rows.scores
    if len(keys) == 1:
        return addrs[0], sizes[0], tier, score
    cat = [np.concatenate(k) for k in zip(*keys, strict=True)]
    order = np.lexsort(cat)  # row, then block, then CTA (rep), then plane, then load, then token
    tiers = np.tile(tier, len(keys))
    score = None if score is None else np.tile(score, len(keys))[order]
    return np.concatenate(addrs)[order], np.concatenate(sizes)[order], tiers[order], score


def _appends(
    amap: AddressMap, layer: int, requests: np.ndarray, positions: np.ndarray, with_index: bool
):
    pt = amap.workload.page_tokens
    slot_global = amap.page_table[requests, positions // pt] * pt + positions % pt
    addrs, sizes = [], []
    for r in range(len(requests)):
        for p, plane in enumerate(amap.layout.planes):
            addrs.append(amap.plane_base[layer, p] + slot_global[r] * plane.bytes_per_token)
            sizes.append(plane.bytes_per_token)
        if with_index:
            addrs.append(amap.index_base[layer] + slot_global[r] * amap.index_bytes)
            sizes.append(amap.index_bytes)
    return np.array(addrs, np.int64), np.array(sizes, np.int64)


def build_step(amap: AddressMap, rows: SelectionBatch) -> AccessChunk:
    """All accesses of one decode step; ``rows`` are that step's trace rows for the batch."""
    wl = amap.workload
    if not len(rows):
        return AccessChunk.concat([])
    step = int(rows.step[0])
    order = np.lexsort((rows.group, rows.request, rows.layer))
    rows = rows.take(order)
    pieces: list[AccessChunk] = []
    layer_cut = np.flatnonzero(np.diff(rows.layer)) + 1
    for lo, hi in zip([0, *layer_cut.tolist()], [*layer_cut.tolist(), len(rows)], strict=True):
        lrows = rows.take(np.arange(lo, hi))
        layer = int(lrows.layer[0])
        if layer >= amap.layers:
            raise DsacacheError(
                f"trace has layer {layer}, but the workload was built for {amap.layers}"
            )
        first = np.flatnonzero(np.r_[True, np.diff(lrows.request) != 0])
        requests = lrows.request[first].astype(np.int64)
        positions = lrows.position[first].astype(np.int64)
        if "weights" in wl.classes and wl.weight_bytes:
            pieces.append(
                _piece(
                    np.array([amap.weights_base + layer * wl.weight_bytes]),
                    wl.weight_bytes,
                    "weights",
                    step,
                    layer,
                )
            )
        if "index" in wl.classes:
            if amap.index_query_bytes:
                addr = amap.query_address("index", requests)
                pieces.append(_piece(addr, amap.index_query_bytes, "query", step, layer))
            pieces.append(
                _piece(*_index_reads(amap, layer, requests, positions), "index", step, layer)
            )
        if "kv" in wl.classes:
            if amap.kv_query_bytes:
                addr = amap.query_address("kv", requests)
                pieces.append(_piece(addr, amap.kv_query_bytes, "query", step, layer))
            addr, size, tier, score = _kv_gathers(amap, layer, lrows)
            pieces.append(_piece(addr, size, "kv", step, layer, tier, score))
        if "append" in wl.classes:
            pieces.append(
                _piece(
                    *_appends(amap, layer, requests, positions, "index" in wl.classes),
                    "append",
                    step,
                    layer,
                )
            )
    return AccessChunk.concat(pieces)


def trace_shape(trace: Trace) -> tuple[int, int, int, int]:
    """(layers, groups, requests, max_position) of a trace, from its manifest or its rows."""
    totals = trace.manifest.get("totals", {})
    keys = ("layers", "groups", "requests", "max_position")
    if all(isinstance(totals.get(k), int) and totals[k] > 0 for k in keys):
        shape = [totals[k] for k in keys]
    else:
        shape = [0, 0, 0, 0]
        for part in trace.iter_parts():
            if len(part):
                cols = (part.layer, part.group, part.request)
                shape[:3] = [max(s, int(c.max()) + 1) for s, c in zip(shape[:3], cols, strict=True)]
                shape[3] = max(shape[3], int(part.position.max()))
    shape[0] = max(shape[0], int(trace.model.get("layers", 0)))
    return tuple(shape)


def layout_and_groups(trace: Trace, layout: str | None = None) -> tuple[KVLayout, int]:
    """The trace's KV layout (or ``layout``) and its number of KV groups per selection,
    checked to fit each other."""
    groups = trace_shape(trace)[1]
    kv = trace_layout(trace, layout)
    kv.check_groups(groups)
    return kv, groups


def plan_replay(trace: Trace, workload: Workload) -> AddressMap:
    """Check the workload against the trace and lay out its address space."""
    layers, groups, requests, max_position = trace_shape(trace)
    workload.check()
    if workload.batch > requests:
        raise DsacacheError(
            f"batch {workload.batch} is larger than the trace's {requests} request(s); "
            f"use --batch <= {requests} or synthesize more requests"
        )
    return AddressMap.build(workload, trace.model, layers, groups, max_position)


def iter_stream(trace: Trace, amap: AddressMap) -> Iterator[AccessChunk]:
    """Yield one ``AccessChunk`` per decode step of the trace, for the workload's batch."""
    batch = amap.workload.batch
    for rows in trace.iter_steps():
        keep = rows.request < batch
        if keep.any():
            yield build_step(amap, rows.take(keep))
