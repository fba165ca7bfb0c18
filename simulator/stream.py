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
from dsacache.simulator.workload import (
    CLASS_ID,
    AddressMap,
    Workload,
    page_tier,
    query_repeats,
)
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


@dataclass
class _Section:
    """One kind of access of every layer of a step (e.g. the indexer's key reads), its
    elements in layer order; ``build_step`` interleaves the sections layer by layer."""

    cls: str
    addr: np.ndarray
    nbytes: np.ndarray
    layer: np.ndarray  # of each access, non-decreasing
    tier: np.ndarray | None = None
    score: np.ndarray | None = None


def _index_reads(
    amap: AddressMap, layer: np.ndarray, requests: np.ndarray, positions: np.ndarray
) -> _Section:
    """The indexer's reads of every cached token's key, one access per page, per (layer,
    request) pair."""
    pt = amap.workload.page_tokens
    npages = -(-positions // pt)
    pair = np.repeat(np.arange(len(requests)), npages)
    page = np.arange(npages.sum()) - np.repeat(np.cumsum(npages) - npages, npages)
    tokens = np.minimum(pt, positions[pair] - page * pt)
    phys = amap.page_table[requests[pair], page]
    addr = amap.index_base[layer[pair]] + phys * pt * amap.index_bytes
    return _Section("index", addr, tokens * amap.index_bytes, layer[pair])


def _kv_gathers(amap: AddressMap, rows: SelectionBatch) -> _Section:
    """The sparse kernel's gathers of every row's selected tokens: per row, block by block
    of ``block_tokens``; within a block, CTA by CTA (``reads_per_token``), plane by plane,
    load by load, the block's tokens in order."""
    wl, layout = amap.workload, amap.layout
    pt = wl.page_tokens
    lengths = rows.lengths.astype(np.int64)
    starts = rows.offsets[:-1].astype(np.int64)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    rank = np.arange(len(rows.indices)) - starts[row_of]
    block, in_block = np.divmod(rank, wl.block_tokens)
    block_len = np.minimum(wl.block_tokens, lengths[row_of] - block * wl.block_tokens)
    tok = rows.indices.astype(np.int64)
    phys = amap.page_table[rows.request[row_of], tok // pt]
    slot_global = phys * pt + tok % pt
    layer = rows.layer[row_of].astype(np.int64)
    group = rows.group[row_of].astype(np.int64)
    record = [amap.plane_base[layer, p] + slot_global * plane.bytes_per_token
              for p, plane in enumerate(layout.planes)]  # fmt: skip
    # (address, bytes) of each load of one CTA, per token, in plane and load order
    if wl.kv_loads:  # one plane, read whole (AddressMap.build checks); what reaches the L2
        spans = [_new_sectors(record[0], wl.kv_loads[:c], *load)
                 for c, load in enumerate(wl.kv_loads)]  # fmt: skip
    else:
        spans = [
            (record[p] + offset + (group * layout.read_bytes(plane, amap.groups)
                                   if plane.grouped and amap.groups > 1 else 0), size)
            for p, plane in enumerate(layout.planes)
            for offset, size in layout.plane_loads(plane, amap.groups, wl.kv_loads_apart)
        ]  # fmt: skip
    n = len(spans) * wl.reads_per_token  # every CTA makes the same loads
    # each row's accesses start at n x its first index; a block after n x the full blocks
    base = n * (starts[row_of] + block * wl.block_tokens) + in_block
    addr = np.empty(n * len(tok), np.int64)
    nbytes = np.empty(n * len(tok), np.int64)
    where = np.empty(n * len(tok), np.int64)  # the token of every access
    token = np.arange(len(tok))
    for c in range(n):
        at = base + c * block_len
        addr[at], nbytes[at] = spans[c % len(spans)]
        where[at] = token
    if wl.kv_loads:  # loads whose sectors an earlier load of the CTA read reach no L2
        kept = nbytes > 0
        addr, nbytes, where = addr[kept], nbytes[kept], where[kept]
    tier = page_tier(phys, wl.peer_share, wl.remote_share)[where]
    score = None if rows.scores is None else np.asarray(rows.scores, np.float32)[where]
    return _Section("kv", addr, nbytes, layer[where], tier, score)


L1_SECTOR = 32  # bytes: an SM's L1 keeps what a CTA's loads fetched at this granularity


def _new_sectors(
    record: np.ndarray, earlier: tuple[tuple[int, int], ...], offset: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(address, bytes) of what a load of ``size`` bytes at ``offset`` into each record asks
    the L2 for when the CTA's ``earlier`` loads of that record are in its L1: its sectors, less
    those at either end that an earlier load covered (0 bytes: none left)."""
    lo = (record + offset) // L1_SECTOR
    hi = (record + offset + size - 1) // L1_SECTOR
    covered = [((record + o) // L1_SECTOR, (record + o + n - 1) // L1_SECTOR) for o, n in earlier]
    for _ in range(len(covered)):  # past each covered range in turn, however they chain
        for a, b in covered:
            lo = np.where((lo >= a) & (lo <= b), b + 1, lo)
            hi = np.where((hi >= a) & (hi <= b), a - 1, hi)
    return lo * L1_SECTOR, np.maximum(hi - lo + 1, 0) * L1_SECTOR


def _appends(
    amap: AddressMap,
    layer: np.ndarray,
    requests: np.ndarray,
    positions: np.ndarray,
    with_index: bool,
) -> _Section:
    """The new token's writes per (layer, request) pair: its record in every plane, then its
    indexer key."""
    pt = amap.workload.page_tokens
    slot_global = amap.page_table[requests, positions // pt] * pt + positions % pt
    cols = [amap.plane_base[layer, p] + slot_global * plane.bytes_per_token
            for p, plane in enumerate(amap.layout.planes)]  # fmt: skip
    sizes = [plane.bytes_per_token for plane in amap.layout.planes]
    if with_index:
        cols.append(amap.index_base[layer] + slot_global * amap.index_bytes)
        sizes.append(amap.index_bytes)
    addr = np.stack(cols, axis=1).ravel()
    nbytes = np.tile(np.array(sizes, np.int64), len(requests))
    return _Section("append", addr, nbytes, np.repeat(layer, len(sizes)))


def build_step(amap: AddressMap, rows: SelectionBatch) -> AccessChunk:
    """All accesses of one decode step; ``rows`` are that step's trace rows for the batch.
    Layer by layer, in kernel order: weights, the indexer's query and key reads, the
    attention kernel's query and KV gathers, the appends (the module docstring)."""
    wl = amap.workload
    if not len(rows):
        return AccessChunk.concat([])
    step = int(rows.step[0])
    order = np.lexsort((rows.group, rows.request, rows.layer))
    if np.any(order[1:] < order[:-1]):  # iter_steps yields this order already
        rows = rows.take(order)
    if int(rows.layer[-1]) >= amap.layers:
        raise DsacacheError(
            f"trace has layer {int(rows.layer[-1])}, but the workload was built for {amap.layers}"
        )
    # one (layer, request) pair per request of each layer: its first row
    first = np.flatnonzero(np.r_[True, (np.diff(rows.layer) != 0) | (np.diff(rows.request) != 0)])
    layer = rows.layer[first].astype(np.int64)
    requests = rows.request[first].astype(np.int64)
    positions = rows.position[first].astype(np.int64)
    sections: list[_Section] = []
    if "weights" in wl.classes and wl.weight_bytes:
        present = np.unique(layer)
        addr = amap.weights_base + present * wl.weight_bytes
        sections.append(_Section("weights", addr, np.full(len(present), wl.weight_bytes), present))
    if "index" in wl.classes:
        if amap.index_query_bytes:
            addr = amap.query_address("index", requests)
            sections.append(
                _Section("query", addr, np.full(len(addr), amap.index_query_bytes), layer)
            )
        sections.append(_index_reads(amap, layer, requests, positions))
    if "kv" in wl.classes:
        if amap.kv_query_bytes:
            reads = query_repeats(wl.query_reads, requests)
            addr = np.repeat(amap.query_address("kv", requests), reads)
            sections.append(
                _Section("query", addr, np.full(len(addr), amap.kv_query_bytes),
                         np.repeat(layer, reads))
            )  # fmt: skip
        sections.append(_kv_gathers(amap, rows))
        if "partials" in wl.classes and wl.partial_bytes:
            addr = amap.partials_base + requests * wl.partial_bytes
            sections.append(_Section("partials", addr, np.full(len(addr), wl.partial_bytes), layer))
    if "append" in wl.classes:
        sections.append(_appends(amap, layer, requests, positions, "index" in wl.classes))
    return _interleave(sections, step, amap.layers) if sections else AccessChunk.concat([])


def _interleave(sections: list[_Section], step: int, layers: int) -> AccessChunk:
    """One chunk of the sections' accesses, layer by layer, each layer's sections in order."""
    counts = np.stack([np.bincount(s.layer, minlength=layers) for s in sections], axis=1)
    start = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(counts.shape)  # [layer, sec]
    total = int(counts.sum())
    out = AccessChunk(
        np.empty(total, np.int64),
        np.empty(total, np.int64),
        np.empty(total, np.int8),
        np.full(total, step, np.int32),
        np.empty(total, np.int16),
        np.zeros(total, np.int8),
        np.full(total, np.nan, np.float32),
    )
    for k, sec in enumerate(sections):
        first_of_layer = np.cumsum(counts[:, k]) - counts[:, k]
        at = start[sec.layer, k] + np.arange(len(sec.addr)) - first_of_layer[sec.layer]
        out.addr[at] = sec.addr
        out.nbytes[at] = sec.nbytes
        out.cls[at] = CLASS_ID[sec.cls]
        out.layer[at] = sec.layer
        if sec.tier is not None:
            out.tier[at] = sec.tier
        if sec.score is not None:
            out.score[at] = sec.score
    return out


def check_requests(requests: int, total: int) -> int:
    """``requests`` if it is between 1 and ``total`` (the trace's request count, from
    ``trace_shape``), else ``DsacacheError``."""
    if not 1 <= requests <= total:
        raise DsacacheError(f"requests {requests} must be between 1 and the trace's {total}")
    return requests


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
