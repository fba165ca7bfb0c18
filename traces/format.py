"""The ``.dsatrace`` format: a directory of zstd Parquet parts plus ``manifest.json``.

One row per selection: ``request, step, position, layer, group, indices`` where ``indices``
are the KV token positions the indexer selected (unique, ascending, each ``< position``).
An optional ``scores`` column (list<float16>, one per index) holds the indexer's score of each
selected token (for the oracle indexer: its attention mass); a trace has it in every part or
in none, and the manifest's ``indexer.scores`` says what the values are.

Writing is crash-safe: each part goes to a temporary name, is fsynced and renamed, and the
manifest is replaced atomically after every part, so a killed writer leaves a trace of all
parts finished so far. Reading streams part by part and validates as it goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsacache import background
from dsacache.errors import TraceError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCALAR_COLUMNS = {
    "request": np.int32,
    "step": np.int32,
    "position": np.int32,
    "layer": np.int16,
    "group": np.int16,
}
ARROW_SCHEMA = pa.schema(
    [
        ("request", pa.int32()),
        ("step", pa.int32()),
        ("position", pa.int32()),
        ("layer", pa.int16()),
        ("group", pa.int16()),
        ("indices", pa.list_(pa.int32())),
    ]
)
SCORES_FIELD = pa.field("scores", pa.list_(pa.float16()))
FLOAT16_MAX = float(np.finfo(np.float16).max)
_ENCODING = {name: "DELTA_BINARY_PACKED" for name in SCALAR_COLUMNS}
_ENCODING["indices.list.element"] = "DELTA_BINARY_PACKED"


@dataclass
class SelectionBatch:
    """A block of trace rows as numpy arrays; row ``i`` selected ``indices[offsets[i]:offsets[i+1]]``.

    Batches read from a trace may hold read-only views of the decoded Parquet columns (no
    copy of 10^8 indices); copy an array before changing it."""

    request: np.ndarray
    step: np.ndarray
    position: np.ndarray
    layer: np.ndarray
    group: np.ndarray
    offsets: np.ndarray  # int64, len(rows) + 1, starts at 0
    indices: np.ndarray  # int32, flat
    scores: np.ndarray | None = None  # float32, flat, aligned with indices (optional)

    def __len__(self) -> int:
        return len(self.step)

    def row(self, i: int) -> np.ndarray:
        """The selected indices of row ``i``."""
        return self.indices[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def slice(self, start: int, stop: int) -> SelectionBatch:
        """Rows ``start`` to ``stop`` (exclusive) as views of this batch's arrays (no copy of
        their indices)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return SelectionBatch(
            **{name: getattr(self, name)[start:stop] for name in SCALAR_COLUMNS},
            offsets=self.offsets[start : stop + 1] - lo,
            indices=self.indices[lo:hi],
            scores=None if self.scores is None else self.scores[lo:hi],
        )

    def take(self, rows: np.ndarray) -> SelectionBatch:
        """A new batch with the given rows (integer positions or boolean mask), in that order."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[rows]
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return SelectionBatch(
            self.request[rows],
            self.step[rows],
            self.position[rows],
            self.layer[rows],
            self.group[rows],
            offsets,
            self.indices[gather],
            None if self.scores is None else self.scores[gather],
        )

    @staticmethod
    def from_dense(
        step: int, positions: np.ndarray, dense: np.ndarray, scores: np.ndarray | None = None
    ) -> SelectionBatch:
        """Rows of one decode step from ``dense`` ``[L, B, G, W]`` indices (``-1``: none; what
        a capture collects per step), ``positions`` ``[L, B]`` the context length of each
        (layer, request) and optionally ``scores`` beside the indices; row order layer,
        request, group (step-major)."""
        layers, batch, groups, width = dense.shape
        if positions.shape != (layers, batch):
            raise TraceError(f"positions has shape {positions.shape}; expected {(layers, batch)}")
        rows = dense.reshape(-1, width)
        keep = rows >= 0
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(keep.sum(1), out=offsets[1:])
        return SelectionBatch(
            request=np.tile(np.repeat(np.arange(batch, dtype=np.int32), groups), layers),
            step=np.full(len(rows), step, np.int32),
            position=np.repeat(positions.reshape(-1), groups).astype(np.int32),
            layer=np.repeat(np.arange(layers, dtype=np.int16), batch * groups),
            group=np.tile(np.arange(groups, dtype=np.int16), layers * batch),
            offsets=offsets,
            indices=rows[keep].astype(np.int32, copy=False),
            scores=None if scores is None else scores.reshape(-1, width)[keep],
        )

    @staticmethod
    def concat(batches: list[SelectionBatch]) -> SelectionBatch:
        """Join batches end to end (one batch comes back as it is, not copied)."""
        if not batches:
            return SelectionBatch.empty()
        if len(batches) == 1:
            return batches[0]
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for b in batches:
            offsets.append(b.offsets[1:] + base)
            base += int(b.offsets[-1])
        cols = {
            name: np.concatenate([getattr(b, name) for b in batches]) for name in SCALAR_COLUMNS
        }
        scored = [b.scores is not None for b in batches]
        if any(scored) and not all(scored):
            raise TraceError("cannot join rows with and without indexer scores")
        return SelectionBatch(
            **cols,
            offsets=np.concatenate(offsets),
            indices=np.concatenate([b.indices for b in batches]),
            scores=np.concatenate([b.scores for b in batches]) if all(scored) else None,
        )

    @staticmethod
    def empty() -> SelectionBatch:
        cols = {name: np.zeros(0, dtype=dt) for name, dt in SCALAR_COLUMNS.items()}
        return SelectionBatch(
            **cols, offsets=np.zeros(1, dtype=np.int64), indices=np.zeros(0, np.int32)
        )

    def to_pandas(self):  # -> pandas.DataFrame; pandas imported lazily (traces/ needs only numpy)
        import pandas as pd

        df = pd.DataFrame({name: getattr(self, name) for name in SCALAR_COLUMNS})
        df["indices"] = [self.row(i) for i in range(len(self))]
        if self.scores is not None:
            df["scores"] = [
                self.scores[self.offsets[i] : self.offsets[i + 1]] for i in range(len(self))
            ]
        return df


def check_rows(batch: SelectionBatch, where: str) -> None:
    """Raise ``TraceError`` naming the first row that breaks the format's rules."""
    n = len(batch)
    for name, dtype in SCALAR_COLUMNS.items():
        col = getattr(batch, name)
        if col.shape != (n,):
            raise TraceError(f"{where}: column {name!r} has {col.shape[0]} values for {n} rows")
        info = np.iinfo(dtype)
        if n and (col.min() < info.min or col.max() > info.max):
            raise TraceError(f"{where}: column {name!r} has values outside {np.dtype(dtype).name}")
    offsets, idx = batch.offsets, batch.indices
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(idx):
        raise TraceError(f"{where}: row offsets do not match the {len(idx)} stored indices")
    lengths = np.diff(offsets)
    if (lengths < 0).any():
        raise TraceError(f"{where}: row offsets are not ascending")
    if batch.scores is not None:
        if batch.scores.shape != idx.shape:
            raise TraceError(
                f"{where}: {len(batch.scores)} scores for {len(idx)} indices (one score per index)"
            )
        if len(idx) and not np.isfinite(batch.scores).all():
            raise TraceError(f"{where}: column 'scores' has values that are not finite")
        big = float(np.abs(batch.scores).max()) if len(idx) else 0.0
        if big > FLOAT16_MAX:
            raise TraceError(
                f"{where}: score {big:g} is too large for the float16 'scores' column "
                f"(at most {FLOAT16_MAX:g}); scale the scores down"
            )

    def fail(row: int, problem: str) -> None:
        raise TraceError(
            f"{where}: row {row} (request {batch.request[row]}, step {batch.step[row]}, "
            f"layer {batch.layer[row]}, group {batch.group[row]}): {problem}"
        )

    for name in ("request", "step", "layer", "group"):
        bad = np.flatnonzero(getattr(batch, name) < 0)
        if bad.size:
            fail(int(bad[0]), f"{name} {getattr(batch, name)[bad[0]]} is negative")
    bad = np.flatnonzero(batch.position < 1)
    if bad.size:
        fail(int(bad[0]), f"position {batch.position[bad[0]]} must be >= 1")
    if not len(idx):
        return
    # Vectorised: find the first row that breaks a rule, then say what is wrong with it. A
    # row with ascending indices is in range when its first and last index are, so the range
    # check reads two values per row instead of gathering a position per index.
    candidates = []
    neg = np.flatnonzero(idx < 0)
    if neg.size:
        candidates.append(int(np.searchsorted(offsets, neg[0], side="right") - 1))
    # a difference of two non-negative signed values cannot overflow (unsigned ones can)
    step = np.diff(idx if idx.dtype.kind == "i" else idx.astype(np.int64))
    borders = offsets[1:-1]
    step[borders[(borders > 0) & (borders < len(idx))] - 1] = 1  # across rows: no rule
    unsorted = np.flatnonzero(step <= 0)
    if unsorted.size:
        candidates.append(int(np.searchsorted(offsets, unsorted[0], side="right") - 1))
    rows = np.flatnonzero(lengths)
    high = np.flatnonzero(idx[offsets[rows + 1] - 1] >= batch.position[rows])
    if high.size:  # exact for every row before the first unsorted one, which is all we need
        candidates.append(int(rows[high[0]]))
    if candidates:
        r = min(candidates)
        row, pos = idx[offsets[r] : offsets[r + 1]], batch.position[r]
        out = np.flatnonzero((row < 0) | (row >= pos))
        if out.size:
            fail(r, f"index {row[out[0]]} is outside 0 <= index < position ({pos})")
        i = int(np.flatnonzero(np.diff(row.astype(np.int64)) <= 0)[0])
        fail(r, f"indices must be unique and ascending, found {row[i]} followed by {row[i + 1]}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _to_arrow(batch: SelectionBatch) -> pa.Table:
    lists = pa.ListArray.from_arrays(
        pa.array(batch.offsets.astype(np.int32)),
        pa.array(batch.indices.astype(np.int32, copy=False)),
    )
    cols = [
        pa.array(getattr(batch, name).astype(dt, copy=False)) for name, dt in SCALAR_COLUMNS.items()
    ]
    if batch.scores is None:
        return pa.Table.from_arrays([*cols, lists], schema=ARROW_SCHEMA)
    scores = pa.ListArray.from_arrays(
        pa.array(batch.offsets.astype(np.int32)), pa.array(batch.scores.astype(np.float16))
    )
    return pa.Table.from_arrays([*cols, lists, scores], schema=ARROW_SCHEMA.append(SCORES_FIELD))


class TraceWriter:
    """Write a trace crash-safely; use as a context manager.

    >>> with TraceWriter("t.dsatrace", model={...}, indexer={"kind": "oracle", "k": 64}) as w:
    ...     w.append(request=0, step=0, position=100, layer=0, group=0, indices=[0, 5, 99])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model: dict[str, Any],
        indexer: dict[str, Any],
        capture: dict[str, Any] | None = None,
        part_rows: int = 65536,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        if part_rows < 1:
            raise TraceError(f"part_rows must be >= 1, got {part_rows}")
        self.part_rows = part_rows
        self._pending: list[SelectionBatch] = []
        self._pending_rows = 0
        self._last_key: tuple[int, int] | None = None
        self._closed = False
        self.rows_written = 0  # rows in finished parts (on disk)
        if resume and (self.path / MANIFEST).exists():
            self._resume(model, indexer, capture or {})
            return
        if self.path.exists():
            if not overwrite:
                raise TraceError(f"{self.path} already exists (choose another --out or remove it)")
            if not (self.path / MANIFEST).exists() and any(self.path.iterdir()):
                raise TraceError(f"{self.path} exists and is not a trace; refusing to overwrite")
            for child in self.path.iterdir():
                child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = {
            "format": "dsatrace",
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": dict(model),
            "indexer": dict(indexer),
            "capture": dict(capture or {}),
            "order": "step-major",
            "complete": False,
            "parts": [],
        }
        self._write_manifest()

    def _resume(self, model: dict, indexer: dict, capture: dict) -> None:
        """Continue an interrupted trace: keep its finished parts, drop anything unfinished."""
        trace = open_trace(self.path)
        if trace.complete:
            raise TraceError(f"{self.path} is already complete; nothing to resume")
        for key, given in (("model", model), ("indexer", indexer), ("capture", capture)):
            if json.loads(json.dumps(given)) != trace.manifest.get(key):
                raise TraceError(
                    f"{self.path} was written with a different {key}; cannot resume it with these settings"
                )
        trace.validate()  # every finished part must be intact
        listed = {p["file"] for p in trace.parts} | {MANIFEST}
        for child in self.path.iterdir():  # temp files and a part renamed but never listed
            if child.name not in listed:
                child.unlink()
        self.manifest = trace.manifest
        self.rows_written = trace.rows

    # -- adding rows ---------------------------------------------------------------------------
    def append(
        self, *, request: int, step: int, position: int, layer: int, group: int, indices,
        scores=None,
    ) -> None:  # fmt: skip
        """Add one selection row (``scores``: the indexer's score of each index, optional)."""
        idx = np.asarray(indices, dtype=np.int64)
        self.append_batch(
            SelectionBatch(
                request=np.array([request], np.int64),
                step=np.array([step], np.int64),
                position=np.array([position], np.int64),
                layer=np.array([layer], np.int64),
                group=np.array([group], np.int64),
                offsets=np.array([0, len(idx)], np.int64),
                indices=idx,
                scores=None if scores is None else np.asarray(scores, np.float32),
            )
        )

    def append_batch(self, batch: SelectionBatch) -> None:
        """Add many rows at once (validated before anything is written)."""
        if self._closed:
            raise TraceError(f"{self.path}: writer is closed")
        if not len(batch):
            return
        check_rows(batch, f"{self.path}: rows being written")
        scored = batch.scores is not None
        if self.manifest.setdefault("scored", scored) != scored:
            raise TraceError(
                f"{self.path}: rows {'with' if scored else 'without'} indexer scores in a trace "
                f"whose earlier rows {'had none' if scored else 'had them'}"
            )
        keys = batch.step.astype(np.int64) * 65536 + batch.layer
        prev = None if self._last_key is None else self._last_key[0] * 65536 + self._last_key[1]
        if (prev is not None and keys[0] < prev) or (np.diff(keys) < 0).any():
            self.manifest["order"] = "unordered"
        self._last_key = (int(batch.step[-1]), int(batch.layer[-1]))
        self._pending.append(batch)
        self._pending_rows += len(batch)
        while self._pending_rows >= self.part_rows:
            whole = SelectionBatch.concat(self._pending)
            if len(whole) == self.part_rows:  # the common case when parts hold whole steps
                self._write_part(whole)
                self._pending, self._pending_rows = [], 0
                break
            self._write_part(whole.take(np.arange(self.part_rows)))
            rest = whole.take(np.arange(self.part_rows, len(whole)))
            self._pending = [rest] if len(rest) else []
            self._pending_rows = len(rest)

    def flush(self) -> None:
        """Write buffered rows as a part now."""
        if self._pending_rows:
            self._write_part(SelectionBatch.concat(self._pending))
            self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        """Flush and mark the trace complete."""
        if self._closed:
            return
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()
        self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was finished; the trace stays marked incomplete
            self.flush()
            self._closed = True

    # -- internals -----------------------------------------------------------------------------
    def _write_part(self, batch: SelectionBatch) -> None:
        name = f"part-{len(self.manifest['parts']):05d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(
            _to_arrow(batch),
            sink,
            compression="zstd",
            compression_level=3,  # the delta encoding does most of the work: level 9 saved 2% for 2.4x the time
            use_dictionary=False,
            column_encoding=_ENCODING,
            write_statistics=["step", "layer", "request"],
        )
        data = sink.getvalue().to_pybytes()
        _atomic_write(self.path / name, data)
        self.rows_written += len(batch)
        self.manifest["parts"].append(
            {
                "file": name,
                "rows": len(batch),
                "indices": int(batch.offsets[-1]),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "steps": [int(batch.step.min()), int(batch.step.max())],
                "max_position": int(batch.position.max()),
                "requests": int(batch.request.max()) + 1,
                "layers": int(batch.layer.max()) + 1,
                "groups": int(batch.group.max()) + 1,
            }
        )
        self._write_manifest()

    def _write_manifest(self) -> None:
        parts = self.manifest["parts"]
        self.manifest["totals"] = {
            **{
                key: max((p[key] for p in parts), default=0)
                for key in ("max_position", "requests", "layers", "groups")
            },
            "rows": sum(p["rows"] for p in parts),
            "indices": sum(p["indices"] for p in parts),
            "bytes": sum(p["bytes"] for p in parts),
        }
        text = json.dumps(self.manifest, indent=1, sort_keys=False) + "\n"
        _atomic_write(self.path / MANIFEST, text.encode())


@dataclass
class Trace:
    """A trace opened for reading. Parts are read (and verified) lazily, one at a time."""

    path: Path
    manifest: dict[str, Any]
    _verified: set[str] = field(default_factory=set, repr=False)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest.get("model", {})

    @property
    def indexer(self) -> dict[str, Any]:
        return self.manifest.get("indexer", {})

    @property
    def parts(self) -> list[dict[str, Any]]:
        return self.manifest["parts"]

    @property
    def rows(self) -> int:
        return sum(p["rows"] for p in self.parts)

    @property
    def num_indices(self) -> int:
        return sum(p["indices"] for p in self.parts)

    @property
    def stored_bytes(self) -> int:
        return sum(p["bytes"] for p in self.parts)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def step_major(self) -> bool:
        return self.manifest.get("order") == "step-major"

    def read_part(self, i: int, verify: bool = True) -> SelectionBatch:
        """Read part ``i`` as a ``SelectionBatch``; checks size, checksum, schema and rows."""
        meta = self.parts[i]
        file = self.path / meta["file"]
        where = f"{self.path.name}/{meta['file']}"
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise TraceError(f"{where}: part listed in {MANIFEST} is missing") from None
        if len(data) != meta["bytes"]:
            raise TraceError(
                f"{where}: truncated or damaged ({len(data)} bytes, {MANIFEST} says {meta['bytes']})"
            )
        if verify and meta["file"] not in self._verified:
            digest = hashlib.sha256(data).hexdigest()
            if digest != meta["sha256"]:
                raise TraceError(
                    f"{where}: checksum mismatch (sha256 {digest[:16]}..., {MANIFEST} says "
                    f"{meta['sha256'][:16]}...): the file is damaged"
                )
        try:
            # one thread: pyarrow 26's reader thread pool can abort the process at exit
            # ("terminate called without an active exception", about 1 in 10 runs under load)
            table = pq.read_table(pa.BufferReader(data), use_threads=False)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise TraceError(f"{where}: not a readable Parquet part ({e})") from None
        batch = _from_arrow(table, where)
        if len(batch) != meta["rows"]:
            raise TraceError(f"{where}: has {len(batch)} rows, {MANIFEST} says {meta['rows']}")
        if verify and meta["file"] not in self._verified:
            check_rows(batch, where)
            self._verified.add(meta["file"])
        return batch

    def iter_parts(self, verify: bool = True) -> Iterator[SelectionBatch]:
        """Stream the trace part by part (bounded memory)."""
        for i in range(len(self.parts)):
            yield self.read_part(i, verify)

    def iter_steps(self, verify: bool = True, read_ahead: bool = False) -> Iterator[SelectionBatch]:
        """Yield one batch per decode step, rows ordered by (layer, request, group).

        Streams with bounded memory when the trace is step-major (as the writer produces when
        rows arrive in step order); otherwise the whole trace is loaded and sorted.
        ``read_ahead`` decodes the next part in a worker thread while the caller works through
        the current one's steps (the Parquet decode releases the GIL; two parts in memory).
        """
        if not self.step_major:
            source = iter([self.read_all(verify)])
        elif read_ahead:
            source = background.read_ahead(self.iter_parts(verify))
        else:
            source = self.iter_parts(verify)
        carry: SelectionBatch | None = None
        for part in source:
            if carry is not None:
                part = SelectionBatch.concat([carry, part])
            if not len(part):
                continue
            order = np.lexsort((part.group, part.request, part.layer, part.step))
            if np.any(order[1:] < order[:-1]):  # the writer's order usually is this one already
                part = part.take(order)
            self._refuse_duplicate_rows(part.step, part.layer, part.request, part.group)
            steps = part.step
            cut = np.flatnonzero(np.diff(steps)) + 1
            bounds = [0, *cut.tolist(), len(part)]
            finished = len(bounds) - 2 if self.step_major else len(bounds) - 1
            for a, b in zip(bounds[:finished], bounds[1 : finished + 1], strict=True):
                yield part.slice(a, b)
            carry = part.slice(bounds[finished], len(part)) if self.step_major else None
        if carry is not None and len(carry):
            yield carry

    def _refuse_duplicate_rows(self, step, layer, request, group) -> None:
        """Raise ``TraceError`` if two rows, sorted by (step, layer, request, group), share
        all four: a replay would count that selection twice."""
        same = (np.diff(step) == 0) & (np.diff(layer) == 0) & (np.diff(request) == 0)
        same &= np.diff(group) == 0
        if same.any():
            i = int(np.flatnonzero(same)[0])
            raise TraceError(
                f"{self.path}: two rows for step {step[i]}, layer {layer[i]}, request "
                f"{request[i]}, group {group[i]}; a trace holds one row per (step, layer, "
                "request, group)"
            )

    def read_all(self, verify: bool = True) -> SelectionBatch:
        """The whole trace in memory."""
        return SelectionBatch.concat(list(self.iter_parts(verify)))

    def to_pandas(self):
        """The whole trace as a pandas DataFrame (indices as numpy arrays per row)."""
        return self.read_all().to_pandas()

    def validate(self) -> dict[str, Any]:
        """Read and check every part; return a summary (raises ``TraceError`` on a problem)."""
        steps: set[int] = set()
        layers: set[int] = set()
        groups: set[int] = set()
        requests: set[int] = set()
        kmax = 0
        keys = []
        for part in self.iter_parts(verify=True):
            keys.append(
                np.stack([part.step, part.layer, part.request, part.group]).astype(np.int64)
            )
            steps.update(np.unique(part.step).tolist())
            layers.update(np.unique(part.layer).tolist())
            groups.update(np.unique(part.group).tolist())
            requests.update(np.unique(part.request).tolist())
            if len(part):
                kmax = max(kmax, int(part.lengths.max()))
        if keys:
            key = np.concatenate(keys, axis=1)
            self._refuse_duplicate_rows(*key[:, np.lexsort(key[::-1])])
        nidx = self.num_indices
        return {
            "path": str(self.path),
            "complete": self.complete,
            "parts": len(self.parts),
            "rows": self.rows,
            "requests": len(requests),
            "steps": len(steps),
            "layers": len(layers),
            "groups": len(groups),
            "k": kmax,
            "indices": nidx,
            "bytes": self.stored_bytes,
            "bytes_per_index": self.stored_bytes / nidx if nidx else float("nan"),
        }


def _from_arrow(table: pa.Table, where: str) -> SelectionBatch:
    names = set(table.column_names)
    missing = [c for c in ARROW_SCHEMA.names if c not in names]
    if missing:
        raise TraceError(f"{where}: missing column(s) {', '.join(missing)}")
    cols: dict[str, np.ndarray] = {}
    for name, dtype in SCALAR_COLUMNS.items():
        col = table.column(name)
        if not pa.types.is_integer(col.type):
            raise TraceError(f"{where}: column {name!r} has type {col.type}, expected an integer")
        if col.null_count:
            raise TraceError(f"{where}: column {name!r} has missing values")
        cols[name] = col.to_numpy().astype(np.int64).astype(dtype, copy=False)
    lists = table.column("indices")
    if not (pa.types.is_list(lists.type) and pa.types.is_integer(lists.type.value_type)):
        raise TraceError(f"{where}: column 'indices' has type {lists.type}, expected list<int32>")
    if lists.null_count:
        raise TraceError(f"{where}: column 'indices' has missing rows")
    offsets, values = _flat_list(lists, "indices", where)
    if len(values) and (values.min() < 0 or int(values.max()) > np.iinfo(np.int32).max):
        raise TraceError(f"{where}: column 'indices' has values outside int32 / negative")
    scores = None
    if "scores" in names:
        col = table.column("scores")
        if not (pa.types.is_list(col.type) and pa.types.is_floating(col.type.value_type)):
            raise TraceError(
                f"{where}: column 'scores' has type {col.type}, expected list<float16>"
            )
        if col.null_count:
            raise TraceError(f"{where}: column 'scores' has missing rows")
        score_offsets, scores = _flat_list(col, "scores", where)
        if not np.array_equal(score_offsets, offsets):
            raise TraceError(f"{where}: rows have a different number of scores than indices")
        scores = scores.astype(np.float32)
    return SelectionBatch(
        **cols, offsets=offsets, indices=values.astype(np.int32, copy=False), scores=scores
    )


def _flat_list(column: pa.ChunkedArray, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, flat values) of a list column without missing values."""
    lists = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    values = lists.values
    if values.null_count:
        raise TraceError(f"{where}: column {name!r} has missing values")
    return offsets - offsets[0], values.to_numpy()[offsets[0] : offsets[-1]]


def open_trace(path: str | os.PathLike) -> Trace:
    """Open a ``.dsatrace`` directory, or a bundled trace by name (``bundled()``); checks the
    manifest, not yet the parts."""
    path = Path(path)
    if not path.exists():
        from dsacache.traces import DATA_DIR

        shipped = DATA_DIR / f"{path}.dsatrace"
        if len(path.parts) != 1 or not shipped.is_dir():
            raise TraceError(f"{path}: no such trace directory (nor a bundled trace name)")
        path = shipped
    if not path.is_dir():
        raise TraceError(f"{path}: a trace is a directory (NAME.dsatrace/), this is a file")
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise TraceError(f"{path}: no {MANIFEST}; not a dsacache trace") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise TraceError(f"{mpath}: expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TraceError(
            f"{mpath}: schema_version {version!r} is not supported (this dsacache reads "
            f"{SCHEMA_VERSION})"
        )
    parts = manifest.get("parts")
    if not isinstance(parts, list):
        raise TraceError(f"{mpath}: 'parts' must be a list")
    for i, p in enumerate(parts):
        ok = (
            isinstance(p, dict)
            and isinstance(p.get("file"), str)
            and "/" not in p["file"]
            and p["file"] not in ("", ".", "..")
            and all(
                isinstance(p.get(key), int) and p[key] >= 0 for key in ("rows", "indices", "bytes")
            )
            and isinstance(p.get("sha256"), str)
        )
        if not ok:
            raise TraceError(
                f"{mpath}: parts[{i}] must have file, rows, indices, bytes (>= 0) and sha256"
            )
    for key in ("model", "indexer", "capture"):
        if not isinstance(manifest.get(key, {}), dict):
            raise TraceError(f"{mpath}: '{key}' must be a JSON object")
    for section, key in (("model", "layers"), ("indexer", "k")):
        value = manifest.get(section, {}).get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise TraceError(f"{mpath}: {section}.{key} must be an integer >= 1, got {value!r}")
    return Trace(path, manifest)
