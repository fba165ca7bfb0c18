"""Slow pure-Python models of the classic line policies, the oracle for tests/test_classic_policies.py.

Written from the papers' descriptions for obviousness, not speed, and independent of the Numba
hooks in policies/: queues are deques and lists, the PLRU tree is a dict of address ranges,
RRIP ages lines one step at a time. ``ReferencePolicyCache`` is a sectored set-associative
cache (reads only) that fills a set's ways in order 0, 1, ... and then asks the set's policy
object for a victim way, as the engine does. A policy object per set implements ``hit(way)``,
``fill(way, line)`` and ``victim(line) -> way`` (``line`` is the missing line number).
"""

from __future__ import annotations

from collections import deque

from dsacache.simulator.reference import COUNTERS, reference_set_index

MASK64 = (1 << 64) - 1


class Lcg:
    """The 64-bit LCG behind BRRIP's coin: state * 6364136223846793005 + 1442695040888963407."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def coin(self, p: float) -> bool:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & MASK64
        return (self.state >> 33) < p * 2**31


class TreePLRU:
    def __init__(self, ways: int, shared: dict, index: int) -> None:
        self.ways = ways
        self.lru_half = {}  # (lo, hi) -> "left" / "right": the half to evict from

    def _touch(self, way: int) -> None:
        lo, hi = 0, self.ways
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if way < mid:
                self.lru_half[lo, hi] = "right"
                hi = mid
            else:
                self.lru_half[lo, hi] = "left"
                lo = mid

    hit = _touch

    def fill(self, way: int, line: int) -> None:
        self._touch(way)

    def victim(self, line: int) -> int:
        lo, hi = 0, self.ways
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.lru_half.get((lo, hi), "left") == "left":
                hi = mid
            else:
                lo = mid
        return lo


class RRIP:
    """SRRIP / BRRIP (``mode``), or DRRIP when ``mode`` is ``"drrip"``."""

    def __init__(self, ways: int, shared: dict, index: int, mode: str, bits: int = 2, **kw):
        self.mode, self.index, self.shared = mode, index, shared
        self.max = 2**bits - 1
        self.rrpv = [self.max] * ways
        self.kw = kw

    def hit(self, way: int) -> None:
        self.rrpv[way] = 0

    def _uses_brrip(self) -> bool:
        if self.mode != "drrip":
            return self.mode == "brrip"
        sh = self.shared
        top = 2 ** self.kw["psel_bits"] - 1
        if self.index in sh["srrip_leaders"]:
            sh["psel"] = min(sh["psel"] + 1, top)
            return False
        if self.index in sh["brrip_leaders"]:
            sh["psel"] = max(sh["psel"] - 1, 0)
            return True
        return sh["psel"] >= 2 ** (self.kw["psel_bits"] - 1)

    def fill(self, way: int, line: int) -> None:
        if self._uses_brrip() and not self.shared["rng"].coin(self.kw["epsilon"]):
            self.rrpv[way] = self.max
        else:
            self.rrpv[way] = self.max - 1

    def victim(self, line: int) -> int:
        while self.max not in self.rrpv:
            self.rrpv = [v + 1 for v in self.rrpv]
        return self.rrpv.index(self.max)


def drrip_shared(n_sets: int, leaders: int, psel_bits: int, seed: int) -> dict:
    """Leader sets and PSEL as the DRRIP docstring defines them."""
    per_kind = min(leaders, n_sets // 2)
    srrip, brrip = set(), set()
    if per_kind:
        size = n_sets // per_kind
        for k in range(per_kind):
            srrip.add(k * size + k % size)
            brrip.add(k * size + (k + size // 2) % size)
    assert not srrip & brrip
    return {
        "srrip_leaders": srrip,
        "brrip_leaders": brrip,
        "psel": 2 ** (psel_bits - 1) - 1,
        "rng": Lcg(seed),
    }


class LFU:
    def __init__(self, ways: int, shared: dict, index: int) -> None:
        self.count = [0] * ways
        self.last = [0] * ways
        self.shared = shared

    def _now(self) -> int:
        return self.shared["clock"]

    def hit(self, way: int) -> None:
        self.count[way] += 1
        self.last[way] = self._now()

    def fill(self, way: int, line: int) -> None:
        self.count[way] = 1
        self.last[way] = self._now()

    def victim(self, line: int) -> int:
        return min(range(len(self.count)), key=lambda w: (self.count[w], self.last[w]))


class Sieve:
    def __init__(self, ways: int, shared: dict, index: int) -> None:
        self.queue: list[int] = []  # ways, oldest first
        self.visited: dict[int, bool] = {}
        self.hand: int | None = None  # a way, or None: start at the oldest

    def hit(self, way: int) -> None:
        self.visited[way] = True

    def fill(self, way: int, line: int) -> None:
        self.queue.append(way)
        self.visited[way] = False

    def victim(self, line: int) -> int:
        i = 0 if self.hand is None else self.queue.index(self.hand)
        while self.visited[self.queue[i]]:
            self.visited[self.queue[i]] = False
            i = (i + 1) % len(self.queue)
        way = self.queue.pop(i)
        self.hand = self.queue[i] if i < len(self.queue) else None
        return way


class S3FIFO:
    def __init__(
        self,
        ways: int,
        shared: dict,
        index: int,
        small_ratio: float = 0.1,
        ghost_ratio: float = 0.9,
        threshold: int = 1,
    ) -> None:
        self.small_cap = max(1, int(small_ratio * ways))
        if ways > 1:
            self.small_cap = min(self.small_cap, ways - 1)
        self.main_cap = ways - self.small_cap
        self.ghost: deque[int] = deque(maxlen=min(ways, int(ghost_ratio * ways)))
        self.threshold = threshold
        self.small: deque[int] = deque()  # ways, oldest at the left
        self.main: deque[int] = deque()
        self.freq: dict[int, int] = {}
        self.line_of: dict[int, int] = {}
        self.evicted_once = False
        self.from_ghost = False

    def hit(self, way: int) -> None:
        self.freq[way] = min(self.freq[way] + 1, 3)

    def fill(self, way: int, line: int) -> None:
        self.freq[way] = 0
        self.line_of[way] = line
        if self.from_ghost or (not self.evicted_once and len(self.small) >= self.small_cap):
            self.main.append(way)
        else:
            self.small.append(way)
        self.from_ghost = False

    def victim(self, line: int) -> int:
        self.evicted_once = True
        if line in self.ghost:
            self.ghost.remove(line)
            self.from_ghost = True
        while True:
            if len(self.main) > self.main_cap or not self.small:
                while True:
                    way = self.main.popleft()
                    if self.freq[way] == 0:
                        return way
                    self.freq[way] -= 1
                    self.main.append(way)
            while self.small:
                way = self.small.popleft()
                if self.freq[way] >= self.threshold:
                    self.freq[way] = 0
                    self.main.append(way)
                else:
                    if self.ghost.maxlen:
                        self.ghost.append(self.line_of[way])
                    return way


def make_reference_policy(spec: str, n_sets: int, ways: int):
    """``(factory, shared)`` for a policy spec such as ``srrip:bits=3`` (same names as dsacache)."""
    name, _, rest = spec.partition(":")
    kw = {k: v for k, v in (item.split("=") for item in rest.split(",") if item)}
    shared: dict = {"clock": 0}
    if name == "plru":
        return (lambda i: TreePLRU(ways, shared, i)), shared
    if name in ("srrip", "brrip", "drrip"):
        bits = int(kw.get("bits", 2))
        eps = float(kw.get("epsilon", 1 / 32))
        seed = int(kw.get("seed", 0))
        psel_bits = int(kw.get("psel_bits", 10))
        shared.update(drrip_shared(n_sets, int(kw.get("leaders", 32)), psel_bits, seed))
        return (
            lambda i: RRIP(ways, shared, i, name, bits=bits, epsilon=eps, psel_bits=psel_bits)
        ), shared
    if name == "lfu":
        return (lambda i: LFU(ways, shared, i)), shared
    if name == "sieve":
        return (lambda i: Sieve(ways, shared, i)), shared
    if name == "s3fifo":
        args = {
            "small_ratio": float(kw.get("small_ratio", 0.1)),
            "ghost_ratio": float(kw.get("ghost_ratio", 0.9)),
            "threshold": int(kw.get("threshold", 1)),
        }
        return (lambda i: S3FIFO(ways, shared, i, **args)), shared
    raise ValueError(spec)


class ReferencePolicyCache:
    """Sectored set-associative cache, reads only, one reference policy object per set."""

    def __init__(
        self,
        size: int,
        ways: int,
        policy: str,
        line: int = 128,
        sector: int = 32,
        set_hash: str = "mod",
    ) -> None:
        self.line, self.sector, self.ways, self.set_hash = line, sector, ways, set_hash
        self.n_sets = size // (ways * line)
        factory, self.shared = make_reference_policy(policy, self.n_sets, ways)
        self.policies = [factory(i) for i in range(self.n_sets)]
        self.tags = [[] for _ in range(self.n_sets)]  # way -> line number
        self.valid = [[] for _ in range(self.n_sets)]  # way -> sector bitmask
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.hits: list[bool] = []  # per line access

    def access(self, addr: int, nbytes: int) -> None:
        c = self.counts
        c["bytes"] += nbytes
        end = addr + nbytes
        for line_no in range(addr // self.line, (end - 1) // self.line + 1):
            self.shared["clock"] += 1
            lo = max(addr, line_no * self.line) - line_no * self.line
            hi = min(end, (line_no + 1) * self.line) - line_no * self.line
            wanted = {s for s in range(lo // self.sector, (hi - 1) // self.sector + 1)}
            s = reference_set_index(line_no, self.n_sets, self.set_hash, 1)
            tags, valid, policy = self.tags[s], self.valid[s], self.policies[s]
            c["accesses"] += 1
            c["sectors"] += len(wanted)
            if line_no in tags:
                way = tags.index(line_no)
                missing = wanted - valid[way]
                valid[way] |= wanted
                policy.hit(way)
            else:
                missing = wanted
                if len(tags) < self.ways:
                    way = len(tags)
                    tags.append(line_no)
                    valid.append(set(wanted))
                else:
                    way = policy.victim(line_no)
                    tags[way] = line_no
                    valid[way] = set(wanted)
                policy.fill(way, line_no)
            c["sector_hits"] += len(wanted) - len(missing)
            c["sector_misses"] += len(missing)
            c["fetched_sectors"] += len(missing)  # one sector per fill unit (the default)
            c["line_hits"] += not missing
            self.hits.append(not missing)
