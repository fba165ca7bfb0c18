"""Capture of DSA top-k selections (model hooks, indexers) and synthetic traces.

Importing this package is cheap: torch and transformers load only inside capture code.
"""

from dsacache.tracer.synth import PRESETS, SynthConfig, preset, synthesize

__all__ = ["PRESETS", "SynthConfig", "preset", "synthesize"]
