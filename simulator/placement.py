"""Sharded KV placement: which GPU of which node holds each selected token.

When a request's KV cache is sharded over ``gpus`` GPUs per node and ``nodes`` nodes
(``owners = gpus x nodes``, owner ``o`` is GPU ``o % gpus`` of node ``o // gpus``), every
token a DSA indexer selects lives on one owner. For each trace row (decode step, layer,
request, KV group) this module counts the selected tokens per owner, the distinct pages a
fetch would touch on each, and the bytes a fetch to the query's GPU (its *home*) would move.

A placement is written ``UNIT:SCHEME[,key=value,...]``:

- ``UNIT``: ``tokens`` (each token placed on its own) or ``pages`` (whole ``page_tokens``-token
  pages placed; default 64 tokens per page, as the paged cache).
- ``SCHEME``: ``contiguous`` (the request's context split into ``owners`` equal ranges of
  units; ``length=`` tokens, default: the request's longest context in the trace),
  ``rr`` (unit ``u`` on owner ``u % owners``) or ``hash`` (a seeded hash of request and unit).
- ``home``: where the request's query runs: ``request`` (owner ``request % owners``, the
  default), ``first`` (owner 0) or ``last`` (the owner of the newest cached token).

Numpy only (plus the layout table for bytes per token).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from dsacache.errors import DsacacheError

if TYPE_CHECKING:
    import pandas as pd

UNITS = ("tokens", "pages")
SCHEMES = ("contiguous", "rr", "hash")
HOMES = ("request", "first", "last")
# Link between a query's home and an owner: same GPU, another GPU of the node, another node.
LINK_KINDS = ("local", "intra", "inter")
_KEYS = ("page_tokens", "seed", "length", "home")


@dataclass(frozen=True)
class Placement:
    """How KV units (tokens or pages) are spread over ``gpus`` x ``nodes`` owners."""

    unit: str = "pages"
    scheme: str = "rr"
    gpus: int = 1
    nodes: int = 1
    page_tokens: int = 64
    seed: int = 0
    length: int = 0  # contiguous: tokens split into ranges (0: the request's longest context)
    home: str = "request"

    @property
    def owners(self) -> int:
        """Number of owners (GPUs in all nodes)."""
        return self.gpus * self.nodes

    @property
    def spec(self) -> str:
        """The placement written back as a spec string."""
        extra = []
        if self.unit == "pages" and self.page_tokens != 64:
            extra.append(f"page_tokens={self.page_tokens}")
        if self.scheme == "hash" and self.seed:
            extra.append(f"seed={self.seed}")
        if self.scheme == "contiguous" and self.length:
            extra.append(f"length={self.length}")
        if self.home != "request":
            extra.append(f"home={self.home}")
        return ",".join([f"{self.unit}:{self.scheme}", *extra])

    def check(self) -> None:
        """Raise ``DsacacheError`` naming the first field out of range."""
        if self.unit not in UNITS:
            raise DsacacheError(
                f"placement unit {self.unit!r} unknown; choose one of: tokens, pages"
            )
        if self.scheme not in SCHEMES:
            raise DsacacheError(
                f"placement scheme {self.scheme!r} unknown; choose one of: {', '.join(SCHEMES)}"
            )
        if self.home not in HOMES:
            raise DsacacheError(
                f"placement home {self.home!r} unknown; choose one of: {', '.join(HOMES)}"
            )
        for name in ("gpus", "nodes", "page_tokens"):
            if getattr(self, name) < 1:
                raise DsacacheError(f"placement: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "length"):
            if getattr(self, name) < 0:
                raise DsacacheError(f"placement: {name} must be >= 0, got {getattr(self, name)}")

    def unit_of(self, token: np.ndarray) -> np.ndarray:
        """The placement unit (token or page number) of each token position."""
        token = np.asarray(token, np.int64)
        return token if self.unit == "tokens" else token // self.page_tokens

    def owner(self, request: np.ndarray, token: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Owner of each (request, token); ``length`` is the request's context length (tokens,
        used by ``contiguous`` only). Arrays broadcast against each other."""
        w = self.owners
        request = np.asarray(request, np.int64)
        unit = self.unit_of(token)
        if self.scheme == "rr":
            return unit % w
        if self.scheme == "hash":
            return _hash(request, unit, self.seed) % np.uint64(w)
        length = np.asarray(self.length or length, np.int64)
        units = np.maximum(self.unit_of(np.maximum(length - 1, 0)) + 1, 1)
        per = -(-units // w)  # units per owner, ceil
        return np.minimum(unit // per, w - 1)

    def home_of(self, request: np.ndarray, position: np.ndarray, length: np.ndarray) -> np.ndarray:
        """The owner whose GPU runs each request's query at a step with ``position`` tokens."""
        request = np.asarray(request, np.int64)
        if self.home == "request":
            return request % self.owners
        if self.home == "first":
            return np.zeros_like(request)
        newest = np.maximum(np.asarray(position, np.int64) - 1, 0)
        return self.owner(request, newest, length).astype(np.int64)

    def link(self, home: np.ndarray, owner: np.ndarray) -> np.ndarray:
        """Link kind (index into ``LINK_KINDS``) between each home and owner."""
        home, owner = np.asarray(home, np.int64), np.asarray(owner, np.int64)
        same_node = home // self.gpus == owner // self.gpus
        return np.where(home == owner, 0, np.where(same_node, 1, 2)).astype(np.int8)


def _hash(request: np.ndarray, unit: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit mix of (request, unit, seed) (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        x = (
            np.asarray(unit, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            + np.asarray(request, np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            + np.uint64(seed) * np.uint64(0x165667B19E3779F9)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def parse_placement(spec: str, gpus: int = 1, nodes: int = 1) -> Placement:
    """Parse ``pages:rr``, ``tokens:contiguous,length=32768``, ``pages:hash,seed=3,home=last``."""
    text = str(spec).strip()
    head, _, rest = text.partition(",")
    unit, colon, scheme = head.partition(":")
    if not colon:
        unit, scheme = "pages", unit  # bare scheme: pages
    fields: dict[str, object] = {"unit": unit.strip(), "scheme": scheme.strip()}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in _KEYS:
            raise DsacacheError(
                f"placement {text!r}: {item!r} is not one of {', '.join(k + '=' for k in _KEYS)}"
            )
        if key == "home":
            fields[key] = value
            continue
        try:
            fields[key] = int(value)
        except ValueError:
            raise DsacacheError(f"placement {text!r}: {key}={value!r} is not an integer") from None
    p = Placement(gpus=gpus, nodes=nodes, **fields)  # type: ignore[arg-type]
    if p.unit not in UNITS or p.scheme not in SCHEMES:
        raise DsacacheError(
            f"placement {text!r} unknown; expected UNIT:SCHEME with UNIT tokens or pages and "
            f"SCHEME {', '.join(SCHEMES)} (e.g. pages:rr)"
        )
    p.check()
    return p


@dataclass
class PlacementCounts:
    """Per trace row (step, layer, request, group): selected tokens and pages per owner.

    ``counts[i, o]`` tokens of row ``i`` live on owner ``o``; ``pages[i, o]`` distinct
    ``page_tokens``-token pages hold them there (the segments a gather would issue);
    ``home[i]`` is the owner that runs the query; ``fetch_bytes`` moves every remote owner's
    tokens to the home.
    """

    placement: Placement
    bytes_per_token: int
    step: np.ndarray
    layer: np.ndarray
    request: np.ndarray
    group: np.ndarray
    position: np.ndarray
    home: np.ndarray  # [rows]
    counts: np.ndarray  # [rows, owners] int64
    pages: np.ndarray  # [rows, owners] int64

    def __len__(self) -> int:
        return len(self.step)

    @property
    def links(self) -> np.ndarray:
        """Link kind from each row's home to every owner, ``[rows, owners]`` (``LINK_KINDS``)."""
        owners = np.arange(self.placement.owners)
        return self.placement.link(self.home[:, None], owners[None, :])

    @property
    def remote(self) -> np.ndarray:
        """Boolean ``[rows, owners]``: owner is not the home."""
        return self.home[:, None] != np.arange(self.placement.owners)[None, :]

    @property
    def fetch_bytes(self) -> np.ndarray:
        """Bytes a fetch of every remote owner's selected tokens moves, ``[rows, owners]``."""
        return np.where(self.remote, self.counts, 0) * self.bytes_per_token

    def per_step(self) -> pd.DataFrame:
        """One row per decode step: selected tokens by where they live relative to the query's
        GPU (local, another GPU of the node, another node), pages touched on remote owners,
        bytes an always-fetch moves, and the load imbalance (busiest owner / mean owner)."""
        import pandas as pd

        kind = self.links
        n = self.counts
        per_owner = pd.DataFrame(n).groupby(self.step).sum()
        frame = pd.DataFrame(
            {
                "step": self.step,
                "queries": 1,
                "tokens": n.sum(axis=1),
                "local_tokens": np.where(kind == 0, n, 0).sum(axis=1),
                "intra_tokens": np.where(kind == 1, n, 0).sum(axis=1),
                "inter_tokens": np.where(kind == 2, n, 0).sum(axis=1),
                "remote_pages": np.where(kind > 0, self.pages, 0).sum(axis=1),
                "fetch_MB": self.fetch_bytes.sum(axis=1) / 1e6,
            }
        )
        out = frame.groupby("step").sum()
        mean = per_owner.mean(axis=1).where(lambda m: m > 0)
        out["imbalance"] = (per_owner.max(axis=1) / mean).fillna(0.0)
        return out

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (step, layer, request, group, owner) holding selected
        tokens, with the link kind from the query's GPU, tokens, pages and fetch bytes."""
        import pandas as pd

        row, owner = np.nonzero(self.counts)
        kind = self.links[row, owner]
        return pd.DataFrame(
            {
                "step": self.step[row],
                "layer": self.layer[row],
                "request": self.request[row],
                "group": self.group[row],
                "home": self.home[row],
                "owner": owner,
                "link": pd.Categorical.from_codes(kind, categories=list(LINK_KINDS)),
                "tokens": self.counts[row, owner],
                "pages": self.pages[row, owner],
                "fetch_bytes": self.fetch_bytes[row, owner],
            }
        )

    def totals(self) -> dict[str, float]:
        """Whole-trace shares of selected tokens by link kind, and fetch bytes per step."""
        steps = self.per_step()
        tokens = max(float(steps["tokens"].sum()), 1.0)
        return {
            "steps": len(steps),
            "owners": self.placement.owners,
            "local_pct": 100 * float(steps["local_tokens"].sum()) / tokens,
            "intra_pct": 100 * float(steps["intra_tokens"].sum()) / tokens,
            "inter_pct": 100 * float(steps["inter_tokens"].sum()) / tokens,
            "fetch_MB_per_step": float(steps["fetch_MB"].mean()),
            "tokens_per_remote_page": float(
                (steps["intra_tokens"] + steps["inter_tokens"]).sum()
                / max(float(steps["remote_pages"].sum()), 1.0)
            ),
            "imbalance_mean": float(steps["imbalance"].mean()),
        }

    @staticmethod
    def concat(parts: list[PlacementCounts]) -> PlacementCounts:
        """Join per-step results (same placement and bytes per token)."""
        if not parts:
            raise DsacacheError("no placement rows to join")
        first = parts[0]
        arrays = {
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in ("step", "layer", "request", "group", "position", "home", "counts", "pages")
        }
        return PlacementCounts(first.placement, first.bytes_per_token, **arrays)


def place_rows(
    batch,
    placement: Placement,
    bytes_per_token: int,
    lengths: dict[int, int] | None = None,
) -> PlacementCounts:
    """Count the selected tokens of every row of a ``SelectionBatch`` per owner.

    ``lengths`` maps request -> its context length in tokens (for ``contiguous``; default:
    the row's own position, i.e. the context at that step)."""
    placement.check()
    w = placement.owners
    n = len(batch)
    request = np.asarray(batch.request, np.int64)
    position = np.asarray(batch.position, np.int64)
    if lengths:
        length = np.array([lengths.get(int(r), 0) for r in request], np.int64)
        length = np.maximum(length, position)
    else:
        length = position
    sizes = np.diff(np.asarray(batch.offsets, np.int64))
    row = np.repeat(np.arange(n, dtype=np.int64), sizes)
    tokens = np.asarray(batch.indices, np.int64)
    owner = placement.owner(request[row], tokens, length[row]).astype(np.int64)
    cell = row * w + owner
    counts = np.bincount(cell, minlength=n * w).reshape(n, w)
    page = tokens // placement.page_tokens
    if len(page):
        key = cell * (int(page.max()) + 1) + page
        distinct_cells = np.unique(key) // (int(page.max()) + 1)
    else:
        distinct_cells = np.zeros(0, np.int64)
    pages = np.bincount(distinct_cells, minlength=n * w).reshape(n, w)
    home = placement.home_of(request, position, length).astype(np.int64)
    return PlacementCounts(
        placement,
        int(bytes_per_token),
        np.asarray(batch.step, np.int64),
        np.asarray(batch.layer, np.int64),
        request,
        np.asarray(batch.group, np.int64),
        position,
        home,
        counts.astype(np.int64),
        pages.astype(np.int64),
    )


def request_lengths(trace, requests: Iterable[int] | None = None) -> dict[int, int]:
    """Each request's longest context (max position) over the whole trace."""
    out: dict[int, int] = {}
    wanted = None if requests is None else set(requests)
    for part in trace.iter_parts():
        for r in np.unique(part.request):
            if wanted is not None and int(r) not in wanted:
                continue
            top = int(part.position[part.request == r].max())
            out[int(r)] = max(out.get(int(r), 0), top)
    return out


def iter_place(
    trace,
    placement: Placement,
    *,
    layout: str | None = None,
    requests: int | None = None,
) -> Iterator[PlacementCounts]:
    """Per decode step of ``trace``, the placement counts of its rows (requests
    ``0..requests-1`` if given). Bytes per token come from the layout (default: the trace's)."""
    placement.check()
    from dsacache.simulator.stream import check_requests, layout_and_groups, trace_shape

    if requests is not None:
        check_requests(requests, trace_shape(trace)[2])
    kv, groups = layout_and_groups(trace, layout)
    bpt = kv.selection_bytes(groups)
    lengths = None
    if placement.scheme == "contiguous" and not placement.length:
        lengths = request_lengths(trace, None if requests is None else range(requests))
    for rows in trace.iter_steps():
        if requests is not None:
            rows = rows.take(rows.request < requests)
        if len(rows):
            yield place_rows(rows, placement, bpt, lengths)


def place(
    trace,
    placement: Placement | str,
    *,
    gpus: int | None = None,
    nodes: int | None = None,
    layout: str | None = None,
    requests: int | None = None,
) -> PlacementCounts:
    """Placement counts of every row of ``trace`` (all steps joined); ``placement`` may be a
    spec string, with ``gpus`` and ``nodes`` given separately."""
    if isinstance(placement, str):
        placement = parse_placement(placement, gpus or 1, nodes or 1)
    elif gpus is not None or nodes is not None:
        placement = replace(placement, gpus=gpus or placement.gpus, nodes=nodes or placement.nodes)
    parts = list(iter_place(trace, placement, layout=layout, requests=requests))
    if not parts:
        raise DsacacheError(f"{trace.path}: no trace rows to place")
    return PlacementCounts.concat(parts)
