"""Cache models behind one interface, chosen by the policy's engine.

- ``lines``: the set-associative sectored cache with a line policy (``engine.Cache``);
- ``tokens``: a fully-associative cache whose unit is a KV token (``objects``);
- ``reserve``: a token-granularity reservation for KV plus the remaining ways as a line cache.

Every model replays a step's ``AccessChunk`` with ``run_chunk`` into counters per bucket.
"""

from __future__ import annotations

import numpy as np

from dsacache.errors import DsacacheError
from dsacache.policies import Policy, make_policy
from dsacache.simulator import objects
from dsacache.simulator.engine import (
    Cache,
    CacheConfig,
    check_counters,
    line_numbers,
    lines_per_access,
)
from dsacache.simulator.workload import CLASS_ID

KV, APPEND = CLASS_ID["kv"], CLASS_ID["append"]


def _fill_args(cfg: CacheConfig) -> tuple[int, np.ndarray]:
    """``run_objects``' fill unit: its shift and ``CacheConfig.fill_masks``."""
    return cfg.fill_bytes.bit_length() - 1, cfg.fill_masks()


class LineModel:
    """A set-associative line cache (any line policy)."""

    def __init__(self, config: CacheConfig, policy: Policy) -> None:
        self.cache = Cache(config, policy)
        self.policy = policy
        self.needs_future = policy.type.needs_future
        self.description = f"{config.ways}-way set-associative"

    def future_keys(self, addr, nbytes, klass) -> np.ndarray:
        return line_numbers(addr, nbytes, self.cache.config.line)

    def run_chunk(
        self, addr, nbytes, is_write, klass, layer, bucket, counters, future=None, score=None
    ):
        self.cache.run(addr, nbytes, is_write, bucket, counters, klass, future)


class TokenModel:
    """The whole cache, fully associative, KV cached per token and other traffic per line."""

    def __init__(self, config: CacheConfig, policy: Policy) -> None:
        self.config, self.policy = config, policy
        self.fill = _fill_args(config)
        self.needs_future = policy.type.needs_future
        self.appends = policy.values["appends"] == "yes"
        self.sets = policy.values.get("sets", 0) or 1
        if config.size // self.sets < config.line:
            raise DsacacheError(
                f"policy {policy.label}: {self.sets} sets leave less than one {config.line}-B "
                f"line per set in {config.size} B"
            )
        self.store = objects.ObjectStore(
            np.full(self.sets, config.size // self.sets), config.size // config.line
        )
        self.ghost = objects.ObjectStore(np.array([1]), 1)
        self.description = (
            "fully-associative, token granularity"
            if self.sets == 1
            else f"{self.sets} hashed sets, token granularity"
        )

    def _tokens(self, klass) -> np.ndarray:
        return (klass == KV) | ((klass == APPEND) & self.appends)

    def future_keys(self, addr, nbytes, klass) -> np.ndarray:
        return objects.object_keys(addr, nbytes, self._tokens(klass), self.config.line)

    def run_chunk(
        self, addr, nbytes, is_write, klass, layer, bucket, counters, future=None, score=None
    ):
        cfg = self.config
        check_counters(counters, bucket)
        routed = np.zeros(len(addr), np.int8)
        part = np.zeros(len(addr), np.int64) if self.sets == 1 else objects.sets_of(addr, self.sets)
        objects.run_objects(
            addr, nbytes, is_write, self._tokens(klass), part,
            bucket, _future(future), counters, self.store.arrays(),
            cfg.line.bit_length() - 1, cfg.sector.bit_length() - 1, self.needs_future,
            np.full(len(addr), objects.ADMIT_ALWAYS, np.int8), self.ghost.arrays(), True, True,
            routed, *self.fill,
        )  # fmt: skip


class ReserveModel:
    """Reserved ways for KV tokens (token-granularity inner policy) + a line cache for the rest."""

    def __init__(self, config: CacheConfig, policy: Policy, layers: int) -> None:
        v = policy.values
        self.config, self.policy = config, policy
        self.fill = _fill_args(config)
        way_bytes = config.n_sets * config.line
        reserved_ways = v["ways"] or -(-v["bytes"] // way_bytes)
        if not 1 <= reserved_ways < config.ways:
            raise DsacacheError(
                f"policy {policy.label}: the reservation needs 1..{config.ways - 1} of the "
                f"{config.ways} ways (one way is {way_bytes} B), got {reserved_ways}"
            )
        self.reserved_bytes = reserved_ways * way_bytes
        rest = CacheConfig(
            (config.ways - reserved_ways) * way_bytes, config.ways - reserved_ways, config.line,
            config.sector, config.set_hash, config.partitions, config.write_allocate,
            fill=config.fill,
        )  # fmt: skip
        self.rest = Cache(rest, make_policy(v["rest"]))
        self.appends = v["appends"] == "yes"
        self.per_layer = v["scope"] == "layer"
        parts = layers if self.per_layer else 1
        self.store = objects.ObjectStore(
            np.full(parts, self.reserved_bytes // parts), self.reserved_bytes // config.line
        )
        ghost_entries = self.reserved_bytes // config.line
        self.ghost = objects.ObjectStore(np.array([ghost_entries]), ghost_entries)
        self.needs_future = v["inner"] == "token-belady"
        self.learned = v["scope"] == "learned"
        self.admitted = np.ones(max(layers, 1), bool)  # learned scope: layers admitted now
        self.reuse = np.zeros(max(layers, 1))  # learned scope: EMA of step-to-step reuse
        self.footprint = np.zeros(max(layers, 1))  # learned scope: KV bytes per step
        self.previous: dict[int, np.ndarray] = {}
        self.history = SelectionHistory(v["decay"]) if v["admit"] == "frequent" else None
        self.description = (
            f"{reserved_ways} of {config.ways} ways ({self.reserved_bytes} B) reserved for KV"
        )

    def _tokens(self, klass) -> np.ndarray:
        return (klass == KV) | ((klass == APPEND) & self.appends)

    def future_keys(self, addr, nbytes, klass) -> np.ndarray:
        return np.asarray(addr)[self._tokens(klass)]

    def run_chunk(
        self, addr, nbytes, is_write, klass, layer, bucket, counters, future=None, score=None
    ):
        cfg = self.config
        check_counters(counters, bucket)
        routed = np.zeros(len(addr), np.int8)
        part = layer.astype(np.int64) if self.per_layer else np.zeros(len(addr), np.int64)
        tokens = self._tokens(klass)
        if self.learned:
            tokens &= self.admitted[layer]
        objects.run_objects(
            addr, nbytes, is_write, tokens, part, bucket, _future(future),
            counters, self.store.arrays(), cfg.line.bit_length() - 1,
            cfg.sector.bit_length() - 1, self.needs_future, self._admit(addr, klass, layer, score),
            self.ghost.arrays(), False, self.appends, routed, *self.fill,
        )  # fmt: skip
        rest = routed == 0
        self.rest.run(addr[rest], nbytes[rest], is_write[rest], bucket[rest], counters, klass[rest])
        if self.learned:
            self._learn(addr, nbytes, klass, layer)

    def _admit(self, addr, klass, layer, score) -> np.ndarray:
        """What each access does on a miss in the reservation (``objects.ADMIT_*``)."""
        v = self.policy.values
        mode = v["admit"]
        if mode == "all":
            return np.full(len(addr), objects.ADMIT_ALWAYS, np.int8)
        if mode == "second":
            return np.full(len(addr), objects.ADMIT_SECOND, np.int8)
        kv = klass == KV
        admit = np.full(len(addr), objects.ADMIT_ALWAYS, np.int8)  # appends (if routed here)
        if mode == "frequent":
            count = self.history.update(addr[kv])  # this step's selection counted in
            admit[kv] = count >= v["threshold"]
            return admit
        if score is None or (kv.any() and np.isnan(score[kv]).all()):
            raise DsacacheError(
                f"policy {self.policy.label} needs the indexer's scores, and this trace has "
                "none (capture records them; synthetic traces do not have them)"
            )
        admit[kv] = top_share(score[kv], layer[kv], addr[kv]) <= v["top"]
        return admit

    def _learn(self, addr, nbytes, klass, layer) -> None:
        """Update per-layer reuse and footprint from this step's KV gathers; re-pick layers."""
        line = self.config.line
        kv = klass == KV
        for lay in np.unique(layer[kv]):
            mine = kv & (layer == lay)
            keys = np.unique(addr[mine])
            self.footprint[lay] = lines_per_access(addr[mine], nbytes[mine], line).sum() * line
            prev = self.previous.get(int(lay))
            if prev is not None and len(keys):
                now = np.isin(keys, prev, assume_unique=True).mean()
                self.reuse[lay] = 0.5 * self.reuse[lay] + 0.5 * now
            self.previous[int(lay)] = keys
        order = np.argsort(-self.reuse, kind="stable")
        fits = np.cumsum(self.footprint[order]) <= self.reserved_bytes
        self.admitted[:] = False
        self.admitted[order[fits]] = True


def top_share(score: np.ndarray, group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For each access, the share of its group's distinct tokens (``key``) whose score is at
    least its token's: 1/n for the single best token, 1 for the worst (ties share the larger
    value; repeated reads of a token count once)."""
    out = np.empty(len(score))
    for g in np.unique(group):
        mine = np.flatnonzero(group == g)
        keys, first, inverse = np.unique(key[mine], return_index=True, return_inverse=True)
        desc = np.sort(-score[mine][first])
        at_least = np.searchsorted(desc, -score[mine][first], side="right")
        out[mine] = (at_least / len(keys))[inverse]
    return out


class SelectionHistory:
    """Per KV record (its address: one token of one layer and request), an exponentially aged
    count of the decode steps that selected it: ``count = decay * count + selected``. Entries
    that decay below 1/64 are dropped, so memory follows the recently selected tokens."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.keys = np.zeros(0, np.int64)  # sorted
        self.counts = np.zeros(0)

    def update(self, addr: np.ndarray) -> np.ndarray:
        """Count one step's selection (``addr``: its KV reads, repeats allowed) and return
        every read's count after the update."""
        now = np.unique(addr)
        keys = np.union1d(self.keys, now)
        counts = np.zeros(len(keys))
        counts[np.searchsorted(keys, self.keys)] = self.counts * self.decay
        counts[np.searchsorted(keys, now)] += 1.0
        keep = counts >= 1 / 64
        self.keys, self.counts = keys[keep], counts[keep]
        return self.counts[np.searchsorted(self.keys, addr)]


def _future(future):
    return np.zeros(0, np.int64) if future is None else np.ascontiguousarray(future, np.int64)


def make_model(config: CacheConfig, policy: str | Policy, layers: int = 1):
    """The cache model for ``policy`` (a spec string or a bound ``Policy``)."""
    policy = make_policy(policy)
    engine = policy.type.engine
    if engine == "lines":
        return LineModel(config, policy)
    if engine == "tokens":
        return TokenModel(config, policy)
    if engine == "reserve":
        return ReserveModel(config, policy, layers)
    raise DsacacheError(f"policy {policy.name}: unknown engine {engine!r}")
