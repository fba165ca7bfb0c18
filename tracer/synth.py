"""Synthetic DSA traces with explicit statistical knobs (no GPU, no model needed).

Each (request, layer, group) keeps its previous selection. At every decode step the new
top-k set is built from: the attention-sink tokens (always kept), a share ``keep`` of the
previous step's picks, and fresh picks drawn from the recent window (``recency_weight``),
from tokens selected in the last ``history`` steps but dropped since (``return_weight``:
the "vertical" re-selections of LFPS, arXiv 2506.15704) and uniformly from the context.
A token therefore stays selected for ``1 / (1 - keep)`` steps on average; the Levy paper
(arXiv 2603.13430) reports about 1.82 consecutive steps on real models.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from dsacache.errors import DsacacheError
from dsacache.traces import SelectionBatch, TraceWriter

PRESET_MODELS: dict[str, dict[str, Any]] = {
    "deepseek-v3.2": {
        "name": "DeepSeek-V3.2 (synthetic selections)",
        "layers": 61,
        "heads": 128,
        "kv_heads": 1,
        "head_dim": 576,
        "kv_lora_rank": 512,
        "rope_dim": 64,
        "attention": "MLA",
        "kv_dtype": "fp8",
        "layout": "mla-fp8",
        "max_context": 131072,
    },
    "smollm2-135m": {
        "name": "SmolLM2-135M-Instruct (synthetic selections)",
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "head_dim": 64,
        "attention": "GQA",
        "kv_dtype": "bf16",
        "layout": "gqa",
        "max_context": 8192,
    },
}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic selection process (see the module docstring)."""

    layers: int = 4
    groups: int = 1
    requests: int = 1
    context: int = 4096
    steps: int = 32
    k: int = 256
    keep: float = 0.45
    recency_window: int = 128
    recency_weight: float = 0.3
    return_weight: float = 0.2
    history: int = 4
    sinks: int = 4
    layer_variation: float = 0.1
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict, compare=False)

    def check(self) -> None:
        """Raise ``DsacacheError`` naming the first knob out of range."""
        positive = ("layers", "groups", "requests", "context", "steps", "k")
        for name in positive:
            if getattr(self, name) < 1:
                raise DsacacheError(f"synth: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("recency_window", "history", "sinks", "seed"):
            if getattr(self, name) < 0:
                raise DsacacheError(f"synth: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("keep", "recency_weight", "return_weight", "layer_variation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DsacacheError(f"synth: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.recency_weight + self.return_weight > 1.0:
            raise DsacacheError(
                "synth: recency_weight + return_weight must be <= 1, got "
                f"{self.recency_weight} + {self.return_weight}"
            )
        if self.context + self.steps > np.iinfo(np.int32).max:
            raise DsacacheError(f"synth: context + steps must fit in int32, got {self.context}")
        if self.layers > 32767 or self.groups > 32767:
            raise DsacacheError("synth: layers and groups must be <= 32767")


PRESETS: dict[str, SynthConfig] = {
    "deepseek-v3.2": SynthConfig(
        layers=61,
        groups=1,
        context=32768,
        steps=32,
        k=2048,
        recency_window=512,
        sinks=4,
        model=PRESET_MODELS["deepseek-v3.2"],
    ),
    "smollm2-135m": SynthConfig(
        layers=30,
        groups=3,
        context=2048,
        steps=64,
        k=256,
        recency_window=128,
        sinks=4,
        model=PRESET_MODELS["smollm2-135m"],
    ),
}


def preset(name: str, **overrides: Any) -> SynthConfig:
    """A preset's config with some knobs replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise DsacacheError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


SPEC_PREFIX = "synth:"


def parse_spec(spec: str) -> SynthConfig:
    """The config of a trace spec ``synth:PRESET[:KNOB=VALUE,...]``, e.g.
    ``synth:deepseek-v3.2:layers=4,context=131072,requests=8,steps=4``: a synthetic trace
    named by its knobs, so that a command line alone reproduces it (``materialize``)."""
    if not spec.startswith(SPEC_PREFIX):
        raise DsacacheError(f"trace spec {spec!r} does not start with {SPEC_PREFIX!r}")
    name, _, knobs = spec[len(SPEC_PREFIX) :].partition(":")
    fields = {
        f.name: f.type for f in SynthConfig.__dataclass_fields__.values() if f.name != "model"
    }
    overrides: dict[str, Any] = {}
    for item in filter(None, knobs.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise DsacacheError(
                f"trace spec {spec!r}: {item!r} is not KNOB=VALUE with a knob of: "
                + ", ".join(fields)
            )
        kind = float if fields[key] in (float, "float") else int
        try:
            overrides[key] = kind(value)
        except ValueError:
            raise DsacacheError(
                f"trace spec {spec!r}: {key} needs a number, got {value!r}"
            ) from None
    cfg = preset(name, **overrides)
    cfg.check()
    return cfg


def materialize(trace: str | os.PathLike, tmpdir: str | os.PathLike) -> str | os.PathLike:
    """``trace`` itself (a path or bundled name), or for a ``synth:`` spec a trace generated
    into ``tmpdir`` (deterministic: the same spec gives the same trace anywhere)."""
    if isinstance(trace, str) and trace.startswith(SPEC_PREFIX):
        return synthesize(parse_spec(trace), os.path.join(tmpdir, "synth.dsatrace"))
    return trace


class _Selector:
    """Selection state of one (request, layer, group) stream."""

    def __init__(self, cfg: SynthConfig, keep: float, rng: np.random.Generator) -> None:
        self.cfg, self.keep, self.rng = cfg, keep, rng
        self.prev = np.zeros(0, np.int64)
        self.past: deque[np.ndarray] = deque(maxlen=max(cfg.history, 1))

    def next(self, position: int) -> np.ndarray:
        """The sorted token positions selected at a step with ``position`` tokens cached.

        The sets are kept as boolean masks over the positions (the set operations on sorted
        arrays, ``np.union1d`` and ``np.setdiff1d``, were most of a DeepSeek-scale synthesis);
        the draws from the generator are the same, so a spec gives the same trace."""
        cfg, rng = self.cfg, self.rng
        if cfg.k >= position:
            chosen = np.arange(position, dtype=np.int64)
        else:
            n_sinks = min(cfg.sinks, position, cfg.k)
            taken = np.zeros(position, bool)
            taken[:n_sinks] = True
            pieces = [np.arange(n_sinks, dtype=np.int64)]  # disjoint parts of the selection
            count = n_sinks
            candidates = self.prev[self.prev >= n_sinks]  # the last selection, sinks apart
            n_keep = min(int(round(self.keep * cfg.k)), len(candidates), cfg.k - count)
            if n_keep:
                pieces.append(rng.choice(candidates, n_keep, replace=False))
                taken[pieces[-1]] = True
                count += n_keep
            window_lo = max(0, position - max(cfg.recency_window, 1))  # the recency window
            returning = None  # dropped since the last `history` steps: made when first drawn
            if cfg.recency_weight + cfg.return_weight >= 1.0:  # no draw from all positions
                returning = self._returning(position) if self.past and cfg.history else None
                self._check_reachable(position, window_lo, taken, cfg.k - count, returning)
            while count < cfg.k:
                need = cfg.k - count
                draw = max(2 * need, 16)
                source = rng.random(draw)
                picks = rng.integers(0, position, draw)
                recent = source < cfg.recency_weight
                picks[recent] = rng.integers(window_lo, position, int(recent.sum()))
                back = (source >= cfg.recency_weight) & (
                    source < cfg.recency_weight + cfg.return_weight
                )
                if back.any() and self.past and cfg.history:
                    if returning is None:
                        returning = self._returning(position)
                    if len(returning):
                        picks[back] = rng.choice(returning, int(back.sum()))
                picks.sort()
                fresh = picks[np.r_[True, picks[1:] != picks[:-1]]]  # unique, sorted
                fresh = fresh[~taken[fresh]]
                if len(fresh) > need:
                    fresh = rng.choice(fresh, need, replace=False)
                taken[fresh] = True
                pieces.append(fresh)
                count += len(fresh)
            chosen = np.sort(np.concatenate(pieces))
        self.past.append(chosen)
        self.prev = chosen
        return chosen

    def _check_reachable(self, position: int, window_lo: int, taken: np.ndarray, need: int,
                         returning: np.ndarray | None) -> None:  # fmt: skip
        """With every draw from the recency window or the returning tokens, raise if fewer
        than ``need`` of those are not ``taken`` yet (the draws could never fill the step)."""
        cfg = self.cfg
        reachable = np.zeros(position, bool)
        if cfg.recency_weight > 0:
            reachable[window_lo:] = True
        if cfg.return_weight > 0 and cfg.recency_weight < 1:
            if returning is None or not len(returning):
                return  # its draws fall back to all positions
            reachable[returning] = True
        left = int(np.count_nonzero(reachable & ~taken))
        if left < need:
            raise DsacacheError(
                f"synth: recency_weight + return_weight = 1 draws every token from the last "
                f"recency_window={cfg.recency_window} positions or from the returning tokens, "
                f"and {left} of those are left for the {need} a step of k={cfg.k} still needs "
                f"(at position {position}): lower the weights or widen recency_window"
            )

    def _returning(self, position: int) -> np.ndarray:
        """Tokens of the selections in ``past`` that the last one dropped, sorted."""
        seen = np.zeros(position, bool)
        for earlier in self.past:
            seen[earlier] = True
        seen[self.prev] = False
        return np.flatnonzero(seen).astype(np.int64, copy=False)


def synthesize(
    cfg: SynthConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    part_rows: int = 65536,
    progress: bool = False,
    resume: bool = False,
) -> str:
    """Generate a trace into ``out`` (a ``.dsatrace`` directory); returns its path. With
    ``resume``, an interrupted run continues: generation is deterministic, so the rows already
    in finished parts are regenerated and skipped, not written again."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    layer_keep = np.clip(cfg.keep + cfg.layer_variation * rng.uniform(-1, 1, cfg.layers), 0.0, 1.0)
    streams = [
        [
            [_Selector(cfg, float(layer_keep[layer]), rng) for _ in range(cfg.groups)]
            for layer in range(cfg.layers)
        ]
        for _ in range(cfg.requests)
    ]
    model = dict(cfg.model) or {
        "name": "synthetic",
        "layers": cfg.layers,
        "kv_heads": cfg.groups,
        "attention": "MLA" if cfg.groups == 1 else "GQA",
    }
    model["layers"] = cfg.layers
    indexer = {
        "kind": "synthetic",
        "k": cfg.k,
        "sink": cfg.sinks,
        "window": 0,  # no recent tokens are forced in; recency is drawn (recency_window)
        "recency_window": cfg.recency_window,
        "granularity": "group" if cfg.groups > 1 else "layer",
    }
    knobs = {k: v for k, v in asdict(cfg).items() if k != "model"}
    capture = {"generator": "dsacache synth", "config": knobs}
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="synth", unit="step")
    with TraceWriter(
        out,
        model=model,
        indexer=indexer,
        capture=capture,
        overwrite=overwrite,
        part_rows=part_rows,
        resume=resume,
    ) as writer:
        skip = writer.rows_written
        for step in steps:
            position = cfg.context + step
            rows, picks = [], []
            for layer in range(cfg.layers):
                for request in range(cfg.requests):
                    for group in range(cfg.groups):
                        picks.append(streams[request][layer][group].next(position))
                        rows.append((request, layer, group))
            meta = np.array(rows, dtype=np.int64)
            lengths = np.array([len(p) for p in picks], dtype=np.int64)
            offsets = np.zeros(len(picks) + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            batch = SelectionBatch(
                request=meta[:, 0],
                step=np.full(len(rows), step, np.int64),
                position=np.full(len(rows), position, np.int64),
                layer=meta[:, 1],
                group=meta[:, 2],
                offsets=offsets,
                indices=np.concatenate(picks),
            )
            if skip >= len(batch):
                skip -= len(batch)
                continue
            writer.append_batch(batch.take(np.arange(skip, len(batch))))
            skip = 0
    return str(out)
