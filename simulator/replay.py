"""Replay a trace through one or more caches in a single pass over its access stream."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd

from dsacache.background import read_ahead
from dsacache.errors import DsacacheError
from dsacache.simulator.caches import make_model
from dsacache.simulator.engine import CacheConfig, next_use
from dsacache.simulator.presets import GPUPreset, gpu_preset
from dsacache.simulator.reference import COUNTERS
from dsacache.simulator.stream import iter_stream, plan_replay
from dsacache.simulator.workload import CLASSES, TIERS, WRITE_CLASSES, Workload
from dsacache.traces import Trace

RESULT_COLUMNS = (
    "policy",
    "step",
    "layer",
    "class",
    "tier",
    *COUNTERS,
    "line_misses",
    "bytes_from_memory",
    "time_s",
)


@dataclass(frozen=True)
class Level:
    """A memory level behind the cache: a fixed latency plus bytes over a bandwidth."""

    latency_s: float
    bandwidth: float  # bytes/s


@dataclass(frozen=True)
class Hierarchy:
    """Cost coefficients of the L2 and the levels behind it (measured by ``calibrate``).

    The time of one (step, layer, class) row is: L2-served bytes / L2 bandwidth, plus for the
    tier that serves its misses, that tier's latency (once, if anything missed) plus missed
    bytes / its bandwidth. Kernels of a step run one after another, so rows add up.
    """

    l2_bandwidth: float
    levels: dict[str, Level] = field(default_factory=dict)

    @classmethod
    def for_gpu(cls, gpu: GPUPreset) -> Hierarchy:
        return cls(
            gpu.l2_bandwidth,
            {
                "hbm": Level(gpu.hbm_latency, gpu.hbm_bandwidth),
                "peer": Level(3e-6, 150e9),  # NVLink small transfers are issue-limited (Ma et al.)
                "remote": Level(16e-6, 25e9),  # InfiniBand probe ~16 us, ~25 GB/s (Ma et al.)
            },
        )

    def time(self, df: pd.DataFrame, sector: int) -> np.ndarray:
        """Estimated seconds of each result row."""
        hit_bytes = df["sector_hits"].to_numpy() * sector
        miss_bytes = df["fetched_sectors"].to_numpy() * sector
        t = hit_bytes / self.l2_bandwidth
        tiers = df["tier"].to_numpy()
        for name, level in self.levels.items():
            mine = tiers == name
            t = t + np.where(
                mine, miss_bytes / level.bandwidth + (miss_bytes > 0) * level.latency_s, 0
            )
        return t


def replay(
    trace: Trace,
    *,
    policies: Sequence[str] = ("lru",),
    gpu: str = "h100",
    cache_size: int | str | None = None,
    ways: int | None = None,
    set_hash: str | None = None,
    workload: Workload | None = None,
    hierarchy: Hierarchy | None = None,
    progress: bool = False,
    replicate: bool = False,
    fill: int | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Replay ``trace`` through the GPU's L2 under each policy; one row per (policy, step,
    layer, class, tier) with the counters of ``RESULT_COLUMNS``. ``gpu`` is a preset name, a
    bundled calibrated profile (``h200-calibrated``) or a profile file (``dsacache
    calibrate``); ``cache_size``, ``ways``, ``set_hash`` and ``fill`` override its L2
    geometry (default: the preset's). ``replicate``: the L2's
    partitions keep near copies of far reads (``CacheConfig.replicate``); ``fill``: bytes the
    memory returns per miss unit (``CacheConfig.fill``; default the GPU preset's).
    ``threads``: policies replayed at once, each step (default: one per policy, up to the
    CPU count; the replay loops run without the GIL)."""
    if not policies:
        raise DsacacheError("replay needs at least one policy")
    if threads is not None and threads < 1:
        raise DsacacheError(f"threads must be >= 1, got {threads}")
    preset = gpu_preset(gpu)
    overrides: dict = {"replicate": replicate}
    if set_hash is not None:
        overrides["set_hash"] = set_hash
    if ways is not None:
        overrides["ways"] = ways
    if fill is not None:
        overrides["fill"] = fill
    config: CacheConfig = preset.cache(cache_size, **overrides)
    workload = workload or Workload()
    amap = plan_replay(trace, workload)
    caches = [make_model(config, preset.policy(p, config.ways), amap.layers) for p in policies]
    labels = [c.policy.label for c in caches]
    if len(set(labels)) != len(labels):
        raise DsacacheError(f"policies given twice: {', '.join(labels)}")
    hierarchy = hierarchy or Hierarchy.for_gpu(preset)
    n_cls, n_tier = len(CLASSES), len(TIERS)
    n_buckets = amap.layers * n_cls * n_tier
    write_cls = np.array([c in WRITE_CLASSES for c in CLASSES])
    frames: list[dict[str, np.ndarray]] = []
    chunks = iter_stream(trace, amap)
    futures = [None] * len(caches)
    if any(c.needs_future for c in caches):
        # Offline policies read the whole stream's future: build it up front (memory grows
        # with the trace, about 30 bytes per access).
        chunks = list(chunks)
        futures = [_futures(c, chunks) if c.needs_future else None for c in caches]
    else:  # the next step's stream is built while the replay loops (nogil) run this one's
        chunks = read_ahead(chunks)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="replay", unit="step")

    def run(cache, future, chunk, bucket, is_write) -> np.ndarray:
        counters = np.zeros((n_buckets, len(COUNTERS)), np.int64)
        cache.run_chunk(
            chunk.addr,
            chunk.nbytes,
            is_write,
            chunk.cls,
            chunk.layer,
            bucket,
            counters,
            future,
            score=chunk.score,
        )
        return counters

    # Each policy's cache replays the step in its own thread: the replay loops release the GIL
    threads = min(len(caches), os.cpu_count() or 1) if threads is None else threads
    with ThreadPoolExecutor(threads, "dsacache-replay") as pool:
        map_ = pool.map if threads > 1 else map
        for i, chunk in enumerate(chunks):
            if not len(chunk):
                continue
            bucket = (chunk.layer.astype(np.int64) * n_cls + chunk.cls) * n_tier + chunk.tier
            is_write = write_cls[chunk.cls]
            job = partial(run, chunk=chunk, bucket=bucket, is_write=is_write)
            step_futures = [None if f is None else f[i] for f in futures]
            for counters, label in zip(map_(job, caches, step_futures), labels, strict=True):
                used = np.flatnonzero(counters.any(axis=1))
                layer, rest = np.divmod(used, n_cls * n_tier)
                cls, tier = np.divmod(rest, n_tier)
                frame = {name: counters[used, i] for i, name in enumerate(COUNTERS)}
                frame.update(
                    policy=np.full(len(used), label, object),
                    step=np.full(len(used), int(chunk.step[0]), np.int32),
                    layer=layer.astype(np.int16),
                    cls=cls,
                    tier=tier,
                )
                frames.append(frame)
    if not frames:
        raise DsacacheError(f"{trace.path}: no rows for requests 0..{workload.batch - 1}")
    cat = {k: np.concatenate([f[k] for f in frames]) for k in frames[0]}
    df = pd.DataFrame(
        {
            "policy": pd.Categorical(cat["policy"], categories=labels),
            "step": cat["step"],
            "layer": cat["layer"],
            "class": pd.Categorical.from_codes(cat["cls"], categories=list(CLASSES)),
            "tier": pd.Categorical.from_codes(cat["tier"], categories=list(TIERS)),
            **{name: cat[name] for name in COUNTERS},
        }
    )
    df["line_misses"] = df["accesses"] - df["line_hits"]
    df["bytes_from_memory"] = df["fetched_sectors"] * config.sector
    df["time_s"] = hierarchy.time(df, config.sector)
    df.attrs.update(
        cache_bytes=config.size,
        ways=config.ways,
        set_hash=config.set_hash,
        gpu=gpu,
        layout=amap.layout.spec,
        batch=workload.batch,
        classes=",".join(workload.classes),
        page_order=workload.page_order,
        reads_per_token=workload.reads_per_token,
        kv_loads=[list(load) for load in workload.kv_loads],
        query_reads=workload.query_reads,
        query_bytes=[amap.index_query_bytes, amap.kv_query_bytes],  # per request: index, kv
        trace=str(trace.path),
    )
    return df


def _futures(model, chunks: list) -> list[np.ndarray]:
    """Next-use positions for ``model``'s keys over the whole stream, split per chunk."""
    keys = [model.future_keys(c.addr, c.nbytes, c.cls) for c in chunks]
    whole = next_use(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    return np.split(whole, np.cumsum([len(k) for k in keys])[:-1])


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per policy: sector hit rates (all reads and KV gathers only), bytes from memory
    and estimated memory time per decode step."""
    reads = df[~df["class"].isin(list(WRITE_CLASSES))]
    kv = df[df["class"] == "kv"]
    steps = df.groupby("policy", observed=True)["step"].nunique()
    g = reads.groupby("policy", observed=True)
    gk = kv.groupby("policy", observed=True)
    out = pd.DataFrame(
        {
            "hit_rate": g["sector_hits"].sum() / g["sectors"].sum(),
            "kv_hit_rate": gk["sector_hits"].sum() / gk["sectors"].sum(),
            "kv_line_hit_rate": gk["line_hits"].sum() / gk["accesses"].sum(),
            "MB_from_memory_per_step": g["bytes_from_memory"].sum() / steps / 1e6,
            "memory_ms_per_step": df.groupby("policy", observed=True)["time_s"].sum() / steps * 1e3,
        }
    )
    out.index.name = "policy"
    return out
