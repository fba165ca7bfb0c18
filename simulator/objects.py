"""Fully-associative, size-aware object caches in Numba: the token-granularity side of dsacache.

An *object* is what one access of the stream reads as a unit: for KV traffic, one token's
record in one layer (and plane, or group slice where the layout splits them); for any other
traffic, one cache line. Its footprint is the whole lines it spans, as a sectored LLC would
store it. Objects live in ``parts`` independent LRU lists, each with its own byte capacity
(one list shared by all layers, or one per layer). Lookup is an open-addressing hash table
(linear probing, backward-shift deletion); recency is a doubly-linked list per part, so every
operation is O(1) expected. A slot's key and node sit side by side and a node's fields fill
one 64-byte record, so a hit touches a few cache lines instead of one per field.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dsacache.simulator.engine import _POPCOUNT8, prefetch
from dsacache.simulator.jitcache import persist

EMPTY = -1
EVICT_AHEAD = 3  # LRU evictions whose list nodes and table slots are prefetched
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)
# a node's record: NODE_WORDS int32 fields (two spare), 32 bytes: half a cache line
PREV, NEXT, SIZE, PART, SLOT, VALID = range(6)
NODE_WORDS = 8


@njit(inline="always")
def _slot(key, mask):
    return np.int64((np.uint64(key) * _HASH_MUL) >> np.uint64(20)) & mask


@njit(inline="always")
def _find(table, mask, key):
    """Slot of ``key`` in ``table`` (pairs key, node), or -1 - (the first empty slot)."""
    i = _slot(key, mask)
    while True:
        k = table[2 * i]
        if k == key:
            return i
        if k == EMPTY:
            return -1 - i
        i = (i + 1) & mask


@njit(inline="always")
def _delete(table, nodes, mask, i):
    table[2 * i] = EMPTY
    j = i
    while True:
        j = (j + 1) & mask
        k = table[2 * j]
        if k == EMPTY:
            return
        home = _slot(k, mask)
        # move j back to the hole at i unless its home lies cyclically in (i, j]
        if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            n = table[2 * j + 1]
            table[2 * i] = k
            table[2 * i + 1] = n
            nodes[n * NODE_WORDS + SLOT] = i
            table[2 * j] = EMPTY
            i = j


@njit(inline="always")
def _unlink(nodes, head, tail, p, n):
    a = nodes[n * NODE_WORDS + PREV]
    b = nodes[n * NODE_WORDS + NEXT]
    if a >= 0:
        nodes[a * NODE_WORDS + NEXT] = b
    else:
        head[p] = b
    if b >= 0:
        nodes[b * NODE_WORDS + PREV] = a
    else:
        tail[p] = a


@njit(inline="always")
def _push_front(nodes, head, tail, p, n):
    h = head[p]
    nodes[n * NODE_WORDS + PREV] = -1
    nodes[n * NODE_WORDS + NEXT] = h
    if h >= 0:
        nodes[h * NODE_WORDS + PREV] = n
    else:
        tail[p] = n
    head[p] = n


def _aligned_zeros(n: int, dtype, align: int = 64) -> np.ndarray:
    """Zeroed ``dtype[n]`` whose data starts on an ``align``-byte boundary (so no record
    straddles two cache lines)."""
    size = np.dtype(dtype).itemsize
    raw = np.zeros(n + align // size, dtype)
    skip = (-raw.ctypes.data % align) // size
    return raw[skip : skip + n]


class ObjectStore:
    """State of a fully-associative LRU over objects, split into ``parts`` with byte capacities."""

    def __init__(self, capacities: np.ndarray, max_objects: int) -> None:
        self.capacity = np.asarray(capacities, np.int64)
        parts = len(self.capacity)
        n = max(int(max_objects), 1) + parts
        size = 1 << max(int(2 * n - 1).bit_length(), 4)
        self.table = np.full(2 * size, EMPTY, np.int64)  # slot i: key at 2i, node at 2i + 1
        self.nodes = _aligned_zeros(n * NODE_WORDS, np.int32)
        self.head = np.full(parts, -1, np.int64)
        self.tail = np.full(parts, -1, np.int64)
        self.used = np.zeros(parts, np.int64)
        self.free = np.arange(n - 1, -1, -1, dtype=np.int64)  # a stack of free node ids
        self.n_free = np.array([n], np.int64)
        # Belady with one part: a max-heap of (next use, node, version) with lazy deletion
        heap = 4 * n if parts == 1 else 1
        self.heap_key = np.zeros(heap, np.int64)
        self.heap_node = np.zeros(heap, np.int64)
        self.heap_ver = np.zeros(heap, np.int64)
        self.heap_size = np.zeros(1, np.int64)
        self.next_use = np.zeros(n, np.int64)  # per node, read by Belady only
        self.ver = np.zeros(n if parts == 1 else 1, np.int64)  # per node: heap entry versions

    def arrays(self) -> tuple:
        return (
            self.table, self.nodes, self.head, self.tail, self.used, self.capacity, self.free,
            self.n_free, self.heap_key, self.heap_node, self.heap_ver, self.heap_size,
            self.next_use, self.ver,
        )  # fmt: skip


@njit(inline="always")
def remove(st, n):
    """Drop node ``n`` from its part's list and the table, and free it."""
    table, nodes, head, tail, used, free, n_free = st[0], st[1], st[2], st[3], st[4], st[6], st[7]
    rec = n * NODE_WORDS
    p = nodes[rec + PART]
    _unlink(nodes, head, tail, p, n)
    _delete(table, nodes, table.shape[0] // 2 - 1, nodes[rec + SLOT])
    used[p] -= nodes[rec + SIZE]
    nodes[rec + PART] = -1  # not in the store: heap entries of it are stale
    free[n_free[0]] = n
    n_free[0] += 1


@njit(inline="always")
def _heap_push(st, key, node):
    hk, hn, hv, size = st[8], st[9], st[10], st[11]
    if size[0] == hk.shape[0]:
        _heap_rebuild(st)
    i = size[0]
    size[0] += 1
    while i > 0:
        parent = (i - 1) >> 1
        if hk[parent] >= key:
            break
        hk[i], hn[i], hv[i] = hk[parent], hn[parent], hv[parent]
        i = parent
    hk[i], hn[i], hv[i] = key, node, st[13][node]


@njit(inline="always")
def _heap_pop(st):
    """Remove the top entry; return its (next use, node, version)."""
    hk, hn, hv, size = st[8], st[9], st[10], st[11]
    top = (hk[0], hn[0], hv[0])
    size[0] -= 1
    k, n, v = hk[size[0]], hn[size[0]], hv[size[0]]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size[0]:
            break
        if child + 1 < size[0] and hk[child + 1] > hk[child]:
            child += 1
        if hk[child] <= k:
            break
        hk[i], hn[i], hv[i] = hk[child], hn[child], hv[child]
        i = child
    hk[i], hn[i], hv[i] = k, n, v
    return top


@njit
def _heap_rebuild(st):
    """Drop stale entries: re-push one entry per live node."""
    st[11][0] = 0
    nodes = st[1]
    n = st[2][0]
    while n >= 0:
        _heap_push(st, st[12][n], n)
        n = nodes[n * NODE_WORDS + NEXT]


@njit(inline="always")
def _evict_furthest(st, p):
    """Belady at object granularity: evict the object of part ``p`` used furthest ahead.
    One part: pop the heap, skipping stale entries (O(log n)); several: walk the list."""
    nodes, head, next_use = st[1], st[2], st[12]
    if head.shape[0] == 1:
        while True:
            _, node, v = _heap_pop(st)
            if nodes[node * NODE_WORDS + PART] == p and st[13][node] == v:
                remove(st, node)
                return
    best = -1
    far = -1
    n = head[p]
    while n >= 0:
        if next_use[n] > far:
            far = next_use[n]
            best = n
        n = nodes[n * NODE_WORDS + NEXT]
    remove(st, best)


@njit(inline="always")
def lookup(st, key):
    """Node id of ``key``, or -1."""
    table = st[0]
    i = _find(table, table.shape[0] // 2 - 1, key)
    return table[2 * i + 1] if i >= 0 else -1


@njit(inline="always")
def touch(st, n, next_use, furthest=False):
    nodes, head, tail = st[1], st[2], st[3]
    rec = n * NODE_WORDS
    p = nodes[rec + PART]
    if furthest:
        st[12][n] = next_use
        if head.shape[0] == 1:
            st[13][n] += 1
            _heap_push(st, next_use, n)
    if head[p] != n:
        _unlink(nodes, head, tail, p, n)
        _push_front(nodes, head, tail, p, n)


@njit(inline="always")
def insert(st, key, size, p, valid, next_use, furthest):
    """Insert ``key`` (absent) into part ``p``, evicting LRU (or furthest-used) objects to make
    room. An object larger than its part's capacity is not inserted (returns -1)."""
    table, nodes, head, tail, used, capacity, free, n_free = st[0:8]
    if size > capacity[p]:
        return -1
    while used[p] + size > capacity[p]:
        if furthest:
            _evict_furthest(st, p)
        else:
            remove(st, tail[p])  # least recently used
            # Start loading what the next evictions read, walking up from the new tail: each
            # record on the way was requested by an earlier eviction, the last one is new.
            t = tail[p]
            for _ in range(EVICT_AHEAD):
                if t < 0:
                    break
                prefetch(table, 2 * nodes[t * NODE_WORDS + SLOT])
                t = nodes[t * NODE_WORDS + PREV]
                prefetch(nodes, max(t, 0) * NODE_WORDS)
    n_free[0] -= 1
    n = free[n_free[0]]
    i = -1 - _find(table, table.shape[0] // 2 - 1, key)
    table[2 * i] = key
    table[2 * i + 1] = n
    rec = n * NODE_WORDS
    nodes[rec + SLOT] = i
    nodes[rec + SIZE] = size
    nodes[rec + PART] = p
    nodes[rec + VALID] = valid
    used[p] += size
    _push_front(nodes, head, tail, p, n)
    if furthest:
        st[12][n] = next_use
        if head.shape[0] == 1:
            st[13][n] += 1
            _heap_push(st, next_use, n)
    return n


@njit(inline="always")
def set_of(key, n_sets):
    """The hashed set (part) of an object key, for set-associative object caches."""
    return np.int64((np.uint64(key) * _HASH_MUL) >> np.uint64(33)) % n_sets


@persist
@njit
def sets_of(keys, n_sets):
    """``set_of`` of every key (an int64 array)."""
    out = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        out[i] = set_of(keys[i], n_sets)
    return out


LINE_TAG = np.int64(1) << np.int64(61)  # keeps line objects apart from token objects
PREFETCH_AHEAD = 8  # accesses


@njit(inline="always")
def _key_of(a, is_token, line_shift):
    """The object key of an access's first object."""
    return a if is_token else (a >> line_shift) | LINE_TAG


ADMIT_NEVER, ADMIT_ALWAYS, ADMIT_SECOND = 0, 1, 2  # what a token read miss does (run_objects)


@persist
@njit(nogil=True, _nrt=False)  # no reference counting in the hot loop (5x faster)
def run_objects(
    addr,
    nbytes,
    is_write,
    is_token,
    part,
    bucket,
    future,
    counters,
    st,
    line_shift,
    sector_shift,
    furthest,
    admit,
    ghost,
    handle_lines,
    admit_writes,
    routed,
    fill_shift,
    fill_mask,
):
    """Replay accesses through an object store. Token accesses are one object each; other
    accesses are one object per line (sectored: only requested sectors are fetched), unless
    ``handle_lines`` is off. ``routed[i]`` is set to 1 for every access this store handled;
    accesses left at 0 (lines when ``handle_lines`` is off, token misses that were not
    admitted, writes when ``admit_writes`` is off) are for the next cache to serve.
    ``admit[i]`` says what a token read that misses does: ``ADMIT_NEVER`` (leave it to the next
    cache), ``ADMIT_ALWAYS`` (insert it) or ``ADMIT_SECOND`` (insert it if ``ghost`` remembers
    an earlier miss of it, else remember this one). A miss fetches whole fill units of
    ``1 << fill_shift`` bytes (``fill_mask``: ``CacheConfig.fill_masks``),
    counted in ``fetched_sectors``."""
    has_future = future.shape[0] > 0
    n_parts = st[2].shape[0]
    mask = st[0].shape[0] // 2 - 1
    k = 0
    line_bytes = 1 << line_shift
    for i in range(addr.shape[0]):
        # Lookups are random memory reads: start loading the table slot of a later access, and
        # for a nearer one the record of the node in its home slot (most keys sit there).
        j = min(i + 2 * PREFETCH_AHEAD, addr.shape[0] - 1)
        prefetch(st[0], 2 * _slot(_key_of(addr[j], is_token[j], line_shift), mask))
        j = min(i + PREFETCH_AHEAD, addr.shape[0] - 1)
        home = 2 * _slot(_key_of(addr[j], is_token[j], line_shift), mask)
        prefetch(st[1], max(st[0][home + 1], 0) * NODE_WORDS)
        a = addr[i]
        end = a + nbytes[i]
        first = a >> line_shift
        last = (end - 1) >> line_shift
        b = bucket[i]
        counters[b, 6] += nbytes[i]
        if is_token[i]:
            n_lines = last - first + 1
            n_sec = (((end - 1) >> sector_shift) - (a >> sector_shift)) + 1
            nu = future[k] if has_future else 0
            k += 1
            node = lookup(st, a)
            if is_write[i]:
                if not admit_writes:
                    continue
                counters[b, 5] += n_sec
                if node >= 0:
                    touch(st, node, nu, furthest)
                else:
                    insert(st, a, n_lines * line_bytes, part[i], 0, nu, furthest)
                routed[i] = 1
                continue
            if node >= 0:
                touch(st, node, nu, furthest)
                counters[b, 0] += n_lines
                counters[b, 1] += n_lines
                counters[b, 2] += n_sec
                counters[b, 3] += n_sec
                routed[i] = 1
                continue
            if admit[i] == ADMIT_NEVER:
                continue
            if admit[i] == ADMIT_SECOND:
                g = lookup(ghost, a)
                if g < 0:  # first sighting: remember it, let the next cache serve it
                    insert(ghost, a, 1, 0, 0, 0, False)
                    continue
                remove(ghost, g)
            insert(st, a, n_lines * line_bytes, part[i], 0, nu, furthest)
            counters[b, 0] += n_lines
            counters[b, 2] += n_sec
            counters[b, 4] += n_sec
            units = ((end - 1) >> fill_shift) - (a >> fill_shift) + 1
            counters[b, 7] += units << (fill_shift - sector_shift)
            routed[i] = 1
            continue
        if not handle_lines:
            continue
        routed[i] = 1
        for ln in range(first, last + 1):
            p_line = 0 if n_parts == 1 else set_of(ln, n_parts)
            start = ln << line_shift
            s0 = (max(a, start) - start) >> sector_shift
            s1 = (min(end, start + line_bytes) - start - 1) >> sector_shift
            wanted = ((1 << (s1 + 1)) - 1) ^ ((1 << s0) - 1)
            n_wanted = s1 - s0 + 1
            nu = future[k] if has_future else 0
            k += 1
            key = ln | LINE_TAG
            node = lookup(st, key)
            if is_write[i]:
                counters[b, 5] += n_wanted
                if node >= 0:
                    st[1][node * NODE_WORDS + VALID] |= wanted
                    touch(st, node, nu, furthest)
                else:
                    insert(st, key, line_bytes, p_line, wanted, nu, furthest)
                continue
            counters[b, 0] += 1
            counters[b, 2] += n_wanted
            if node >= 0:
                v = st[1][node * NODE_WORDS + VALID]
                lacking = wanted & ~v
                fetched = fill_mask[lacking]
                st[1][node * NODE_WORDS + VALID] = v | wanted | fetched
                touch(st, node, nu, furthest)
            else:
                lacking = wanted
                fetched = fill_mask[lacking]
                insert(st, key, line_bytes, p_line, wanted | fetched, nu, furthest)
            missing = _POPCOUNT8[lacking]
            counters[b, 1] += missing == 0
            counters[b, 3] += n_wanted - missing
            counters[b, 4] += missing
            counters[b, 7] += _POPCOUNT8[fetched]


def object_keys(
    addr: np.ndarray, nbytes: np.ndarray, is_token: np.ndarray, line: int
) -> np.ndarray:
    """The key of every object access ``run_objects`` makes, in order (for ``next_use``)."""
    from dsacache.simulator.engine import line_numbers, lines_per_access

    count = np.where(is_token, 1, lines_per_access(addr, nbytes, line))
    pos = np.cumsum(count) - count
    keys = np.empty(int(count.sum()), np.int64)
    keys[pos[is_token]] = addr[is_token]
    others = np.ones(len(keys), bool)
    others[pos[is_token]] = False
    keys[others] = line_numbers(addr[~is_token], nbytes[~is_token], line) | LINE_TAG
    return keys
