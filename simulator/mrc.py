"""Miss-ratio curves: exact LRU stack distances, SHARDS sampling and OPT points.

One pass over an access stream gives the hit ratio of a fully-associative LRU cache of *every*
size (Mattson et al., 1970: LRU is a stack algorithm, so an access hits in a cache of ``c``
objects exactly when its *stack distance*, the number of distinct objects touched since the
previous access to the same object, including itself, is ``<= c``). The distance is counted
with a Fenwick tree over access times (one mark per object at the time of its latest access),
so every access costs O(log N); the tree is compacted when it fills, which bounds memory by
the number of distinct objects, not by the length of the stream.

Sizes: all objects of one curve have the same footprint ``object_bytes`` (a KV token's
bytes per layer under the layout for token curves, a 128-byte line for line curves), so a
cache of ``B`` bytes holds ``B // object_bytes`` objects, and curve sizes are in bytes.

SHARDS (Waldspurger et al., FAST '15) keeps only the accesses whose key hashes below a
threshold (``hash(key) mod P < R * P``): every access to a sampled object is kept, so reuse
inside the sample is exact and sampled distances scale by ``1 / R``. The *adjusted* variant
(``adjust=True``) adds the difference between the expected (``R`` x accesses) and actual
sample count to the smallest distance. It is off by default: on DSA traces, where small
caches get almost no hits, it adds a spurious constant hit ratio at every small size, and
the unadjusted curve was 2-4x closer to exact on both bundled real traces (1% sampling).

OPT points are Belady's MIN over the same objects, which inserts every miss, as the
``belady`` and ``token-belady`` policies do (and makes the same decisions as ``token-belady``
run through ``caches.make_model`` over one-line objects; the benchmark checks that). OPT needs
the whole stream's future, so it runs on a stream held in memory (about 50 bytes per access),
at a handful of sizes, O(N log N) each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from numba import njit

from dsacache.errors import DsacacheError
from dsacache.simulator.engine import hash_slot, line_numbers, lines_per_access, next_use
from dsacache.simulator.jitcache import persist
from dsacache.simulator.stream import build_step, layout_and_groups, plan_replay, trace_shape
from dsacache.simulator.workload import CLASSES, WRITE_CLASSES, Workload
from dsacache.traces import Trace

_EMPTY = np.int64(-1)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
SHARDS_MODULUS = 1 << 24


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _mix(key, seed):
    """splitmix64's finalizer: a well-spread 64-bit hash of ``key`` (seeded)."""
    z = np.uint64(key) ^ np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _bit_add(bit, i, v):
    i += 1
    n = bit.shape[0]
    while i < n:
        bit[i] += v
        i += i & (-i)


@njit(inline="always")
def _bit_prefix(bit, i):
    """Sum of marks at times ``0..i``."""
    i += 1
    s = 0
    while i > 0:
        s += bit[i]
        i -= i & (-i)
    return s


@persist
@njit(nogil=True)
def _feed(keys, counted, start, tkeys, tids, shift, last, bit, hist, state, thresh, seed, mask):
    """Process ``keys[start:]``; return the position reached (``< len(keys)`` when a table
    must grow first). ``state``: [objects, time, seen, sampled, cold, seen_all, sampled_all]
    where ``seen``/``sampled`` count counted accesses before/after sampling."""
    n_ids = state[0]
    t = state[1]
    tsize = tkeys.shape[0]
    tmask = tsize - 1
    for i in range(start, keys.shape[0]):
        key = keys[i]
        c = counted[i]
        if thresh <= mask:  # sampling: keep keys whose hash falls below the threshold
            if np.int64(_mix(key, seed) & np.uint64(mask)) >= thresh:
                state[2] += c
                state[5] += 1
                continue
        if (
            t + 1 >= bit.shape[0]
            or 2 * (n_ids + 1) > tsize
            or n_ids + 2 >= hist.shape[0]
            or n_ids + 2 >= last.shape[0]
        ):
            state[0] = n_ids
            state[1] = t
            return i
        state[2] += c
        state[3] += c
        state[5] += 1
        state[6] += 1
        j = hash_slot(key, shift)
        while True:
            k = tkeys[j]
            if k == key or k == _EMPTY:
                break
            j = (j + 1) & tmask
        if k == _EMPTY:  # first access: a cold miss
            tkeys[j] = key
            tids[j] = n_ids
            last[n_ids] = t
            n_ids += 1
            state[4] += c
        else:
            obj = tids[j]
            s = last[obj]
            # distinct objects touched after s (all marks lie at times <= t - 1), plus itself
            d = n_ids - _bit_prefix(bit, s) + 1
            hist[d] += c
            _bit_add(bit, s, -1)
            last[obj] = t
        _bit_add(bit, t, 1)
        t += 1
    state[0] = n_ids
    state[1] = t
    return keys.shape[0]


@persist
@njit
def _rehash(tkeys, tids, new_keys, new_ids, shift):
    mask = new_keys.shape[0] - 1
    for i in range(tkeys.shape[0]):
        k = tkeys[i]
        if k == _EMPTY:
            continue
        j = hash_slot(k, shift)
        while new_keys[j] != _EMPTY:
            j = (j + 1) & mask
        new_keys[j] = k
        new_ids[j] = tids[i]


@persist
@njit
def _build_bit(bit, n):
    """Fenwick tree with one mark at each of the times ``0..n-1``."""
    bit[:] = 0
    for i in range(n):
        _bit_add(bit, i, 1)


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------
@dataclass
class MissRatioCurve:
    """The hit ratio of a fully-associative cache at any size, from stack-distance counts.

    ``counts[d]`` is the (estimated) number of counted accesses whose stack distance is ``d``
    objects in the (sampled) stream; ``total`` the counted accesses; a sampled curve's
    distances stand for ``d / sample_rate`` objects of the full stream. For ``kind="opt"``
    the curve is only known at ``sizes_known`` (bytes) with ``hits_known``.
    """

    label: str
    kind: str  # "lru", "shards" or "opt"
    object_bytes: int
    counts: np.ndarray  # float64, index = stack distance in (sampled) objects
    total: float
    cold: float
    objects: float  # distinct objects (estimated for SHARDS)
    sample_rate: float = 1.0
    accesses: int = 0  # accesses processed (after sampling)
    sizes_known: np.ndarray | None = None
    hits_known: np.ndarray | None = None

    @property
    def footprint_bytes(self) -> int:
        """Bytes of all distinct objects: the size at which only cold misses remain."""
        return int(round(self.objects)) * self.object_bytes

    def hit_ratio(self, sizes: Sequence[int] | np.ndarray | int) -> np.ndarray:
        """Hit ratio at each cache size in bytes (a cache holds ``size // object_bytes``)."""
        sizes = np.atleast_1d(np.asarray(sizes, np.float64))
        if self.kind == "opt":
            assert self.sizes_known is not None and self.hits_known is not None
            return np.interp(sizes, self.sizes_known, self.hits_known)
        if self.total <= 0:
            return np.zeros(len(sizes))
        capacity = np.floor(sizes / self.object_bytes)
        cum = np.cumsum(self.counts)
        idx = np.clip(np.floor(capacity * self.sample_rate + 1e-9).astype(np.int64), 0, None)
        idx = np.minimum(idx, len(cum) - 1)
        return np.clip(cum[idx] / self.total, 0.0, 1.0)

    def miss_ratio(self, sizes: Sequence[int] | np.ndarray | int) -> np.ndarray:
        """1 - ``hit_ratio(sizes)``."""
        return 1.0 - self.hit_ratio(sizes)

    def default_sizes(self, points: int = 120, largest: int | None = None) -> np.ndarray:
        """Log-spaced cache sizes in bytes from one object to past the footprint."""
        top = max(largest or 0, int(self.footprint_bytes * 1.25), 2 * self.object_bytes)
        grid = np.geomspace(self.object_bytes, top, points)
        return np.unique((grid // self.object_bytes).astype(np.int64) * self.object_bytes)

    def to_dict(self, sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Columns ``size_bytes, hit_ratio, miss_ratio`` at ``sizes`` (default grid)."""
        sizes = self.default_sizes() if sizes is None else np.asarray(sizes, np.int64)
        hr = self.hit_ratio(sizes)
        return {"size_bytes": sizes, "hit_ratio": hr, "miss_ratio": 1.0 - hr}


class StackDistances:
    """Streaming exact (``sample_rate=1``) or SHARDS-sampled LRU stack distances.

    Feed keys (non-negative int64, one per access, in stream order) chunk by chunk with
    ``feed``; ``counted`` marks the accesses whose hit or miss counts (writes update recency
    but are left out of the ratio); ``curve()`` gives the ``MissRatioCurve``.
    """

    def __init__(
        self,
        object_bytes: int,
        sample_rate: float = 1.0,
        *,
        seed: int = 0,
        adjust: bool = False,
        modulus: int = SHARDS_MODULUS,
    ) -> None:
        if object_bytes < 1:
            raise DsacacheError(f"object_bytes must be >= 1, got {object_bytes}")
        if not 0.0 < sample_rate <= 1.0:
            raise DsacacheError(f"sample rate must be in (0, 1], got {sample_rate}")
        if modulus < 2 or modulus & (modulus - 1):
            raise DsacacheError(f"SHARDS modulus must be a power of two >= 2, got {modulus}")
        self.object_bytes = int(object_bytes)
        self.sample_rate = float(sample_rate)
        self.adjust = adjust
        self.seed = int(seed) & 0x7FFFFFFFFFFFFFFF
        self.mask = modulus - 1
        threshold = int(round(sample_rate * modulus))
        if sample_rate < 1.0 and threshold < 1:
            raise DsacacheError(f"sample rate {sample_rate} is below 1/{modulus}")
        # thresh > mask means: keep everything (exact)
        self.thresh = modulus if sample_rate >= 1.0 else threshold
        self.rate = 1.0 if sample_rate >= 1.0 else threshold / modulus
        self._alloc(1 << 12)

    def _alloc(self, n: int) -> None:
        size = 1 << max(int(2 * n - 1).bit_length(), 4)
        self.shift = 64 - (size.bit_length() - 1)
        self.tkeys = np.full(size, -1, np.int64)
        self.tids = np.zeros(size, np.int64)
        self.last = np.zeros(n, np.int64)
        self.bit = np.zeros(2 * n + 1, np.int64)
        self.hist = np.zeros(n + 2, np.int64)
        self.state = np.zeros(7, np.int64)

    def feed(self, keys: np.ndarray, counted: np.ndarray | None = None) -> None:
        """Account for accesses to ``keys`` (in order); ``counted`` defaults to all."""
        keys = np.ascontiguousarray(keys, np.int64)
        if keys.ndim != 1:
            raise DsacacheError(f"keys must be a 1-D array, got shape {keys.shape}")
        if len(keys) and keys.min() < 0:
            raise DsacacheError("keys must be non-negative integers")
        if counted is None:
            counted = np.ones(len(keys), np.int64)
        else:
            counted = np.ascontiguousarray(counted, np.int64)
            if counted.shape != keys.shape:
                raise DsacacheError(f"counted has {len(counted)} entries for {len(keys)} keys")
        pos = 0
        while pos < len(keys):
            pos = _feed(
                keys, counted, pos, self.tkeys, self.tids, self.shift, self.last, self.bit,
                self.hist, self.state, self.thresh, self.seed, self.mask,
            )  # fmt: skip
            if pos < len(keys):
                self._grow()

    def _grow(self) -> None:
        n_ids, t = int(self.state[0]), int(self.state[1])
        if 2 * (n_ids + 1) > len(self.tkeys):
            size = 2 * len(self.tkeys)
            shift = 64 - (size.bit_length() - 1)
            keys, ids = np.full(size, -1, np.int64), np.zeros(size, np.int64)
            _rehash(self.tkeys, self.tids, keys, ids, shift)
            self.tkeys, self.tids, self.shift = keys, ids, shift
        if n_ids + 2 >= len(self.last):
            self.last = np.concatenate([self.last, np.zeros(len(self.last), np.int64)])
        if n_ids + 2 >= len(self.hist):
            self.hist = np.concatenate([self.hist, np.zeros(len(self.hist), np.int64)])
        if t + 1 >= len(self.bit):
            # compaction: renumber the objects' latest times 0..n_ids-1 in recency order
            if 2 * n_ids + 2 > len(self.bit) - 1:
                self.bit = np.zeros(2 * len(self.bit) + 1, np.int64)
            live = self.last[:n_ids]
            order = np.argsort(live, kind="stable")
            live[order] = np.arange(n_ids, dtype=np.int64)
            _build_bit(self.bit, n_ids)
            self.state[1] = n_ids

    @property
    def accesses(self) -> int:
        """Accesses fed so far (before sampling)."""
        return int(self.state[5])

    def curve(self, label: str = "") -> MissRatioCurve:
        """The miss-ratio curve of everything fed so far."""
        n_ids = int(self.state[0])
        seen, sampled, cold = (float(x) for x in self.state[2:5])
        counts = self.hist[: n_ids + 2].astype(np.float64)
        rate = self.rate
        total = sampled
        if rate < 1.0:
            expected = seen * rate
            if self.adjust and len(counts) > 1:
                counts[1] += expected - sampled  # SHARDS_adj: fix the sample-size bias
                total = expected
            cold = cold * (total / sampled) if sampled else 0.0
        return MissRatioCurve(
            label=label,
            kind="lru" if rate >= 1.0 else "shards",
            object_bytes=self.object_bytes,
            counts=counts,
            total=total,
            cold=cold,
            objects=n_ids / rate,
            sample_rate=rate,
            accesses=int(self.state[6]),
        )


def lru_curve(
    chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
    object_bytes: int,
    *,
    sample_rate: float = 1.0,
    seed: int = 0,
    adjust: bool = False,
    label: str = "",
) -> MissRatioCurve:
    """Exact (or SHARDS-sampled) LRU miss-ratio curve of a stream of ``(keys, counted)``."""
    sd = StackDistances(object_bytes, sample_rate, seed=seed, adjust=adjust)
    for keys, counted in chunks:
        sd.feed(keys, counted)
    return sd.curve(label)


@njit(inline="always")
def _heap_push(hk, hn, size, key, node):
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if hk[parent] >= key:
            break
        hk[i] = hk[parent]
        hn[i] = hn[parent]
        i = parent
    hk[i] = key
    hn[i] = node
    return size + 1


@njit(inline="always")
def _heap_pop(hk, hn, size):
    """Remove the largest key; return (key, node, new size)."""
    top_k, top_n = hk[0], hn[0]
    size -= 1
    k, n = hk[size], hn[size]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and hk[child + 1] > hk[child]:
            child += 1
        if hk[child] <= k:
            break
        hk[i] = hk[child]
        hn[i] = hn[child]
        i = child
    hk[i] = k
    hn[i] = n
    return top_k, top_n, size


@persist
@njit(nogil=True)
def _opt_hits(ids, future, counted, capacity, n_objects):
    """Belady's MIN over equal-size objects: counted hits of a cache of ``capacity`` objects.
    Every miss is inserted; when full, the cached object used furthest ahead is evicted (a
    max-heap of next uses with lazy deletion of stale entries)."""
    cached = np.zeros(n_objects, np.bool_)
    nxt = np.zeros(n_objects, np.int64)
    hk = np.zeros(ids.shape[0] + 1, np.int64)
    hn = np.zeros(ids.shape[0] + 1, np.int64)
    size = 0
    used = 0
    hits = 0
    for i in range(ids.shape[0]):
        x = ids[i]
        nu = future[i]
        if cached[x]:
            hits += counted[i]
        else:
            if used == capacity:
                while True:
                    k, y, size = _heap_pop(hk, hn, size)
                    if cached[y] and nxt[y] == k:
                        cached[y] = False
                        used -= 1
                        break
            cached[x] = True
            used += 1
        nxt[x] = nu
        size = _heap_push(hk, hn, size, nu, x)
    return hits


def opt_curve(
    keys: np.ndarray,
    object_bytes: int,
    sizes: Sequence[int] | np.ndarray,
    counted: np.ndarray | None = None,
    *,
    label: str = "OPT",
) -> MissRatioCurve:
    """Belady's MIN hit ratio at each cache size in bytes (objects of ``object_bytes``); the
    same decisions as the ``token-belady`` policy over one-line objects, O(N log N) a size."""
    keys = np.asarray(keys, np.int64)
    counted = np.ones(len(keys), bool) if counted is None else np.asarray(counted, bool)
    if counted.shape != keys.shape:
        raise DsacacheError(f"counted has {len(counted)} entries for {len(keys)} keys")
    _, ids = np.unique(keys, return_inverse=True)
    ids = ids.astype(np.int64).ravel()
    n_objects = int(ids.max()) + 1 if len(ids) else 0
    future = next_use(ids)
    weight = counted.astype(np.int64)
    sizes = np.unique(np.asarray(sizes, np.int64))
    total = int(weight.sum())
    hits = np.zeros(len(sizes))
    for i, size in enumerate(sizes):
        capacity = int(size) // object_bytes
        if capacity >= 1 and total:
            hits[i] = _opt_hits(ids, future, weight, capacity, n_objects) / total
    return MissRatioCurve(
        label=label,
        kind="opt",
        object_bytes=object_bytes,
        counts=np.zeros(1),
        total=float(total),
        cold=float(len(np.unique(ids[counted]))) if total else 0.0,
        objects=float(n_objects),
        accesses=len(keys),
        sizes_known=sizes,
        hits_known=hits,
    )


def curve_error(
    exact: MissRatioCurve, approx: MissRatioCurve, sizes: np.ndarray | None = None
) -> dict[str, float]:
    """Mean and largest absolute hit-ratio difference of two curves on ``sizes`` (default:
    120 log-spaced sizes from one object to past the exact curve's footprint)."""
    sizes = exact.default_sizes() if sizes is None else np.asarray(sizes)
    diff = np.abs(exact.hit_ratio(sizes) - approx.hit_ratio(sizes))
    return {"mae": float(diff.mean()), "max_error": float(diff.max()), "points": len(sizes)}


# --------------------------------------------------------------------------------------------
# Streams from traces
# --------------------------------------------------------------------------------------------
def _batch_of(trace: Trace, batch: int | None) -> int:
    requests = trace_shape(trace)[2]
    if batch is None:
        return requests
    if not 1 <= batch <= requests:
        raise DsacacheError(f"batch {batch} must be between 1 and the trace's {requests} requests")
    return batch


def token_stream(
    trace: Trace, *, batch: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """One ``(keys, None)`` chunk per decode step: a key per selected token, in gather order
    (layer, request, group, ascending index); a key names (request, layer, group, token)."""
    layers, groups, requests, max_position = trace_shape(trace)
    batch = _batch_of(trace, batch)
    span = max_position + 1
    for rows in trace.iter_steps():
        rows = rows.take(rows.request < batch)
        if not len(rows):
            continue
        lengths = rows.lengths
        stream = (rows.request.astype(np.int64) * layers + rows.layer) * groups + rows.group
        yield np.repeat(stream * span, lengths) + rows.indices, None


def token_object_bytes(trace: Trace, layout: str | None = None) -> int:
    """Footprint of one token object: the layout's bytes per token and layer (per group)."""
    lay, groups = layout_and_groups(trace, layout)
    return lay.selection_bytes(groups)


def line_stream(
    trace: Trace,
    *,
    workload: Workload | None = None,
    classes: Sequence[str] = ("kv",),
    count: Sequence[str] | None = None,
    line: int = 128,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One ``(line numbers, counted)`` chunk per decode step of the replay stream (the
    stream builder's accesses of ``classes``, split into lines as the engine does). Accesses
    of the classes in ``count`` (default: every read class in ``classes``) count toward the
    hit ratio; the others (writes, or e.g. indexer reads when only ``kv`` is counted) only
    update recency, as they do in the cache."""
    base = workload or Workload(batch=trace_shape(trace)[2])
    count = [c for c in classes if c not in WRITE_CLASSES] if count is None else list(count)
    bad = [c for c in (*classes, *count) if c not in CLASSES]
    if bad or not classes:
        raise DsacacheError(
            f"traffic class(es) {', '.join(bad) or '(none)'} unknown; choose from: "
            + ", ".join(CLASSES)
        )
    if line < 1 or line & (line - 1):
        raise DsacacheError(f"line size {line} B must be a power of two")
    wl = replace(base, classes=tuple(classes))
    amap = plan_replay(trace, wl)
    counted = np.array([c in count for c in CLASSES])
    for rows in trace.iter_steps():
        rows = rows.take(rows.request < wl.batch)
        if not len(rows):
            continue
        chunk = build_step(amap, rows)
        lines = line_numbers(chunk.addr, chunk.nbytes, line)
        yield lines, np.repeat(counted[chunk.cls], lines_per_access(chunk.addr, chunk.nbytes, line))


def token_mrc(
    trace: Trace,
    *,
    layout: str | None = None,
    batch: int | None = None,
    sample_rate: float = 1.0,
    seed: int = 0,
    adjust: bool = False,
) -> MissRatioCurve:
    """LRU miss-ratio curve of the KV gathers at token granularity (exact or SHARDS)."""
    label = "token LRU" if sample_rate >= 1.0 else f"token LRU, SHARDS {sample_rate:g}"
    return lru_curve(
        token_stream(trace, batch=batch),
        token_object_bytes(trace, layout),
        sample_rate=sample_rate,
        seed=seed,
        adjust=adjust,
        label=label,
    )


def line_mrc(
    trace: Trace,
    *,
    workload: Workload | None = None,
    classes: Sequence[str] = ("kv",),
    count: Sequence[str] | None = None,
    line: int = 128,
    sample_rate: float = 1.0,
    seed: int = 0,
    adjust: bool = False,
) -> MissRatioCurve:
    """LRU miss-ratio curve of the replay stream at line granularity (exact or SHARDS)."""
    what = "+".join(classes)
    if count is not None and list(count) != list(classes):
        what = f"{'+'.join(count)} in {what}"
    label = f"line LRU ({what})" + ("" if sample_rate >= 1.0 else f", SHARDS {sample_rate:g}")
    return lru_curve(
        line_stream(trace, workload=workload, classes=classes, count=count, line=line),
        line,
        sample_rate=sample_rate,
        seed=seed,
        adjust=adjust,
        label=label,
    )


def collect(
    chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate a stream's chunks into whole ``keys`` and ``counted`` arrays (for OPT)."""
    keys, counted = [], []
    for k, c in chunks:
        keys.append(np.asarray(k, np.int64))
        counted.append(np.ones(len(k), bool) if c is None else np.asarray(c, bool))
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(keys), np.concatenate(counted)
