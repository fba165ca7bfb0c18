"""Capture of DSA top-k selections (model hooks, indexers) and synthetic traces.

Importing this package is cheap: torch and transformers load only inside capture code. The
capture names below (``capture_trace``, ``CaptureConfig``, ...) are imported on first use.
"""

from importlib import import_module
from typing import Any

from dsacache.tracer.synth import PRESETS, SynthConfig, preset, synthesize

_LAZY = {
    "CaptureConfig": "dsacache.tracer.capture",
    "CaptureResult": "dsacache.tracer.capture",
    "capture_trace": "dsacache.tracer.capture",
    "OracleConfig": "dsacache.tracer.indexers",
    "SparseAttention": "dsacache.tracer.sparse",
    "MODELS": "dsacache.tracer.models",
    "load_backbone": "dsacache.tracer.models",
    "resolve_model": "dsacache.tracer.models",
    "make_prompts": "dsacache.tracer.texts",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRESETS", "SynthConfig", "preset", "synthesize", *_LAZY]
