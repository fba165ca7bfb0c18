"""The synthetic selector written with sorted-array set operations, the oracle for the
differential test in tests/test_synth.py and the baseline of benchmarks/bench_synth.py.

This is how ``tracer/synth._Selector.next`` picked tokens before it kept its sets as boolean
masks: the same draws from the generator, in the same order, on the same sorted arrays, so
both must return identical selections. Written for obviousness, not speed.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class NeverFills(Exception):
    """The selection loop ran ``max_rounds`` rounds without filling the step."""


class ReferenceSelector:
    """Selection state of one (request, layer, group) stream, as ``synth._Selector``; after
    ``max_rounds`` rounds of draws in one step it raises ``NeverFills`` (the generator this
    is looped forever where no draw could fill the step)."""

    def __init__(self, cfg, keep: float, rng: np.random.Generator, max_rounds: int = 10000) -> None:
        self.cfg, self.keep, self.rng, self.max_rounds = cfg, keep, rng, max_rounds
        self.prev = np.zeros(0, np.int64)
        self.past: deque[np.ndarray] = deque(maxlen=max(cfg.history, 1))

    def next(self, position: int) -> np.ndarray:
        cfg, rng = self.cfg, self.rng
        if cfg.k >= position:
            chosen = np.arange(position, dtype=np.int64)
        else:
            sinks = np.arange(min(cfg.sinks, position, cfg.k), dtype=np.int64)
            chosen = sinks
            candidates = np.setdiff1d(self.prev, sinks, assume_unique=True)
            n_keep = min(int(round(self.keep * cfg.k)), len(candidates), cfg.k - len(chosen))
            if n_keep:
                chosen = np.union1d(chosen, rng.choice(candidates, n_keep, replace=False))
            returning = (
                np.setdiff1d(np.concatenate(list(self.past)), self.prev)
                if self.past and cfg.history
                else np.zeros(0, np.int64)
            )
            rounds = 0
            while len(chosen) < cfg.k:
                rounds += 1
                if rounds > self.max_rounds:
                    raise NeverFills
                need = cfg.k - len(chosen)
                draw = max(2 * need, 16)
                source = rng.random(draw)
                window_lo = max(0, position - max(cfg.recency_window, 1))
                picks = rng.integers(0, position, draw)
                recent = source < cfg.recency_weight
                picks[recent] = rng.integers(window_lo, position, int(recent.sum()))
                back = (source >= cfg.recency_weight) & (
                    source < cfg.recency_weight + cfg.return_weight
                )
                if len(returning) and back.any():
                    picks[back] = rng.choice(returning, int(back.sum()))
                fresh = np.setdiff1d(np.unique(picks), chosen, assume_unique=True)
                if len(fresh) > need:
                    fresh = rng.choice(fresh, need, replace=False)
                chosen = np.union1d(chosen, fresh)
        self.past.append(chosen)
        self.prev = chosen
        return chosen
