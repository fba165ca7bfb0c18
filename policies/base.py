"""The policy plug-in API and registry.

A line-granularity policy is four Numba-compiled hooks over preallocated state arrays, which
the engine's replay loop calls (and Numba inlines; no first-class functions in the loop):

- ``init(line_state, set_state, glob, n_sets, ways, params)``: fill the state once;
- ``on_hit(line_state, set_state, glob, s, way, ways, clock, params)``: a read or write hit
  line ``way`` of set ``s``;
- ``on_fill(line_state, set_state, glob, s, way, ways, clock, params)``: a line was just
  placed in ``way`` (an empty way, or the victim's);
- ``victim(line_state, set_state, glob, s, ways, clock, params) -> way``: the set is full;
  choose the way to evict.

The engine fills a set's ways in order 0, 1, ... before it asks for victims (lines are never
invalidated), so a policy sees every way filled once before ``victim`` is first called.
``line_state`` is ``line_dtype``[n_sets * ways * line_words] (way ``w`` of set ``s`` owns
words from ``(s * ways + w) * line_words``), ``set_state`` is ``line_dtype``[n_sets *
set_words], ``glob`` int64[16] (global counters, RNG state) and ``params`` a
float64 array of the policy's numeric parameters in declaration order.

The engine writes context into ``glob`` before every hook call: ``glob[0]`` is the index of
the next access to the current line (only for policies with ``needs_future``; Belady),
``glob[1]`` the traffic class of the current access, ``glob[2]`` the line number (address >>
line bits) of the current access (ghost lists need it; both only for policies with
``reads_access``, the default), ``glob[3]`` the line size in bytes (set before ``init``).
``glob[0:4]`` belong to the engine; policies keep their own global state in ``glob[4:]``. Register a policy with
``register``; users add their own from a Python file (``dsacache replay --plugin FILE``)
without editing the package.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsacache.errors import DsacacheError
from dsacache.units import format_size, parse_size, parse_spec


@dataclass(frozen=True)
class Param:
    """A typed policy parameter: ``kind`` is int, float, size or choice."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None

    def parse(self, raw: str, policy: str) -> Any:
        """Convert the user's string, or raise naming the value and what is allowed."""
        try:
            if self.kind == "size":
                value: Any = parse_size(raw)
            elif self.kind == "int":
                value = int(raw)
            elif self.kind == "float":
                value = float(raw)
            else:
                if raw not in self.choices:
                    raise ValueError
                return raw
        except (ValueError, DsacacheError):
            allowed = {
                "size": "a size such as 16MiB",
                "int": "an integer",
                "float": "a number",
                "choice": "one of " + ", ".join(self.choices),
            }[self.kind]
            raise DsacacheError(f"policy {policy}: {self.name}={raw!r} is not {allowed}") from None
        if self.kind == "float" and not math.isfinite(value):
            raise DsacacheError(f"policy {policy}: {self.name}={raw} is not a finite number")
        if self.kind == "int" and abs(value) > 2**53:  # the compiled hooks get float64 params
            raise DsacacheError(f"policy {policy}: {self.name}={raw} is beyond +-2**53")
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise DsacacheError(
                f"policy {policy}: {self.name}={raw} is outside [{self.low}, {self.high}]"
            )
        return value

    def render(self, value: Any) -> str:
        """The value as a user would type it (sizes as ``16MiB``)."""
        return format_size(value).replace(" ", "") if self.kind == "size" else str(value)

    def describe(self) -> str:
        return f"{self.name}={self.render(self.default)} ({self.help})"


@dataclass(frozen=True)
class PolicyType:
    """A registered policy: its hooks, state sizes and parameters."""

    name: str
    description: str
    init: Callable | None = None
    on_hit: Callable | None = None
    on_fill: Callable | None = None
    victim: Callable | None = None
    params: tuple[Param, ...] = ()
    set_words: int = 1
    # Where set ``s``'s first state word lies: ``set_state[s * set_words]`` (set-major) or
    # ``set_state[s]`` (False: the words are columns of ``n_sets``, as in LRU's head and tail
    # arrays; a plug-in reusing LRU's list sets False). The engine prefetches that word a few
    # accesses ahead.
    set_major: bool = True
    line_words: int = 1
    line_dtype: type = np.int64
    needs_future: bool = False
    # The hooks read glob[1] (traffic class) or glob[2] (line number); False spares the engine
    # two stores per access (about 5% of a replay on a Zipf stream).
    reads_access: bool = True
    # Optional ``prefetch(line_state, set_state, s, ways)``: start loading the policy state of
    # set ``s``, which the engine looks up a few accesses later (hints to the CPU's caches,
    # for policies whose per-set state spans several cache lines; the engine already
    # prefetches the set's first word, see ``set_major``).
    prefetch: Callable | None = None
    # Optional ``check(ways, n_sets, policy)`` run when a cache is built: raises
    # ``DsacacheError`` for a geometry the policy cannot handle (e.g. tree-PLRU needs 2**k ways).
    check: Callable | None = None
    # "lines": the hooks above drive the set-associative engine. "tokens" / "reserve": the
    # policy is one of the simulator's object-granularity engines (simulator/caches.py),
    # configured by ``params`` alone.
    engine: str = "lines"


@dataclass(frozen=True)
class Policy:
    """A policy with its parameters bound, as parsed from ``name:key=value,...``."""

    type: PolicyType
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def label(self) -> str:
        """The canonical spec string, e.g. ``srrip:bits=2``."""
        changed = {
            p.name: p.render(self.values[p.name])
            for p in self.type.params
            if self.values[p.name] != p.default
        }
        return self.name + (
            ":" + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else ""
        )

    def param_array(self) -> np.ndarray:
        """Numeric parameters in declaration order (choices as their index)."""
        out = []
        for p in self.type.params:
            v = self.values[p.name]
            out.append(float(p.choices.index(v)) if p.kind == "choice" else float(v))
        return np.array(out or [0.0], dtype=np.float64)


_REGISTRY: dict[str, PolicyType] = {}


def register(policy: PolicyType) -> PolicyType:
    """Add a policy to the registry (a later registration of the same name replaces it)."""
    _REGISTRY[policy.name] = policy
    return policy


def registered() -> dict[str, PolicyType]:
    """All registered policies by name."""
    _load_builtin()
    return dict(_REGISTRY)


def split_plugin(spec: str) -> tuple[Path | None, str]:
    """``path/to/file.py:name[:k=v,...]`` -> (the plug-in file, ``name[:k=v,...]``); a spec
    without a file -> (None, spec)."""
    if ".py:" not in spec:
        return None, spec
    path, _, rest = spec.partition(".py:")
    return Path(path + ".py"), rest


def make_policy(spec: str | Policy, defaults: dict[str, Any] | None = None) -> Policy:
    """Parse ``name:key=value,...`` into a bound ``Policy``. ``path/to/file.py:name[:k=v,...]``
    first loads a plug-in file that registers ``name``. ``defaults``: values for the
    parameters the spec leaves out, where the policy has them (a GPU profile's, e.g. the
    ``persist_ways`` of ``hints``)."""
    if isinstance(spec, Policy):
        return spec
    _load_builtin()
    plugin, spec = split_plugin(spec)
    if plugin is not None:
        load_plugin(plugin)
    parsed = parse_spec(spec, "policy")
    if parsed.name not in _REGISTRY:
        raise DsacacheError(
            f"unknown policy {parsed.name!r}; choose one of: {', '.join(sorted(_REGISTRY))} "
            "(see `dsacache policies`)"
        )
    ptype = _REGISTRY[parsed.name]
    known = {p.name: p for p in ptype.params}
    unknown = [k for k in parsed.params if k not in known]
    if unknown:
        allowed = ", ".join(known) or "none"
        raise DsacacheError(
            f"policy {parsed.name}: unknown parameter(s) {', '.join(unknown)}; allowed: {allowed}"
        )
    values = {p.name: p.default for p in ptype.params}
    given = {k: str(v) for k, v in (defaults or {}).items() if k in known}
    for key, raw in (given | parsed.params).items():  # defaults checked as a spec's values are
        values[key] = known[key].parse(raw, parsed.name)
    return Policy(ptype, values)


def load_plugin(path: str | Path) -> None:
    """Import a Python file that calls ``register(...)`` for its own policies."""
    path = Path(path)
    if not path.is_file():
        raise DsacacheError(f"policy plug-in {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"dsacache_plugin_{path.stem}", path)
    if spec is None:
        raise DsacacheError(f"policy plug-in {path}: not a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's file: report it on one line
        raise DsacacheError(
            f"policy plug-in {path} failed to load: {type(e).__name__}: {e}"
        ) from None


_ENTRY_POINTS_LOADED = []


def _load_builtin() -> None:
    from dsacache.policies import builtin  # noqa: F401  (registers on import)

    if not _ENTRY_POINTS_LOADED:  # packages that declare policies under this entry-point group
        _ENTRY_POINTS_LOADED.append(True)
        from importlib.metadata import entry_points

        for ep in entry_points(group="dsacache.policies"):
            try:
                ep.load()
            except Exception as e:
                raise DsacacheError(f"policy entry point {ep.name} failed to load: {e}") from None
