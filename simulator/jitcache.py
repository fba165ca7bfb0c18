"""Compiled replay loops kept on disk between processes.

Numba compiles each policy's replay loop on first use: 2 s for LRU, 20 s for the object
engine behind ``token-lru``, more than half of a ``dsacache demo`` and a cost every sweep
worker paid again. Numba's own file cache (``cache=True``) cannot hold these loops: they are
closures over the policy's hooks, and numba keys a closure by its pickled cells, which differ
from process to process, so every process wrote a new entry and never read one back.

``persist`` gives a dispatcher numba's file cache (same folders, same ``NUMBA_CACHE_DIR``,
same checks of numba's version, the CPU and the defining file) keyed instead by a name the
caller chooses plus a digest of the sources the loop is compiled from: every file of
dsacache's ``simulator`` and ``policies`` packages, and the files that define the hooks
(a policy plug-in). Editing any of them compiles afresh; a plug-in's hooks that call helpers
from yet another file of the user's are not followed, nor are module-level values a hook
reads that its file computes at import (from the environment, say); hooks made by a factory
(closures) or typed into a session are compiled in every process. ``DSACACHE_JIT_CACHE=0``
turns the file cache off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from numba.core.caching import FunctionCache, IndexDataCacheFile

import dsacache.policies


class _KeyedCache(FunctionCache):
    """Numba's per-function file cache with a stable index key, one index file per key (the
    builds of one closure would otherwise share numba's index, where two processes saving
    at once can list one build's data under the other's key), and every data file tagged
    with its key, checked on load."""

    def __init__(self, py_func: Callable, key: str) -> None:
        super().__init__(py_func)
        self._stable_key = key
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._cache_file = IndexDataCacheFile(
            cache_path=self._cache_path,
            filename_base=f"{self._impl.filename_base}-{digest}",
            source_stamp=self._impl.locator.get_source_stamp(),
        )

    def _index_key(self, sig, codegen):
        return (sig, codegen.magic_tuple(), self._stable_key)

    def _save_overload(self, sig, data):
        if not self._enabled or not self._impl.check_cachable(data):
            return
        self._impl.locator.ensure_cache_path()
        key = self._index_key(sig, data.codegen)
        self._cache_file.save(key, (key, self._impl.reduce(data)))

    def _load_overload(self, sig, target_context):
        if not self._enabled:
            return None
        key = self._index_key(sig, target_context.codegen())
        stored = self._cache_file.load(key)
        if stored is None or stored[0] != key:  # another build's data: compile this one
            return None
        return self._impl.rebuild(target_context, stored[1])

    # A cache must never stop a replay: an unreadable or damaged entry is compiled afresh,
    # and a full or read-only disk leaves the loop compiled in this process only.
    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # pickle, OS and numba errors alike
            warnings.warn(f"dsacache: compiling afresh, the cached build is unreadable ({e})",
                          stacklevel=2)  # fmt: skip
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except OSError as e:
            warnings.warn(f"dsacache: compiled loop not kept on disk ({e})", stacklevel=2)


@functools.cache
def _package_digest() -> str:
    h = hashlib.sha256()
    for folder in (Path(__file__).parent, Path(dsacache.policies.__file__).parent):
        for path in sorted(folder.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _file_digest(paths: Iterable[str]) -> str:
    h = hashlib.sha256(_package_digest().encode())
    for path in sorted(set(paths)):
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def _identified(func: Callable) -> bool:
    """A hook its file, module and name identify: defined at the top level of a readable
    file (not a closure, whose cells could make two builds of one name differ, nor code
    typed into a session or ``exec``, whose source cannot be digested)."""
    return (
        func.__closure__ is None
        and "<locals>" not in func.__qualname__
        and Path(func.__code__.co_filename).is_file()
    )


def enabled() -> bool:
    """False when ``DSACACHE_JIT_CACHE=0`` asks for compilation in every process."""
    return os.environ.get("DSACACHE_JIT_CACHE", "1") != "0"


def persist(dispatcher, name: str | None = None, hooks: Iterable[Callable] = ()):
    """Give numba ``dispatcher`` (compiled lazily, without numba's ``cache=True``) a file
    cache keyed by ``name`` (what a generated build specialises on, e.g. the policy and its
    way count; default: the function's module and name) and the sources of the package and
    of ``hooks`` (njit functions compiled into it). Returns the dispatcher, so it also
    decorates: ``@persist`` over ``@njit``."""
    hooks = [getattr(h, "py_func", h) for h in hooks]
    if not enabled() or not all(_identified(h) for h in hooks):
        return dispatcher
    func = dispatcher.py_func
    name = name or f"{func.__module__}.{func.__qualname__}"
    names = ",".join(f"{h.__module__}.{h.__qualname__}" for h in hooks)
    files = [h.__code__.co_filename for h in hooks]
    try:
        dispatcher._cache = _KeyedCache(func, f"{name}|{names}|{_file_digest(files)}")
    except RuntimeError:  # numba found no writable cache folder: compile in-process only
        pass
    return dispatcher
