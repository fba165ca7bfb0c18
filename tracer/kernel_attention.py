"""The capture's ``triton`` backend: sparse decode steps through dsacache's Triton DSA kernels.

With ``--backend triton`` (the default on CUDA) every sparse decode step runs, per layer:

1. a paged mirror of the layer's K/V (``kernels.paged.GQACache``, 64-token pages, one page
   table shared by all layers, pages drawn from a shuffled free list with a fixed seed),
   filled once from the prefill's K/V and appended with each step's new token by a
   device-side ``index_copy_`` (no host sync); the pools are sized for prompt + steps tokens;
2. the selection on the device by ``kernels.indexer.select_topk`` (top-k with the first
   ``sink`` and last ``window`` tokens forced in, the eager oracle's semantics): for the
   oracle over the dense attention mass computed exactly as the eager path does (the oracle
   is dense attention by definition); for the lightning indexer over the logits of the Triton
   kernel ``indexer_logits`` on a paged fp8 key cache (``IndexKeyCache``, the indexer's key
   dim) with the indexer's per-head weights;
3. the attention by ``kernels.sparse_decode.gqa_sparse_decode`` over the selected tokens and
   the new token itself (bf16 K/V, float32 accumulation), with the same index tensor that
   goes to the trace (copied to the host once per step, not once per layer).

Where the backends can differ (ties). On the same layer inputs the oracle's mass is the same
float32 tensor in both backends and ``select_topk`` keeps the same set as ``oracle_topk``:
the selections are identical (up to exactly equal masses, which ``torch.topk`` orders either
way). The lightning indexer's kernel rounds the query to bf16 (fp8 keys and scales are the
same bytes) and sums in another order, so a token whose score lies within that rounding of
the k-th score may be swapped for another: a differing token counts as a *tie* when its
eager score is within ``TIE_ATOL + TIE_RTOL * max|score|`` of the eager k-th score (the
smallest score among the eager selection's non-forced tokens). In a whole capture the two
backends also see different inputs after the first layer: the kernel attends in bf16 (the
eager path in float32), so hidden states drift by bf16 rounding, near-ties flip, and once a
generated token differs the decodes part. ``backend_check`` measures both: per-layer
agreement on the same inputs (``check=True``: the eager selection and attention recomputed
beside the kernels') and the agreement of two independent captures.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from dsacache.errors import DsacacheError
from dsacache.tracer.indexers import OracleConfig

BACKENDS = ("auto", "eager", "triton")
PAGE_ORDER = "shuffled"
PAGE_SEED = 0
TIE_RTOL = 2**-6  # lightning on the same inputs: bf16 query rounding (2^-9) summed over terms
TIE_ATOL = 1e-6


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The backend a capture on ``device`` runs: ``eager`` or ``triton``.

    ``auto`` is ``triton`` on a CUDA device with Triton installed, else ``eager``. ``triton``
    needs Triton and a CUDA device, or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: slow,
    for tests); otherwise a ``DsacacheError`` says what is missing.
    """
    if backend not in BACKENDS:
        raise DsacacheError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "eager":
        return "eager"
    kind = torch.device(device).type
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if kind == "cuda" and has_triton else "eager"
    if not has_triton:
        raise DsacacheError(
            "--backend triton needs the triton package (pip install triton); use --backend eager"
        )
    if kind != "cuda":
        interpreted = _interpret_env()
        import sys

        mod = sys.modules.get("dsacache.kernels.indexer")
        if mod is not None:  # the kernels were decorated already: their mode is fixed
            interpreted = bool(mod.INTERPRET)
        if not interpreted:
            raise DsacacheError(
                f"--backend triton on device {str(device)!r}: the Triton kernels need a CUDA "
                "GPU (--device cuda), or TRITON_INTERPRET=1 set before the start to run them "
                "in Triton's CPU interpreter (slow; for tests); on the CPU use --backend eager"
            )
    return "triton"


def selection_ties(
    a: torch.Tensor,
    b: torch.Tensor,
    score: torch.Tensor,
    sink: int,
    window: int,
    rtol: float = TIE_RTOL,
    atol: float = TIE_ATOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare two selections ``a`` (the reference, e.g. eager) and ``b`` ``[..., k']`` (token
    positions, no -1) of the same rows, scored by the reference ``score`` ``[..., P]``.

    Returns ``(equal, equal_modulo_ties)``, bool ``[...]``: a row is equal modulo ties when
    every token in one selection but not the other has a reference score within
    ``atol + rtol * max|score|`` (of its row) of the row's k-th score, the smallest score
    among ``a``'s tokens that are not forced in (first ``sink``, last ``window``).
    """
    p = score.shape[-1]
    in_a = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    in_a.scatter_(-1, a.long().to(score.device), True)
    in_b = torch.zeros_like(in_a).scatter_(-1, b.long().to(score.device), True)
    diff = in_a ^ in_b
    equal = ~diff.any(-1)
    pos = torch.arange(p, device=score.device)
    forced = (pos < sink) | (pos >= p - window)
    s = score.float()
    theta = s.masked_fill(~(in_a & ~forced), torch.inf).amin(-1, keepdim=True)
    tol = atol + rtol * s.abs().amax(-1, keepdim=True)
    near = (s - theta).abs() <= tol  # inf theta (nothing free to swap): never near
    return equal, (~diff | near).all(-1)


class KernelAttention:
    """Paged K/V mirrors (and lightning key caches) of a batch's layers, and the kernel calls
    of one sparse decode step. One page table serves every layer; ``capacity`` tokens per
    request (prompt + decode steps) are allocated up front."""

    def __init__(
        self,
        batch: int,
        capacity: int,
        device: str | torch.device,
        *,
        order: str = PAGE_ORDER,
        seed: int = PAGE_SEED,
    ) -> None:
        from dsacache.kernels.paged import make_page_table

        self.batch, self.capacity = batch, capacity
        self.device = torch.device(device)
        self.order, self.seed = order, seed
        self.pages = make_page_table([capacity] * batch, order=order, seed=seed, device=device)
        self.kv: dict[int, Any] = {}  # layer -> GQACache
        self.index: dict[int, Any] = {}  # layer -> IndexKeyCache

    def manifest(self) -> dict[str, Any]:
        """How the paged mirrors are laid out (for the trace manifest)."""
        return {
            "page_size": self.pages.page_size,
            "page_order": self.order,
            "page_seed": self.seed,
            "tokens_per_request": self.capacity,
            "kv": "bf16 GQA pools [pages, 64, kv_heads, head_dim] (kernels.paged.GQACache)",
        }

    def _check_room(self, tokens: int) -> None:
        if tokens > self.capacity:
            raise DsacacheError(
                f"the paged KV mirror holds {self.capacity} tokens per request; the decode "
                f"reached {tokens}"
            )

    def fill(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Mirror the prefill's K/V ``[B, kv_heads, S, head_dim]`` of ``layer``."""
        from dsacache.kernels.paged import build_gqa_cache

        self._check_room(key.shape[2])
        self.kv[layer] = build_gqa_cache(
            list(key.transpose(1, 2)), list(value.transpose(1, 2)), self.pages
        )

    def _append_slots(self, position: int) -> torch.Tensor:
        from dsacache.kernels.paged import _append_slots

        self._check_room(position + 1)
        ctx = torch.full((self.batch,), position, dtype=torch.int32, device=self.device)
        return _append_slots(self.pages, ctx)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor, position: int) -> None:
        """Write the new token's K/V ``[B, kv_heads, head_dim]`` at ``position``."""
        cache = self.kv[layer]
        slots = self._append_slots(position)
        kv, d = cache.kv_heads, cache.head_dim
        cache.k.view(-1, kv, d).index_copy_(0, slots, key.to(torch.bfloat16))
        cache.v.view(-1, kv, d).index_copy_(0, slots, value.to(torch.bfloat16))

    def fill_index(self, layer: int, keys: torch.Tensor) -> None:
        """Quantise and page the prefill's indexer keys ``[B, S, dim]`` of ``layer``."""
        from dsacache.kernels.paged import build_index_cache

        self._check_room(keys.shape[1])
        try:
            self.index[layer] = build_index_cache(list(keys.float()), self.pages)
        except ValueError as e:
            raise DsacacheError(f"lightning indexer keys: {e}") from None

    def append_index(self, layer: int, keys: torch.Tensor, position: int) -> None:
        """Quantise and write the new token's indexer key ``[B, dim]`` at ``position``."""
        from dsacache.kernels.paged import append_index_keys

        ctx = torch.full((self.batch,), position, dtype=torch.int32, device=self.device)
        self._check_room(position + 1)
        append_index_keys(self.index[layer], ctx, keys.float())

    def index_logits(
        self, layer: int, q: torch.Tensor, weights: torch.Tensor, position: int
    ) -> torch.Tensor:
        """Lightning logits ``[B, position]`` of queries ``q`` ``[B, H, dim]`` (rounded to
        bf16, as the kernel multiplies in bf16) with per-head ``weights`` ``[B, H]``."""
        from dsacache.kernels.indexer import indexer_logits

        ctx = torch.full((self.batch,), position, dtype=torch.int32, device=self.device)
        return indexer_logits(
            q.to(torch.bfloat16).contiguous(), weights.float().contiguous(), self.index[layer],
            ctx, position, query_fp8=False,
        )  # fmt: skip

    def select(self, score: torch.Tensor, cfg: OracleConfig) -> torch.Tensor:
        """``select_topk`` of ``score`` ``[B, G, P]``: int32 ``[B, G, min(k, P)]``, ascending,
        the eager ``oracle_topk``'s selection (every request holds ``P`` tokens, so the -1
        padding ``select_topk`` adds when ``P < k`` is cut off)."""
        from dsacache.kernels.indexer import select_topk

        b, g, p = score.shape
        ctx = torch.full((b * g,), p, dtype=torch.int32, device=score.device)
        top = select_topk(score.reshape(b * g, p), ctx, cfg.k, cfg.sink, cfg.window)
        return top[:, : min(cfg.k, p)].reshape(b, g, -1)

    def attend(
        self, layer: int, q: torch.Tensor, chosen: torch.Tensor, position: int, scale: float
    ) -> torch.Tensor:
        """``gqa_sparse_decode`` of ``q`` ``[B, H, D]`` over the tokens ``chosen`` ``[B, G,
        k']`` (G = 1 or kv_heads) and the new token at ``position``: bf16 ``[B, H, D]``."""
        from dsacache.kernels.sparse_decode import gqa_sparse_decode

        b, g, _ = chosen.shape
        own = torch.full((b, g, 1), position, dtype=torch.int32, device=chosen.device)
        indices = torch.cat((chosen.to(torch.int32), own), dim=-1)
        out, _ = gqa_sparse_decode(q.to(torch.bfloat16), self.kv[layer], indices, scale)
        return out
