"""Capture real DSA top-k traces from a model's greedy decode with oracle sparse attention.

All requests are prompts of the same length (token-exact slices of real offline text), so they
decode together as one batch without padding. The prompt is prefilled densely; then every
decode step attends, in every layer, only to the oracle's top-k cached tokens (plus the new
token itself), and the next token is the sparse model's argmax. Rows are written step by step
(step-major: for each step all layers, requests and groups) through the crash-safe
``TraceWriter``.

Beside the sparse decode runs a dense reference on the same tokens (teacher-forced with the
sparse model's tokens, its own dense KV cache): the share of steps where both pick the same
next token is the manifest's ``agreement``. Up to the first disagreement of a request, the
sparse and a free-running dense greedy decode produce identical text.

``backend`` says what computes the sparse steps: ``eager`` (torch, float32; the CPU path and
the test oracle) or ``triton`` (dsacache's Triton DSA kernels: paged bf16 K/V mirror, device
top-k, the lightning indexer's logits kernel, sparse GQA decode; see ``kernel_attention``);
``auto`` takes ``triton`` on a CUDA device. The manifest's ``capture.backend`` records it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsacache.errors import DsacacheError
from dsacache.tracer.indexers import INDEXERS, OracleConfig
from dsacache.tracer.kernel_attention import (
    BACKENDS,
    TIE_ATOL,
    TIE_RTOL,
    KernelAttention,
    resolve_backend,
)
from dsacache.tracer.models import Backbone, load_backbone, resolve_model
from dsacache.tracer.sparse import SparseAttention
from dsacache.tracer.texts import default_sources, file_source, make_prompts
from dsacache.traces import SelectionBatch, TraceWriter


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture: model, indexer, prompts and decode length."""

    model: str = "smollm2-135m"
    indexer: str = "oracle"
    k: int = 64
    sink: int = 4
    window: int = 16
    granularity: str = "layer"
    steps: int = 16
    prompt_tokens: int = 256
    requests: int = 2
    texts: tuple[str, ...] = ()
    device: str = "cpu"
    indexer_weights: str = ""  # lightning: trained weights (dsacache train-indexer)
    scores: bool = True  # record each selected token's indexer score (2 bytes per index)
    backend: str = "auto"  # eager, triton (Triton DSA kernels) or auto (triton on CUDA)

    def oracle(self) -> OracleConfig:
        """The indexer's parameters."""
        return OracleConfig(
            k=self.k, sink=self.sink, window=self.window, granularity=self.granularity
        )

    def check(self) -> None:
        """Raise ``DsacacheError`` naming the first setting out of range (model not loaded)."""
        if self.indexer not in INDEXERS:
            raise DsacacheError(
                f"unknown indexer {self.indexer!r}; choose one of: {', '.join(INDEXERS)}"
            )
        self.oracle().check()
        if self.indexer == "lightning" and not self.indexer_weights:
            raise DsacacheError(
                "--indexer lightning needs --indexer-weights FILE (train one with "
                "dsacache train-indexer)"
            )
        for name in ("steps", "prompt_tokens", "requests"):
            if getattr(self, name) < 1:
                raise DsacacheError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_tokens + self.steps >= np.iinfo(np.int32).max:
            raise DsacacheError(
                f"prompt_tokens + steps must fit in int32, got {self.prompt_tokens}"
            )
        if self.requests > 4096:
            raise DsacacheError(f"requests must be <= 4096 (one batch), got {self.requests}")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise DsacacheError(f"unknown device {self.device!r}; use cpu or cuda[:N]") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise DsacacheError(f"device {self.device!r}: this torch sees no CUDA GPU; use cpu")
        if self.backend not in BACKENDS:
            raise DsacacheError(
                f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}"
            )
        resolve_backend(self.backend, self.device)


@dataclass
class CaptureResult:
    """What a capture produced: the trace path and its headline numbers."""

    path: Path
    agreement: float
    matching: int
    compared: int
    first_divergence: list[int | None]
    mass_recall: float
    timing_s: dict[str, float] = field(default_factory=dict)
    indexer_recall: float | None = None  # lightning: share of the oracle's top-k it picked
    backend: str = "eager"  # the backend that ran (auto resolved)
    check: dict[str, Any] | None = None  # check=True: kernels vs eager on the same inputs


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("dsacache", "torch", "transformers", "gguf", "accelerate", "tokenizers", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class _Forward:
    """Calls the model for the last position's logits, across transformers' kwarg renames."""

    def __init__(self, model: Any) -> None:
        params = inspect.signature(model.forward).parameters
        self.model = model
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()

    def __call__(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_kw: cache, "use_cache": True}
        if self.keep_kw:
            kwargs[self.keep_kw] = 1
        with torch.no_grad():
            out = self.model(input_ids=ids, **kwargs)
        return out.logits[:, -1].float()


def _step_rows(
    attn: SparseAttention, layers: int, step: int, position: int, scores: bool = True
) -> SelectionBatch:
    """One decode step's rows, ordered layer, request, group (the step's per-layer results
    come to the host once, ``attn.collect``; they stay in ``attn.host``)."""
    attn.host = attn.collect(layers)
    sel = attn.host["selections"]  # [L, B, G, k], every entry a selected token
    positions = np.full(sel.shape[:2], position)
    return SelectionBatch.from_dense(step, positions, sel, attn.host["scores"] if scores else None)


def _resumable(out: str | os.PathLike, cfg: CaptureConfig) -> dict[str, Any] | None:
    """The capture metadata of an interrupted capture at ``out`` made with ``cfg``, or None
    when there is nothing there to resume."""
    from dsacache.traces import open_trace

    if not (Path(out) / "manifest.json").exists():
        return None
    trace = open_trace(out)
    if trace.complete:
        raise DsacacheError(f"{out} is already complete; nothing to resume")
    meta = trace.manifest.get("capture", {})
    mine = json.loads(json.dumps(asdict(cfg)))
    if "backend" not in (meta.get("config") or {}):  # captured before backends existed
        mine.pop("backend")
    if meta.get("config") != mine:
        raise DsacacheError(f"{out} was captured with other settings; cannot resume it with these")
    return meta


def _check_same_step(out: str | os.PathLike, rows: SelectionBatch) -> None:
    """Raise unless the rows the trace at ``out`` holds for this step (all of them, or the
    first ones where a kill cut the step) equal ``rows``."""
    from dsacache.traces import open_trace

    step = int(rows.step[0])
    for part in open_trace(out).iter_steps():
        if int(part.step[0]) == step:
            mine = rows.take(np.arange(len(part)))
            same_scores = part.scores is None or np.array_equal(
                part.scores, mine.scores.astype(np.float16).astype(np.float32)
            )
            if not (np.array_equal(part.indices, mine.indices)
                    and np.array_equal(part.offsets, mine.offsets) and same_scores):  # fmt: skip
                raise DsacacheError(
                    f"{out}: decoding again gave other selections at step {step} than the "
                    "interrupted run (a different machine or library version?); cannot resume"
                )
            return


def capture_trace(
    cfg: CaptureConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    command: str | None = None,
    backbone: Backbone | None = None,
    part_rows: int = 65536,
    check: bool = False,
) -> CaptureResult:
    """Decode ``cfg.requests`` real-text prompts with oracle sparse attention; write the trace.

    ``resume=True`` continues an interrupted capture at ``out`` with the same settings: the
    decode is deterministic and the KV cache is not checkpointed, so it decodes again from the
    prompt but writes only the rows the trace does not hold yet (after checking that the last
    finished step comes out identical). ``check=True`` (triton backend) also recomputes every
    sparse layer's eager selection and attention on the same inputs and reports the agreement
    per layer (``CaptureResult.check``, manifest ``capture.kernel_check``)."""
    cfg.check()
    previous = _resumable(out, cfg) if resume else None
    if Path(out).exists() and not overwrite and previous is None:
        raise DsacacheError(
            f"{out} already exists (choose another --out, --force to replace it, or --resume "
            "to continue an interrupted capture)"
        )
    t0 = time.perf_counter()
    sources = [file_source(p) for p in cfg.texts] if cfg.texts else default_sources()
    if backbone is None:
        resolve_model(cfg.model)  # a clear error for an unknown model before slow imports
        backbone = load_backbone(cfg.model, device=cfg.device, quiet=not progress)
    if backbone.max_context and cfg.prompt_tokens + cfg.steps > backbone.max_context:
        raise DsacacheError(
            f"prompt_tokens + steps must be <= {backbone.max_context:,} (the model's context), "
            f"got {cfg.prompt_tokens:,} + {cfg.steps:,}"
        )
    prompts = make_prompts(backbone.tokenizer, cfg.requests, cfg.prompt_tokens, sources)
    t_load = time.perf_counter() - t0

    model = backbone.model
    device = next(model.parameters()).device
    backend = resolve_backend(cfg.backend, device)
    if check and backend != "triton":
        raise DsacacheError("check=True compares the triton backend with eager; use backend triton")
    kernels = None
    if backend == "triton":
        kernels = KernelAttention(cfg.requests, cfg.prompt_tokens + cfg.steps, device)
    ids = torch.tensor([p.ids for p in prompts], dtype=torch.long, device=device)
    oracle = cfg.oracle()
    forward = _Forward(model)
    prompt_meta = [{"request": i, **p.provenance()} for i, p in enumerate(prompts)]
    capture_meta: dict[str, Any] = {
        "tool": "dsacache capture",
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": _device_name(str(device)),
        "versions": _versions(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config": asdict(cfg),
        "decode": {
            "prefill": "dense, whole prompt at once",
            "steps": "greedy; every layer attends only to its selected tokens and the new token",
            "eos": "ignored (fixed number of steps)",
            "batch": "all requests together, equal prompt lengths, no padding",
            "position": "cached tokens at the step = prompt_tokens + step",
        },
        "prompts": prompt_meta,
        "backend": {
            "name": backend,
            "requested": cfg.backend,
            **(kernels.manifest() if kernels is not None else {}),
        },
    }
    if str(device).startswith("cuda"):
        from dsacache.kernels.ncu import device_metadata

        capture_meta["gpu"] = device_metadata()  # driver, clocks, L2, CUDA and Triton versions
    if backend == "triton":
        capture_meta["backend"]["kernels"] = (
            "kernels.indexer.select_topk (top-k, sink/window), "
            + ("kernels.indexer.indexer_logits (fp8 keys), " if cfg.indexer == "lightning" else "")
            + "kernels.sparse_decode.gqa_sparse_decode"
        )
    if previous is not None:
        if previous.get("prompts") != json.loads(json.dumps(prompt_meta)):
            raise DsacacheError(f"{out}: its prompts differ from this run's; cannot resume it")
        capture_meta = previous  # the manifest must stay as the interrupted run wrote it
        prompt_meta = previous["prompts"]
    layers = backbone.layers
    lightning = None
    indexer_meta = oracle.manifest(backbone.heads, backbone.kv_heads)
    if not cfg.scores:
        indexer_meta.pop("scores", None)
    if cfg.indexer == "lightning":
        from dsacache.tracer.lightning import load_indexer

        lightning = load_indexer(
            cfg.indexer_weights, backbone.ref.name, backbone.model.config.hidden_size, layers
        )
        for m in lightning.layers:
            m.to(device)
        dim = lightning.config.dim
        if backend == "triton" and (dim < 16 or dim & (dim - 1)):
            raise DsacacheError(
                f"--backend triton: the indexer kernel takes keys of a power-of-two dim >= 16; "
                f"{cfg.indexer_weights} has {dim}-dim keys (train with --dim 32, or capture "
                "with --backend eager)"
            )
        indexer_meta = {**indexer_meta, **lightning.manifest()}
    oracle_recall_sum = np.zeros(layers)
    recall_sum = np.zeros(layers)
    recall_rows = 0
    recall_min = 1.0
    check_sum: dict[str, np.ndarray] = {}
    check_max = {name: np.zeros(layers) for name in ("out_diff", "out_scale", "score_diff")}
    agree = np.zeros((cfg.requests, cfg.steps), dtype=bool)
    generated: list[torch.Tensor] = []
    dense_next: list[torch.Tensor] = []

    steps: Any = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="capture", unit="step", file=sys.stderr)
    with (
        SparseAttention(
            model, oracle, backbone.kv_heads, lightning=lightning, kernels=kernels, check=check
        ) as attn,
        TraceWriter(
            out,
            model=backbone.manifest(),
            indexer=indexer_meta,
            capture=capture_meta,
            overwrite=overwrite and previous is None,
            resume=previous is not None,
            part_rows=part_rows,
        ) as writer,
    ):
        rows_per_step = layers * cfg.requests * oracle.groups(backbone.kv_heads)
        done_steps, done_rows = divmod(writer.rows_written, rows_per_step)
        t1 = time.perf_counter()
        sparse_cache = forward.new_cache()
        attn.sparse = False
        attn.clear()
        token = forward(ids, sparse_cache).argmax(-1)
        if attn.calls != layers:
            raise DsacacheError(
                f"model {backbone.ref.name} ran {attn.calls} attention calls for {layers} layers; "
                "capture needs one standard attention per layer"
            )
        dense_cache = copy.deepcopy(sparse_cache)  # the prefill is dense for both
        generated.append(token)
        t_prefill = time.perf_counter() - t1
        t2 = time.perf_counter()
        t_sparse = 0.0
        for step in steps:
            position = cfg.prompt_tokens + step
            attn.clear()
            attn.sparse = True
            t3 = time.perf_counter()
            logits = forward(token[:, None], sparse_cache)
            rows = _step_rows(attn, layers, step, position, cfg.scores)
            t_sparse += time.perf_counter() - t3  # (the rows' host copy synchronises)
            if previous is not None and step == (done_steps if done_rows else done_steps - 1):
                _check_same_step(out, rows)  # the newest step the interrupted run wrote
            if step >= done_steps:  # (a step cut by a part boundary: only its missing rows)
                skip = done_rows if step == done_steps else 0
                writer.append_batch(rows.take(np.arange(skip, len(rows))))
            recall = attn.host["recall"].astype(np.float64)
            recall_sum += recall.sum(axis=(1, 2))
            recall_rows += recall[0].size
            recall_min = min(recall_min, float(recall.min()))
            if lightning is not None:
                oracle_recall_sum += attn.host["oracle_recall"].astype(np.float64).mean(axis=(1, 2))
            if check:
                for name in ("equal", "tied"):
                    per_layer_rows = attn.host[f"check_{name}"].reshape(layers, -1)
                    check_sum[name] = check_sum.get(name, 0) + per_layer_rows.sum(1)
                    check_sum[f"steps_{name}"] = check_sum.get(f"steps_{name}", 0) + int(
                        per_layer_rows.all()
                    )
                for name in ("out_diff", "out_scale", "score_diff"):
                    check_max[name] = np.maximum(check_max[name], attn.host[f"check_{name}"])
            attn.sparse = False
            attn.index_record = False  # the dense reference adds no indexer keys
            dense = forward(token[:, None], dense_cache).argmax(-1)
            attn.index_record = True
            token = logits.argmax(-1)
            agree[:, step] = (token == dense).cpu().numpy()
            generated.append(token)
            dense_next.append(dense)
        t_decode = time.perf_counter() - t2

        gen = torch.stack(generated, dim=1).cpu().tolist()
        dn = torch.stack(dense_next, dim=1).cpu().tolist()
        first = [int(np.argmin(row)) if not row.all() else None for row in agree]
        for meta, g, d in zip(prompt_meta, gen, dn, strict=True):
            meta["generated_ids"] = g
            meta["dense_next_ids"] = d
            meta["generated_text"] = backbone.tokenizer.decode(g)
        per_layer = recall_sum / recall_rows
        timing = {
            "load_and_prompts": round(t_load, 3),
            "prefill": round(t_prefill, 3),
            "decode": round(t_decode, 3),
            "decode_per_step": round(t_decode / cfg.steps, 4),
            "sparse_steps": round(t_sparse, 3),
            "sparse_per_step": round(t_sparse / cfg.steps, 5),
        }
        capture_meta.update(
            agreement={
                "next_token": float(agree.mean()),
                "matching": int(agree.sum()),
                "compared": int(agree.size),
                "first_divergence_step": first,
                "definition": "share of (request, step) where the sparse model's argmax equals "
                "the dense model's argmax on the same tokens (dense KV cache of its own)",
            },
            mass_recall={
                "mean": float(per_layer.mean()),
                "min": recall_min,
                "per_layer": [round(float(x), 5) for x in per_layer],
                "definition": "share of the dense attention mass on cached tokens that the "
                "selected tokens hold (summed over the heads sharing the selection)",
            },
            timing_s=timing,
        )
        if lightning is not None:
            per_layer_recall = oracle_recall_sum / cfg.steps
            capture_meta["indexer_recall_of_oracle"] = {
                "mean": float(per_layer_recall.mean()),
                "per_layer": [round(float(x), 4) for x in per_layer_recall],
                "definition": "share of the oracle's top-k (same k, sink, window) that the "
                "lightning indexer also picked, at the same decode state",
            }
        check_meta = None
        if check:
            rows_per_layer = cfg.steps * cfg.requests * oracle.groups(backbone.kv_heads)
            same, tied = (check_sum[n] / rows_per_layer for n in ("equal", "tied"))
            check_meta = {
                "rows_per_layer": rows_per_layer,
                "identical_per_layer": [round(float(x), 5) for x in same],
                "identical_modulo_ties_per_layer": [round(float(x), 5) for x in tied],
                "steps_identical": check_sum["steps_equal"] / cfg.steps,
                "steps_identical_modulo_ties": check_sum["steps_tied"] / cfg.steps,
                "max_abs_out_diff_per_layer": [float(x) for x in check_max["out_diff"]],
                "max_abs_out_per_layer": [float(x) for x in check_max["out_scale"]],
                "max_score_diff_rel_per_layer": [float(x) for x in check_max["score_diff"]],
                "tie_rtol": TIE_RTOL,
                "tie_atol": TIE_ATOL,
                "definition": "every sparse layer also ran the eager selection and attention "
                "on the same inputs; identical: same selected set; modulo ties: every "
                "differing token's eager score is within tie_atol + tie_rtol * max|score| of "
                "the eager k-th score (kernel_attention.selection_ties); out diff: kernel "
                "output vs eager float32 attention over the kernel's selection (max |out| "
                "beside it); score diff: max |kernel - eager score| / max |eager score| of a "
                "row (0 for the oracle, whose mass both compute alike)",
            }
            capture_meta["kernel_check"] = check_meta
        writer.manifest["capture"] = capture_meta
    return CaptureResult(
        path=Path(out),
        agreement=float(agree.mean()),
        matching=int(agree.sum()),
        compared=int(agree.size),
        first_divergence=first,
        mass_recall=float(per_layer.mean()),
        timing_s=timing,
        indexer_recall=(capture_meta.get("indexer_recall_of_oracle") or {}).get("mean"),
        backend=backend,
        check=check_meta,
    )
