"""The replay engine: KV layouts, access-stream builder, Numba caches, hierarchy and timing."""

from dsacache.simulator.engine import Cache, CacheConfig, simulate_addresses
from dsacache.simulator.layouts import LAYOUTS, KVLayout, make_layout
from dsacache.simulator.presets import PRESETS as GPU_PRESETS
from dsacache.simulator.presets import gpu_preset
from dsacache.simulator.replay import Hierarchy, Level, replay, summarize
from dsacache.simulator.stream import AccessChunk, build_step, iter_stream, plan_replay
from dsacache.simulator.workload import CLASSES, TIERS, AddressMap, Workload

__all__ = [
    "CLASSES",
    "GPU_PRESETS",
    "LAYOUTS",
    "TIERS",
    "AccessChunk",
    "AddressMap",
    "Cache",
    "CacheConfig",
    "Hierarchy",
    "KVLayout",
    "Level",
    "Workload",
    "build_step",
    "gpu_preset",
    "iter_stream",
    "make_layout",
    "plan_replay",
    "replay",
    "simulate_addresses",
    "summarize",
]
