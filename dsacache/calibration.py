"""Calibrate the L2 model against measured probes, then compare it on workloads it was not fit to.

The measured data (``simulator/data/<gpu>/l2-*.parquet``, from ``dsacache probe`` on the GPU)
hold one row per measured kernel with Nsight Compute's counters. The measured hit rate is the
share of read sectors from the SMs whose lookup hit (``..._lookup_hit.sum / ....sum``), the
same quantity as the simulator's ``sector_hits / sectors``; the measured DRAM bytes
(``dram__bytes_read.sum``) are compared with the simulator's ``fetched_sectors`` x 32 B.

- ``reuse`` (read S bytes twice) is used to *fit* the model: which capacity and policy
  reproduce the curve of second-read hit rate over S;
- ``gather`` and ``decode`` (DSA-shaped streams) are then *predicted* by the fitted model and
  compared with measurement.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from dsacache.errors import DsacacheError
from dsacache.policies.hints import takes_gpu_evict_last_ways
from dsacache.simulator.caches import make_model
from dsacache.simulator.engine import CacheConfig
from dsacache.simulator.presets import (
    DATA_DIR,
    PROFILE_FORMAT,
    bundled_profile,
    gpu_preset,
    load_profile,
)
from dsacache.simulator.reference import COUNTERS
from dsacache.simulator.workload import CLASS_ID, CLASSES, WRITE_CLASSES, Workload
from dsacache.units import parse_size

READ = "lts__t_sectors_srcunit_tex_op_read.sum"
READ_HIT = "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum"
DRAM = "dram__bytes_read.sum"
SECTOR_BYTES = 32  # the L2 sector ncu counts and the models keep
_BASE_STRIDE = 1 << 34  # buffers live far apart in the simulated address space


def measured(gpu: str, experiment: str) -> pd.DataFrame:
    """A bundled measurement with its ``hit`` column (read-sector lookup hit rate)."""
    path = DATA_DIR / gpu / f"l2-{experiment}.parquet"
    if not path.exists():
        have = (
            sorted(p.name for p in (DATA_DIR / gpu).glob("l2-*.parquet"))
            if (DATA_DIR / gpu).exists()
            else []
        )
        raise DsacacheError(
            f"no measurement {path.name} for {gpu}; have: {', '.join(have) or 'none'}"
        )
    df = pd.read_parquet(path)
    df["hit"] = df[READ_HIT] / df[READ]
    return df


class _Sim:
    """Feeds a sequence of buffer reads, writes and gathers to one cache model."""

    def __init__(self, m: Model) -> None:
        self.model = make_model(m.config(), m.policy)

    def access(
        self, addr: np.ndarray, nbytes: np.ndarray, write: bool = False, klass: str = "index"
    ) -> float:
        """Hit rate of these accesses (traffic class ``klass``: what a ``hints`` policy keys
        its priority on); the bytes they read from memory go to ``dram_bytes``."""
        counters = np.zeros((1, len(COUNTERS)), np.int64)
        n = len(addr)
        self.model.run_chunk(
            np.asarray(addr, np.int64), np.asarray(nbytes, np.int64), np.full(n, write),
            np.full(n, CLASS_ID[klass], np.int8), np.zeros(n, np.int16), np.zeros(n, np.int64),
            counters,
        )  # fmt: skip
        self.dram_bytes = int(counters[0, COUNTERS.index("fetched_sectors")]) * SECTOR_BYTES
        sectors, hits = counters[0, 2], counters[0, 3]
        return hits / sectors if sectors else float("nan")

    def stream(
        self, buffer: int, nbytes: int, write: bool = False, block: int = 16384,
        klass: str = "index", offset: int = 0,
    ) -> float:  # fmt: skip
        """Hit rate of one pass over ``nbytes`` of ``buffer`` from byte ``offset``."""
        starts = np.arange(0, nbytes, block, dtype=np.int64)
        sizes = np.minimum(block, nbytes - starts)
        return self.access(buffer * _BASE_STRIDE + offset + starts, sizes, write, klass)

    def gather(
        self, buffer: int, index_buffer: int, tokens: np.ndarray, row_bytes: int
    ) -> tuple[float, int]:
        """A probe gather: read the int32 indices, then the rows they select. Returns the
        rows' hit rate and the DRAM bytes of both (ncu counts both)."""
        self.stream(index_buffer, 4 * len(tokens))
        index_dram = self.dram_bytes
        addr = buffer * _BASE_STRIDE + np.asarray(tokens, np.int64) * row_bytes
        hit = self.access(addr, np.full(len(addr), row_bytes))
        return hit, index_dram + self.dram_bytes


@dataclass(frozen=True)
class Model:
    """One L2 model to compare: policy, capacity, associativity, set hash and partitions
    (``replicate``: the GH100's two L2 halves, a far read keeping a near copy)."""

    policy: str = "lru"
    capacity: int = 50 * 2**20
    ways: int = 16
    set_hash: str = "mod"
    partitions: int = 1
    replicate: bool = False
    fill: int = 0  # bytes read from memory per miss unit (CacheConfig.fill); 0: one sector
    last_ways: int = 0  # ways per set where evict_last lines keep priority (fit_evict_last)

    @property
    def label(self) -> str:
        label = f"{self.policy} {self.capacity / 2**20:.4g}MiB {self.ways}-way {self.set_hash}"
        label += f" {self.fill}B fill" if self.fill else ""
        label += f" evict_last {self.last_ways} ways" if self.last_ways else ""
        return label + (f" {self.partitions} halves replicating" if self.replicate else "")

    def config(self) -> CacheConfig:
        """The cache geometry of this model."""
        return CacheConfig.of(
            self.capacity, ways=self.ways, set_hash=self.set_hash,
            partitions=self.partitions, replicate=self.replicate, fill=self.fill,
        )  # fmt: skip

    def with_policy(self, policy: str) -> Model:
        """The same geometry under another policy."""
        return replace(self, policy=policy)

    @classmethod
    def from_profile(cls, profile: dict) -> Model:
        """The L2 model of a GPU profile (``dsacache calibrate``)."""
        m = profile["l2_model"]
        return cls(m["policy"], int(m["capacity"]), int(m["ways"]), m["set_hash"],
                   fill=int(m["fill"]), last_ways=int(m.get("evict_last_ways", 0)))  # fmt: skip

    def profile_fields(self) -> dict:
        """The ``l2_model`` section of a GPU profile."""
        return {"policy": self.policy, "capacity": self.capacity, "ways": self.ways,
                "set_hash": self.set_hash, "fill": self.fill, "line": 128, "sector": 32,
                **({"evict_last_ways": self.last_ways} if self.last_ways else {})}  # fmt: skip

    def hints(self, levels: list[str]) -> str:
        """The ``hints`` policy giving each ``class=level`` of ``levels`` its priority, with
        this GPU's ways for evict_last lines when one is ``last``."""
        spec = "hints:" + ",".join(levels)
        if self.last_ways and takes_gpu_evict_last_ways(spec):
            spec += f",persist_ways={self.last_ways}"
        return spec


# The fitted models are the bundled GPU profiles (data/<gpu>/profile.json), which
# `dsacache calibrate --gpu GPU` writes from the bundled probes: the reuse curve fits the L2
# geometry, the gathers' DRAM bytes the fill unit, the kernel durations the memory times.
# H100: LRU 28 MiB, 16 ways, multiplicative `hash` index. H200 (L2 reports 60 MiB): LRU
# 33 MiB, 24 ways, pseudo-random `mix` index (docs/l2_model_search.md). On both, DRAM is read
# in 64-B units: the DRAM bytes of cold gathers of 656-B rows are 4.2% above their missed
# sectors x 32 B, and the 64-B count matches them to 0.2%.
def _bundled_fit(gpu: str) -> Model:

    return Model.from_profile(load_profile(bundled_profile(gpu)))


H100_FIT = _bundled_fit("h100")
H200_FIT = _bundled_fit("h200")
NAIVE = Model("lru", 50 * 2**20, 16, "mod")
NAIVE_H200 = Model("lru", 60 * 2**20, 16, "mod")
FITS = {"h100": H100_FIT, "h200": H200_FIT}
NAIVES = {"h100": NAIVE, "h200": NAIVE_H200}


def fitted(gpu: str) -> Model:
    """The L2 model fit to ``gpu``'s measured reuse curve."""
    if gpu not in FITS:
        raise DsacacheError(f"no calibrated L2 model for gpu {gpu!r}; have: {', '.join(FITS)}")
    return FITS[gpu]


def has_measurement(gpu: str, experiment: str) -> bool:
    """Whether ``data/<gpu>/l2-<experiment>.parquet`` is bundled."""
    return (DATA_DIR / gpu / f"l2-{experiment}.parquet").exists()


def simulate_reuse(sizes: list[int], model: Model) -> np.ndarray:
    """Second-read hit rate for each buffer size (flush, read, read again). The probe's
    256 MiB flush is modelled as a cache full of stale lines (``fill_with_stale_lines``,
    a quarter of the accesses): the flushed lines are never read again, so the two give the
    same hits under LRU and FIFO (not under random replacement, which may pick a probe line
    while stale ones remain)."""
    out = []
    for s in sizes:
        sim = _Sim(model)
        fill_with_stale_lines(sim.model, model.capacity)
        sim.stream(1, s)
        out.append(sim.stream(1, s))
    return np.array(out)


def simulate_twice(df: pd.DataFrame, model: Model) -> pd.DataFrame:
    """Hit rate and DRAM bytes of a ``twice`` measurement's gathers (columns ``role``,
    ``simulated``, ``simulated_dram_bytes``): the selection followed by itself in one
    gather, then two gathers of it. The model serves every repeat from the first read's
    fill, so ``together`` has the hits of ``first`` and ``second`` combined."""
    from dsacache.kernels.probes import dsa_selections

    args = probe_args(df)
    a, _ = dsa_selections(args.k, args.context, args.keep)
    rows = []
    for role, tokens in (("together", np.concatenate([a, a])), ("first", a), ("second", a)):
        if role != "second":  # the probe flushes before "together" and before "first"
            sim = _Sim(model)
            fill_with_stale_lines(sim.model, model.capacity)
        hit, dram = sim.gather(1, 2, tokens, args.row_bytes)
        rows.append({"role": role, "simulated": hit, "simulated_dram_bytes": dram})
    return pd.DataFrame(rows)


HINT_LEVEL = {"": "normal", "evict_first": "first", "evict_last": "last"}


def hint_policy(model: Model, evict: str) -> Model:
    """``model`` with a ``hints`` policy that gives the ``kv`` class the ``evict`` priority
    (the class the hint probe's first read is simulated in)."""
    if not evict:
        return model
    if model.policy != "lru":
        raise DsacacheError(f"the hint probe is modelled on an LRU model, not {model.policy!r}")
    return model.with_policy(model.hints([f"kv={HINT_LEVEL[evict]}"]))


def simulate_hint(df: pd.DataFrame, model: Model) -> pd.DataFrame:
    """Hit rate and DRAM bytes of the first (hinted) read, the other data and the second read
    for each (size, bytes between) of a ``hint`` measurement (columns ``bytes``,
    ``other_bytes``, ``role``, ``simulated``, ``simulated_dram_bytes``): the first read runs
    in the ``kv`` class under ``hint_policy``, the rest unhinted. All points share one cache
    and one buffer address, as on the GPU: the probe reads one buffer for every point of a
    size, and PyTorch's allocator handed the next size's buffer the same address (the H100's
    8 and 16 MiB first reads found the kept evict_last lines of the size before; 24 MiB, which
    did not, is the model's one miss there). Its flush (unhinted, as ``fill_with_stale_lines``)
    leaves the evict_last lines the GPU keeps in place."""
    args = probe_args(df)
    sim = _Sim(hint_policy(model, args.evict))
    rows = []
    for size, x in df[df["role"] == "second"][["bytes", "other_bytes"]].itertuples(index=False):
        fill_with_stale_lines(sim.model, model.capacity)  # the probe's flush (simulate_reuse)
        for role, buffer, nbytes, klass in (("first", 1, size, "kv"), ("between", 2, x, "index"),
                                            ("second", 1, size, "index")):  # fmt: skip
            if nbytes:
                hit = sim.stream(buffer, int(nbytes), klass=klass)
                rows.append({"bytes": nbytes if role == "between" else size, "other_bytes": x,
                             "role": role, "simulated": hit,
                             "simulated_dram_bytes": sim.dram_bytes})  # fmt: skip
    return pd.DataFrame(rows)


def simulate_beside(df: pd.DataFrame, model: Model) -> pd.DataFrame:
    """Hit rate and DRAM bytes of each launch of a ``beside`` measurement (columns ``role``,
    ``layer``, ``bytes``, ``other_bytes``, ``simulated``, ``simulated_dram_bytes``): per KV
    size, its KV buffer written (a new allocation per size, so no kept line of the size
    before is found again), the probe's flush, then per layer the normal buffer written, the
    layer's KV read in the ``kv`` class under ``hint_policy`` (``--kv-reads`` times), the
    normal buffer read back unhinted."""
    from dsacache.kernels.probes import BESIDE_KV_ROLES

    args = probe_args(df)
    kv_roles = BESIDE_KV_ROLES[: args.kv_reads]
    sim = _Sim(hint_policy(model, args.evict))
    beside = parse_size(args.beside)
    rows = []
    normal_buffer = 2
    for i, size in enumerate(parse_size(s) for s in args.sizes.split(",")):
        kv_buffer = 3 + i
        sim.stream(kv_buffer, args.layers * size, write=True)  # the probe's torch.rand
        fill_with_stale_lines(sim.model, model.capacity)
        for layer in range(args.layers):
            # layer rows of the normal buffer and of this size's KV, as the probe's tensors
            sim.stream(normal_buffer, beside, write=True, offset=layer * beside)
            for role, buffer, nbytes, other, klass in (
                *[(kv, kv_buffer, size, beside, "kv") for kv in kv_roles],
                ("normal", normal_buffer, beside, size, "index"),
            ):
                offset = layer * nbytes
                hit = sim.stream(buffer, nbytes, klass=klass, offset=offset)
                rows.append({"role": role, "layer": layer, "bytes": nbytes, "other_bytes": other,
                             "simulated": hit, "simulated_dram_bytes": sim.dram_bytes})  # fmt: skip
    return pd.DataFrame(rows)


def simulate_gather(df: pd.DataFrame, model: Model) -> pd.DataFrame:
    """Hit rate and DRAM bytes of the first (cold) and second gather for each bytes-between
    setting of a ``gather`` measurement (columns ``other_bytes``, ``role``, ``simulated``,
    ``simulated_dram_bytes``)."""
    from dsacache.kernels.probes import dsa_selections

    args = probe_args(df)
    a, b = dsa_selections(args.k, args.context, args.keep)
    row_bytes = args.row_bytes
    rows = []
    for x in sorted(df["other_bytes"].unique()):
        sim = _Sim(model)
        fill_with_stale_lines(sim.model, model.capacity)  # the probe's flush (simulate_reuse)
        hit, dram = sim.gather(1, 2, a, row_bytes)
        rows.append({"other_bytes": x, "role": "first", "simulated": hit,
                     "simulated_dram_bytes": dram})  # fmt: skip
        if x:
            sim.stream(3, int(x), write=True)  # torch.rand writes the buffer, then it is read
            sim.stream(3, int(x))
        hit, dram = sim.gather(1, 4, b, row_bytes)
        rows.append({"other_bytes": x, "role": "second", "simulated": hit,
                     "simulated_dram_bytes": dram})  # fmt: skip
    return pd.DataFrame(rows)


STALE_L2 = True  # the probes' L2 starts full of other data (see fill_with_stale_lines)


def fill_with_stale_lines(cache, capacity: int) -> None:
    """Fill ``cache`` with lines no probe address matches, at normal priority (the ``append``
    class, which no hint of the probes names): a GPU's L2 is never empty, and before the
    profiled steps the probe has just written its caches. Under LRU this changes nothing (a
    stale line is evicted exactly when an empty way would be filled), but under eviction
    hints it does: an ``evict_first`` line is then the first victim of the next fill in its
    set, instead of sitting in a way nobody else needed."""

    line = 128
    n = 2 * capacity // line  # sequential lines over twice the capacity
    addr = (1 << 44) + np.arange(n, dtype=np.int64) * line
    cls = np.full(n, CLASS_ID["append"], np.int8)
    counters = np.zeros((len(CLASSES), len(COUNTERS)), np.int64)
    cache.run_chunk(addr, np.full(n, line, np.int64), np.zeros(n, bool), cls,
                    np.zeros(n, np.int16), cls.astype(np.int64), counters)  # fmt: skip


def run_step(
    cache, chunk, as_weights: np.ndarray | None = None, counted_as: np.ndarray | None = None
) -> np.ndarray:
    """Counters ``[class, COUNTERS]`` of one step's accesses replayed through ``cache``. The
    accesses where ``as_weights`` is true carry the ``weights`` class for the policy (which the
    decode workloads have no other use for), so that a hint or a window can treat them apart
    (``kv_layers_from``, ``attention_query``); each access is counted under ``counted_as``
    (default: its own class; ``kernel_classes``)."""

    klass = chunk.cls.copy()
    if as_weights is not None:
        klass[as_weights] = CLASS_ID["weights"]
    counters = np.zeros((len(CLASSES), len(COUNTERS)), np.int64)
    bucket = chunk.cls if counted_as is None else counted_as
    write = np.isin(chunk.cls, [CLASS_ID[c] for c in WRITE_CLASSES])
    cache.run_chunk(chunk.addr, chunk.nbytes, write, klass, chunk.layer,
                    bucket.astype(np.int64), counters)  # fmt: skip
    return counters


def kv_layers_from(chunk, first: int) -> np.ndarray | None:
    """The KV reads of layers >= ``first`` (``--kv-first-from``); None when ``first`` < 0."""

    if first < 0:
        return None
    return (chunk.cls == CLASS_ID["kv"]) & (chunk.layer >= first)


def query_hint(args) -> str:
    """The L2 hint the attention kernel of a decode-step profile loads its query with: ""
    for ours, ``decode_step.FLASHMLA_QUERY_EVICT`` for FlashMLA (probes have no backend)."""
    from dsacache.kernels.decode_step import FLASHMLA_QUERY_EVICT

    return FLASHMLA_QUERY_EVICT if getattr(args, "backend", "") == "flashmla" else ""


def attention_query(chunk, amap) -> np.ndarray:
    """The attention kernel's query reads (``query`` class) of a chunk."""

    return (chunk.cls == CLASS_ID["query"]) & (chunk.addr >= amap.query_address("kv", 0))


def kernel_classes(chunk, amap) -> np.ndarray:
    """The class each access of ``chunk`` is counted under when compared with ncu, which counts
    a kernel's query among its reads: a ``query`` read under its kernel's class (the indexer's
    ``index``, the attention kernel's ``kv``). For the policy the query keeps its own class,
    loaded without the kernel's hints, as our kernels load it."""
    counted = chunk.cls.copy()
    query = chunk.cls == CLASS_ID["query"]
    counted[query] = np.where(
        attention_query(chunk, amap)[query], CLASS_ID["kv"], CLASS_ID["index"]
    )
    return counted


def simulate_decode(
    df: pd.DataFrame, model: Model, kv_first_from: int = -1, keep: float = 0.45
) -> pd.DataFrame:
    """Per (step, class) hit rates of the ``decode`` probe's trace replayed by dsacache.

    ``kv_first_from`` >= 0 mirrors the probe's per-layer hint: the KV gathers of those layers
    carry the ``weights`` traffic class, so a ``hints:...,weights=first`` policy marks them
    evict_first (the probe has no weights traffic; the class only carries the hint).
    """
    import tempfile

    from dsacache.kernels.probes import decode_config
    from dsacache.simulator.stream import build_step, plan_replay
    from dsacache.tracer.synth import synthesize
    from dsacache.traces import open_trace

    k = int(df["k"].iloc[0])
    layers = int(df["layer"].max()) + 1
    steps = int(df["step"].max()) + 1
    context = int(df[(df["role"] == "index") & (df["step"] == 0)]["bytes"].iloc[0]) // 132
    cfg = decode_config(layers, context, steps, k, keep)
    cache = make_model(model.config(), model.policy, layers)
    rows = []
    if STALE_L2:
        fill_with_stale_lines(cache, model.capacity)
    with tempfile.TemporaryDirectory() as tmp:
        trace = open_trace(synthesize(cfg, f"{tmp}/t.dsatrace"))
        amap = plan_replay(trace, Workload(layout="mla-fp8", classes=("index", "kv")))
        for step_rows in trace.iter_steps():
            chunk = build_step(amap, step_rows)
            counters = run_step(cache, chunk, kv_layers_from(chunk, kv_first_from))
            for role in ("index", "kv"):
                c = counters[CLASS_ID[role]]
                rows.append({"step": int(chunk.step[0]), "role": role, "simulated": c[3] / c[2],
                             "simulated_dram_bytes": c[7] * SECTOR_BYTES / layers})  # fmt: skip
    return pd.DataFrame(rows)


def reuse_points(reuse: pd.DataFrame) -> pd.DataFrame:
    """The second reads of a ``reuse`` measurement (columns ``bytes``, ``hit``), or a clear
    error for another file."""
    if probe_args(reuse).experiment != "reuse":
        raise DsacacheError("the L2 geometry is fit to a `dsacache probe reuse` measurement")
    second = reuse[reuse["role"] == "second"]
    return second.assign(hit=second[READ_HIT] / second[READ])


def fit_reuse(
    reuse: pd.DataFrame, capacities_mib=range(24, 41), ways=(8, 16, 24, 32), policies=("lru",),
    set_hashes=("hash", "mix"), progress: bool = False,
) -> pd.DataFrame:  # fmt: skip
    """Mean absolute error (points) of the simulated reuse curve for each candidate model
    (best first; columns ``model``, ``mae_points`` and the model's fields)."""
    second = reuse_points(reuse)
    grid = [(p, h, w, mib) for p in policies for h in set_hashes for w in ways
            for mib in capacities_mib]  # fmt: skip
    if not grid:
        raise DsacacheError("the L2 model search is empty: give capacities, ways and set hashes")
    if progress:
        from tqdm import tqdm

        grid = tqdm(grid, desc="fit L2 geometry", unit="model")
    rows = []
    for policy, set_hash, w, mib in grid:
        set_bytes = w * 128  # whole sets of 128-byte lines (24 ways: 3 KiB)
        whole_sets = int(mib * 2**20) // set_bytes * set_bytes
        model = Model(policy, whole_sets, w, set_hash)
        sim = simulate_reuse(second["bytes"].tolist(), model)
        err = np.abs(sim - second["hit"].to_numpy()).mean() * 100
        rows.append({"model": model.label, "mae_points": err, **model.profile_fields()})
    return pd.DataFrame(rows).sort_values("mae_points", kind="stable").reset_index(drop=True)


def fit_fill(gathers: list[pd.DataFrame], model: Model, fills=(32, 64, 128)) -> pd.DataFrame:
    """Median |simulated / measured - 1| (%) of the DRAM bytes of ``gather`` measurements for
    each fill unit (the bytes memory returns per missing sector's unit), best first."""
    rows = []
    for fill in fills:
        errs = []
        for m in gathers:
            meas = m[m["role"].isin(["first", "second"])]
            j = meas.merge(
                simulate_gather(m, replace(model, fill=fill)), on=["other_bytes", "role"]
            )
            if j.empty:
                raise DsacacheError("a gather measurement has no first/second gather rows to fit")
            errs += list(np.abs(j["simulated_dram_bytes"] / j[DRAM] - 1) * 100)
        rows.append({"fill": fill, "dram_error_pct": float(np.median(errs))})
    return pd.DataFrame(rows).sort_values("dram_error_pct", kind="stable").reset_index(drop=True)


MIN_LAST_GAIN_POINTS = 1.0  # fit_evict_last: DRAM error points a kept-ways count must gain


def fit_evict_last(hints: list[pd.DataFrame], model: Model) -> pd.DataFrame:
    """How many ways per set the GPU keeps evict_last lines in without a persisting set-aside,
    fit to ``dsacache probe hint --evict evict_last`` measurements: for each count from 0 to
    ``model.ways - 1``, the mean |simulated - measured| DRAM bytes of the probes' first and
    second reads, as points of the bytes read (column ``dram_error_points``), best first.
    DRAM bytes, not hit rates: a GH100 read from the far L2 half misses its near half even
    when the far copy is kept (half the kept lines' reads), which this unpartitioned model
    does not represent. A count that beats none by less than ``MIN_LAST_GAIN_POINTS`` ranks
    below none, so noise on a GPU that keeps nothing does not set a default."""
    rows = []
    for ways in range(model.ways):
        fit = replace(model, last_ways=ways)
        errors = []
        for df in hints:
            keys = ["bytes", "other_bytes", "role"]
            j = _measured(df.assign(hit=df[READ_HIT] / df[READ]), keys).merge(
                simulate_hint(df, fit), on=keys
            )
            errors.append((j["simulated_dram_bytes"] - j["measured_dram_bytes"]) / j["bytes"])
        rows.append({"evict_last_ways": ways,
                     "dram_error_points": 100 * float(np.abs(np.concatenate(errors)).mean())})  # fmt: skip
    out = pd.DataFrame(rows)
    none = out["dram_error_points"].iloc[0]
    out = out.sort_values("dram_error_points", kind="stable", ignore_index=True)
    if out["dram_error_points"].iloc[0] > none - MIN_LAST_GAIN_POINTS:  # no count gains enough
        out = pd.concat([out[out["evict_last_ways"] == 0], out[out["evict_last_ways"] > 0]],
                        ignore_index=True)  # fmt: skip
    return out


def hierarchy_coefficients(reuse: pd.DataFrame) -> dict[str, float]:
    """Memory-time coefficients from a ``reuse`` measurement's kernel durations: cold first
    reads give HBM latency and bandwidth (time = latency + bytes / bandwidth, least squares),
    second reads that hit > 95% give the L2 bandwidth (peer and remote levels cannot be
    measured on one GPU)."""
    m = reuse.assign(hit=reuse[READ_HIT] / reuse[READ])

    def line_fit(rows: pd.DataFrame, what: str) -> tuple[float, float]:
        x = rows["bytes"].to_numpy(float)
        t = rows["gpu__time_duration.sum"].to_numpy(float) * 1e-9
        if len(np.unique(x)) < 2:
            raise DsacacheError(f"the {what} time fit needs reads of two sizes or more")
        (latency, per_byte), *_ = np.linalg.lstsq(np.vstack([np.ones_like(x), x]).T, t, rcond=None)
        if not per_byte > 0:
            raise DsacacheError(f"the {what} times do not grow with the bytes read")
        return max(latency, 0.0), 1.0 / per_byte

    hbm_latency, hbm_bw = line_fit(m[m["role"] == "first"], "HBM (cold first reads)")
    l2_rows = m[(m["role"] == "second") & (m["hit"] > 0.95)]
    _, l2_bw = line_fit(l2_rows, "L2 (second reads that hit > 95%)")
    return {"hbm_latency_s": hbm_latency, "hbm_bandwidth": hbm_bw, "l2_bandwidth": l2_bw}


def _source(path: str | Path, m: pd.DataFrame) -> dict:
    first = m.iloc[0]
    return {"file": Path(path).name, "command": str(first.get("meta_command", "")),
            "date": str(first.get("meta_date", "")), "kernels": len(m)}  # fmt: skip


def calibrate(
    reuse_path: str | Path, gather_paths: list[str | Path] = (), *, capacities_mib=None,
    ways=(8, 16, 24, 32), set_hashes=("hash", "mix"), fills=(32, 64, 128),
    progress: bool = False, hint_paths: list[str | Path] = (),
) -> dict:  # fmt: skip
    """Fit a GPU profile to probe measurements: the L2 geometry (LRU; effective capacity,
    ways, set index) to the reuse curve, the fill unit to the gathers' DRAM bytes, the ways
    kept for evict_last lines to evict_last hint probes (``fit_evict_last``), the memory
    coefficients to the reuse kernels' durations. ``capacities_mib`` defaults to 40-70% of
    the L2 the GPU reports, in 1 MiB steps. Returns the profile (``presets.load_profile``'s
    format) with the fit's errors and the runner-up models."""
    from importlib.metadata import version

    reuse = read_measurement(reuse_path)
    sizes = len(reuse_points(reuse))  # a reuse probe, or a clear error
    gathers = [read_measurement(p) for p in gather_paths]
    for path, g in zip(gather_paths, gathers, strict=True):
        if probe_args(g).experiment != "gather":
            raise DsacacheError(f"{path}: the fill unit is fit to `dsacache probe gather` files")
    hints = [read_measurement(p) for p in hint_paths]
    for path, h in zip(hint_paths, hints, strict=True):
        args = probe_args(h)
        if args.experiment != "hint" or args.evict != "evict_last":
            raise DsacacheError(
                f"{path}: the evict_last ways are fit to `dsacache probe hint --evict evict_last` files"
            )
    if "meta_l2_bytes" not in reuse:
        raise DsacacheError(f"{reuse_path} lacks meta_l2_bytes (the L2 size the GPU reports)")
    first = reuse.iloc[0]
    l2_bytes = int(first["meta_l2_bytes"])
    if capacities_mib is None:
        mib = l2_bytes / 2**20
        capacities_mib = range(max(1, round(0.4 * mib)), max(1, round(0.7 * mib)) + 1)
    geometry = fit_reuse(reuse, capacities_mib, ways, ("lru",), set_hashes, progress=progress)
    best = geometry.iloc[0]
    model = Model("lru", int(best["capacity"]), int(best["ways"]), str(best["set_hash"]))
    fill_errors = fit_fill(gathers, model, fills) if gathers else None
    if fill_errors is not None:
        model = replace(model, fill=int(fill_errors["fill"].iloc[0]))
    last_errors = fit_evict_last(hints, model) if hints else None
    if last_errors is not None:
        model = replace(model, last_ways=int(last_errors["evict_last_ways"].iloc[0]))
    gpu = {key: (v.item() if hasattr(v, "item") else v) for key, v in first.items()
           if str(key).startswith("meta_") and key not in ("meta_command", "meta_date")}  # fmt: skip
    gpu = {key.removeprefix("meta_"): v for key, v in gpu.items()}
    gpu["name"] = gpu.pop("gpu", "unknown")
    gpu["l2_bytes"] = l2_bytes
    return {
        "format": PROFILE_FORMAT,
        "summary": f"{model.label}, fit to {sizes} reuse sizes "
        f"({best['mae_points']:.2f} points mean error) on {gpu['name']}",
        "gpu": gpu,
        "l2_model": model.profile_fields(),
        "hierarchy": hierarchy_coefficients(reuse),
        "fit": {
            "reuse_mae_points": float(best["mae_points"]),
            "runners_up": geometry.iloc[1:6][["model", "mae_points"]].to_dict("records"),
            "searched": {
                "policy": ["lru"],
                "capacity_mib": [int(min(capacities_mib)), int(max(capacities_mib))],
                "ways": [int(w) for w in ways],
                "set_hash": list(set_hashes),
                "fill": [int(f) for f in fills] if gathers else [],
            },
            "fill_dram_error_pct": None
            if fill_errors is None
            else {str(r.fill): r.dram_error_pct for r in fill_errors.itertuples()},
            "evict_last_dram_error_points": None
            if last_errors is None
            else {str(r.evict_last_ways): r.dram_error_points for r in last_errors.itertuples()},
        },  # fmt: skip
        "measurements": [_source(reuse_path, reuse)]
        + [_source(p, g) for p, g in zip(gather_paths, gathers, strict=True)]
        + [_source(p, h) for p, h in zip(hint_paths, hints, strict=True)],
        "dsacache": version("dsacache"),
    }


def command_args(m: pd.DataFrame, module: str):
    """The arguments after ``python -m dsacache.kernels.MODULE`` in a measurement's
    ``meta_command`` (a list of words), or ``None`` when it ran another program. An empty
    hint ("") did not survive joining the command: it is put back."""
    import shlex

    command = str(m["meta_command"].iloc[0]) if "meta_command" in m else ""
    try:
        words = shlex.split(command)
    except ValueError:
        words = []
    if f"dsacache.kernels.{module}" not in words:
        return None
    words = words[words.index(f"dsacache.kernels.{module}") + 1 :]
    for i in reversed(range(len(words))):
        if words[i] in ("--evict", "--index-evict", "--kv-evict") and (
            i + 1 == len(words) or words[i + 1].startswith("--")
        ):
            words.insert(i + 1, "")
    return words


def _parse(parser, words: list[str]):
    try:
        args, _ = parser.parse_known_args(words)
    except SystemExit:
        raise DsacacheError(f"cannot read the arguments back from {words!r}") from None
    return args


def probe_args(m: pd.DataFrame):
    """The ``dsacache.kernels.probes`` arguments a measurement was taken with, read back from
    its ``meta_command`` (``argparse.Namespace``)."""
    from dsacache.kernels.probes import parser

    words = command_args(m, "probes")
    if words is None:
        command = str(m["meta_command"].iloc[0]) if "meta_command" in m else ""
        raise DsacacheError(
            "not a probe measurement (its meta_command does not run dsacache.kernels.probes; "
            f"make one with `dsacache probe`): {command[:200]!r}"
        )
    return _parse(parser(), words)


def decode_policy(args, base: Model, l2_bytes: int) -> tuple[str, int]:
    """The policy that models a ``decode`` probe's hints on ``base``, and the first layer
    whose KV ``simulate_decode`` relabels (-1: none). Eviction hints become a ``hints``
    policy; ``--kv-first-from N`` marks the KV of layers >= N evict_first through the
    ``weights`` class; a persisting window over the first N layers' KV becomes ``persist``
    with the set-aside scaled from the physical L2 to the model's capacity."""
    query = query_hint(args)
    hinted = args.index_evict or args.kv_evict or args.kv_first_from >= 0 or query
    if args.persist_layers > 0 and hinted:
        raise DsacacheError(
            "a decode with a persisting window and eviction hints together (FlashMLA's query "
            "is loaded evict_first) has no model policy (persist or hints, not both)"
        )
    if args.persist_layers > 0:
        aside = parse_size(args.set_aside) * base.capacity // l2_bytes
        return (
            f"persist:window=kv,hit_ratio={args.hit_ratio},set_aside={aside}",
            args.persist_layers,
        )
    hints = [
        f"{cls}={HINT_LEVEL[h]}"
        for cls, h in (("index", args.index_evict), ("kv", args.kv_evict))
        if h
    ]
    if args.kv_first_from >= 0 and query:
        raise DsacacheError("--kv-first-from is a probe option; FlashMLA profiles cannot take it")
    if args.kv_first_from >= 0:
        hints.append("weights=first")  # those KV layers (kv_layers_from)
    elif query:
        hints.append(f"weights={HINT_LEVEL[query]}")  # the query (attention_query)
    return (base.hints(hints) if hints else base.policy), args.kv_first_from


def _measured(m: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A probe measurement's reads of its own buffers (every role but the other data
    streamed ``between``): ``keys``, ``measured`` (hit rate), ``measured_dram_bytes`` and
    ``measured_read_bytes``."""
    reads = m[m["role"] != "between"][[*keys, "hit", DRAM, READ]]
    reads = reads.assign(**{READ: reads[READ] * SECTOR_BYTES})
    return reads.rename(columns={"hit": "measured", DRAM: "measured_dram_bytes",
                                 READ: "measured_read_bytes"})  # fmt: skip


def _probe_rows(
    name: str, model: Model, joined: pd.DataFrame, point, policy: str | None = None
) -> list[dict]:
    """Compare rows of a probe: measured and simulated hit rate and DRAM bytes, one per row
    of ``joined``, named by ``point(row)``; ``policy``: the one simulated, if not the
    model's own (a hint probe's)."""
    return [
        {"experiment": name, "point": point(r), "model": model.label,
         "policy": policy or model.policy,
         "measured": r.measured, "simulated": r.simulated,
         "measured_dram_bytes": r.measured_dram_bytes,
         "simulated_dram_bytes": r.simulated_dram_bytes,
         "measured_read_bytes": r.measured_read_bytes}
        for r in joined.itertuples()
    ]  # fmt: skip


def compare_measurement(name: str, m: pd.DataFrame, models: tuple[Model, ...]) -> list[dict]:
    """Measured vs simulated rows of one probe measurement (``dsacache probe``'s output, with
    its ``hit`` column), for each model: decode steps per (step, role), gathers per (role,
    bytes between), reuse per size (second reads)."""
    args = probe_args(m)
    rows = []
    if args.experiment == "reuse":
        second = m[m["role"] == "second"]
        for model in models:
            sim = simulate_reuse(second["bytes"].tolist(), model)
            rows += [
                {"experiment": name, "point": f"second read, {b / 2**20:g} MiB",
                 "model": model.label, "policy": model.policy, "measured": hit, "simulated": s}
                for b, hit, s in zip(second["bytes"], second["hit"], sim, strict=True)
            ]  # fmt: skip
        return rows
    if args.experiment == "hint":
        meas = _measured(m, ["bytes", "other_bytes", "role"])
        for model in models:
            j = meas.merge(simulate_hint(m, model), on=["bytes", "other_bytes", "role"])
            rows += _probe_rows(
                name, model, j,
                lambda r: f"{r.role} read, {r.bytes / 2**20:g} MiB {args.evict or 'unhinted'}, "
                f"{r.other_bytes / 2**20:g} MiB between",
                policy=hint_policy(model, args.evict).policy,
            )  # fmt: skip
        return rows
    if args.experiment == "beside":
        meas = _measured(m, ["role", "layer", "bytes", "other_bytes"])
        for model in models:
            j = meas.merge(simulate_beside(m, model), on=["role", "layer", "bytes", "other_bytes"])
            kv_bytes = j["bytes"].where(j["role"] != "normal", j["other_bytes"])
            rows += _probe_rows(
                name, model, j.assign(kv_bytes=kv_bytes),
                lambda r: f"layer {r.layer} {r.role} read, {r.kv_bytes / 2**20:g} MiB "
                f"{args.evict or 'unhinted'} KV per layer",
                policy=hint_policy(model, args.evict).policy,
            )  # fmt: skip
        return rows
    if args.experiment == "twice":
        meas = _measured(m, ["role"])
        for model in models:
            j = meas.merge(simulate_twice(m, model), on="role")
            rows += _probe_rows(name, model, j, lambda r: f"{r.role} ({args.k} rows read twice)")
        return rows
    if args.experiment == "gather":
        meas = _measured(m, ["other_bytes", "role"])
        for model in models:
            j = meas.merge(simulate_gather(m, model), on=["other_bytes", "role"])
            rows += _probe_rows(
                name, model, j, lambda r: f"{r.role} gather, {r.other_bytes / 2**20:g} MiB between"
            )
        return rows
    meas = m.groupby(["step", "role"]).agg(measured=("hit", "mean"), measured_dram_bytes=(DRAM, "mean"),
                                           measured_read_bytes=(READ, "mean")).reset_index()  # fmt: skip
    meas["measured_read_bytes"] *= SECTOR_BYTES
    for base in models:
        policy, first_from = decode_policy(args, base, int(m["meta_l2_bytes"].iloc[0]))
        model = base.with_policy(policy)
        j = meas.merge(simulate_decode(m, model, first_from, args.keep), on=["step", "role"])
        rows += [
            {"experiment": name, "point": f"step {r.step} {r.role}", "model": base.label,
             "policy": model.policy, "measured": r.measured, "simulated": r.simulated,
             "measured_dram_bytes": r.measured_dram_bytes,
             "simulated_dram_bytes": r.simulated_dram_bytes,
             "measured_read_bytes": r.measured_read_bytes}
            for r in j.itertuples()
        ]  # fmt: skip
    return rows


def _errors(rows: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame(rows)
    for col in ("measured_dram_bytes", "simulated_dram_bytes", "measured_read_bytes"):
        if col not in out:
            out[col] = np.nan
    out["error_points"] = (out["simulated"] - out["measured"]) * 100
    dram_diff = out["simulated_dram_bytes"] - out["measured_dram_bytes"]
    out["dram_error_pct"] = (dram_diff / out["measured_dram_bytes"]) * 100
    # relative to the bytes read through the L2: stays meaningful where DRAM reads are ~0
    out["dram_error_points"] = (dram_diff / out["measured_read_bytes"]) * 100
    return out


def compare(
    gpu: str = "h100", models: tuple[Model, ...] | None = None, threads: int | None = None
) -> pd.DataFrame:
    """Measured vs simulated hit rates and DRAM bytes read on the DSA-shaped measurements
    bundled for ``gpu`` (every probe but ``reuse``, which the fit used; the profiled decode
    kernels are ``compare_files(kernel_measurements(gpu))``), one row per (experiment,
    point, model): columns ``measured``, ``simulated``, ``error_points`` (hit rates) and
    ``measured_dram_bytes``, ``simulated_dram_bytes``, ``dram_error_pct`` (NaN where not
    compared). ``models`` defaults to the naive model (the reported L2 size, modulo sets) and
    the GPU's fitted one. ``threads``: measurements simulated at once (default: the CPU count;
    the replay loops run without the GIL)."""
    measured_gpus = sorted(p.name for p in DATA_DIR.iterdir() if any(p.glob("l2-*.parquet")))
    if gpu not in measured_gpus:
        raise DsacacheError(
            f"no bundled measurements for gpu {gpu!r}; measured: {', '.join(measured_gpus)}"
        )
    if models is None:
        models = (NAIVES[gpu], fitted(gpu)) if gpu in FITS else (NAIVE,)
    names = [p.stem[len("l2-") :] for p in sorted((DATA_DIR / gpu).glob("l2-*.parquet"))]
    names = [n for n in names if n != "reuse"]
    with ThreadPoolExecutor(threads or os.cpu_count() or 1, "dsacache-compare") as pool:
        parts = pool.map(lambda n: compare_measurement(n, measured(gpu, n), models), names)
        return _errors([row for part in parts for row in part])


def gpu_of(m: pd.DataFrame) -> str:
    """The calibrated GPU a measurement was taken on (``h100``, ``h200``), from its metadata."""
    name = str(m["meta_gpu"].iloc[0]) if "meta_gpu" in m else "unknown"
    for key in FITS:
        if re.search(rf"\b{key}\b", name.lower()):  # "H200", not "GH200"
            return key
    raise DsacacheError(
        f"no calibrated L2 model for {name!r}; pick one with --gpu ({', '.join(FITS)})"
    )


def read_measurement(path: str | Path) -> pd.DataFrame:
    """A measurement file (Parquet or CSV), or a clear error."""
    try:
        return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise DsacacheError(f"cannot read measurement {path}: {e}") from None


def compare_files(paths: list[str], gpu: str | None = None) -> pd.DataFrame:
    """``compare`` for measurement files: ``dsacache probe`` outputs, and ``dsacache profile``
    runs of the decode-step driver (one per file, or several told apart by a ``config``
    column). Each is simulated with the fitted model of ``gpu``, or of the GPU its metadata
    names."""
    rows = []
    for path in paths:
        m = read_measurement(path)
        missing = {READ, READ_HIT, DRAM, "meta_command"} - set(m.columns)
        if missing:
            raise DsacacheError(
                f"{path} lacks the columns {', '.join(sorted(missing))}: not a `dsacache probe` "
                "or `dsacache profile` measurement"
            )
        model = fitted(gpu or gpu_of(m))
        if "Kernel Name" in m and command_args(m, "decode_step") is not None:
            configs = m.groupby("config", sort=True) if "config" in m else [(Path(path).stem, m)]
            for name, part in configs:
                rows += compare_decode_step(str(name), part.reset_index(drop=True), (model,))
            continue
        if not {"role", "bytes"} <= set(m.columns):
            raise DsacacheError(
                f"{path} lacks the columns bytes, role: not a `dsacache probe` measurement (nor "
                "a profile of python -m dsacache.kernels.decode_step)"
            )
        m["hit"] = m[READ_HIT] / m[READ]
        try:
            rows += compare_measurement(Path(path).stem, m, (model,))
        except KeyError as e:
            raise DsacacheError(
                f"{path} lacks the column {e}: not a `dsacache probe` file"
            ) from None
    return _errors(rows)


def kernel_measurements(gpu: str) -> list[Path]:
    """The bundled profiles of the decode-step driver for ``gpu`` (``decode-steps*.parquet``)."""
    return sorted((DATA_DIR / gpu).glob("decode-steps*.parquet"))


def fit_hierarchy(gpu: str = "h100"):
    """The memory-time coefficients of ``gpu``'s bundled profile (``hierarchy_coefficients``
    of its reuse probe) as a ``Hierarchy``."""
    from dsacache.simulator.replay import Hierarchy

    return Hierarchy.for_gpu(gpu_preset(gpu + "-calibrated"))


# ---- the decode-step driver under ncu (kernels/decode_step.py, `dsacache profile`) -----------
STEP_KERNELS = (  # (class, pattern of the kernel's name): the launches a profile is read from
    ("index", "dsa_indexer_logits"),
    ("kv", "dsa_mla_sparse_decode|dsa_gqa_sparse_decode|flash_fwd_splitkv_mla"),
)


def driver_args(m: pd.DataFrame):
    """The ``dsacache.kernels.decode_step`` arguments a profile was taken with, read back from
    its ``meta_command``, or ``None`` when the file profiled another program."""
    from dsacache.kernels.decode_step import parser

    words = command_args(m, "decode_step")
    if words is None:
        return None
    args = _parse(parser(), words)
    args.kv_first_from = -1  # a probe option decode_policy reads; the driver has none
    return args


def measured_steps(m: pd.DataFrame, layers: int) -> pd.DataFrame:
    """Per (step, class): the ncu read sectors, hits and DRAM bytes of a decode-step profile's
    indexer (``index``) and sparse attention (``kv``) launches; launch n of a class is layer
    ``n % layers`` of step ``n // layers``."""
    parts = []
    for cls, pattern in STEP_KERNELS:
        k = m[m["Kernel Name"].astype(str).str.contains(pattern)].reset_index(drop=True)
        k = k.assign(step=np.arange(len(k)) // layers, role=cls)
        parts.append(k.groupby(["step", "role"])[[READ, READ_HIT, DRAM]].sum().reset_index())
    return pd.concat(parts, ignore_index=True)


def simulate_steps(args, model: Model, first_from: int, sms: int) -> tuple[pd.DataFrame, int]:
    """Per (step, class) simulated sectors, hits and DRAM bytes of the driver's workload: the
    same trace (bundled, or regenerated from its ``synth:`` spec), layout, batch, page order,
    layers and steps, with the attention kernel's tiling (``with_kernel_tiling``), each
    kernel's query (the ``query`` class, counted in its kernel's class: ``kernel_classes``)
    and the split-K partials it writes on a GPU of ``sms`` SMs (``partials``, compared in no
    class); ``first_from`` as in ``run_step``. Returns the rows and the number of layers run."""
    import tempfile

    from dsacache.kernels.decode_step import INDEX_HEADS, with_kernel_tiling
    from dsacache.simulator.stream import build_step, plan_replay
    from dsacache.tracer.synth import materialize
    from dsacache.traces import open_trace

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trace = open_trace(materialize(args.trace, tmp))
        except DsacacheError as e:
            raise DsacacheError(
                f"cannot re-simulate the profiled decode: its trace is not here ({e}); profile "
                "a bundled trace or a synth:PRESET:KNOB=VALUE,... spec"
            ) from None
        wl = Workload(
            layout=args.layout,
            batch=args.batch,
            page_order=args.page_order,
            seed=args.seed,
            classes=("index", "kv", "query", "partials"),
            heads=args.heads or int(trace.model.get("heads", 128)),
            index_heads=INDEX_HEADS,
        )
        wl = with_kernel_tiling(wl, trace, args.backend, sms)
        amap = plan_replay(trace, wl)
        layers = min(amap.layers, args.layers or amap.layers)
        cache = make_model(model.config(), model.policy, layers)
        if STALE_L2:
            fill_with_stale_lines(cache, model.capacity)
        for n, step_rows in enumerate(trace.iter_steps()):
            if args.steps is not None and n >= args.steps:
                break
            keep = (step_rows.request < args.batch) & (step_rows.layer < layers)
            chunk = build_step(amap, step_rows.take(np.flatnonzero(keep)))
            apart = kv_layers_from(chunk, first_from)
            if query_hint(args):  # the policy gives the weights class the query's hint
                query = attention_query(chunk, amap)
                apart = query if apart is None else apart | query
            counters = run_step(cache, chunk, apart, kernel_classes(chunk, amap))
            for role in ("index", "kv"):
                c = counters[CLASS_ID[role]]
                rows.append({"step": n, "role": role, "sim_sectors": c[2], "sim_hits": c[3],
                             "simulated_dram_bytes": c[7] * 32})  # fmt: skip
    return pd.DataFrame(rows), layers


def compare_decode_step(name: str, m: pd.DataFrame, models: tuple[Model, ...]) -> list[dict]:
    """Measured vs simulated rows of one decode-step profile, per (step, class).

    ncu counts every sector a kernel reads, also the small reads that every program repeats
    (its query again, head weights, page-table rows, the selection) and that hit; the model
    streams the keys, the KV and one read of each query. The measured hit rate compared is
    therefore that of the modelled reads: ``(hits - extra) / (reads - extra)`` with
    ``extra = reads - simulated sectors`` (taken as hits; ``raw_measured`` keeps ncu's own
    rate)."""
    args = driver_args(m)
    for col in ("meta_l2_bytes", "meta_sms"):  # the L2 and SM count of the GPU profiled
        if col not in m:
            raise DsacacheError(f"profile {name} lacks {col}: profile it again (dsacache profile)")
    sms = int(m["meta_sms"].iloc[0])
    rows = []
    for base in models:
        policy, first_from = decode_policy(args, base, int(m["meta_l2_bytes"].iloc[0]))
        model = base.with_policy(policy)
        sim, layers = simulate_steps(args, model, first_from, sms)
        j = measured_steps(m, layers).merge(sim, on=["step", "role"])
        extra = np.maximum(j[READ] - j["sim_sectors"], 0)
        j["measured"] = ((j[READ_HIT] - extra) / (j[READ] - extra)).clip(0, 1)
        rows += [
            {"experiment": name, "point": f"step {r['step']} {r['role']}", "model": base.label,
             "policy": model.policy, "measured": r["measured"],
             "simulated": r["sim_hits"] / r["sim_sectors"], "raw_measured": r[READ_HIT] / r[READ],
             "measured_dram_bytes": r[DRAM], "simulated_dram_bytes": r["simulated_dram_bytes"],
             "measured_read_bytes": r[READ] * SECTOR_BYTES}
            for r in j.to_dict("records")
        ]  # fmt: skip
    return rows


# ---- route-vs-fetch terms measured on one GPU (kernels/route_calibrate.py) ------------------
def fit_terms(df: pd.DataFrame) -> pd.DataFrame:
    """Least-squares ``seconds = intercept + slope * n`` per term over the median of trials."""
    med = df[df.role == "fit"].groupby(["term", "n"], as_index=False)["seconds"].median()
    out = []
    for term, g in med.groupby("term"):
        slope, intercept = np.polyfit(g.n.to_numpy(float), g.seconds.to_numpy(), 1)
        pred = intercept + slope * g.n
        rel = float(np.median(np.abs(pred - g.seconds) / g.seconds))
        out.append(dict(term=term, intercept_s=intercept, per_unit_s=slope, median_rel_err=rel))
    return pd.DataFrame(out)


# A composite path is the sum of these fitted terms (route_local attends twice, then merges).
ROUTE_PATHS = {
    "fetch_local": (("gather", 1), ("copy_d2d", 1), ("attend", 1)),
    "route_local": (("attend", 2), ("merge@2", 1)),
}


def predict_term(df: pd.DataFrame, term: str, n: float, how: str = "table") -> float:
    """Seconds of one term at ``n`` tokens (or partials): ``table`` interpolates linearly
    between the measured medians (the kernel's split-K plan makes attend piecewise linear);
    ``linear`` uses the least-squares line of :func:`fit_terms`."""
    med = df[(df.role == "fit") & (df.term == term)].groupby("n")["seconds"].median()
    if med.empty:
        raise ValueError(f"no measurement of term {term!r}; have {sorted(set(df.term))}")
    if how == "table":
        return float(np.interp(n, med.index.to_numpy(float), med.to_numpy()))
    slope, intercept = np.polyfit(med.index.to_numpy(float), med.to_numpy(), 1)
    return float(intercept + slope * n)


def check_paths(df: pd.DataFrame, how: str = "table") -> pd.DataFrame:
    """Measured vs predicted (sum of the terms of :data:`ROUTE_PATHS`) time of the composite paths,
    at token counts that no term was measured at."""
    med = df[df.role == "check"].groupby(["term", "n"], as_index=False)["seconds"].median()
    rows = []
    for r in med.itertuples():
        pred = sum(
            times * predict_term(df, "merge", 2, how)
            if term == "merge@2"
            else times * predict_term(df, term, r.n, how)
            for term, times in ROUTE_PATHS[r.term]
        )
        rows.append(dict(path=r.term, n=r.n, measured_s=r.seconds, predicted_s=pred,
                         error=(pred - r.seconds) / r.seconds, how=how))  # fmt: skip
    return pd.DataFrame(rows)


def route_coefficients(gpu: str = "h200") -> dict[str, float]:
    """Cost-model coefficients (``routefetch.CostModel`` override keys) measured on ``gpu``'s
    bundled route calibration: per-token move (gather) and compute (sparse MLA attend, 128
    heads) from the least-squares lines, the attend's fixed cost as the launch, the merge of
    two partials, and the PCIe link from pinned host copies (the mean of both directions)."""
    path = DATA_DIR / gpu / "route-calibration.parquet"
    if not path.exists():
        have = sorted(p.parent.name for p in DATA_DIR.glob("*/route-calibration.parquet"))
        raise DsacacheError(
            f"no route calibration for gpu {gpu!r}; measured: {', '.join(have) or 'none'}"
        )
    df = pd.read_parquet(path)
    terms = fit_terms(df).set_index("term")
    attend = df[df["term"] == "attend"].iloc[0]
    bytes_per_token = float(attend["bytes"] / attend["n"])
    copies = terms.loc[["copy_d2h", "copy_h2d"]]
    return {
        "move_s_per_token": float(terms.at["gather", "per_unit_s"]),
        "compute_s_per_token": float(terms.at["attend", "per_unit_s"]),
        "launch_s": float(terms.at["attend", "intercept_s"]),
        "merge_s": predict_term(df, "merge", 2),
        "pcie.probe_s": float(copies["intercept_s"].mean()),
        "pcie.bandwidth": bytes_per_token / float(copies["per_unit_s"].mean()),
    }
