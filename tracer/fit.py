"""Fit the synthetic generator's knobs to a real trace (``dsacache synth --like TRACE``).

Measured per (request, layer, group) stream, over consecutive steps, on the picks that are
not forced (attention sinks and the recent window always selected):

- ``keep``: share of the k picks that the previous step also picked (mean over layers), and
  ``layer_variation``: half the spread of the per-layer means;
- ``return_weight``: share of fresh picks (not picked at the previous step) that were picked
  within the last ``history`` steps;
- ``recency_weight``: share of the remaining fresh picks that fall in the last
  ``recency_window`` positions, less what a uniform draw would put there.

The knobs then generate a trace at another scale (layers, k, context) with those statistics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np

from dsacache.errors import DsacacheError
from dsacache.tracer.synth import SynthConfig
from dsacache.traces import Trace


def measure(trace: Trace, history: int = 4, recency_window: int = 128) -> dict[str, float]:
    """Selection statistics of a trace (see the module docstring), plus per-layer keep."""
    sinks = int(trace.indexer.get("sink", 0))
    window = int(trace.indexer.get("window", 0))
    past: dict[tuple[int, int, int], deque] = {}
    kept, fresh_n, returned, recent, recent_expect = {}, 0, 0, 0, 0.0
    k_max = 0
    for rows in trace.iter_steps():
        for i in range(len(rows)):
            key = (int(rows.request[i]), int(rows.layer[i]), int(rows.group[i]))
            pos = int(rows.position[i])
            sel = rows.row(i).astype(np.int64)
            k_max = max(k_max, len(sel))
            free = sel[(sel >= sinks) & (sel < pos - window)]
            hist = past.setdefault(key, deque(maxlen=history + 1))
            if hist and len(free):
                prev = hist[-1]
                in_prev = np.isin(free, prev)
                kept.setdefault(key[1], []).append(in_prev.sum() / max(len(sel), 1))
                fresh = free[~in_prev]
                older = np.concatenate(list(hist)[:-1]) if len(hist) > 1 else np.zeros(0, np.int64)
                back = np.isin(fresh, older)
                returned += int(back.sum())
                rest = fresh[~back]
                recent += int((rest >= pos - recency_window).sum())
                recent_expect += len(rest) * min(recency_window, pos) / pos
                fresh_n += len(fresh)
            hist.append(sel)
    if not kept:
        raise DsacacheError(f"{trace.path}: needs at least two steps to fit selection statistics")
    per_layer = np.array([np.mean(v) for _, v in sorted(kept.items())])
    n_rest = max(fresh_n - returned, 1)
    return {
        "keep": float(per_layer.mean()),
        "layer_variation": float((per_layer.max() - per_layer.min()) / 2),
        "return_weight": returned / max(fresh_n, 1),
        "recency_weight": max(0.0, (recent - recent_expect) / n_rest)
        * (1 - returned / max(fresh_n, 1)),
        "sinks": sinks,
        "window": window,
        "k": k_max,
        "per_layer_keep": per_layer.tolist(),
    }


_TUNED = ("keep", "return_weight", "recency_weight")


def like(
    trace: Trace, base: SynthConfig, history: int = 4, recency_window: int = 128,
    iterations: int = 3,
) -> SynthConfig:  # fmt: skip
    """``base`` (the target scale) with its statistical knobs fitted to ``trace``.

    The knobs are not the statistics themselves (a uniform draw can land on a recently
    selected token, for instance), so they are tuned: synthesize at the trace's own k and
    context (4 layers, 32 steps), measure, move each knob by the remaining gap, repeat.
    """
    import tempfile

    from dsacache.tracer.synth import synthesize
    from dsacache.traces import open_trace

    target = measure(trace, history, recency_window)
    knobs = {name: min(target[name], 1.0) for name in _TUNED}
    first = trace.read_part(0) if trace.parts else None
    if first is None or not len(first):
        raise DsacacheError(f"{trace.path}: empty trace, nothing to fit")
    probe = SynthConfig(
        layers=4, groups=1, requests=1, context=int(first.position.min()), steps=32,
        k=target["k"], recency_window=recency_window, history=history, sinks=target["sinks"],
        layer_variation=0.0, seed=base.seed,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(iterations):
            cfg = replace(probe, **_clamped(knobs))
            got = measure(
                open_trace(synthesize(cfg, f"{tmp}/probe{i}.dsatrace")), history, recency_window
            )
            for name in _TUNED:
                knobs[name] += target[name] - got[name]
    return replace(
        base,
        **_clamped(knobs),
        layer_variation=min(target["layer_variation"], 1.0),
        recency_window=recency_window,
        history=history,
        sinks=target["sinks"],
    )


def _clamped(knobs: dict[str, float]) -> dict[str, float]:
    out = {name: float(np.clip(v, 0.0, 1.0)) for name, v in knobs.items()}
    out["recency_weight"] = min(out["recency_weight"], 1.0 - out["return_weight"])
    return out
