"""dsacache: cache-hierarchy simulator and trace analyzer for Dynamic Sparse Attention decode.

Python API (everything here starts without torch, transformers or triton)::

    import dsacache
    trace = dsacache.open_trace("t.dsatrace")
    df = dsacache.replay(trace, policies=["lru", "fifo"], gpu="h100",
                         workload=dsacache.Workload(layout="mla-fp8", batch=4))
    print(dsacache.summarize(df))
"""

from dsacache.errors import DsacacheError, TraceError
from dsacache.simulator import (
    Cache,
    CacheConfig,
    Hierarchy,
    Workload,
    make_layout,
    replay,
    simulate_addresses,
    summarize,
)
from dsacache.simulator.analyze import analyze
from dsacache.tracer import SynthConfig, preset, synthesize
from dsacache.traces import TraceWriter, open_trace
from dsacache.units import parse_size

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "analyze",
    "CacheConfig",
    "DsacacheError",
    "Hierarchy",
    "SynthConfig",
    "TraceError",
    "TraceWriter",
    "Workload",
    "make_layout",
    "open_trace",
    "parse_size",
    "preset",
    "replay",
    "simulate_addresses",
    "summarize",
    "synthesize",
]
