"""GPU last-level-cache presets.

Only facts read off a real device are marked ``verified``; associativity and the set hash of
NVIDIA's L2 are not published, so they are modelling assumptions until calibrated against
measured hit rates (the compare issue).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsacache.errors import DsacacheError
from dsacache.simulator.engine import CacheConfig


@dataclass(frozen=True)
class GPUPreset:
    """A GPU's L2 geometry and memory-side coefficients."""

    name: str
    l2_bytes: int
    ways: int
    partitions: int
    hbm_bandwidth: float  # bytes/s
    l2_bandwidth: float  # bytes/s
    hbm_latency: float  # s, one exposed round trip per kernel
    verified: str  # which fields were measured, and where
    line: int = 128
    sector: int = 32
    fill: int = 0  # bytes the memory behind the L2 returns per miss unit; 0: one sector

    def cache(self, size: int | None = None, **overrides) -> CacheConfig:
        """The L2 as a ``CacheConfig`` (optionally resized, e.g. to its effective capacity)."""
        kw = dict(ways=self.ways, line=self.line, sector=self.sector, partitions=self.partitions,
                  fill=self.fill)  # fmt: skip
        kw.update(overrides)
        return CacheConfig.of(size or self.l2_bytes, **kw)


PRESETS = {
    "h100": GPUPreset(
        "NVIDIA H100 80GB HBM3 (SXM)",
        l2_bytes=52_428_800,
        ways=16,
        partitions=2,
        hbm_bandwidth=3.35e12,
        l2_bandwidth=10.0e12,
        hbm_latency=0.8e-6,
        fill=64,
        verified="L2 size read on the lent H100 (torch / NVML); DRAM read in 64-B units "
        "(ncu, dsacache/data/h100/l2-gather); ways, hash and bandwidths assumed",
    ),
    "h200": GPUPreset(
        "NVIDIA H200 (SXM)",
        l2_bytes=62_914_560,
        ways=16,
        partitions=2,
        hbm_bandwidth=4.8e12,
        l2_bandwidth=10.0e12,
        hbm_latency=0.8e-6,
        fill=64,
        verified="L2 size read on the lent H200 (torch / NVML); DRAM read in 64-B units "
        "(ncu, dsacache/data/h200/l2-gather-rows-*); ways, hash and bandwidths assumed",
    ),
    "a100": GPUPreset(
        "NVIDIA A100 (SXM)",
        l2_bytes=41_943_040,
        ways=16,
        partitions=2,
        hbm_bandwidth=2.0e12,
        l2_bandwidth=5.0e12,
        hbm_latency=0.9e-6,
        verified="unverified: datasheet values; calibrate before trusting",
    ),
}


def gpu_preset(name: str) -> GPUPreset:
    """Look up a preset by short name (``h100``, ``h200``, ``a100``)."""
    key = name.lower()
    if key not in PRESETS:
        raise DsacacheError(f"unknown GPU preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]
