"""Trace statistics: how the DSA indexer's selections move from step to step and layer to layer.

``analyze(trace)`` streams the trace one decode step at a time and returns ``TraceStats``, a
set of pandas DataFrames. A *stream* is one (request, layer, group): the sequence of its
top-k selections over the decode. Per selection (trace row) it measures

- overlap with the stream's previous selection: Jaccard ``|A & B| / |A | B|`` and the share of
  this step's k that was selected in the previous step (``reused``);
- reuse distance in steps of every selected token (steps since the stream last selected it,
  0 when it never did) and recency (``position - index``: how far back in the context);
- the share of attention-sink tokens (``index < sinks``) and of recent-window tokens
  (``index >= position - window``);
- pages touched with ``page_tokens``-token pages and the bytes a page-granular fetch would
  move (whole pages, the last one only up to ``position``) against the selected bytes;
- the working set: distinct tokens a stream selected in the last N steps, for each N;
- cross-layer overlap: Jaccard of two layers' selections of the same request, group and step.

Memory is bounded by the trace's shape, not its length: one int32 per (stream, position)
remembers the step a token was last selected in, plus a few scalars per trace row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsacache.errors import DsacacheError
from dsacache.simulator.mrc import token_object_bytes
from dsacache.simulator.stream import check_requests, trace_shape
from dsacache.traces import Trace

MAX_REUSE_DISTANCE = 64  # reuse distances of 64 steps and more share the last bucket
STATE_LIMIT_BYTES = 2 << 30  # the per-(stream, position) state that analyze may allocate
WINDOWS = (1, 2, 4, 8, 16)


@dataclass
class TraceStats:
    """The tables ``analyze`` returns (columns are described in docs/analyze.md).

    - ``selections``: one row per (step, layer, group), averaged over the requests.
    - ``layers``: one row per (layer, group), averaged over steps and requests.
    - ``reuse``: histogram of reuse distances in steps per (layer, group); distance 0 counts
      first selections, ``MAX_REUSE_DISTANCE`` counts that many steps and more.
    - ``recency``: histogram of ``position - index`` per (layer, group) in power-of-two bins
      ``[lo, hi)``.
    - ``working_set``: distinct tokens per stream over the last ``window`` steps, per (window,
      step, layer, group): ``tokens`` (mean over requests) and ``bytes`` (all requests).
    - ``cross_layer``: mean Jaccard overlap of every pair of layers' selections.
    """

    selections: pd.DataFrame
    layers: pd.DataFrame
    reuse: pd.DataFrame
    recency: pd.DataFrame
    working_set: pd.DataFrame
    cross_layer: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name."""
        names = ("selections", "layers", "reuse", "recency", "working_set", "cross_layer")
        return {name: getattr(self, name) for name in names}

    def summary(self) -> dict[str, Any]:
        """Whole-trace figures: means over all selections, working sets of the whole batch."""
        sel = self.selections
        w = sel["rows"].to_numpy(np.float64)

        def mean(col: str) -> float:
            ok = np.isfinite(sel[col].to_numpy(np.float64))
            return float(np.average(sel[col][ok], weights=w[ok])) if ok.any() else float("nan")

        ws = self.working_set.groupby(["window", "step"])["bytes"].sum()
        ws = ws.groupby("window").mean()
        adjacent = self.layers["adjacent_layer_jaccard"].to_numpy(np.float64)
        adjacent = adjacent[np.isfinite(adjacent)]
        return {
            **self.meta,
            "jaccard": mean("jaccard"),
            "reused": mean("reused"),
            "sink_share": mean("sink_share"),
            "window_share": mean("window_share"),
            "recency_median": mean("recency_median"),
            "pages_per_selection": mean("pages"),
            "page_fetch_amplification": float(
                sel["page_fetch_bytes"].sum() / sel["selected_bytes"].sum()
            ),
            "selected_bytes_per_step": float(sel.groupby("step")["selected_bytes"].sum().mean()),
            "working_set_bytes": {int(k): float(v) for k, v in ws.items()},
            "adjacent_layer_jaccard": float(adjacent.mean()) if len(adjacent) else float("nan"),
        }

    def save(self, out: str | Path, fmt: str = "parquet") -> list[Path]:
        """Write every table to ``out/NAME.parquet`` (or ``.csv``) plus ``summary.json``."""
        if fmt not in ("parquet", "csv"):
            raise DsacacheError(f"table format {fmt!r} unknown; choose parquet or csv")
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise DsacacheError(f"--out {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, df in self.tables().items():
            path = out / f"{name}.{fmt}"
            if fmt == "csv":
                df.to_csv(path, index=False)
            else:
                df.to_parquet(path, index=False)
            paths.append(path)
        path = out / "summary.json"
        path.write_text(json.dumps(self.summary(), indent=1, default=float) + "\n")
        return [*paths, path]


def _defaults(trace: Trace, sinks: int | None, window: int | None) -> tuple[int, int]:
    idx = trace.indexer
    if sinks is None:
        sinks = int(idx.get("sink", 4))
    if window is None:
        window = int(idx["window"] if "window" in idx else idx.get("recency_window", 16))
    if sinks < 0 or window < 0:
        raise DsacacheError(f"sinks ({sinks}) and window ({window}) must be >= 0")
    return sinks, window


def analyze(
    trace: Trace,
    *,
    layout: str | None = None,
    requests: int | None = None,
    page_tokens: int = 64,
    windows: tuple[int, ...] = WINDOWS,
    sinks: int | None = None,
    window: int | None = None,
    cross_layer: bool = True,
    progress: bool = False,
) -> TraceStats:
    """Selection statistics of ``trace`` (see the module docstring), streamed step by step.

    ``layout`` sizes a token (default: the trace model's); ``requests`` analyzes only
    requests ``0..requests-1``; ``sinks``/``window`` default to the trace's indexer settings.
    """
    layers, groups, n_requests, max_position = trace_shape(trace)
    if requests is not None:
        n_requests = check_requests(requests, n_requests)
    if page_tokens < 1:
        raise DsacacheError(f"page_tokens must be >= 1, got {page_tokens}")
    windows = tuple(sorted({int(n) for n in windows}))
    if not windows or windows[0] < 1:
        raise DsacacheError(f"working-set windows must be >= 1 steps, got {windows}")
    sinks, window = _defaults(trace, sinks, window)
    token_bytes = token_object_bytes(trace, layout)
    span = max_position + 1
    n_streams = n_requests * layers * groups
    state_bytes = n_streams * span * 4
    if state_bytes > STATE_LIMIT_BYTES:
        raise DsacacheError(
            f"analyzing {n_requests} request(s) x {layers} layers x {groups} group(s) x "
            f"{span} positions needs {state_bytes / 2**30:.1f} GiB; pass requests= (--requests) "
            "to analyze fewer"
        )
    n_lg = layers * groups
    n_bins = max(int(max_position).bit_length(), 1)
    last = np.full(n_streams * span, -1, np.int32)  # step each token was last selected
    prev_step = np.full(n_streams, -1, np.int64)
    prev_len = np.zeros(n_streams, np.int64)
    first_step = np.full(n_streams, -1, np.int64)
    reuse_hist = np.zeros(n_lg * (MAX_REUSE_DISTANCE + 1), np.int64)
    recency_hist = np.zeros(n_lg * n_bins, np.int64)
    ws_parts: list[pd.DataFrame] = []
    row_parts: list[dict[str, np.ndarray]] = []
    n_rg = n_requests * groups
    cross_sum = np.zeros((layers, layers))
    cross_n = np.zeros((layers, layers))

    steps = trace.iter_steps()
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="analyze", unit="step")
    for rows in steps:
        rows = rows.take(rows.request < n_requests)
        n = len(rows)
        if not n:
            continue
        s = int(rows.step[0])
        req = rows.request.astype(np.int64)
        lay = rows.layer.astype(np.int64)
        grp = rows.group.astype(np.int64)
        sid = (req * layers + lay) * groups + grp
        lg = lay * groups + grp
        k = rows.lengths
        row_of = np.repeat(np.arange(n), k)
        idx = rows.indices.astype(np.int64)
        pos = rows.position.astype(np.int64)
        pos_t = pos[row_of]
        flat = sid[row_of] * span + idx
        before = last[flat]

        # overlap with the stream's previous selection
        ps = prev_step[sid]
        has_prev = ps >= 0
        inter = np.bincount(row_of, weights=before == ps[row_of], minlength=n)
        union = k + prev_len[sid] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            jaccard = np.where(has_prev, inter / union, np.nan)
            reused = np.where(has_prev, inter / k, np.nan)

        dist = np.where(before >= 0, np.minimum(s - before, MAX_REUSE_DISTANCE), 0)
        reuse_hist += np.bincount(
            lg[row_of] * (MAX_REUSE_DISTANCE + 1) + dist, minlength=len(reuse_hist)
        )
        recency = pos_t - idx  # >= 1: indices are < position
        rbin = np.frexp(recency.astype(np.float64))[1] - 1  # floor(log2), exact
        recency_hist += np.bincount(lg[row_of] * n_bins + rbin, minlength=len(recency_hist))
        starts = rows.offsets[:-1]
        # indices ascend, so recency descends: the middle element is the row's median recency
        has = k > 0
        mid = np.where(has, starts + (k - 1) // 2, 0)
        recency_median = np.where(has, pos - rows.indices[mid] if len(idx) else 0, np.nan)

        page = idx // page_tokens
        new_page = np.ones(len(idx), bool)
        new_page[1:] = (page[1:] != page[:-1]) | (row_of[1:] != row_of[:-1])
        page_len = np.minimum(page_tokens, pos_t - page * page_tokens)
        pages = np.bincount(row_of, weights=new_page, minlength=n)
        fetched = np.bincount(row_of, weights=new_page * page_len, minlength=n)

        row_parts.append(
            {
                "step": rows.step.astype(np.int32),
                "layer": rows.layer.astype(np.int16),
                "group": rows.group.astype(np.int16),
                "k": k,
                "jaccard": jaccard,
                "reused": reused,
                "new_tokens": np.bincount(row_of, weights=before < 0, minlength=n),
                "sink_share": np.bincount(row_of, weights=idx < sinks, minlength=n) / k,
                "window_share": np.bincount(row_of, weights=idx >= pos_t - window, minlength=n) / k,
                "recency_median": recency_median,
                "pages": pages,
                "selected_bytes": k * token_bytes,
                "page_fetch_bytes": fetched * token_bytes,
            }
        )

        last[flat] = s
        prev_step[sid] = s
        prev_len[sid] = k
        first_step[sid] = np.where(first_step[sid] < 0, s, first_step[sid])

        age = s - last.reshape(n_streams, span)[sid]  # steps since each token's last selection
        for w in windows:
            full = s - first_step[sid] >= w - 1  # the window lies inside the stream's decode
            if not full.any():
                continue
            distinct = np.count_nonzero(age[full] < w, axis=1)
            ws_parts.append(
                pd.DataFrame({"window": w, "step": s, "lg": lg[full], "tokens": distinct}).astype(
                    {"tokens": np.int64}
                )
            )

        if cross_layer:
            rg = req * groups + grp
            inter_m = _layer_intersections(
                (rg * span)[row_of] + idx, rg[row_of], lay[row_of], n_rg, layers
            )
            sizes = np.zeros((n_rg, layers))
            sizes[rg, lay] = k
            both = (sizes[:, :, None] > 0) & (sizes[:, None, :] > 0)
            union_m = sizes[:, :, None] + sizes[:, None, :] - inter_m
            with np.errstate(invalid="ignore", divide="ignore"):
                jm = np.where(both & (union_m > 0), inter_m / union_m, 0.0)
            cross_sum += jm.sum(axis=0)
            cross_n += both.sum(axis=0)

    if not row_parts:
        raise DsacacheError(f"{trace.path}: no selections for requests 0..{n_requests - 1}")
    cat = {key: np.concatenate([p[key] for p in row_parts]) for key in row_parts[0]}
    per_row = pd.DataFrame(cat)
    per_row["rows"] = 1
    keys = ["step", "layer", "group"]
    means = [c for c in per_row.columns if c not in (*keys, "rows", "selected_bytes")]
    means = [c for c in means if c != "page_fetch_bytes"]
    g = per_row.groupby(keys, sort=True)
    selections = g[means].mean()
    selections["rows"] = g["rows"].sum()
    selections["selected_bytes"] = g["selected_bytes"].sum()
    selections["page_fetch_bytes"] = g["page_fetch_bytes"].sum()
    selections = selections.reset_index()

    lg_layer, lg_group = np.divmod(np.arange(n_lg), groups)
    rh = reuse_hist.reshape(n_lg, MAX_REUSE_DISTANCE + 1)
    reuse = pd.DataFrame(
        {
            "layer": np.repeat(lg_layer, MAX_REUSE_DISTANCE + 1).astype(np.int16),
            "group": np.repeat(lg_group, MAX_REUSE_DISTANCE + 1).astype(np.int16),
            "distance": np.tile(np.arange(MAX_REUSE_DISTANCE + 1), n_lg),
            "count": rh.ravel(),
        }
    )
    lo = 1 << np.arange(n_bins)
    recency = pd.DataFrame(
        {
            "layer": np.repeat(lg_layer, n_bins).astype(np.int16),
            "group": np.repeat(lg_group, n_bins).astype(np.int16),
            "lo": np.tile(lo, n_lg),
            "hi": np.tile(2 * lo, n_lg),
            "count": recency_hist,
        }
    )
    if ws_parts:
        ws = pd.concat(ws_parts, ignore_index=True)
        ws = ws.groupby(["window", "step", "lg"], sort=True)["tokens"].agg(["mean", "sum"])
        ws = ws.reset_index()
        working_set = pd.DataFrame(
            {
                "window": ws["window"].astype(np.int32),
                "step": ws["step"].astype(np.int32),
                "layer": (ws["lg"] // groups).astype(np.int16),
                "group": (ws["lg"] % groups).astype(np.int16),
                "tokens": ws["mean"],
                "bytes": ws["sum"] * token_bytes,
            }
        )
    else:
        working_set = pd.DataFrame(
            {c: [] for c in ("window", "step", "layer", "group", "tokens", "bytes")}
        )

    la, lb = np.meshgrid(np.arange(layers), np.arange(layers), indexing="ij")
    with np.errstate(invalid="ignore", divide="ignore"):
        cross = np.where(cross_n > 0, cross_sum / np.maximum(cross_n, 1), np.nan)
    cross_layer = pd.DataFrame(
        {
            "layer_a": la.ravel().astype(np.int16),
            "layer_b": lb.ravel().astype(np.int16),
            "jaccard": cross.ravel(),
            "pairs": cross_n.ravel().astype(np.int64),
        }
    )

    layer_table = _layer_table(selections, reuse, working_set, cross, layers, windows)
    meta = {
        "trace": str(trace.path),
        "model": trace.model.get("name", "?"),
        "layers": layers,
        "groups": groups,
        "requests": n_requests,
        "steps": int(selections["step"].nunique()),
        "k": int(per_row["k"].max()),
        "token_bytes": token_bytes,
        "page_tokens": page_tokens,
        "sinks": sinks,
        "window": window,
    }
    return TraceStats(selections, layer_table, reuse, recency, working_set, cross_layer, meta)


def _layer_intersections(
    token: np.ndarray, rg: np.ndarray, layer: np.ndarray, n_rg: int, layers: int
) -> np.ndarray:
    """``[rg, a, b]``: tokens selected by both layers a and b of (request, group) ``rg``, from
    one step's selections (``token`` names a (request, group, index)). Each token selected by
    m layers adds its m x m layer pairs; counted with bincount (no BLAS: its threads stall
    when the CPUs are shared)."""
    order = np.argsort(token, kind="stable")
    token, rg, layer = token[order], rg[order], layer[order]
    start = np.flatnonzero(np.r_[True, token[1:] != token[:-1]])
    m = np.diff(np.r_[start, len(token)])
    m_of = np.repeat(m, m)  # group size of each element
    first_of = np.repeat(start, m)
    total = int(m_of.sum())
    elem = np.repeat(np.arange(len(token)), m_of)
    offset = np.arange(total) - np.repeat(np.cumsum(m_of) - m_of, m_of)
    partner = np.repeat(first_of, m_of) + offset
    codes = (rg[elem] * layers + layer[elem]) * layers + layer[partner]
    counts = np.bincount(codes, minlength=n_rg * layers * layers)
    return counts.reshape(n_rg, layers, layers).astype(np.float64)


def _layer_table(
    selections: pd.DataFrame,
    reuse: pd.DataFrame,
    working_set: pd.DataFrame,
    cross: np.ndarray,
    layers: int,
    windows: tuple[int, ...],
) -> pd.DataFrame:
    """One row per (layer, group): selection-weighted means and histogram summaries."""
    keys = ["layer", "group"]
    sel = selections.copy()
    w = sel["rows"].to_numpy(np.float64)
    out = sel.groupby(keys)[["rows"]].sum()
    for col in ("k", "jaccard", "reused", "sink_share", "window_share", "recency_median", "pages"):
        v = sel[col].to_numpy(np.float64)
        ok = np.isfinite(v)
        sel["_wv"] = np.where(ok, v * w, 0.0)
        sel["_w"] = np.where(ok, w, 0.0)
        g = sel.groupby(keys)
        out[col] = g["_wv"].sum() / g["_w"].sum()
    g = sel.groupby(keys)
    out["page_fetch_amplification"] = g["page_fetch_bytes"].sum() / g["selected_bytes"].sum()
    r = reuse.pivot_table(index=keys, columns="distance", values="count", aggfunc="sum")
    total = r.sum(axis=1)
    d = r.columns.to_numpy()
    again = r.loc[:, d > 0]
    out["first_selection_share"] = r[0] / total
    out["reuse_distance_mean"] = (again * d[d > 0]).sum(axis=1) / again.sum(axis=1)
    out["reuse_next_step_share"] = r[1] / total if 1 in r.columns else 0.0
    ws = working_set.groupby([*keys, "window"])["tokens"].mean().unstack("window")
    for w in windows:  # NaN where the trace has fewer than w steps
        out[f"working_set_{w}"] = ws[w] if w in ws.columns else np.nan
    adj = np.full(layers, np.nan)
    adj[1:] = np.diagonal(cross, offset=1)
    out["adjacent_layer_jaccard"] = adj[out.index.get_level_values("layer").to_numpy()]
    return out.reset_index()
