"""GPU last-level-cache presets.

Only facts read off a real device are marked ``verified``; associativity and the set hash of
NVIDIA's L2 are not published, so they are modelling assumptions until calibrated against
measured hit rates. ``dsacache calibrate`` fits them to known-answer probes and saves a GPU
profile (JSON); ``gpu_preset`` takes such a file's path, or ``NAME-calibrated`` for the
profile bundled with dsacache (``dsacache/data/NAME/profile.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

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
    set_hash: str = "mod"  # engine.SET_HASHES
    reported_l2_bytes: int | None = None  # calibrated presets: the L2 the GPU reports
    evict_last_ways: int = 0  # ways per set where evict_last lines keep priority unasked
    sms: int = 0  # streaming multiprocessors (sizes the kernels' split-K plans); 0: unknown

    def policy(self, spec: Any, ways: int | None = None) -> Any:
        """The policy ``spec`` as this GPU runs it: a ``hints`` policy with an evict_last level
        keeps evict_last lines in the ways this L2 gives them without a persisting set-aside
        (``persist_ways``), unless the spec names its own or the cache's ``ways`` differ from
        the preset's (the fitted count belongs to the fitted geometry)."""
        from dsacache.policies import make_policy
        from dsacache.policies.hints import takes_gpu_evict_last_ways

        applies = (self.evict_last_ways and ways in (None, self.ways) and isinstance(spec, str)
                   and takes_gpu_evict_last_ways(spec))  # fmt: skip
        return make_policy(spec, {"persist_ways": self.evict_last_ways} if applies else None)

    def cache(self, size: int | None = None, **overrides) -> CacheConfig:
        """The L2 as a ``CacheConfig`` (optionally resized, e.g. to its effective capacity)."""
        kw = dict(ways=self.ways, line=self.line, sector=self.sector, partitions=self.partitions,
                  fill=self.fill, set_hash=self.set_hash)  # fmt: skip
        kw.update(overrides)
        return CacheConfig.of(self.l2_bytes if size is None else size, **kw)


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
        sms=132,
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
        sms=132,
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
        sms=108,
        verified="unverified: datasheet values; calibrate before trusting",
    ),
}


PROFILE_FORMAT = "dsacache-gpu-profile/1"
CALIBRATED = "-calibrated"  # gpu_preset("h200-calibrated"): the bundled profile of the H200


# The package's measurements and GPU profiles, one folder per GPU (dsacache/data/<gpu>/).
DATA_DIR = Path(str(files("dsacache") / "data"))


def bundled_profile(gpu: str) -> Path:
    """Where the GPU profile bundled for ``gpu`` (``h100``, ``h200``) lives."""
    return DATA_DIR / gpu / "profile.json"


def calibrated_gpus() -> list[str]:
    """The GPUs with a bundled profile."""
    return sorted(g for g in PRESETS if bundled_profile(g).exists())


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """A GPU profile written by ``dsacache calibrate``, checked for the fields the simulator
    reads."""
    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DsacacheError(f"cannot read GPU profile {path}: {e}") from None
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise DsacacheError(f"{path} is not a dsacache GPU profile (format {PROFILE_FORMAT})")
    missing = [
        f"{part}.{key}"
        for part, keys in (("gpu", ("name", "l2_bytes")),
                           ("l2_model", ("policy", "capacity", "ways", "set_hash", "fill")),
                           ("hierarchy", ("hbm_latency_s", "hbm_bandwidth", "l2_bandwidth")))
        for key in keys
        if key not in (profile.get(part) or {})
    ]  # fmt: skip
    if missing:
        raise DsacacheError(f"GPU profile {path} lacks {', '.join(missing)}")
    numbers = {f"{part}.{key}": profile[part][key]
               for part, keys in (("gpu", ("l2_bytes",)), ("l2_model", ("capacity", "ways")),
                                  ("hierarchy", ("hbm_bandwidth", "l2_bandwidth", "hbm_latency_s")))
               for key in keys}  # fmt: skip
    bad = [f"{k}={v!r}" for k, v in numbers.items()
           if not isinstance(v, int | float) or not 0 <= v < float("inf")
           or (v == 0 and k != "hierarchy.hbm_latency_s")]  # fmt: skip
    if bad:
        raise DsacacheError(
            f"GPU profile {path}: {', '.join(bad)} must be finite and positive (latency >= 0)"
        )
    last = profile["l2_model"].get("evict_last_ways", 0)
    if not isinstance(last, int) or not 0 <= last < profile["l2_model"]["ways"]:
        raise DsacacheError(
            f"GPU profile {path}: l2_model.evict_last_ways={last!r} must be an integer from 0 "
            f"to ways - 1 ({profile['l2_model']['ways'] - 1})"
        )
    return profile


def preset_from_profile(profile: dict[str, Any]) -> GPUPreset:
    """The preset of a calibrated GPU: the fitted L2 model (its effective capacity, ways, set
    index and fill unit) and the fitted memory coefficients."""
    gpu, l2, mem = profile["gpu"], profile["l2_model"], profile["hierarchy"]
    return GPUPreset(
        f"{gpu['name']} (calibrated)",
        l2_bytes=int(l2["capacity"]),
        ways=int(l2["ways"]),
        partitions=1,
        hbm_bandwidth=float(mem["hbm_bandwidth"]),
        l2_bandwidth=float(mem["l2_bandwidth"]),
        hbm_latency=float(mem["hbm_latency_s"]),
        verified=f"calibrated: {profile.get('summary', 'dsacache calibrate')}",
        fill=int(l2["fill"]),
        set_hash=str(l2["set_hash"]),
        reported_l2_bytes=int(gpu["l2_bytes"]),
        evict_last_ways=int(l2.get("evict_last_ways", 0)),
        sms=int(gpu.get("sms") or 0),
    )


def gpu_preset(name: str | os.PathLike) -> GPUPreset:
    """Look up a preset by short name (``h100``, ``h200``, ``a100``), a bundled calibrated
    profile (``h100-calibrated``, ``h200-calibrated``) or a profile file (``*.json``)."""
    name = os.fspath(name)
    key = name.lower()
    if key.endswith(".json"):
        return preset_from_profile(load_profile(name))
    if key.endswith(CALIBRATED) and key[: -len(CALIBRATED)] in calibrated_gpus():
        return preset_from_profile(load_profile(bundled_profile(key[: -len(CALIBRATED)])))
    if key not in PRESETS:
        known = [*PRESETS, *(g + CALIBRATED for g in calibrated_gpus())]
        raise DsacacheError(
            f"unknown GPU preset {name!r}; choose one of: {', '.join(known)}, or a GPU profile "
            "(.json) written by dsacache calibrate"
        )
    return PRESETS[key]
