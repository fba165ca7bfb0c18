"""DSA indexers: which cached tokens a decode step's attention may read.

The ``oracle`` indexer picks, for the new query of a decode step, the ``k`` cached tokens with
the most true attention mass: the softmax of the query against every cached key (and its own),
summed over the query heads that share one selection. ``granularity="layer"`` shares one
selection among all heads of a layer; ``"group"`` gives each KV group (the query heads that
read one KV head) its own. The first ``sink`` and the last ``window`` cached tokens are always
selected and count towards ``k``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dsacache.errors import DsacacheError

GRANULARITIES = ("layer", "group")
INDEXERS = ("oracle", "lightning")


@dataclass(frozen=True)
class OracleConfig:
    """Parameters of the oracle top-k indexer."""

    k: int = 64
    sink: int = 4
    window: int = 16
    granularity: str = "layer"

    def check(self) -> None:
        """Raise ``DsacacheError`` naming the first parameter out of range."""
        if self.k < 1:
            raise DsacacheError(f"k must be >= 1, got {self.k}")
        if self.sink < 0:
            raise DsacacheError(f"sink must be >= 0, got {self.sink}")
        if self.window < 0:
            raise DsacacheError(f"window must be >= 0, got {self.window}")
        if self.sink + self.window > self.k:
            raise DsacacheError(
                f"sink + window must be <= k (they are part of the k selected tokens), got "
                f"{self.sink} + {self.window} > {self.k}"
            )
        if self.granularity not in GRANULARITIES:
            raise DsacacheError(
                f"unknown granularity {self.granularity!r}; choose one of: "
                f"{', '.join(GRANULARITIES)}"
            )

    def groups(self, kv_heads: int) -> int:
        """Selections per layer: 1 for ``layer``, ``kv_heads`` for ``group``."""
        return 1 if self.granularity == "layer" else kv_heads

    def manifest(self, heads: int, kv_heads: int) -> dict[str, Any]:
        """The trace manifest's ``indexer`` object."""
        return {
            "kind": "oracle",
            **asdict(self),
            "heads_per_selection": heads // self.groups(kv_heads),
            "score": "softmax attention mass of the new query over all cached keys and itself "
            "(dense, per head), summed over the heads sharing the selection",
            "always_kept": "first `sink` and last `window` cached tokens (part of the k)",
            "self_token": "the new token always attends to itself; it is not an index",
            "scores": "column scores: each selected token's score (float16)",
        }


def head_mass(probs: torch.Tensor, kv_heads: int, granularity: str) -> torch.Tensor:
    """Sum attention probabilities ``[B, H, S]`` over the heads that share a selection.

    Returns ``[B, 1, S]`` for ``layer`` and ``[B, kv_heads, S]`` for ``group``; query head
    ``h`` belongs to KV group ``h // (H // kv_heads)`` (the transformers GQA convention).
    """
    b, h, s = probs.shape
    if granularity == "layer":
        return probs.sum(dim=1, keepdim=True)
    return probs.reshape(b, kv_heads, h // kv_heads, s).sum(dim=2)


def oracle_topk(mass: torch.Tensor, cfg: OracleConfig) -> torch.Tensor:
    """Indices ``[B, G, min(k, P)]`` (int64, ascending) of the top-k of ``mass`` ``[B, G, P]``.

    ``P`` is the number of cached tokens; the first ``sink`` and last ``window`` of them are
    always kept. Among equal scores ``torch.topk`` decides (ties are practically absent in
    float32 attention mass).
    """
    position = mass.shape[-1]
    if cfg.k >= position:
        full = torch.arange(position, device=mass.device)
        return full.expand(*mass.shape[:-1], position).clone()
    score = mass.clone()
    score[..., : cfg.sink] = torch.inf
    if cfg.window:
        score[..., position - cfg.window :] = torch.inf
    picked = torch.topk(score, cfg.k, dim=-1, sorted=False).indices
    return torch.sort(picked, dim=-1).values
