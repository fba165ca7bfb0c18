"""A DeepSeek-V3.2-style lightning indexer, distilled from a model's own dense attention.

Per layer, the indexer scores the new token's query against every cached token as
``sum_h w_h(x_t) * ReLU(q_h(x_t) . k(x_s))``: a few small query heads ``q_h``, one key per
token ``k`` (cached per token in fp8 with a per-token scale, as DeepSeek-V3.2 caches its
indexer keys) and per-head weights ``w_h`` computed from the query's hidden state, all linear
maps of the layer's attention input ``x`` (DeepSeek-V3.2 tech report; facts in PAPERS.md).

Training distils the model's dense attention: for every position ``t`` of real text, the
target is the attention mass the layer's heads put on each earlier token (summed over heads,
normalised), and the loss is KL(target || softmax(indexer scores)) over the causal prefix.
The trained weights go to a file with its sha256; a capture with ``--indexer lightning``
references it from the trace manifest and reports the indexer's recall of the oracle top-k.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsacache.errors import DsacacheError

FP8_MAX = 448.0  # float8 e4m3


@dataclass(frozen=True)
class LightningConfig:
    """Shape of the indexer and how it is trained."""

    heads: int = 4
    dim: int = 32
    steps: int = 200
    lr: float = 3e-3
    sequences: int = 4
    tokens: int = 512
    seed: int = 0
    # text skipped at the start of every source: captures cut their prompts from the start,
    # so training on what follows keeps it apart from any prompt up to SmolLM2's 8K context
    skip_tokens: int = 8192

    def check(self) -> None:
        """Raise ``DsacacheError`` naming the first setting out of range."""
        if self.skip_tokens < 0:
            raise DsacacheError(f"lightning indexer: skip_tokens must be >= 0, got "
                                f"{self.skip_tokens}")  # fmt: skip
        for name in ("heads", "dim", "steps", "sequences", "tokens"):
            if getattr(self, name) < 1:
                raise DsacacheError(f"lightning indexer: {name} must be >= 1, got "
                                    f"{getattr(self, name)}")  # fmt: skip
        if not self.lr > 0:
            raise DsacacheError(f"lightning indexer: lr must be > 0, got {self.lr}")


class LayerIndexer(torch.nn.Module):
    """One layer's lightning indexer."""

    def __init__(self, hidden: int, heads: int, dim: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.wq = torch.nn.Linear(hidden, heads * dim, bias=False)
        self.wk = torch.nn.Linear(hidden, dim, bias=False)
        self.ww = torch.nn.Linear(hidden, heads, bias=False)

    def keys(self, x: torch.Tensor, fp8: bool = True) -> torch.Tensor:
        """Index keys ``[..., dim]`` of hidden states ``x``; ``fp8``: as cached (e4m3 values
        with one float scale per token, returned dequantised)."""
        k = self.wk(x.float())
        if not fp8:
            return k
        scale = k.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        return (k / scale).to(torch.float8_e4m3fn).float() * scale

    def scores(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, T, S]`` of queries from hidden states ``x`` ``[B, T, hidden]`` against
        ``keys`` ``[B, S, dim]``."""
        b, t, _ = x.shape
        q = self.wq(x.float()).view(b, t, self.heads, self.dim)
        w = self.ww(x.float())  # [B, T, H]
        s = F.relu(torch.einsum("bthd,bsd->bths", q, keys))
        return torch.einsum("bth,bths->bts", w, s)


@dataclass
class LightningIndexer:
    """Trained per-layer indexers of one model, with where their weights came from."""

    layers: list[LayerIndexer]
    config: LightningConfig
    model: str
    path: Path | None = None
    sha256: str = ""
    training: dict[str, Any] | None = None

    def manifest(self) -> dict[str, Any]:
        """The trace manifest's description of this indexer."""
        return {
            "kind": "lightning",
            "weights": str(self.path) if self.path else None,
            "weights_sha256": self.sha256,
            "heads": self.config.heads,
            "dim": self.config.dim,
            "keys": "fp8 e4m3 per token with one float scale",
            "score": "sum over heads of w_h(x_t) * ReLU(q_h(x_t) . k(x_s)), linear maps of the "
            "layer's attention input",
            "training": self.training or {},
        }

    def save(self, path: str | Path) -> str:
        """Write the weights (torch) and return their sha256."""
        path = Path(path)
        state = {
            "format": "dsacache-lightning-indexer/1",
            "model": self.model,
            "config": asdict(self.config),
            "training": self.training or {},
            "layers": [m.state_dict() for m in self.layers],
        }
        torch.save(state, path)
        self.path, self.sha256 = path, _sha256(path)
        return self.sha256


def load_indexer(path: str | Path, model: str, hidden: int, layers: int) -> LightningIndexer:
    """Load trained weights for ``model`` (checks format, model, shapes)."""
    path = Path(path)
    if not path.exists():
        raise DsacacheError(f"--indexer-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not its own
        raise DsacacheError(f"--indexer-weights {path}: not a torch file ({e})") from None
    if not isinstance(state, dict) or state.get("format") != "dsacache-lightning-indexer/1":
        raise DsacacheError(f"--indexer-weights {path}: not dsacache lightning indexer weights")
    if state["model"] != model or len(state["layers"]) != layers:
        raise DsacacheError(
            f"--indexer-weights {path}: trained for {state['model']} "
            f"({len(state['layers'])} layers), not {model} ({layers} layers)"
        )
    cfg = LightningConfig(**state["config"])
    mods = []
    for sd in state["layers"]:
        m = LayerIndexer(hidden, cfg.heads, cfg.dim)
        m.load_state_dict(sd)
        mods.append(m.eval())
    return LightningIndexer(mods, cfg, model, path, _sha256(path), state.get("training"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distill_loss(m: LayerIndexer, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(scores)) averaged over query positions >= 1; ``x`` ``[B, S,
    hidden]``, ``target`` ``[B, S, S]`` (row t: attention mass on tokens 0..t, sums to 1)."""
    s = m.scores(x, m.keys(x, fp8=False))
    n = x.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    logp = torch.log_softmax(s.masked_fill(~causal, -torch.inf), dim=-1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - logp)).masked_fill(~causal, 0.0)
    return kl.sum(-1)[:, 1:].mean()


def train_layer(
    x: torch.Tensor, target: torch.Tensor, cfg: LightningConfig, layer: int
) -> tuple[LayerIndexer, float, float]:
    """Distil one layer's indexer; returns it with the loss before and after training."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + layer)
    m = LayerIndexer(x.shape[-1], cfg.heads, cfg.dim)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / x.shape[-1] ** 0.5)
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    with torch.no_grad():
        before = float(distill_loss(m, x, target))
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = distill_loss(m, x, target)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(distill_loss(m, x, target))
    return m.eval(), before, after


def collect(backbone: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the attention inputs ``[B, S, hidden]`` and the head-summed, normalised
    causal attention mass ``[B, S, S]`` of one dense forward pass over ``ids``."""
    from dsacache.tracer.indexers import OracleConfig
    from dsacache.tracer.sparse import SparseAttention

    with SparseAttention(
        backbone.model, OracleConfig(k=1, sink=0, window=0), backbone.kv_heads
    ) as attn:
        attn.record_training = True
        with torch.no_grad():
            backbone.model(input_ids=ids, use_cache=False)
        data = attn.training_data
    layers = sorted(data)
    return [data[i][0] for i in layers], [data[i][1] for i in layers]


def train(
    backbone: Any, cfg: LightningConfig, sources: list | None = None, progress: bool = False
) -> LightningIndexer:
    """Distil a lightning indexer for every layer of ``backbone`` on real text."""
    from dsacache.tracer.texts import default_sources, make_prompts

    cfg.check()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    sources = sources or default_sources()
    skipped = -(-cfg.skip_tokens // cfg.tokens) * len(sources)  # whole slices per source
    prompts = make_prompts(backbone.tokenizer, skipped + cfg.sequences, cfg.tokens, sources)
    prompts = prompts[skipped:]
    device = next(backbone.model.parameters()).device
    ids = torch.tensor([p.ids for p in prompts], dtype=torch.long, device=device)
    xs, targets = collect(backbone, ids)
    layers, losses = [], []
    rows = range(len(xs))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="train indexer", unit="layer")
    for i in rows:
        m, before, after = train_layer(xs[i].cpu(), targets[i].cpu(), cfg, i)
        layers.append(m)
        losses.append((round(before, 4), round(after, 4)))
    training = {
        "text": [
            {
                k: v
                for k, v in p.provenance().items()
                if k in ("id", "file", "char_start", "char_end")
            }
            for p in prompts
        ],
        "tokens": cfg.sequences * cfg.tokens,
        "loss": "KL(dense attention mass summed over heads || softmax(indexer scores))",
        "kl_before_after_per_layer": losses,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return LightningIndexer(layers, cfg, backbone.ref.name, training=training)
