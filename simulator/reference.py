"""Slow, plain-Python reference models: the oracle the Numba engine is tested against.

Everything here is written for obviousness, not speed: a set is an ``OrderedDict`` from tag to
its valid-sector bitmask kept in LRU order, and the stream is built token by token with scalar
address arithmetic. Do not optimise this file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from dsacache.simulator.workload import (
    CLASS_ID,
    CLASSES,
    WRITE_CLASSES,
    AddressMap,
    page_tier,
    query_repeats,
)
from dsacache.traces import SelectionBatch

COUNTERS = (
    "accesses",  # line-granular read accesses
    "line_hits",  # reads whose line was present with every requested sector valid
    "sectors",  # sectors read
    "sector_hits",
    "sector_misses",  # requested sectors that were not valid
    "write_sectors",  # sectors written (appends)
    "bytes",  # bytes requested by the stream (reads and writes)
    "fetched_sectors",  # sectors read from the next level: each missing sector's fill unit
)


def fill_units(missing: int, sectors_per_fill: int) -> int:
    """The sector mask fetched for the ``missing`` sectors of a line: every aligned group of
    ``sectors_per_fill`` sectors that holds one of them (the next level's access unit)."""
    group = (1 << sectors_per_fill) - 1
    out = 0
    for first in range(0, 8, sectors_per_fill):
        if missing & (group << first):
            out |= group << first
    return out


def reference_set_index(line: int, n_sets: int, set_hash: str, partitions: int) -> int:
    """Which set a line maps to. ``mod``: line mod sets; ``xor``: fold higher line bits in
    first; ``hash``: a multiplicative hash (bits 20..62 of line x 0x9E3779B97F4A7C15 mod 2**64),
    a stand-in for a GPU's undisclosed address hash; ``mix``: splitmix64's finalizer of that
    product (bits 11..55), so that every line lands in a pseudo-random set, as a buffer's lines
    do under a hash of physical addresses (the fitted H200 model uses it).

    With ``partitions`` > 1 consecutive lines alternate between partitions (each with
    ``n_sets / partitions`` sets), then map into their partition's sets.
    """
    part = line % partitions
    rest = line // partitions
    per = n_sets // partitions
    if set_hash == "xor":
        rest = rest ^ (rest >> 17) ^ (rest >> 29)
    elif set_hash == "hash":
        rest = ((rest * 0x9E3779B97F4A7C15) % 2**64 >> 20) & (2**43 - 1)
    elif set_hash == "mix":
        z = (rest * 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        z ^= z >> 31
        rest = (z >> 11) & (2**45 - 1)
    return part * per + rest % per


def reference_reader(clock: int, partitions: int) -> int:
    """The partition whose SM issues an access that starts after ``clock`` line accesses
    (bits 32.. of clock x 0x9E3779B97F4A7C15 mod 2**64): SMs of all partitions share a
    stream evenly, as a GPU's block scheduler spreads it."""
    return ((clock * 0x9E3779B97F4A7C15) % 2**64 >> 32) % partitions


class ReferenceCache:
    """Sectored set-associative LRU cache, one Python object per line (slow on purpose)."""

    def __init__(
        self,
        size: int,
        ways: int,
        line: int = 128,
        sector: int = 32,
        set_hash: str = "mod",
        partitions: int = 1,
        write_allocate: bool = True,
        replicate: bool = False,
        fill: int = 0,
    ) -> None:
        self.line, self.sector, self.ways = line, sector, ways
        self.per_fill = (fill or sector) // sector  # sectors per unit read from the next level
        self.n_sets = size // (ways * line)
        self.set_hash, self.partitions = set_hash, partitions
        self.write_allocate = write_allocate
        self.replicate = replicate
        self.sets = [OrderedDict() for _ in range(self.n_sets)]
        self.counts: dict[tuple, dict[str, int]] = {}
        self.clock = 0  # line accesses so far: the reader partition of ``replicate`` hashes it

    def _bucket(self, key: tuple) -> dict[str, int]:
        if key not in self.counts:
            self.counts[key] = dict.fromkeys(COUNTERS, 0)
        return self.counts[key]

    def access(self, addr: int, nbytes: int, write: bool = False, key: tuple = ()) -> None:
        """Read (or write) ``nbytes`` bytes at ``addr``; counters go to bucket ``key``."""
        c = self._bucket(key)
        c["bytes"] += nbytes
        end = addr + nbytes  # exclusive
        reader = reference_reader(self.clock, self.partitions)
        for line_no in range(addr // self.line, (end - 1) // self.line + 1):
            self.clock += 1
            lo = max(addr, line_no * self.line) - line_no * self.line
            hi = min(end, (line_no + 1) * self.line) - line_no * self.line
            wanted = 0
            for s in range(lo // self.sector, (hi - 1) // self.sector + 1):
                wanted |= 1 << s
            n_wanted = bin(wanted).count("1")
            home_index = reference_set_index(line_no, self.n_sets, self.set_hash, self.partitions)
            cache_set = self.sets[home_index]
            if self.replicate:
                per = self.n_sets // self.partitions
                home = home_index // per
                copies = [self.sets[home_index + (p - home) * per] for p in range(self.partitions)]
                if write:  # the home takes the write; the copies in other partitions go
                    for p, other in enumerate(copies):
                        if p != home:
                            other.pop(line_no, None)
                elif reader != home:
                    self._read_far(copies[reader], cache_set, line_no, wanted, c)
                    continue
            present = line_no in cache_set
            if write:
                c["write_sectors"] += n_wanted
                if present or self.write_allocate:
                    self._touch(cache_set, line_no, wanted)
                continue
            c["accesses"] += 1
            c["sectors"] += n_wanted
            missing_mask = wanted & ~cache_set.get(line_no, 0)
            missing = bin(missing_mask).count("1")
            fetched = fill_units(missing_mask, self.per_fill)
            self._touch(cache_set, line_no, wanted | fetched)
            c["sector_hits"] += n_wanted - missing
            c["sector_misses"] += missing
            c["fetched_sectors"] += bin(fetched).count("1")
            c["line_hits"] += int(present and missing == 0)

    def _read_far(
        self, near: OrderedDict, home: OrderedDict, line_no: int, wanted: int, c: dict
    ) -> None:
        """A read by an SM of another partition than the line's home: the near copy serves
        it if it holds every wanted sector; else the home (or memory) does, and both the
        home and the near partition keep the line."""
        n_wanted = bin(wanted).count("1")
        c["accesses"] += 1
        c["sectors"] += n_wanted
        near_valid = near.get(line_no, 0)
        if line_no in near and wanted & ~near_valid == 0:
            near.move_to_end(line_no)
            c["sector_hits"] += n_wanted
            c["line_hits"] += 1
            return
        missing_mask = wanted & ~(near_valid | home.get(line_no, 0))
        missing = bin(missing_mask).count("1")
        fetched = fill_units(missing_mask, self.per_fill)
        self._touch(home, line_no, wanted | fetched)
        self._touch(near, line_no, wanted | fetched)
        c["sector_hits"] += n_wanted - missing
        c["sector_misses"] += missing
        c["fetched_sectors"] += bin(fetched).count("1")
        c["line_hits"] += int(missing == 0)

    def _touch(self, cache_set: OrderedDict, line_no: int, sectors: int) -> None:
        """Make ``line_no`` the most recent line of its set with ``sectors`` valid as well
        (inserted, evicting the least recent line, if it is not there)."""
        if line_no in cache_set:
            cache_set[line_no] |= sectors
            cache_set.move_to_end(line_no)
        else:
            if len(cache_set) >= self.ways:
                cache_set.popitem(last=False)  # least recently used
            cache_set[line_no] = sectors


def reference_stream(amap: AddressMap, rows: SelectionBatch) -> Iterator[tuple]:
    """Yield ``(addr, nbytes, class, step, layer, tier)`` for one decode step, one by one."""
    wl, layout = amap.workload, amap.layout
    pt = wl.page_tokens
    step = int(rows.step[0])
    for layer in sorted(set(rows.layer.tolist())):
        mine = [i for i in range(len(rows)) if rows.layer[i] == layer]
        mine.sort(key=lambda i: (int(rows.request[i]), int(rows.group[i])))
        positions: dict[int, int] = {}
        for i in mine:
            positions.setdefault(int(rows.request[i]), int(rows.position[i]))
        if "weights" in wl.classes and wl.weight_bytes:
            yield (
                amap.weights_base + layer * wl.weight_bytes,
                wl.weight_bytes,
                "weights",
                step,
                layer,
                0,
            )
        if "index" in wl.classes:
            if amap.index_query_bytes:
                for request in positions:
                    addr = amap.query_base + request * amap.index_query_bytes
                    yield addr, amap.index_query_bytes, "query", step, layer, 0
            for request, position in positions.items():
                for page in range((position + pt - 1) // pt):
                    tokens = min(pt, position - page * pt)
                    phys = int(amap.page_table[request, page])
                    addr = int(amap.index_base[layer]) + phys * pt * amap.index_bytes
                    yield addr, tokens * amap.index_bytes, "index", step, layer, 0
        if "kv" in wl.classes:
            if amap.kv_query_bytes:
                first = amap.query_base + wl.batch * amap.index_query_bytes
                for request in positions:
                    addr = first + request * amap.kv_query_bytes
                    for _ in range(int(query_repeats(wl.query_reads, np.array([request]))[0])):
                        yield addr, amap.kv_query_bytes, "query", step, layer, 0
            for i in mine:
                request, group = int(rows.request[i]), int(rows.group[i])
                tokens = [int(t) for t in rows.row(i)]
                for start in range(0, len(tokens), wl.block_tokens):
                    block = tokens[start : start + wl.block_tokens]
                    for _cta in range(wl.reads_per_token):
                        if wl.kv_loads:
                            yield from _l1_filtered_loads(amap, layer, request, block, step)
                            continue
                        for p, plane in enumerate(layout.planes):
                            for offset, size in layout.plane_loads(
                                plane, amap.groups, wl.kv_loads_apart
                            ):
                                for t in block:
                                    addr = amap.kv_address(layer, p, request, t, group) + offset
                                    phys = amap.page_table[request, t // pt]
                                    tier = int(page_tier(phys, wl.peer_share, wl.remote_share))
                                    yield addr, size, "kv", step, layer, tier
            if "partials" in wl.classes and wl.partial_bytes:
                for request in positions:
                    addr = amap.partials_base + request * wl.partial_bytes
                    yield addr, wl.partial_bytes, "partials", step, layer, 0
        if "append" in wl.classes:
            for request, position in positions.items():
                for p, plane in enumerate(layout.planes):
                    addr = amap.kv_address(layer, p, request, position, 0)
                    yield addr, plane.bytes_per_token, "append", step, layer, 0
                if "index" in wl.classes:
                    phys = int(amap.page_table[request, position // pt])
                    slot = phys * pt + position % pt
                    yield (
                        int(amap.index_base[layer]) + slot * amap.index_bytes,
                        amap.index_bytes,
                        "append",
                        step,
                        layer,
                        0,
                    )


def _l1_filtered_loads(amap, layer: int, request: int, block: list[int], step: int):
    """One CTA's ``Workload.kv_loads`` of a block of tokens, load by load, as the L2 sees them:
    a load asks only for the sectors (32 B) that no earlier load of its token brought to the
    L1, as one access from the first to the last of them (nothing if none)."""
    wl = amap.workload
    seen: dict[int, set[int]] = {t: set() for t in block}
    for offset, size in wl.kv_loads:
        for t in block:
            start = amap.kv_address(layer, 0, request, t, 0) + offset
            sectors = set(range(start // 32, (start + size - 1) // 32 + 1))
            new = sectors - seen[t]
            seen[t] |= sectors
            if new:
                phys = amap.page_table[request, t // wl.page_tokens]
                tier = int(page_tier(phys, wl.peer_share, wl.remote_share))
                yield min(new) * 32, (max(new) - min(new) + 1) * 32, "kv", step, layer, tier


def reference_replay(cache: ReferenceCache, amap: AddressMap, steps) -> dict[tuple, dict[str, int]]:
    """Replay trace steps (``SelectionBatch`` per step) through ``cache``; counters keyed by
    ``(step, layer, class, tier)``."""
    for rows in steps:
        rows = rows.take(rows.request < amap.workload.batch)
        if not len(rows):
            continue
        for addr, nbytes, cls, step, layer, tier in reference_stream(amap, rows):
            cache.access(addr, nbytes, cls in WRITE_CLASSES, (step, layer, cls, tier))
    return cache.counts


__all__ = [
    "CLASSES",
    "CLASS_ID",
    "COUNTERS",
    "ReferenceCache",
    "reference_replay",
    "reference_stream",
]
