"""Parameter sweeps: replay one trace under the cross product of many configurations.

A *grid* maps parameter names (``PARAMS``) to lists of values. Every combination is a
*cell*: one ``replay`` of the trace under one policy and one workload. Cells run as tasks on
a Dask distributed cluster (a ``LocalCluster`` of worker processes by default, or any
scheduler the caller connects to: the same code path). As each cell finishes, the client
writes its rows as one Parquet part file of the output directory, crash-safe (temp file,
fsync, rename), named by the cell's key: a hash of the trace's identity and the cell's full
canonical configuration. ``resume=True`` skips cells whose part exists, so an interrupted
sweep continues without duplicating rows, and a grid extended with new values only runs the
new cells.

The dataset (``load_sweep``) has one row per (cell, step, layer, class, tier): the columns
``cell``, the parameters of ``PARAMS`` (``cache_size``, ``ways`` and ``layout`` as resolved
by the replay), and replay's counters.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import pandas as pd

from dsacache.errors import DsacacheError
from dsacache.policies.base import split_plugin
from dsacache.units import parse_size, parse_spec

MANIFEST = "_sweep.json"  # leading "_": Parquet readers skip it when reading the directory
PART_PREFIX = "cell-"
_SCHEMA = 1


def _size(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() in ("default", "none", ""):
        return 0
    try:
        return int(parse_size(value))
    except DsacacheError as e:
        raise DsacacheError(f"sweep parameter {name}={value!r}: {e}") from None


def _int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "default":
        return 0
    try:
        if isinstance(value, bool) or int(value) != float(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise DsacacheError(f"sweep parameter {name}={value!r} is not an integer") from None


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str | int):
        raise DsacacheError(f"sweep parameter {name}={value!r} must be a string")
    return str(value).strip()


def _classes(name: str, value: Any) -> str:
    parts = [p.strip() for p in str(value).replace("+", ",").split(",") if p.strip()]
    return ",".join(parts)


@dataclass(frozen=True)
class Param:
    """A sweepable parameter: how a value is canonicalised, its default, what it means."""

    name: str
    convert: Callable[[str, Any], Any]
    default: Any
    help: str


PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param("policy", _text, "lru", "policy spec (dsacache policies), e.g. token-lru"),
        Param(
            "reservation",
            _size,
            0,
            "bytes reserved by 'reserve' policies (0: the spec's own); ignored by others",
        ),
        Param("gpu", _text, "h100", "GPU preset (h100, h200, a100, h200-calibrated) or profile"),
        Param("cache_size", _size, 0, "L2 size, e.g. 24MiB (0/default: the GPU's)"),
        Param("ways", _int, 0, "associativity (0/default: the GPU's)"),
        Param("set_hash", _text, "", "set-index hash: mod, xor, hash, mix (empty: the GPU's)"),
        Param("layout", _text, "", "KV layout spec (empty: from the trace's model)"),
        Param("batch", _int, 1, "requests decoded together"),
        Param("page_tokens", _int, 64, "tokens per KV page"),
        Param("page_order", _text, "contiguous", "page allocation: contiguous, shuffled"),
        Param("seed", _int, 0, "seed of the shuffled page order"),
        Param("classes", _classes, "index,kv,append", "traffic classes (index+kv+append)"),
        Param("reads_per_token", _int, 1, "CTAs reading each selected token"),
        Param(
            "heads",
            _int,
            0,
            "query heads of the attention kernel, for the query class "
            "(0/default: the trace model's)",
        ),
        Param("weight_bytes", _size, 0, "weights read per layer per step"),
        Param(
            "backend",
            _text,
            "",
            "attention kernel whose KV, query and partials reads the stream follows: triton, "
            "flashmla (empty: reads_per_token as given)",
        ),
    )
}


ADDED_LATER = ("heads", "backend")  # in a cell's key only when not at their default


def _policy_with_reservation(policy: str, reservation: int) -> tuple[str, int]:
    """The effective policy spec of a cell and the reservation that applies to it. A plug-in
    policy (``file.py:name[:k=v]``) keeps its file, made absolute so workers find it."""
    path, policy = split_plugin(policy)
    plugin = "" if path is None else str(path.resolve()) + ":"
    spec = parse_spec(policy, "policy")
    if spec.name != "reserve" or not reservation:
        return plugin + str(spec), 0
    params = dict(spec.params)
    params["bytes"] = str(int(reservation))  # exact bytes (a formatted size would round)
    params.pop("ways", None)  # an explicit byte reservation replaces a way count
    return plugin + str(type(spec)(spec.name, params)), reservation


def canonical(config: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's full configuration: every parameter of ``PARAMS``, canonical values."""
    unknown = sorted(set(config) - set(PARAMS))
    if unknown:
        raise DsacacheError(
            f"unknown sweep parameter(s) {', '.join(unknown)}; allowed: {', '.join(PARAMS)}"
        )
    out = {name: p.convert(name, config.get(name, p.default)) for name, p in PARAMS.items()}
    out["policy"], out["reservation"] = _policy_with_reservation(out["policy"], out["reservation"])
    if out["gpu"].lower().endswith(".json"):  # a GPU profile: absolute, so workers find it
        out["gpu"] = str(Path(out["gpu"]).resolve())
    if not out["set_hash"]:  # the GPU's own set index, recorded as such
        from dsacache.simulator.presets import gpu_preset

        out["set_hash"] = gpu_preset(out["gpu"]).set_hash
    return out


def cell_key(config: Mapping[str, Any], trace_id: str) -> str:
    """Stable 16-hex-digit key of a canonical configuration on a trace. A plug-in policy's
    file content is part of it, and a GPU profile's, so an edited plug-in or profile is
    replayed again on --resume."""
    extra = {}
    path, _ = split_plugin(str(config.get("policy", "")))
    if path is not None and path.exists():
        extra["plugin_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    profile = Path(str(config.get("gpu", "")))
    if profile.suffix.lower() == ".json" and profile.exists():  # an edited profile runs again
        extra["profile_sha256"] = hashlib.sha256(profile.read_bytes()).hexdigest()
    # parameters added after a sweep format was in use count only when set, so that older
    # sweep directories keep their keys and resume
    config = {k: v for k, v in config.items() if not (k in ADDED_LATER and v == PARAMS[k].default)}
    blob = json.dumps({"trace": trace_id, **config, **extra}, sort_keys=True,
                      separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(grid: Mapping[str, Iterable[Any] | Any]) -> list[dict[str, Any]]:
    """The cross product of ``grid`` as canonical configurations, in grid order, with
    duplicates dropped (e.g. a reservation crossed with a policy it does not apply to)."""
    names = list(grid)
    values = []
    for name in names:
        v = grid[name]
        v = list(v) if isinstance(v, list | tuple) else [v]
        if not v:
            raise DsacacheError(f"sweep parameter {name} has no values")
        values.append(v)
    cells, seen = [], set()
    for combo in product(*values):
        cfg = canonical(dict(zip(names, combo, strict=True)))
        frozen = json.dumps(cfg, sort_keys=True)
        if frozen not in seen:
            seen.add(frozen)
            cells.append(cfg)
    return cells


def _split_values(text: str) -> list[str]:
    """Split ``a,b,c`` where a policy spec's own ``key=value`` items stay with their spec:
    ``lru,reserve:bytes=8MiB,inner=token-lru`` is two values."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def parse_params(items: Iterable[str]) -> dict[str, list[str]]:
    """``["policy=lru,fifo", "cache_size=16MiB,32MiB"]`` -> a grid. A repeated name appends."""
    grid: dict[str, list[str]] = {}
    for item in items:
        name, eq, rest = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or name not in PARAMS:
            raise DsacacheError(
                f"--param {item!r}: expected NAME=v1,v2 with NAME one of {', '.join(PARAMS)}"
            )
        values = _split_values(rest)
        if not values:
            raise DsacacheError(f"--param {item!r} has no values")
        grid.setdefault(name, []).extend(values)
    return grid


def load_grid(path: str | os.PathLike) -> dict[str, list[Any]]:
    """Read a TOML grid: ``name = [values]`` (or a single value) at top level or under
    ``[grid]``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise DsacacheError(f"grid file {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise DsacacheError(f"grid file {path}: not valid TOML ({e})") from None
    if "grid" in data and isinstance(data["grid"], dict):
        data = data["grid"]
    grid = {}
    for name, value in data.items():
        key = name.replace("-", "_")
        if key not in PARAMS:
            raise DsacacheError(
                f"grid file {path}: unknown parameter {name!r}; allowed: {', '.join(PARAMS)}"
            )
        grid[key] = value if isinstance(value, list) else [value]
    return grid


def trace_identity(trace) -> str:
    """A digest of the trace's parts (their checksums), so keys differ between traces."""
    h = hashlib.sha256()
    for part in trace.parts:
        h.update(f"{part.get('file')}:{part.get('rows')}:{part.get('sha256')};".encode())
    return h.hexdigest()[:16]


def _workload(cfg: Mapping[str, Any], trace):
    from dsacache.simulator.workload import Workload, check_partials_backend

    workload = Workload(
        layout=cfg["layout"],
        batch=cfg["batch"],
        page_tokens=cfg["page_tokens"],
        page_order=cfg["page_order"],
        seed=cfg["seed"],
        classes=tuple(cfg["classes"].split(",")),
        weight_bytes=cfg["weight_bytes"],
        reads_per_token=cfg["reads_per_token"],
        heads=cfg["heads"],
    )
    check_partials_backend(workload.classes, cfg["backend"])
    if not cfg["backend"]:
        return workload
    from dsacache.kernels.decode_step import backend_workload

    return backend_workload(workload, trace, cfg["backend"], cfg["gpu"])


def check_cell(trace, cfg: Mapping[str, Any]) -> None:
    """Raise ``DsacacheError`` now (before any worker starts) if a cell cannot run."""
    from dsacache.policies import make_policy
    from dsacache.simulator.caches import make_model
    from dsacache.simulator.presets import gpu_preset
    from dsacache.simulator.stream import plan_replay

    policy = make_policy(cfg["policy"])
    from dsacache.simulator.engine import SET_HASHES

    if cfg["set_hash"] not in SET_HASHES:
        raise DsacacheError(
            f"sweep parameter set_hash={cfg['set_hash']!r}: use one of {', '.join(SET_HASHES)}"
        )
    overrides: dict[str, Any] = {"set_hash": cfg["set_hash"]}
    if cfg["ways"]:
        overrides["ways"] = cfg["ways"]
    config = gpu_preset(cfg["gpu"]).cache(cfg["cache_size"] or None, **overrides)
    amap = plan_replay(trace, _workload(cfg, trace))
    make_model(config, policy, amap.layers)  # checks policy against cache (e.g. reserved ways)


def run_cell(trace_path: str, cfg: dict[str, Any], key: str) -> pd.DataFrame:
    """Replay one cell; the rows that go into its part file (runs on a worker)."""
    from dsacache.simulator.replay import replay
    from dsacache.traces import open_trace

    trace = open_trace(trace_path)
    df = replay(
        trace,
        policies=[cfg["policy"]],
        gpu=cfg["gpu"],
        cache_size=cfg["cache_size"] or None,
        ways=cfg["ways"] or None,
        set_hash=cfg["set_hash"],
        workload=_workload(cfg, trace),
    )
    resolved = {
        **cfg,
        "cache_size": int(df.attrs["cache_bytes"]),
        "ways": int(df.attrs["ways"]),
        "layout": str(df.attrs["layout"]),
    }
    head = pd.DataFrame({"cell": key, **resolved}, index=df.index)
    body = df.drop(columns=["policy"])
    for col in ("class", "tier"):
        body[col] = body[col].astype(str)
    return pd.concat([head, body], axis=1)


def _part_path(out: Path, key: str) -> Path:
    return out / f"{PART_PREFIX}{key}.parquet"


def write_part(out: Path, key: str, df: pd.DataFrame, meta: Mapping[str, Any]) -> Path:
    """Write one cell's rows crash-safe: a reader sees the whole part or none of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dsacache.traces.format import _atomic_write

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"dsacache.sweep": json.dumps(dict(meta)).encode()}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    path = _part_path(out, key)
    _atomic_write(path, buf.getvalue())
    return path


def finished_cells(out: str | os.PathLike) -> set[str]:
    """Keys of the cells whose part file is complete (readable Parquet)."""
    import pyarrow.parquet as pq

    done = set()
    for path in Path(out).glob(f"{PART_PREFIX}*.parquet"):
        try:
            pq.read_metadata(path)
        except Exception:  # a damaged part is run again and replaced
            continue
        done.add(path.stem.removeprefix(PART_PREFIX))
    return done


def load_sweep(out: str | os.PathLike) -> pd.DataFrame:
    """All finished cells of a sweep directory as one DataFrame (parts in key order)."""
    import pyarrow.parquet as pq

    out = Path(out)
    parts = sorted(out.glob(f"{PART_PREFIX}*.parquet"))
    if not parts:
        raise DsacacheError(f"{out}: no finished sweep cells")
    frames = [pq.read_table(p, use_threads=False).to_pandas() for p in parts]  # see format.py
    for frame in frames:  # cells written before a parameter existed ran at its default
        for name in ADDED_LATER:
            if name not in frame:
                frame[name] = PARAMS[name].default
    return pd.concat(frames, ignore_index=True)


def summarize_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: its parameters and replay's summary (hit rates, memory time)."""
    from dsacache.simulator.replay import summarize

    names = ["cell", *PARAMS]
    rows = []
    for _, part in df.groupby("cell", sort=False):
        s = summarize(part).reset_index(drop=True)
        for name in reversed(names):
            s.insert(0, name, part[name].iloc[0])
        rows.append(s)
    return pd.concat(rows, ignore_index=True)


@dataclass
class SweepResult:
    """What ``run_sweep`` did: where the dataset is, which cells ran and which were skipped."""

    out: Path
    cells: list[dict[str, Any]]
    keys: list[str]
    ran: list[str]
    skipped: list[str]
    wall_s: float

    def load(self) -> pd.DataFrame:
        """The dataset of this sweep's cells."""
        df = load_sweep(self.out)
        return df[df["cell"].isin(self.keys)].reset_index(drop=True)


def _prepare_out(out: Path, trace_id: str, trace_path: str, resume: bool, force: bool) -> None:
    from dsacache.traces.format import _atomic_write

    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise DsacacheError(f"--out {out} is a file; a sweep writes a directory")
    if out.exists() and any(out.iterdir()):
        if force:
            for p in out.iterdir():
                if p.name == MANIFEST or p.name.startswith((PART_PREFIX, f".{PART_PREFIX}")):
                    p.unlink()
            if any(out.iterdir()):
                raise DsacacheError(f"{out} holds files that are not a sweep's; not overwriting")
        elif not resume:
            raise DsacacheError(f"{out} exists and is not empty; use --resume or --force")
        elif not manifest.exists():
            raise DsacacheError(f"{out} is not a sweep directory (no {MANIFEST})")
        else:
            old = json.loads(manifest.read_text())
            if old.get("trace_id") != trace_id:
                raise DsacacheError(
                    f"{out} holds a sweep of another trace ({old.get('trace')}); "
                    "resume with the same trace or use a new directory"
                )
            return
    out.mkdir(parents=True, exist_ok=True)
    meta = {"schema": _SCHEMA, "trace": trace_path, "trace_id": trace_id}
    _atomic_write(manifest, json.dumps(meta, indent=1).encode())


def run_sweep(
    trace,
    grid: Mapping[str, Iterable[Any] | Any],
    out: str | os.PathLike,
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    client=None,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
) -> SweepResult:
    """Run every cell of ``grid`` on ``trace`` on Dask and write the dataset ``out``.

    The cluster is ``client`` if given, else a ``Client(scheduler)``, else a ``LocalCluster``
    of ``jobs`` worker processes (default: one per CPU). Cells whose part already exists are
    skipped with ``resume``."""
    from dsacache.traces import Trace, open_trace

    if not isinstance(trace, Trace):
        trace = open_trace(trace)
    cells = expand(grid)
    if jobs is not None and jobs < 1:
        raise DsacacheError(f"--jobs must be >= 1, got {jobs}")
    for cfg in cells:
        check_cell(trace, cfg)
    trace_id = trace_identity(trace)
    trace_path = str(Path(trace.path).resolve())
    keys = [cell_key(c, trace_id) for c in cells]
    out = Path(out)
    _prepare_out(out, trace_id, trace_path, resume, force)
    done = finished_cells(out)
    todo = [(k, c) for k, c in zip(keys, cells, strict=True) if k not in done]
    skipped = [k for k in keys if k in done]
    start = time.perf_counter()
    ran: list[str] = []
    if todo:
        with _cluster(client, scheduler, jobs or min(len(todo), os.cpu_count() or 1)) as cl:
            ran = _run_cells(cl, trace_path, todo, out, progress)
    return SweepResult(out, cells, keys, ran, skipped, time.perf_counter() - start)


class _cluster:
    """Context manager yielding a Dask client: the caller's, a remote scheduler's, or a local
    cluster's (closed on exit)."""

    def __init__(self, client, scheduler: str | None, jobs: int) -> None:
        self.client, self.scheduler, self.jobs = client, scheduler, jobs
        self.owned: list[Any] = []

    def __enter__(self):
        if self.client is not None:
            return self.client
        import logging

        from distributed import Client, LocalCluster

        if self.scheduler:
            try:
                client = Client(self.scheduler, timeout="10s")
            except (OSError, TimeoutError, ValueError) as e:
                raise DsacacheError(
                    f"--scheduler {self.scheduler}: cannot connect ({type(e).__name__}: {e}); "
                    "expected tcp://host:port of a running dask scheduler"
                ) from None
            self.owned = [client]
            return client
        cluster = LocalCluster(
            n_workers=self.jobs,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        self.owned = [client, cluster]
        return client

    def __exit__(self, *exc) -> None:
        for obj in self.owned:
            obj.close()


def _run_cells(client, trace_path: str, todo, out: Path, progress: bool) -> list[str]:
    import uuid

    from distributed import as_completed

    run = uuid.uuid4().hex[:8]  # task keys unique per run: a rerun never meets a cancelled task
    futures = {}
    for key, cfg in todo:
        fut = client.submit(run_cell, trace_path, cfg, key, key=f"cell-{key}-{run}", pure=False)
        futures[fut] = (key, cfg)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="sweep", unit="cell")
    ran = []
    submitted = time.perf_counter()
    try:
        for fut in as_completed(futures):
            key, cfg = futures[fut]
            try:
                df = fut.result()
            except DsacacheError as e:
                raise DsacacheError(f"sweep cell {_describe(cfg)}: {e}") from None
            meta = {"config": cfg, "finished_after_s": round(time.perf_counter() - submitted, 3)}
            write_part(out, key, df, meta)
            ran.append(key)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        pending = [f for f in futures if not f.done()]
        if pending:  # interrupted: do not leave work running on a shared cluster
            client.cancel(pending)
    return ran


def _describe(cfg: Mapping[str, Any]) -> str:
    diff = [f"{k}={v}" for k, v in cfg.items() if v != PARAMS[k].default]
    return " ".join(diff) or "defaults"


def describe_params() -> str:
    """One line per sweepable parameter, for ``--help``."""
    return "\n".join(f"{p.name:<16} {p.help}" for p in PARAMS.values())
