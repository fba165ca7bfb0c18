"""Oracle top-k sparse attention plugged into a transformers model for real sparse decode.

``SparseAttention`` registers one attention function in transformers' ``AttentionInterface``
and switches the model to it. The function attends densely (causal) while ``sparse`` is off,
e.g. for the prefill and for a dense reference decode. While ``sparse`` is on, every decode
step (one new query per sequence) computes the dense attention probabilities, lets the oracle
indexer pick the top-k cached tokens per layer (or KV group), and then attends only to those
tokens and to the new token itself; the selections are kept for the trace writer.

With a ``KernelAttention`` (``kernels=``, the capture's ``triton`` backend) the sparse steps
run through the Triton DSA kernels instead (paged K/V mirror, ``select_topk``, the lightning
indexer's logits kernel, ``gqa_sparse_decode``); ``check=True`` recomputes the eager
selection and attention beside them on the same inputs and keeps the comparison per layer
(see ``kernel_attention`` for when the two may differ).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dsacache.errors import DsacacheError
from dsacache.tracer.indexers import OracleConfig, head_mass, oracle_topk
from dsacache.tracer.kernel_attention import selection_ties

ATTENTION_NAME = "dsacache_oracle"
_ACTIVE: list[SparseAttention] = []


def _dispatch(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls for every attention layer (see ``AttentionInterface``)."""
    if not _ACTIVE:
        raise DsacacheError(f"attention {ATTENTION_NAME!r} used outside a SparseAttention block")
    if kwargs.get("sliding_window") is not None:
        raise DsacacheError("capture supports full causal attention only (no sliding window)")
    return _ACTIVE[-1].attend(module, query, key, value, scaling), None


class SparseAttention:
    """Context manager: run ``model`` with oracle top-k sparse decode attention.

    >>> with SparseAttention(model, OracleConfig(k=64), kv_heads=3) as attn:
    ...     attn.sparse = True
    ...     model(input_ids=next_tokens, cache=cache)  # one decode step
    ...     attn.selections[layer]  # [batch, groups, k] int64, ascending
    """

    def __init__(
        self,
        model: Any,
        cfg: OracleConfig,
        kv_heads: int,
        lightning: Any = None,
        kernels: Any = None,
        check: bool = False,
    ) -> None:
        cfg.check()
        if check and kernels is None:
            raise DsacacheError("check=True compares the kernels with eager: it needs kernels")
        self.model = model
        # kernel_attention.KernelAttention: sparse steps through the Triton kernels; its paged
        # K/V mirror follows the cache while ``index_record`` is on (like the indexer keys)
        self.kernels = kernels
        self.check = check
        self.checks: dict[int, dict[str, torch.Tensor]] = {}  # per layer, with ``check``
        self._pinned: dict[tuple, torch.Tensor] = {}
        self.cfg = cfg
        self.kv_heads = kv_heads
        self.sparse = False
        # lightning indexer (tracer/lightning.py): selects instead of the oracle when given;
        # its fp8 keys are cached per layer while ``index_record`` is on (prefill and sparse
        # steps; off for a dense reference decode that must not add keys)
        self.lightning = lightning
        self.index_record = True
        self.index_keys: dict[int, torch.Tensor] = {}
        self.oracle_recall: dict[int, torch.Tensor] = {}  # share of the oracle's top-k picked
        # distillation data (record_training): per layer (attention input, head-summed mass)
        self.record_training = False
        self.training_data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self.selections: dict[int, torch.Tensor] = {}
        self.recall: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}  # the selected tokens' attention mass
        self.calls = 0
        self._previous: str | None = None

    def __enter__(self) -> SparseAttention:
        from transformers import AttentionInterface

        if _ACTIVE:
            raise DsacacheError(
                "a SparseAttention block is already active; nesting is not supported"
            )
        AttentionInterface.register(ATTENTION_NAME, _dispatch)
        self._previous = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation(ATTENTION_NAME)
        except (ValueError, KeyError, AttributeError) as e:
            raise DsacacheError(
                f"model {type(self.model).__name__} cannot switch its attention function "
                f"({str(e).splitlines()[0]}); capture needs a model that uses transformers' "
                "AttentionInterface (Llama, Qwen2, Mistral, ...)"
            ) from None
        if self.model.config._attn_implementation != ATTENTION_NAME:
            raise DsacacheError(
                f"model {type(self.model).__name__} does not use transformers' AttentionInterface; "
                "capture supports models that do (Llama, Qwen2, Mistral, ...)"
            )
        _ACTIVE.append(self)
        for i, layer in enumerate(_decoder_layers(self.model)):
            self._hooks.append(
                layer.self_attn.register_forward_pre_hook(self._keep_hidden(i), with_kwargs=True)
            )
        return self

    def _keep_hidden(self, layer: int):
        def hook(module, args, kwargs):
            self._hidden[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        _ACTIVE.remove(self)
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)

    def clear(self) -> None:
        """Forget the selections of the previous step."""
        self.selections.clear()
        self.recall.clear()
        self.scores.clear()
        self.oracle_recall.clear()
        self.checks.clear()
        self.calls = 0

    def collect(self, layers: int) -> dict[str, np.ndarray]:
        """The step's per-layer results stacked over layers, on the host: ``selections``
        ``[L, B, G, k']`` (int64), ``scores``, ``recall`` and, where kept, ``oracle_recall``
        and the ``check_*`` comparisons. On a GPU the layers are stacked on the device and
        copied with non-blocking copies into pinned buffers, then one synchronisation."""
        missing = [layer for layer in range(layers) if layer not in self.selections]
        if missing or self.calls != layers:
            raise DsacacheError(
                f"the model ran {self.calls} attention calls for {layers} layers (no selection "
                f"for layers {missing[:5]}); capture needs one standard attention per layer"
            )
        found: dict[str, torch.Tensor] = {
            "selections": torch.stack([self.selections[i] for i in range(layers)]),
            "scores": torch.stack([self.scores[i] for i in range(layers)]).float(),
            "recall": torch.stack([self.recall[i] for i in range(layers)]),
        }
        if self.oracle_recall:
            found["oracle_recall"] = torch.stack([self.oracle_recall[i] for i in range(layers)])
        if self.checks:
            for name in self.checks[0]:
                found[f"check_{name}"] = torch.stack([self.checks[i][name] for i in range(layers)])
        device = found["selections"].device
        if device.type != "cuda":
            return {name: t.numpy().copy() for name, t in found.items()}
        host = {}
        for name, t in found.items():
            key = (name, tuple(t.shape), t.dtype)
            if key not in self._pinned:
                self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name] = self._pinned[key]
            host[name].copy_(t, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        return {name: t.numpy().copy() for name, t in host.items()}

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """Attention output ``[B, q_len, H, D]`` of one layer (dense or oracle-sparse)."""
        self.calls += 1
        b, h, q_len, d = query.shape
        kv = key.shape[1]
        if h % kv:
            raise DsacacheError(f"{h} query heads do not split into {kv} KV heads")
        scale = d**-0.5 if scaling is None else scaling
        rep = h // kv
        keys = key.repeat_interleave(rep, dim=1) if rep > 1 else key
        values = value.repeat_interleave(rep, dim=1) if rep > 1 else value
        layer = int(getattr(module, "layer_idx", len(self.selections)))
        kernels = self.kernels
        eager_keys = self.lightning is not None and (kernels is None or self.check)
        if eager_keys and self.index_record:
            new = self.lightning.layers[layer].keys(self._hidden[layer])
            old = self.index_keys.get(layer) if q_len == 1 else None
            self.index_keys[layer] = new if old is None else torch.cat((old, new), dim=1)
        if kernels is not None and self.index_record:
            self._mirror(layer, key, value)
        if self.record_training and q_len > 1:
            self.training_data[layer] = (self._hidden[layer].float().cpu(),
                                         _head_mean_probs(query, keys, scale).cpu())  # fmt: skip
        if not self.sparse or q_len != 1:
            return _dense(query, keys, values, scale).transpose(1, 2).contiguous()

        scores = torch.matmul(query.float(), keys.float().transpose(-1, -2))[:, :, 0] * scale
        probs = torch.softmax(scores, dim=-1)  # [B, H, S]: dense attention of the new query
        position = scores.shape[-1] - 1  # cached tokens; the last key is the new token's own
        mass = head_mass(probs, self.kv_heads, self.cfg.granularity)[..., :position]
        if kernels is not None:
            return self._attend_kernels(layer, query, scores, values, mass, position, scale, rep)
        score, chosen = self._eager_select(layer, mass, position)
        if self.lightning is not None:
            oracle = oracle_topk(mass, self.cfg)
            hit = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, oracle, True)
            self.oracle_recall[layer] = (hit.gather(-1, chosen).float().mean(-1)).cpu()
        out = _sparse_out(scores, values, chosen, position, rep, self.cfg.granularity)
        self.selections[layer] = chosen.cpu()
        total = mass.sum(-1).clamp_min(torch.finfo(mass.dtype).tiny)
        picked = mass.gather(-1, chosen)
        self.scores[layer] = score.gather(-1, chosen).cpu()
        self.recall[layer] = (picked.sum(-1) / total).cpu()
        return out.transpose(1, 2).contiguous()

    def _eager_select(
        self, layer: int, mass: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager indexer's scores ``[B, G, P]`` and selection ``[B, G, k']`` (int64)."""
        if self.lightning is None:
            return mass, oracle_topk(mass, self.cfg)
        x = self._hidden[layer][:, -1:]
        cached = self.index_keys[layer][:, :position]  # the new token's own key is last
        score = self.lightning.layers[layer].scores(x, cached)[:, :1].expand_as(mass)
        return score, oracle_topk(score, self.cfg)

    def _mirror(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keep the kernels' paged K/V (and lightning key) caches equal to the model's cache:
        filled by a prefill, appended with the new token of a decode step."""
        kernels = self.kernels
        x = self._hidden[layer]
        q_len = x.shape[1]
        position = key.shape[2] - q_len  # tokens cached before this call
        if q_len > 1 or layer not in kernels.kv:
            if position:
                raise DsacacheError("the kernel backend needs the prefill to start the cache")
            kernels.fill(layer, key, value)
            if self.lightning is not None:
                keys = self.lightning.layers[layer].keys(x, fp8=False)
                kernels.fill_index(layer, keys)
            return
        kernels.append(layer, key[:, :, -1], value[:, :, -1], position)
        if self.lightning is not None:
            new = self.lightning.layers[layer].keys(x[:, -1], fp8=False)
            kernels.append_index(layer, new, position)

    def _attend_kernels(
        self,
        layer: int,
        query: torch.Tensor,
        scores: torch.Tensor,
        values: torch.Tensor,
        mass: torch.Tensor,
        position: int,
        scale: float,
        rep: int,
    ) -> torch.Tensor:
        """One sparse decode layer through the Triton kernels (see ``kernel_attention``)."""
        kernels = self.kernels
        if self.lightning is None:
            score = mass
            chosen = kernels.select(mass, self.cfg)  # int32 [B, G, k'], on the device
        else:
            m = self.lightning.layers[layer]
            x = self._hidden[layer][:, -1].float()  # [B, hidden]
            q = m.wq(x).view(x.shape[0], m.heads, m.dim)
            logits = kernels.index_logits(layer, q, m.ww(x), position)  # [B, P]
            score = logits[:, None].expand_as(mass)
            chosen = kernels.select(score, self.cfg)
            oracle = kernels.select(mass, self.cfg).long()
            hit = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, oracle, True)
            self.oracle_recall[layer] = hit.gather(-1, chosen.long()).float().mean(-1)
        out = kernels.attend(layer, query[:, :, 0], chosen, position, scale)  # [B, H, D] bf16
        self.selections[layer] = chosen
        picked = chosen.long()
        total = mass.sum(-1).clamp_min(torch.finfo(mass.dtype).tiny)
        self.scores[layer] = score.gather(-1, picked)
        self.recall[layer] = mass.gather(-1, picked).sum(-1) / total
        if self.check:
            e_score, e_chosen = self._eager_select(layer, mass, position)
            equal, tied = selection_ties(e_chosen, chosen, e_score, self.cfg.sink, self.cfg.window)
            ref = _sparse_out(scores, values, picked, position, rep, self.cfg.granularity)
            ref = ref[:, :, 0].float()
            big = e_score.float().abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
            self.checks[layer] = {
                "equal": equal,
                "tied": tied,
                "out_diff": (out.float() - ref).abs().amax(),
                "out_scale": ref.abs().amax(),
                "score_diff": ((score.float() - e_score.float()).abs().amax(-1) / big).amax(),
            }
        return out.to(query.dtype)[:, None]


def _sparse_out(
    scores: torch.Tensor,
    values: torch.Tensor,
    chosen: torch.Tensor,
    position: int,
    rep: int,
    granularity: str,
) -> torch.Tensor:
    """Eager sparse attention ``[B, H, 1, D]``: softmax of ``scores`` ``[B, H, P + 1]`` over
    the ``chosen`` ``[B, G, k']`` tokens and the new token (at ``position``)."""
    allowed = torch.zeros(*chosen.shape[:-1], position + 1, dtype=torch.bool, device=values.device)
    allowed.scatter_(-1, chosen, True)
    allowed[..., position] = True
    if granularity == "group":
        allowed = allowed.repeat_interleave(rep, dim=1)
    weights = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1)
    return torch.matmul(weights.unsqueeze(2).to(values.dtype), values)


def _decoder_layers(model: Any) -> list[Any]:
    """The decoder layers (each with ``self_attn``) of a transformers causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise DsacacheError(
            f"model {type(model).__name__} has no .model.layers; capture supports Llama-style "
            "decoder models (Llama, Qwen2, Mistral, ...)"
        )
    return list(layers)


def _head_mean_probs(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention probabilities ``[B, S, S]`` averaged over heads (each row sums to 1)."""
    s = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale  # [B, H, S, S]
    n = s.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    return torch.softmax(s.masked_fill(~causal, -torch.inf), dim=-1).mean(1)


def _dense(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention where the queries are the last ``q_len`` of the keys' positions."""
    q_len, kv_len = query.shape[2], keys.shape[2]
    if q_len == 1:
        return F.scaled_dot_product_attention(query, keys, values, scale=scale)
    if q_len == kv_len:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale)
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    mask = torch.arange(kv_len, device=query.device)[None, :] <= rows
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
