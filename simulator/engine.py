"""The Numba cache engine: a sectored set-associative cache with pluggable policies.

One replay kernel is compiled per policy type: the policy's hooks are closed over as
compile-time constants, so Numba inlines them into the hot loop. Counters accumulate into
``counters[bucket, k]`` with the columns of ``COUNTERS``; the caller decides what a bucket is
(here: step x layer x traffic class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from dsacache.errors import DsacacheError
from dsacache.policies import Policy, make_policy
from dsacache.simulator.jitcache import persist
from dsacache.simulator.reference import COUNTERS
from dsacache.units import format_size, parse_size

SET_HASHES = ("mod", "xor", "hash", "mix")
MAX_CACHE_BYTES = 2**36  # 64 GiB: far beyond any GPU cache, state of about 7 GiB
_HASH_MUL = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_HASH_MUL_U = np.uint64(0x9E3779B97F4A7C15)
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@dataclass(frozen=True)
class CacheConfig:
    """Geometry of a sectored set-associative cache."""

    size: int
    ways: int = 16
    line: int = 128
    sector: int = 32
    set_hash: str = "mod"
    partitions: int = 1
    write_allocate: bool = True
    replicate: bool = False  # partitions as a GPU's L2 halves: reads keep a near copy
    fill: int = 0  # bytes the next level returns per missing sector's unit; 0: one sector

    @classmethod
    def of(cls, size: int | str, **kw) -> CacheConfig:
        """Build from a size string (``50MiB``) and keyword geometry; validated."""
        cfg = cls(parse_size(size), **kw)
        cfg.check()
        return cfg

    @property
    def n_sets(self) -> int:
        return self.size // (self.ways * self.line)

    @property
    def fill_bytes(self) -> int:
        """The next level's access unit: a read miss fetches every aligned unit of this many
        bytes that holds a missing sector, and all its sectors become valid (the H200's HBM
        is read in 64-B units: dsacache/data/h200/README.md)."""
        return self.fill or self.sector

    def fill_masks(self) -> np.ndarray:
        """``table[m]``: the sectors fetched for the missing-sector mask ``m`` of a line, i.e.
        the union of the aligned ``fill_bytes`` units that ``m`` touches."""
        per_fill = self.fill_bytes // self.sector
        masks = np.arange(256)
        out = np.zeros(256, np.uint8)
        unit = (1 << per_fill) - 1
        for first in range(0, self.line // self.sector, per_fill):
            out |= np.where(masks & (unit << first), unit << first, 0).astype(np.uint8)
        return out

    def check(self) -> None:
        """Raise ``DsacacheError`` naming the first impossible value."""
        for name in ("size", "ways", "line", "sector", "partitions", "fill"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise DsacacheError(f"cache {name} must be an integer, got {value!r}")
        if self.size > MAX_CACHE_BYTES:  # its state (about 14 B a line) would not fit in memory
            raise DsacacheError(
                f"cache size {self.size} B is larger than the {format_size(MAX_CACHE_BYTES)} "
                "the simulator models"
            )
        if self.line < 1 or self.line & (self.line - 1):
            raise DsacacheError(f"cache line {self.line} B must be a power of two")
        if self.sector < 1 or self.sector & (self.sector - 1) or self.line % self.sector:
            raise DsacacheError(
                f"cache sector {self.sector} B must be a power of two that divides the line ({self.line} B)"
            )
        if self.line // self.sector > 8:
            raise DsacacheError(
                f"at most 8 sectors per line are supported, got {self.line // self.sector}"
            )
        fill = self.fill_bytes
        if fill & (fill - 1) or not self.sector <= fill <= self.line:
            raise DsacacheError(
                f"fill unit {self.fill} B must be a power of two from the sector ({self.sector} B) "
                f"to the line ({self.line} B), or 0 for one sector"
            )
        if self.ways < 1:
            raise DsacacheError(f"cache ways must be >= 1, got {self.ways}")
        if self.size < 1 or self.size % (self.ways * self.line):
            raise DsacacheError(
                f"cache size {self.size} B ({format_size(self.size)}) is not a multiple of "
                f"ways x line = {self.ways} x {self.line} B"
            )
        if self.partitions < 1 or self.n_sets % self.partitions:
            raise DsacacheError(
                f"{self.n_sets} sets do not split into {self.partitions} partitions"
            )
        if self.replicate and (self.partitions < 2 or self.partitions & (self.partitions - 1)):
            raise DsacacheError(
                f"replicate needs a power-of-two number of partitions >= 2, got {self.partitions}"
            )
        if self.set_hash not in SET_HASHES:
            raise DsacacheError(
                f"set hash {self.set_hash!r} unknown; choose one of: {', '.join(SET_HASHES)}"
            )


# key -> (policy type, compiled loop); the type is kept so that its id, part of the key, is
# never reused by a type registered later (a plug-in registered again under its name)
_KERNELS: dict[str, tuple[object, object]] = {}
MATCH_WIDTH = 16  # tags compared per vector compare; the tag array is padded by this many


@intrinsic
def match16(typingctx, arr, start, key):
    """Bit ``w`` set where ``arr[start + w] == key``, for w < 16: one vector compare (LLVM
    lowers it to the CPU's SIMD), where a loop with an early exit mispredicts on every hit.
    ``arr`` is an integer array (``key`` is truncated to its width); the caller makes sure 16
    elements from ``start`` lie inside it."""
    width = arr.dtype.bitwidth

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        elem = ir.IntType(width)
        vec_t = ir.VectorType(elem, MATCH_WIDTH)
        vec = builder.load(
            builder.bitcast(builder.gep(data, [args[1]]), vec_t.as_pointer()), align=width // 8
        )
        key = args[2] if width == 64 else builder.trunc(args[2], elem)
        splat = builder.insert_element(ir.Constant(vec_t, ir.Undefined), key, ir.IntType(32)(0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), MATCH_WIDTH), [0] * MATCH_WIDTH)
        splat = builder.shuffle_vector(splat, ir.Constant(vec_t, ir.Undefined), zeros)
        bits = builder.bitcast(builder.icmp_signed("==", vec, splat), ir.IntType(MATCH_WIDTH))
        return builder.zext(bits, ir.IntType(64))

    return types.int64(arr, types.int64, types.int64), codegen


@intrinsic
def ctz(typingctx, x):
    """Trailing zero bits of a nonzero int64 (one instruction)."""

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn_t = ir.FunctionType(i64, [i64, ir.IntType(1)])
        fn = builder.module.declare_intrinsic("llvm.cttz.i64", fnty=fn_t)
        return builder.call(fn, [args[0], ir.IntType(1)(1)])

    return types.int64(types.int64), codegen


@intrinsic
def prefetch(typingctx, arr, index):
    """Ask the CPU to start loading ``arr[index]``'s cache line; a hint, no effect on results."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn_t = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch.p0i8", fnty=fn_t)
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.void(arr, types.int64), codegen


@intrinsic
def item_bytes(typingctx, arr):
    """Bytes per element of ``arr``, a constant of the compiled code (branches on it fold)."""

    def codegen(context, builder, sig, args):
        return context.get_constant(types.int64, arr.dtype.bitwidth // 8)

    return types.int64(arr), codegen


HOST_LINE = 64  # bytes per cache line of the host CPU


@njit(inline="always")
def _no_prefetch(line_state, set_state, s, ways):
    pass


PREFETCH_AHEAD = 8  # accesses between a set's prefetch and its lookup (a power of two)


@njit(inline="always")
def _find_way(tags, base, ln, ways):
    """The way of set ``tags[base : base + ways]`` that holds line ``ln``, or -1."""
    c = 0
    while c < ways:  # not range(0, ways, 16): Numba sizes a stepped range with a division
        m = match16(tags, base + c, ln)
        if ways - c < MATCH_WIDTH:  # the last chunk reads past the set: drop those bits
            m &= (1 << (ways - c)) - 1
        if m:
            return c + ctz(m)
        c += MATCH_WIDTH
    return -1


@njit(inline="always")
def _flush(counters, b, n_acc, n_hit, n_sec, n_sec_miss, n_written, n_bytes, n_fetched):
    counters[b, 0] += n_acc
    counters[b, 1] += n_hit
    counters[b, 2] += n_sec
    counters[b, 3] += n_sec - n_sec_miss
    counters[b, 4] += n_sec_miss
    counters[b, 5] += n_written
    counters[b, 6] += n_bytes
    counters[b, 7] += n_fetched


@njit(inline="always")
def _set_index(ln, per, inv_per, partitions, part_shift, hash_kind):
    """The set of line ``ln``: its partition's block of ``per`` sets, hashed within it."""
    if partitions == 1:
        rest = ln
        part = 0
    elif part_shift >= 0:
        rest = ln >> part_shift
        part = ln & (partitions - 1)
    else:
        rest = ln // partitions
        part = ln - rest * partitions
    if hash_kind == 1:
        rest = rest ^ (rest >> 17) ^ (rest >> 29)
    elif hash_kind == 2:
        rest = ((rest * _HASH_MUL) >> 20) & 0x7FFFFFFFFFF
    elif hash_kind == 3:  # splitmix64's finalizer: every line lands in a pseudo-random set
        z = rest * _HASH_MUL  # int64 products wrap like uint64; shifts are masked to logical
        z = (z ^ ((z >> 30) & 0x3FFFFFFFF)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
        z = (z ^ ((z >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685  # 0x94D049BB133111EB
        z = z ^ ((z >> 31) & 0x1FFFFFFFF)
        rest = (z >> 11) & 0x1FFFFFFFFFFF
    if rest < 4503599627370496:  # 2**52: exact in float64, one correction suffices
        q = np.int64(rest * inv_per)  # remainder by multiplication: a division costs ~40 cycles
        r = rest - q * per
        if r >= per:
            r -= per
        elif r < 0:
            r += per
    else:
        r = rest % per
    return part * per + r


@njit(inline="always")
def reader_partition(clock, partitions):
    """The partition of the SM that issues the access starting at line clock ``clock``: a
    multiplicative hash of it, so the SMs of both halves share every stream evenly."""
    return ((clock * _HASH_MUL) >> 32) & (partitions - 1)


def _kernel(policy: Policy, config: CacheConfig):
    """The compiled replay loop for ``policy``'s type on caches shaped like ``config``
    (compiled on first use, then kept in this process and on disk, ``jitcache``).
    Sets of ``MATCH_WIDTH`` ways (the presets' 16) get their own builds with the way count,
    the set hash, a single partition and the line and sector sizes as constants: the tag
    match is then one compare without the chunk loop, the policy's branches on ``ways`` fold
    away, and the set index is straight-line code (fewer live values, so the loop keeps more
    of its state in registers). Whether the policy reads the future (Belady) is a constant
    of every build.

    ``replicate`` builds the loop of a GPU L2 made of partitions joined by a fabric (GH100):
    a line's home partition comes from its address; a read by an SM of another partition
    (``reader_partition``) looks up that partition's near copy first, then the home, and
    leaves a copy in both; a write goes to the home and drops the copies elsewhere."""
    replicate = config.replicate
    fixed_ways = config.ways if config.ways == MATCH_WIDTH else 0
    fixed_hash = SET_HASHES.index(config.set_hash) if fixed_ways else -1
    single_partition = bool(fixed_ways) and config.partitions == 1
    fixed_line_shift = config.line.bit_length() - 1 if fixed_ways else -1
    fixed_sector_shift = config.sector.bit_length() - 1 if fixed_ways else -1
    shape = (
        f"{fixed_ways}:{fixed_hash}:{int(single_partition)}:{fixed_line_shift}:"
        f"{fixed_sector_shift}:{int(replicate)}"
    )
    key = f"{policy.name}:{id(policy.type)}:{shape}"
    if key in _KERNELS:
        return _KERNELS[key][1]
    on_hit, on_fill, victim = policy.type.on_hit, policy.type.on_fill, policy.type.victim
    access_context = policy.type.reads_access  # constants of this build
    needs_future = policy.type.needs_future
    set_words = policy.type.set_words
    # words from one set's first state word to the next set's
    set_stride = set_words if policy.type.set_major else 1
    policy_prefetch = policy.type.prefetch or _no_prefetch

    @njit(inline="always")
    def allocate(tags, valid, line_state, set_state, glob, s, ways, ln, wanted, clock, params):
        """Fill line ``ln`` into set ``s``: its first empty way, else the policy's victim."""
        base = s * ways
        way = _find_way(tags, base, -1, ways)
        if way < 0:
            way = victim(line_state, set_state, glob, s, ways, clock, params)
        tags[base + way] = ln
        valid[base + way] = wanted
        on_fill(line_state, set_state, glob, s, way, ways, clock, params)

    # _nrt=False: without it Numba reference-counts the state arrays handed to the inlined
    # policy hooks on every access, which made LRU 4-5x slower.
    @njit(cache=False, nogil=True, _nrt=False)
    def run(
        addr,
        nbytes,
        is_write,
        bucket,
        klass,
        future,
        counters,
        tags,
        valid,
        line_state,
        set_state,
        glob,
        params,
        clock,
        n_sets,
        ways,
        line_shift,
        sector_shift,
        partitions,
        part_shift,
        hash_kind,
        write_allocate,
        popcount8,
        fill_mask,
        ring,
    ):
        if fixed_ways:
            ways = fixed_ways
        if fixed_hash >= 0:
            hash_kind = fixed_hash
        if single_partition:
            partitions = 1
        if fixed_line_shift >= 0:
            line_shift = fixed_line_shift
            sector_shift = fixed_sector_shift
        per = n_sets // partitions
        inv_per = 1.0 / per
        line_bytes = 1 << line_shift
        n_sectors = 1 << (line_shift - sector_shift)
        all_sectors = (1 << n_sectors) - 1
        # a set's tags lie in one host line when their bytes are a power of two up to it
        # (the array is 128-B aligned): then one prefetch brings them (16 int32 tags, where
        # the fixed way count makes this a constant)
        set_bytes = item_bytes(tags) * ways
        tags_span_lines = set_bytes > HOST_LINE or set_bytes & (set_bytes - 1) != 0
        k = 0  # line accesses so far in this call: index into ``future``
        # Counters add up in locals while consecutive accesses share a bucket (streams have
        # long runs of one step, layer and class) and are flushed when the bucket changes.
        cur = bucket[0] if addr.shape[0] else 0
        n_acc = n_hit = n_sec = n_sec_miss = n_written = n_bytes = n_fetched = 0
        n = addr.shape[0]
        for j in range(min(PREFETCH_AHEAD, n)):
            ring[j] = _set_index(addr[j] >> line_shift, per, inv_per, partitions, part_shift,
                                 hash_kind)  # fmt: skip
        for i in range(n):
            b = bucket[i]
            if b != cur:
                _flush(counters, cur, n_acc, n_hit, n_sec, n_sec_miss, n_written, n_bytes,
                       n_fetched)  # fmt: skip
                n_acc = n_hit = n_sec = n_sec_miss = n_written = n_bytes = n_fetched = 0
                cur = b
            # The set of this access's first line was computed PREFETCH_AHEAD accesses ago,
            # when its tag, valid and recency words were prefetched: on a scattered stream
            # those loads miss the host's caches, and waiting for them one access at a time
            # was most of the replay's time.
            first_set = ring[i & (PREFETCH_AHEAD - 1)]
            j = i + PREFETCH_AHEAD
            if j < n:
                ahead = _set_index(addr[j] >> line_shift, per, inv_per, partitions, part_shift,
                                   hash_kind)  # fmt: skip
                ring[j & (PREFETCH_AHEAD - 1)] = ahead
                prefetch(tags, ahead * ways)
                if tags_span_lines:
                    prefetch(tags, ahead * ways + ways - 1)
                prefetch(valid, ahead * ways)
                if set_words:  # set_state holds n_sets * set_words words
                    prefetch(set_state, ahead * set_stride)
                policy_prefetch(line_state, set_state, ahead, ways)
            a = addr[i]
            end = a + nbytes[i]
            n_bytes += nbytes[i]
            write = is_write[i]
            if access_context:
                glob[1] = klass[i]
            reader = reader_partition(clock, partitions) if replicate else 0
            first_line = a >> line_shift
            for ln in range(first_line, ((end - 1) >> line_shift) + 1):
                start = ln << line_shift
                if a <= start and end >= start + line_bytes:  # the whole line (the common case)
                    wanted = all_sectors
                    n_wanted = n_sectors
                else:
                    s0 = (max(a, start) - start) >> sector_shift
                    s1 = (min(end, start + line_bytes) - start - 1) >> sector_shift
                    wanted = ((1 << (s1 + 1)) - 1) ^ ((1 << s0) - 1)
                    n_wanted = s1 - s0 + 1
                if ln == first_line:
                    s = first_set
                else:
                    s = _set_index(ln, per, inv_per, partitions, part_shift, hash_kind)
                base = s * ways
                if access_context:
                    glob[2] = ln
                way = _find_way(tags, base, ln, ways)
                clock += 1
                if needs_future:
                    glob[0] = future[k]
                    k += 1
                if replicate:
                    home = s // per
                    if write:  # the home takes the write; copies elsewhere are stale
                        for p in range(partitions):
                            if p != home:
                                other = (s + (p - home) * per) * ways
                                w = _find_way(tags, other, ln, ways)
                                if w >= 0:
                                    tags[other + w] = -1
                                    valid[other + w] = 0
                    elif reader != home:
                        n_acc += 1
                        n_sec += n_wanted
                        near = s + (reader - home) * per
                        near_way = _find_way(tags, near * ways, ln, ways)
                        v_near = 0
                        if near_way >= 0:
                            v_near = valid[near * ways + near_way]
                            if wanted & ~v_near == 0:  # the near copy serves the read
                                on_hit(line_state, set_state, glob, near, near_way, ways, clock,
                                       params)  # fmt: skip
                                n_hit += 1
                                continue
                        v = valid[base + way] if way >= 0 else 0
                        lacking = wanted & ~(v | v_near) & 0xFF
                        fetched = fill_mask[lacking]
                        got = wanted | fetched
                        missing = popcount8[lacking]
                        if way >= 0:
                            valid[base + way] = v | got
                            on_hit(line_state, set_state, glob, s, way, ways, clock, params)
                        else:
                            allocate(tags, valid, line_state, set_state, glob, s, ways, ln,
                                     got, clock, params)  # fmt: skip
                        n_sec_miss += missing
                        n_fetched += popcount8[fetched]
                        n_hit += missing == 0
                        if near_way >= 0:
                            valid[near * ways + near_way] = v_near | got
                            on_hit(line_state, set_state, glob, near, near_way, ways, clock,
                                   params)  # fmt: skip
                        else:
                            allocate(tags, valid, line_state, set_state, glob, near, ways, ln,
                                     got, clock, params)  # fmt: skip
                        continue
                if write:
                    n_written += n_wanted
                    if way >= 0:
                        valid[base + way] |= wanted
                        on_hit(line_state, set_state, glob, s, way, ways, clock, params)
                        continue
                    if not write_allocate:
                        continue
                    missing = 0
                else:
                    n_acc += 1
                    n_sec += n_wanted
                    if way >= 0:
                        v = valid[base + way]
                        lacking = wanted & ~v & 0xFF
                        if lacking:  # sectors missing: fetch their fill units
                            fetched = fill_mask[lacking]
                            valid[base + way] = v | fetched
                            n_sec_miss += popcount8[lacking]
                            n_fetched += popcount8[fetched]
                        else:
                            n_hit += 1
                        on_hit(line_state, set_state, glob, s, way, ways, clock, params)
                        continue
                    n_sec_miss += n_wanted
                    fetched = fill_mask[wanted]
                    n_fetched += popcount8[fetched]
                    wanted |= fetched
                allocate(
                    tags, valid, line_state, set_state, glob, s, ways, ln, wanted, clock, params
                )
        if addr.shape[0]:
            _flush(counters, cur, n_acc, n_hit, n_sec, n_sec_miss, n_written, n_bytes, n_fetched)
        return clock

    hooks = (on_hit, on_fill, victim, policy_prefetch)
    build = f"{policy.name}:{shape}:{int(access_context)}:{int(needs_future)}:{set_stride}"
    _KERNELS[key] = (policy.type, persist(run, build, hooks))
    return _KERNELS[key][1]


def _aligned(count: int, dtype: type, fill: int, align: int = 128) -> np.ndarray:
    """``np.full(count, fill, dtype)`` starting on an ``align``-byte boundary. numpy aligns
    to 16 bytes, so a 16-way set's 128 bytes of tags spanned three host cache lines instead
    of two. Aligned, random streams replay about 5% faster (same-process A/B on Zipf and
    uniform streams: 1.054 and 1.048, medians of 11 rounds)."""
    size = count * np.dtype(dtype).itemsize
    buf = np.empty(size + align, np.uint8)
    start = -buf.ctypes.data % align
    out = buf[start : start + size].view(dtype)
    out[:] = fill
    return out


def check_counters(counters: np.ndarray, bucket: np.ndarray) -> None:
    """Refuse a counters array the compiled loops would write outside of (they do not check
    bounds): int64, a column per ``COUNTERS`` entry, a row for every bucket."""
    if (
        not isinstance(counters, np.ndarray)
        or counters.dtype != np.int64
        or counters.ndim != 2
        or counters.shape[1] != len(COUNTERS)
        or not counters.flags.c_contiguous
    ):
        raise DsacacheError(
            f"counters must be a C-contiguous int64 array of shape (buckets, {len(COUNTERS)}) "
            f"(one column per COUNTERS entry), got {getattr(counters, 'dtype', type(counters))} "
            f"{getattr(counters, 'shape', '')}"
        )
    if len(bucket) and (bucket.min() < 0 or bucket.max() >= counters.shape[0]):
        raise DsacacheError(
            f"bucket numbers must be in [0, {counters.shape[0]}) (the counters' rows), got "
            f"{bucket.min()}..{bucket.max()}"
        )


class Cache:
    """A cache level with its policy and state; feed it access arrays with ``run``."""

    def __init__(self, config: CacheConfig, policy: str | Policy = "lru") -> None:
        config.check()
        self.config = config
        self.policy = make_policy(policy)
        limit = np.iinfo(self.policy.type.line_dtype).max
        if config.ways > limit:
            raise DsacacheError(
                f"policy {self.policy.name} supports at most {limit} ways, got {config.ways}"
            )
        if self.policy.type.check is not None:
            self.policy.type.check(config.ways, config.n_sets, self.policy)
        self._kernel = _kernel(self.policy, config)
        self._ring = np.zeros(PREFETCH_AHEAD, np.int64)  # sets of the next accesses (scratch)
        self._fill_mask = config.fill_masks()
        self.reset()

    def reset(self) -> None:
        """Empty the cache and its policy state."""
        cfg = self.config
        n = cfg.n_sets * cfg.ways
        # 32-bit tags until a line number needs more (``_widen_tags``): a 16-way set's tags
        # then fill one host cache line instead of two, and the tag array half the cache
        self.tags = _aligned(n + MATCH_WIDTH, np.int32, -1)  # padded for the vector compare
        self.valid = _aligned(n, np.uint8, 0)
        ptype = self.policy.type
        self.line_state = np.zeros(n * ptype.line_words, ptype.line_dtype)
        self.set_state = np.zeros(cfg.n_sets * ptype.set_words, ptype.line_dtype)
        self.glob = np.zeros(16, np.int64)
        self.glob[3] = cfg.line  # policies that size themselves in bytes read it in init
        self.params = self.policy.param_array()
        self.clock = 0
        init = self.policy.type.init
        _run_init(
            init, self.line_state, self.set_state, self.glob, cfg.n_sets, cfg.ways, self.params
        )

    def run(
        self,
        addr: np.ndarray,
        nbytes: np.ndarray,
        is_write: np.ndarray,
        bucket: np.ndarray,
        counters: np.ndarray,
        klass: np.ndarray | None = None,
        future: np.ndarray | None = None,
    ) -> None:
        """Replay accesses; add their counters into ``counters[bucket, :]`` (int64, the
        ``COUNTERS`` columns).

        ``klass`` (traffic class per access) and ``future`` (for each line access, the index
        of the next access to the same line; see ``next_use``) are context that policies may
        read as ``glob[1]`` and ``glob[0]``; the current line number is ``glob[2]``.
        """
        cfg = self.config
        if self.policy.type.needs_future and future is None:
            raise DsacacheError(f"policy {self.policy.name} needs the future of the stream")
        bucket = np.ascontiguousarray(bucket, np.int64)
        check_counters(counters, bucket)
        n = len(addr)
        addr = np.ascontiguousarray(addr, np.int64)
        nbytes = np.ascontiguousarray(nbytes, np.int64)
        if n and self.tags.dtype != np.int64:
            highest = (int(addr.max()) + int(nbytes.max()) - 1) >> (cfg.line.bit_length() - 1)
            if highest >= TAG32_LINES or int(addr.min()) < 0:
                self._widen_tags()
        self.clock = self._kernel(
            addr,
            nbytes,
            np.ascontiguousarray(is_write, np.bool_),
            bucket,
            np.zeros(n, np.int8) if klass is None else np.ascontiguousarray(klass, np.int8),
            _NO_FUTURE if future is None else np.ascontiguousarray(future, np.int64),
            counters,
            self.tags,
            self.valid,
            self.line_state,
            self.set_state,
            self.glob,
            self.params,
            self.clock,
            cfg.n_sets,
            cfg.ways,
            cfg.line.bit_length() - 1,
            cfg.sector.bit_length() - 1,
            cfg.partitions,
            cfg.partitions.bit_length() - 1 if cfg.partitions & (cfg.partitions - 1) == 0 else -1,
            SET_HASHES.index(cfg.set_hash),
            cfg.write_allocate,
            _POPCOUNT8,
            self._fill_mask,
            self._ring,
        )

    def _widen_tags(self) -> None:
        """Switch to 64-bit tags, keeping every line cached (32-bit tags hold line numbers
        below ``TAG32_LINES`` as their low 32 bits; all ones is an empty way)."""
        narrow = self.tags.view(np.uint32)
        wide = _aligned(len(narrow), np.int64, -1)
        wide[:] = np.where(narrow == 0xFFFFFFFF, -1, narrow.astype(np.int64))
        self.tags = wide


# Line numbers a 32-bit tag holds: the compiled loop stores a line number's low 32 bits and
# compares keys truncated the same way, and all ones (-1) marks an empty way.
TAG32_LINES = 2**32 - 1
_NO_FUTURE = np.zeros(0, np.int64)
_INIT_CACHE: dict[int, object] = {}


def lines_per_access(addr: np.ndarray, nbytes: np.ndarray, line: int) -> np.ndarray:
    """How many ``line``-byte lines each access ``[addr, addr + nbytes)`` touches."""
    shift = line.bit_length() - 1
    addr = np.asarray(addr, np.int64)
    return ((addr + np.asarray(nbytes, np.int64) - 1) >> shift) - (addr >> shift) + 1


def line_numbers(addr: np.ndarray, nbytes: np.ndarray, line: int) -> np.ndarray:
    """The line number of every line access, in the order the engine makes them."""
    first = np.asarray(addr, np.int64) >> (line.bit_length() - 1)
    count = lines_per_access(addr, nbytes, line)
    starts = np.repeat(first - np.cumsum(count) + count, count)
    return starts + np.arange(int(count.sum()), dtype=np.int64)


NEVER = 1 << 62  # next_use of a key's last occurrence


def next_use(keys: np.ndarray) -> np.ndarray:
    """For each position, the position of the next occurrence of the same key (``NEVER`` =
    ``2**62`` if none): the future that Belady/OPT needs. One backward pass over ``keys``
    (integers) with a hash table of the distinct keys: O(N) time, memory 8 bytes per access
    plus 32-64 per distinct key."""
    keys = np.asarray(keys)
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise DsacacheError(f"next_use needs a 1-D integer array, got {keys.dtype} {keys.shape}")
    return _next_use(keys.astype(np.int64, copy=False))


@njit(inline="always")
def hash_slot(key, shift):
    """Slot of ``key`` in an open-addressing table of ``2**(64 - shift)`` slots (Fibonacci
    hashing: the top bits of the key times 2**64 / golden ratio)."""
    return np.int64((np.uint64(key) * _HASH_MUL_U) >> np.uint64(shift))


@njit(nogil=True)
def _new_table(bits):
    table = np.empty(2 << bits, np.int64)  # slot s: key at 2s, latest position at 2s + 1
    table[1::2] = -1  # empty
    return table


@persist
@njit(nogil=True)
def _next_use(keys):
    # key and position share a host cache line: one miss per probe of a table beyond the caches
    n = keys.shape[0]
    out = np.empty(n, np.int64)
    bits = 10
    table = _new_table(bits)
    count = 0
    for i in range(n - 1, -1, -1):
        if 2 * (count + 1) > (1 << bits):  # keep the table at most half full: rehash to 2x
            old = table
            bits += 1
            table = _new_table(bits)
            for j in range(0, old.shape[0], 2):
                if old[j + 1] >= 0:
                    s = hash_slot(old[j], 64 - bits)
                    while table[2 * s + 1] >= 0:
                        s = (s + 1) & ((1 << bits) - 1)
                    table[2 * s] = old[j]
                    table[2 * s + 1] = old[j + 1]
        k = keys[i]
        s = hash_slot(k, 64 - bits)
        while table[2 * s + 1] >= 0 and table[2 * s] != k:
            s = (s + 1) & ((1 << bits) - 1)
        if table[2 * s + 1] >= 0:
            out[i] = table[2 * s + 1]
        else:
            out[i] = NEVER
            table[2 * s] = k
            count += 1
        table[2 * s + 1] = i
    return out


def _run_init(init, *args) -> None:
    # Hooks are inline="always" njit functions; call them through a tiny compiled wrapper.
    key = id(init)
    if key not in _INIT_CACHE:

        @njit
        def call(line_state, set_state, glob, n_sets, ways, params):
            init(line_state, set_state, glob, n_sets, ways, params)

        name = f"init:{init.py_func.__module__}.{init.py_func.__qualname__}"
        _INIT_CACHE[key] = persist(call, name, (init,))
    _INIT_CACHE[key](*args)


def simulate_addresses(
    addrs: np.ndarray,
    *,
    size: int | str,
    ways: int = 16,
    line: int = 128,
    sector: int = 32,
    policy: str = "lru",
    nbytes: np.ndarray | int | None = None,
    set_hash: str = "mod",
    fill: int = 0,
) -> dict[str, int]:
    """Replay a numpy array of byte addresses (each ``nbytes``, default one sector) and return
    the counters: ``accesses`` (line accesses), ``line_hits``, ``line_misses``, ``sectors``,
    ``sector_hits``, ``sector_misses``, ``fetched_sectors`` (read from memory in units of
    ``fill`` bytes, default one sector), ``bytes``."""
    addrs = np.asarray(addrs)
    if addrs.ndim != 1 or not np.issubdtype(addrs.dtype, np.integer):
        raise DsacacheError(
            f"addresses must be a 1-D integer array, got {addrs.dtype} {addrs.shape}"
        )
    if len(addrs) and (addrs.min() < 0 or addrs.max() >= 2**62):
        bad = addrs[(addrs < 0) | (addrs >= 2**62)][0]
        raise DsacacheError(f"addresses must be in [0, 2**62), got {bad}")
    bound = make_policy(policy)
    if bound.type.engine != "lines":
        raise DsacacheError(
            f"simulate_addresses replays line policies; {bound.name} needs a trace (use replay)"
        )
    config = CacheConfig.of(size, ways=ways, line=line, sector=sector, set_hash=set_hash, fill=fill)
    cache = Cache(config, bound)
    sizes = np.asarray(sector if nbytes is None else nbytes)
    if (
        not np.issubdtype(sizes.dtype, np.integer)
        or sizes.ndim > 1
        or sizes.shape not in ((), addrs.shape)
    ):
        raise DsacacheError(
            f"nbytes must be an integer or an integer array shaped like the addresses "
            f"{addrs.shape}, got {sizes.dtype} {sizes.shape}"
        )
    sizes = np.broadcast_to(sizes.astype(np.int64), addrs.shape)
    if len(sizes) and sizes.min() < 1:
        raise DsacacheError(f"access sizes (nbytes) must be >= 1, got {sizes.min()}")
    counters = np.zeros((1, len(COUNTERS)), np.int64)
    future = next_use(line_numbers(addrs, sizes, line)) if bound.type.needs_future else None
    n = len(addrs)
    cache.run(addrs, sizes, np.zeros(n, np.bool_), np.zeros(n, np.int64), counters, future=future)
    out = dict(zip(COUNTERS, counters[0].tolist(), strict=True))
    out.pop("write_sectors")
    out["line_misses"] = out["accesses"] - out["line_hits"]
    return out
