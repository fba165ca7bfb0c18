"""Real text that ships offline with installed packages, cut into token-exact prompts.

Capture needs prompts of real text without a network: the Python documentation that CPython
installs (``pydoc_data/topics.py``), numpy's API docstrings and a few standard-library modules.
Every prompt records where it came from (package, version, file, sha256 of the file, the
character range and the token ids) so a trace can be reproduced and checked.

No torch here: the tokenizer is any object with the Hugging Face ``__call__`` signature.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsacache.errors import DsacacheError


@dataclass(frozen=True)
class TextSource:
    """A text and where it came from."""

    name: str
    text: str = field(repr=False)
    package: str
    version: str
    file: str
    sha256: str
    transform: str = "raw file, utf-8"

    def provenance(self) -> dict[str, Any]:
        """The fields a trace manifest records for this source."""
        return {
            "source": self.name,
            "package": self.package,
            "version": self.version,
            "file": self.file,
            "sha256": self.sha256,
            "transform": self.transform,
        }


@dataclass(frozen=True)
class Prompt:
    """One request's prompt: token ids cut from a source, with their provenance."""

    ids: list[int] = field(repr=False)
    source: TextSource
    char_start: int
    char_end: int

    @property
    def id(self) -> str:
        """A short name: the source and the first character of the slice."""
        return f"{self.source.name}@{self.char_start}"

    def provenance(self) -> dict[str, Any]:
        """Everything needed to find this prompt again."""
        return {
            "id": self.id,
            **self.source.provenance(),
            "char_start": self.char_start,
            "char_end": self.char_end,
            "tokens": len(self.ids),
            "token_ids": list(self.ids),
        }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stdlib_file(rel: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / rel


def _python_docs() -> TextSource | None:
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        return None
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    path = Path(spec.origin)
    return TextSource(
        name="python-docs",
        text=text,
        package="python",
        version=platform.python_version(),
        file=f"stdlib/{path.parent.name}/{path.name}",
        sha256=_sha256(path),
        transform="values of the `topics` dict, sorted by key, joined by blank lines",
    )


def _numpy_docstrings() -> TextSource | None:
    spec = importlib.util.find_spec("numpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0])
    for rel in ("_core/_add_newdocs.py", "core/_add_newdocs.py"):
        path = root / rel
        if path.exists():
            from importlib.metadata import version

            return TextSource(
                name="numpy-docstrings",
                text=path.read_text(encoding="utf-8"),
                package="numpy",
                version=version("numpy"),
                file=f"numpy/{rel}",
                sha256=_sha256(path),
            )
    return None


def _stdlib_module(name: str, rel: str) -> TextSource | None:
    path = _stdlib_file(rel)
    if not path.exists():
        return None
    return TextSource(
        name=name,
        text=path.read_text(encoding="utf-8"),
        package="python",
        version=platform.python_version(),
        file=f"stdlib/{rel}",
        sha256=_sha256(path),
    )


def default_sources() -> list[TextSource]:
    """The built-in offline texts, prose first: Python docs, numpy docstrings, stdlib code."""
    found = [
        _python_docs(),
        _numpy_docstrings(),
        _stdlib_module("python-typing", "typing.py"),
        _stdlib_module("python-argparse", "argparse.py"),
    ]
    sources = [s for s in found if s is not None]
    if not sources:
        raise DsacacheError("no offline text found (Python's pydoc_data, numpy); pass --text FILE")
    return sources


def file_source(path: str | os.PathLike) -> TextSource:
    """A user's text file as a source."""
    p = Path(path)
    if not p.is_file():
        raise DsacacheError(f"--text {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DsacacheError(f"--text {path}: not a utf-8 text file") from None
    if not text.strip():
        raise DsacacheError(f"--text {path}: the file is empty")
    return TextSource(
        name=p.stem,
        text=text,
        package="file",
        version="",
        file=str(p.resolve()),
        sha256=_sha256(p),
    )


def _cut(tokenizer: Any, text: str, start: int, n_tokens: int) -> tuple[list[int], int] | None:
    """The first ``n_tokens`` token ids of ``text[start:]`` and the character where they end."""
    chars = 8 * n_tokens + 64
    while True:
        piece = text[start : start + chars]
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) > n_tokens or start + chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        return None
    return list(ids[:n_tokens]), start + int(offsets[n_tokens - 1][1])


def make_prompts(
    tokenizer: Any,
    requests: int,
    tokens: int,
    sources: list[TextSource] | None = None,
) -> list[Prompt]:
    """``requests`` prompts of exactly ``tokens`` token ids each, from distinct text slices.

    Request ``i`` reads source ``i % len(sources)``; successive requests on one source take
    consecutive, non-overlapping slices (each starting at the beginning of a line).
    """
    if requests < 1:
        raise DsacacheError(f"requests must be >= 1, got {requests}")
    if tokens < 1:
        raise DsacacheError(f"prompt tokens must be >= 1, got {tokens}")
    sources = default_sources() if sources is None else sources
    if not sources:
        raise DsacacheError("no text sources given")
    cursor = [0] * len(sources)
    prompts: list[Prompt] = []
    for i in range(requests):
        s = i % len(sources)
        src = sources[s]
        cut = _cut(tokenizer, src.text, cursor[s], tokens)
        if cut is None:
            left = len(src.text) - cursor[s]
            raise DsacacheError(
                f"text {src.name} ({src.file}) has too little text left ({left:,} characters) "
                f"for request {i} of {tokens:,} tokens; use fewer --requests or --prompt-tokens, "
                "or add --text FILE"
            )
        ids, end = cut
        prompts.append(Prompt(ids=ids, source=src, char_start=cursor[s], char_end=end))
        nxt = src.text.find("\n", end)
        cursor[s] = len(src.text) if nxt < 0 else nxt + 1
    return prompts
