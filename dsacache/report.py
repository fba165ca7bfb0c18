"""The analysis report of one trace: plots (PNG and SVG), one self-contained HTML file and a
Markdown variant.

``write_report(trace, "report.html")`` runs the analyzer (``simulator.analyze``), the
miss-ratio curves (``simulator.mrc``: exact LRU, SHARDS and OPT points, at token and line
granularity) and a replay with a few policies through the GPU's L2 model, then writes

- ``report.html``: everything in one file (images base64-embedded, tables, metadata and the
  command line), readable offline in any browser;
- ``report.md`` next to it, with the images in ``report_files/`` (PNG and SVG).

Plots use matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), so importing this
module never changes the process-wide pyplot backend.
"""

from __future__ import annotations

import base64
import html
import io
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsacache.errors import DsacacheError
from dsacache.simulator import mrc
from dsacache.simulator.analyze import TraceStats, analyze
from dsacache.simulator.layouts import trace_layout
from dsacache.simulator.stream import trace_shape
from dsacache.simulator.workload import Workload
from dsacache.traces import Trace, open_trace
from dsacache.units import format_size, parse_size, parse_spec

DEFAULT_POLICIES = ("lru", "hints:index=first", "belady")
DEFAULT_RESERVATION = 16 * 2**20
EXACT_LIMIT = 30_000_000  # estimated line accesses up to which the line MRC is also exact
OPT_LIMIT = 20_000_000  # accesses up to which OPT points are computed (whole stream in memory)
_BOUNDS = ("belady", "token-belady")


@dataclass
class ReportData:
    """Everything a report shows, computed once (see ``collect``)."""

    trace: Trace
    stats: TraceStats
    curves: dict[str, dict[str, mrc.MissRatioCurve]]  # granularity -> kind -> curve
    marks: dict[str, int]  # label -> cache size in bytes marked on the MRC plots
    replay: pd.DataFrame | None
    policy_table: pd.DataFrame | None
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def mrc_table(self) -> pd.DataFrame:
        """Hit ratios of every curve at the marked sizes."""
        rows = []
        for gran, curves in self.curves.items():
            for curve in curves.values():
                row = {"granularity": gran, "curve": curve.label}
                for label, size in self.marks.items():
                    row[f"{label} ({format_size(size)})"] = float(curve.hit_ratio(size)[0])
                rows.append(row)
        return pd.DataFrame(rows)

    def shards_error(self) -> pd.DataFrame:
        """SHARDS against exact on the same stream: mean and largest hit-ratio error."""
        rows = []
        for gran, curves in self.curves.items():
            if "lru" in curves and "shards" in curves:
                err = mrc.curve_error(curves["lru"], curves["shards"])
                rows.append(
                    {
                        "granularity": gran,
                        "sample_rate": curves["shards"].sample_rate,
                        "sampled_accesses": curves["shards"].accesses,
                        "accesses": curves["lru"].accesses,
                        "mean_abs_error": err["mae"],
                        "max_error": err["max_error"],
                        "sizes": err["points"],
                    }
                )
        return pd.DataFrame(rows)


def _reservation(policies: list[str]) -> int:
    for spec in policies:
        parsed = parse_spec(spec, "policy")
        if parsed.name == "reserve" and "bytes" in parsed.params:
            return parse_size(parsed.params["bytes"])
    return DEFAULT_RESERVATION


def _cache_model(gpu: str, cache_size: int | str | None) -> dict[str, Any]:
    """The L2 the replay uses: a calibrated preset or profile as given; for a nominal preset,
    the GPU's calibrated profile where dsacache bundles one (``h100`` -> ``h100-calibrated``);
    ``cache_size`` resizes it."""
    from dsacache.simulator.presets import CALIBRATED, calibrated_gpus, gpu_preset

    preset = gpu_preset(gpu)
    if preset.reported_l2_bytes is None and gpu.lower() in calibrated_gpus():
        gpu = gpu.lower() + CALIBRATED
        preset = gpu_preset(gpu)
    calibrated = preset.reported_l2_bytes is not None
    cfg = preset.cache()
    out: dict[str, Any] = {"replay_gpu": gpu, "l2_bytes": preset.reported_l2_bytes or cfg.size,
                           "cache_size": cfg.size, "effective": cfg.size if calibrated else None}  # fmt: skip
    if calibrated:
        out["model"] = preset.verified  # "calibrated: lru 28MiB 16-way ..., fit to ..."
    else:
        out["model"] = f"preset {preset.name}, {format_size(cfg.size)} (uncalibrated)"
    if cache_size is not None:
        out["cache_size"] = parse_size(cache_size)
        out["model"] += f"; resized to {format_size(out['cache_size'])}"
    return out


def collect(
    trace: Trace | str | Path,
    *,
    policies: list[str] | tuple[str, ...] | None = DEFAULT_POLICIES,
    gpu: str = "h100",
    cache_size: int | str | None = None,
    layout: str | None = None,
    batch: int | None = None,
    sample_rate: float = 0.01,
    opt: bool = True,
    progress: bool = False,
) -> ReportData:
    """Compute everything the report shows (statistics, MRCs, replay)."""
    from dsacache.simulator.replay import replay, summarize

    tr = trace if isinstance(trace, Trace) else open_trace(trace)
    policies = list(policies or [])
    requests = trace_shape(tr)[2]
    batch = requests if batch is None else batch
    if not 1 <= batch <= requests:
        raise DsacacheError(f"batch {batch} must be between 1 and the trace's {requests} requests")
    if not 0 < sample_rate <= 1:
        raise DsacacheError(f"sample rate must be in (0, 1], got {sample_rate}")
    cache = _cache_model(gpu, cache_size)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    stats = analyze(tr, layout=layout, requests=batch, progress=progress)
    timings["analyze"] = time.perf_counter() - t0

    marks = {"L2": cache["l2_bytes"]}
    if cache["effective"]:
        marks["effective L2"] = cache["effective"]
    if cache_size is not None:
        marks["replayed cache"] = cache["cache_size"]
    marks["reservation"] = _reservation(policies)

    t0 = time.perf_counter()
    token_bytes = mrc.token_object_bytes(tr, layout)
    keys, _ = mrc.collect(mrc.token_stream(tr, batch=batch))
    token = {
        "lru": mrc.lru_curve([(keys, None)], token_bytes, label="LRU (exact)"),
        "shards": mrc.lru_curve(
            [(keys, None)], token_bytes, sample_rate=sample_rate, label=f"SHARDS {sample_rate:g}"
        ),
    }
    if opt and len(keys) <= OPT_LIMIT:
        sizes = _opt_sizes(token["lru"], marks)
        token["opt"] = mrc.opt_curve(keys, token_bytes, sizes, label="OPT (Belady)")
    del keys
    timings["token_mrc"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wl = Workload(layout=layout or "", batch=batch)
    stream = mrc.line_stream(tr, workload=wl, classes=wl.classes, count=("kv",))
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, desc="line MRC", unit="step")
    # exact line counting costs ~150 ns an access: skip it (SHARDS only) for long streams
    exact = (
        mrc.StackDistances(128) if _line_estimate(tr, batch, token_bytes) <= EXACT_LIMIT else None
    )
    sampled = mrc.StackDistances(128, sample_rate)
    held: list[tuple[np.ndarray, np.ndarray]] | None = [] if opt else None
    n_held = 0
    for lines, counted in stream:
        sampled.feed(lines, counted)
        if exact is not None:
            exact.feed(lines, counted)
        if held is not None:
            n_held += len(lines)
            held = held + [(lines, counted)] if n_held <= OPT_LIMIT else None
    line = {"shards": sampled.curve(f"SHARDS {sample_rate:g}")}
    if exact is not None:
        line["lru"] = exact.curve("LRU (exact)")
    if held:
        lk, lc = mrc.collect(held)
        base = line.get("lru", line["shards"])
        line["opt"] = mrc.opt_curve(lk, 128, _opt_sizes(base, marks), lc, label="OPT (Belady)")
    timings["line_mrc"] = time.perf_counter() - t0

    df = table = None
    if policies:
        t0 = time.perf_counter()
        df = replay(
            tr, policies=policies, gpu=cache["replay_gpu"], cache_size=cache["cache_size"],
            workload=wl, progress=progress,
        )  # fmt: skip
        table = summarize(df)
        timings["replay"] = time.perf_counter() - t0
    settings = {
        "gpu": gpu,
        "cache model": cache["model"],
        "replayed cache": format_size(cache["cache_size"]),
        "layout": trace_layout(tr, layout).spec,
        "token bytes (per layer)": token_bytes,
        "batch": batch,
        "policies": ", ".join(policies) or "(none)",
        "SHARDS sample rate": sample_rate,
    }
    return ReportData(
        tr, stats, {"token": token, "line": line}, marks, df, table, settings, timings
    )


def _line_estimate(tr: Trace, batch: int, token_bytes: int) -> float:
    """Rough line accesses of the replay stream: KV gathers plus indexer-key reads."""
    requests = trace_shape(tr)[2]
    share = batch / requests
    kv = tr.num_indices * -(-token_bytes // 128)
    index = tr.rows * trace_shape(tr)[3] * 132 / 128
    return share * (kv + index)


def _opt_sizes(curve: mrc.MissRatioCurve, marks: dict[str, int]) -> np.ndarray:
    """A few log-spaced sizes up to the footprint, plus the marked ones (OPT costs a pass each)."""
    top = max(curve.footprint_bytes, 2 * curve.object_bytes)
    grid = np.geomspace(max(top / 256, curve.object_bytes), top, 4)
    sizes = np.concatenate([grid, [s for s in marks.values() if s < top * 1.25]])
    return np.unique(sizes.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
_COLORS = {"lru": "#1f77b4", "shards": "#ff7f0e", "opt": "#2ca02c"}
_MARK_STYLE = {"L2": ":", "effective L2": "--", "reservation": "-.", "replayed cache": "-"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_mrc(data: ReportData):
    """Miss ratio against cache size (bytes, log), token and line granularity side by side."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    titles = {
        "token": f"KV gathers, token objects ({data.settings['token bytes (per layer)']} B)",
        "line": "KV gathers in the full decode stream, 128 B lines",
    }
    lru_hit = None
    if data.policy_table is not None and "lru" in data.policy_table.index:
        lru_hit = float(data.policy_table.loc["lru", "kv_line_hit_rate"])
    for ax, (gran, curves) in zip(axes, data.curves.items(), strict=True):
        base = curves.get("lru", curves["shards"])
        top = max([base.footprint_bytes * 1.3, *data.marks.values()]) * 1.1
        low = max(base.object_bytes, min(top / 2000, min(data.marks.values()) / 64))
        sizes = np.unique(np.geomspace(low, top, 300).astype(np.int64))
        for kind in ("lru", "shards"):
            if kind in curves:
                ax.plot(
                    sizes / 2**20, curves[kind].miss_ratio(sizes), color=_COLORS[kind],
                    ls="-" if kind == "lru" else "--", label=curves[kind].label,
                )  # fmt: skip
        if "opt" in curves:
            o = curves["opt"]
            ax.plot(
                o.sizes_known / 2**20, 1 - o.hits_known, "o", color=_COLORS["opt"], label=o.label
            )
        for label, size in data.marks.items():
            ax.axvline(size / 2**20, color="0.35", ls=_MARK_STYLE.get(label, ":"), lw=1)
            ax.text(size / 2**20, 0.98, f"{label} ", rotation=90, va="top", ha="right",
                    fontsize=7, color="0.3")  # fmt: skip
        if gran == "line" and lru_hit is not None:
            cs = parse_size(data.settings["replayed cache"].replace(" ", ""))
            ax.plot([cs / 2**20], [1 - lru_hit], "kx", ms=8, label="replay: lru, set-assoc.")
        ax.set_xscale("log")
        ax.set_xlabel("cache size (MiB)")
        ax.set_title(titles[gran], fontsize=9)
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("miss ratio (fully associative)")
    return fig


def plot_heatmap(data: ReportData):
    """KV-gather sector hit rate per layer (rows) and policy (columns) from the replay."""
    kv = data.replay[data.replay["class"] == "kv"]
    g = kv.groupby(["layer", "policy"], observed=True)[["sector_hits", "sectors"]].sum()
    rate = (g["sector_hits"] / g["sectors"]).unstack("policy")
    fig = _figure(1.6 + 1.1 * rate.shape[1], 1.2 + 0.16 * rate.shape[0])
    ax = fig.subplots()
    im = ax.imshow(rate.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(rate.shape[1]), rate.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rate.shape[0]), rate.index, fontsize=6)
    ax.set_ylabel("layer")
    if rate.size <= 400:
        for (i, j), v in np.ndenumerate(rate.to_numpy()):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                        color="w" if v < 0.6 else "k")  # fmt: skip
    fig.colorbar(im, ax=ax, label="KV-gather sector hit rate")
    return fig


def plot_overlap(data: ReportData):
    """Step-to-step overlap over the decode: mean over layers, 10-90% band across layers."""
    sel = data.stats.selections.dropna(subset=["jaccard"])
    fig = _figure(7, 3.4)
    ax = fig.subplots()
    for col, color, label in (
        ("reused", "#1f77b4", "share of k selected in the previous step"),
        ("jaccard", "#d62728", "Jaccard with the previous step"),
    ):
        g = sel.groupby("step")[col]
        x = np.asarray(g.mean().index)
        ax.fill_between(x, g.quantile(0.1), g.quantile(0.9), color=color, alpha=0.18, lw=0)
        ax.plot(x, g.mean(), color=color, label=label)
    ax.set_ylim(0, 1)
    ax.set_xlabel("decode step")
    ax.set_ylabel("overlap (mean over layers)")
    ax.set_title("bands: 10th to 90th percentile over layers", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_recency(data: ReportData):
    """How far back the selections reach: position - index, power-of-two bins."""
    rec = data.stats.recency.groupby("lo")["count"].sum()
    share = rec / rec.sum()
    fig = _figure(7, 3.4)
    ax = fig.subplots()
    lo = share.index.to_numpy()
    ax.bar(lo, share.to_numpy(), width=lo, align="edge", color="#1f77b4", edgecolor="w")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recency: position - index (tokens back in the context)")
    ax.set_ylabel("share of selected tokens")
    ax2 = ax.twinx()
    ax2.plot(2 * lo, share.cumsum().to_numpy(), color="#d62728", marker=".", lw=1)
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative share", color="#d62728")
    ax.grid(alpha=0.3)
    return fig


def plot_policies(data: ReportData):
    """KV-gather hit rate per policy; offline bounds grey, the best bound as a dashed line."""
    t = data.policy_table
    fig = _figure(7, 0.9 + 0.42 * len(t))
    ax = fig.subplots()
    bound = [any(b in p for b in _BOUNDS) for p in t.index]
    colors = ["#999999" if b else "#1f77b4" for b in bound]
    ax.barh(range(len(t)), t["kv_hit_rate"], color=colors)
    for i, v in enumerate(t["kv_hit_rate"]):
        ax.text(v, i, f" {v:.1%}", va="center", fontsize=8)
    if any(bound):
        best = float(t["kv_hit_rate"][bound].max())
        ax.axvline(best, color="k", ls="--", lw=1)
        ax.set_title(f"dashed: best offline (OPT) bound, {best:.1%}", fontsize=8)
    ax.set_yticks(range(len(t)), t.index, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("KV-gather sector hit rate (grey: offline bounds)")
    return fig


def figures(data: ReportData) -> dict[str, Any]:
    """Every plot of the report by name (matplotlib Figures)."""
    out = {
        "mrc": plot_mrc(data),
        "overlap": plot_overlap(data),
        "recency": plot_recency(data),
    }
    if data.replay is not None:
        out["policies"] = plot_policies(data)
        out["heatmap"] = plot_heatmap(data)
    return out


# ----------------------------------------------------------------------------------------------
# HTML and Markdown
# ----------------------------------------------------------------------------------------------
CAPTIONS = {
    "mrc": "Miss-ratio curves of fully-associative LRU at every size (exact stack distances), "
    "the SHARDS estimate and OPT points. Vertical lines: the GPU's L2, its calibrated effective "
    "size for reuse, the reservation size. The cross is the replayed set-associative LRU.",
    "policies": "KV-gather hit rate of each replayed policy; grey bars are offline bounds.",
    "heatmap": "KV-gather hit rate per layer and policy (replay).",
    "overlap": "How much of each step's selection was selected in the previous step.",
    "recency": "How far back in the context the selected tokens lie.",
}
TITLES = {
    "mrc": "Miss-ratio curves",
    "policies": "Policy comparison",
    "heatmap": "Per-layer hit rate",
    "overlap": "Step-to-step overlap",
    "recency": "Recency of the selected tokens",
}

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>dsacache report: {{ name }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 2px 7px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; } figure { margin: 0.8em 0; }
figcaption { font-size: 0.85em; color: #555; } code { background: #f5f5f5; padding: 1px 4px; }
.scroll { max-height: 420px; overflow: auto; display: inline-block; }
</style></head><body>
<h1>dsacache report: {{ name }}</h1>
<p>Command: <code>{{ command }}</code><br>Written {{ date }} by dsacache {{ version }}.</p>
<h2>Run</h2>
{{ settings }}
<h2>Trace</h2>
{{ trace_meta }}
<h2>Summary statistics</h2>
{{ summary }}
{% for fig in figs %}
<h2>{{ fig.title }}</h2>
<figure><img alt="{{ fig.title }}" src="data:image/png;base64,{{ fig.png }}">
<figcaption>{{ fig.caption }}</figcaption></figure>
{% if fig.table %}{{ fig.table }}{% endif %}
{% endfor %}
<h2>Per layer</h2>
<div class="scroll">{{ layers }}</div>
<h2>Timings</h2>
{{ timings }}
</body></html>
"""


def _html_table(df: pd.DataFrame, index: bool = False) -> str:
    return df.to_html(index=index, border=0, float_format=lambda x: f"{x:.4g}", na_rep="")


def _kv_table(d: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({"": list(d), "value": [str(v) for v in d.values()]})


def _fmt(x: Any) -> str:
    if isinstance(x, float | np.floating):
        return "" if not np.isfinite(x) else f"{x:.4g}"
    return str(x)


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table (tabulate through pandas): numbers to 4 significant
    digits, missing values blank, pipes in cells escaped."""
    if index:
        df = df.reset_index()
    cells = df.map(lambda v: _fmt(v).replace("|", "\\|"))
    return cells.to_markdown(index=False, disable_numparse=True)


def _summary_table(stats: TraceStats) -> pd.DataFrame:
    s = stats.summary()
    rows = {
        "selections (rows)": int(stats.selections["rows"].sum()),
        "k (largest)": s["k"],
        "Jaccard with the previous step": s["jaccard"],
        "share of k selected in the previous step": s["reused"],
        f"attention-sink share (index < {s['sinks']})": s["sink_share"],
        f"recent-window share (last {s['window']} tokens)": s["window_share"],
        "median recency (tokens back)": s["recency_median"],
        f"pages touched per selection ({s['page_tokens']}-token pages)": s["pages_per_selection"],
        "page-granular fetch / selected bytes": s["page_fetch_amplification"],
        "selected KV per step (all layers, batch)": format_size(int(s["selected_bytes_per_step"])),
        "Jaccard of adjacent layers": s["adjacent_layer_jaccard"],
    }
    for w, b in s["working_set_bytes"].items():
        rows[f"working set over {w} step(s) (all layers, batch)"] = format_size(int(b))
    return pd.DataFrame({"statistic": list(rows), "value": [_fmt(v) for v in rows.values()]})


_LAYER_COLUMNS = [
    "layer", "group", "jaccard", "reused", "first_selection_share", "reuse_distance_mean",
    "recency_median", "sink_share", "window_share", "pages", "page_fetch_amplification",
    "working_set_4", "adjacent_layer_jaccard",
]  # fmt: skip


def _layer_table(data: ReportData) -> pd.DataFrame:
    layers = data.stats.layers
    out = layers[[c for c in _LAYER_COLUMNS if c in layers.columns]].copy()
    if data.replay is not None:
        kv = data.replay[data.replay["class"] == "kv"]
        g = kv.groupby(["layer", "policy"], observed=True)[["sector_hits", "sectors"]].sum()
        rate = (g["sector_hits"] / g["sectors"]).unstack("policy")
        rate.columns = [f"hit {p}" for p in rate.columns]
        out = out.merge(rate, left_on="layer", right_index=True, how="left")
    return out


def _trace_meta(tr: Trace) -> dict[str, Any]:
    layers, groups, requests, max_position = trace_shape(tr)
    cap = tr.manifest.get("capture", {})
    return {
        "path": str(tr.path),
        "model": tr.model.get("name", "?"),
        "attention": tr.model.get("attention", "?"),
        "indexer": f"{tr.indexer.get('kind', '?')}, k={tr.indexer.get('k', '?')}",
        "shape": f"{requests} request(s), {layers} layers, {groups} group(s), "
        f"positions up to {max_position}",
        "rows / indices": f"{tr.rows:,} / {tr.num_indices:,}",
        "complete": tr.complete,
        "captured with": cap.get("command") or cap.get("tool") or "?",
        "capture device": cap.get("device", "?"),
        "created": tr.manifest.get("created", "?"),
    }


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(
    trace: Trace | str | Path,
    out: str | Path,
    *,
    policies: list[str] | tuple[str, ...] | None = DEFAULT_POLICIES,
    gpu: str = "h100",
    cache_size: int | str | None = None,
    layout: str | None = None,
    batch: int | None = None,
    sample_rate: float = 0.01,
    opt: bool = True,
    command: str | None = None,
    progress: bool = False,
) -> Path:
    """Write ``out`` (HTML, self-contained), ``out`` with suffix ``.md`` and the plots (PNG and
    SVG) in ``<stem>_files/``; return the HTML path. See ``collect`` for the options."""
    import jinja2

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise DsacacheError(f"--out {out}: the report is an .html file")
    if out.exists() and out.is_dir():
        raise DsacacheError(f"--out {out} is a directory; give a file name ending in .html")
    t0 = time.perf_counter()
    data = collect(
        trace, policies=policies, gpu=gpu, cache_size=cache_size, layout=layout, batch=batch,
        sample_rate=sample_rate, opt=opt, progress=progress,
    )  # fmt: skip
    t1 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    assets = out.with_name(out.stem + "_files")
    assets.mkdir(exist_ok=True)
    figs = figures(data)
    tables = {"policies": data.policy_table}
    mrc_tables = [data.mrc_table(), data.shards_error()]
    rendered = []
    md_figs = []
    for name, fig in figs.items():
        png = _png(fig)
        (assets / f"{name}.png").write_bytes(png)
        fig.savefig(assets / f"{name}.svg", format="svg")
        if name == "mrc":
            table_html = "".join(_html_table(t) for t in mrc_tables if len(t))
            table_md = "\n\n".join(markdown_table(t) for t in mrc_tables if len(t))
        elif tables.get(name) is not None:
            table_html = _html_table(tables[name], index=True)
            table_md = markdown_table(tables[name], index=True)
        else:
            table_html = table_md = ""
        rendered.append(
            {
                "title": TITLES[name],
                "caption": CAPTIONS[name],
                "png": base64.b64encode(png).decode(),
                "table": table_html,
            }
        )
        md_figs.append((name, table_md))
    data.timings["plots"] = time.perf_counter() - t1
    data.timings["total"] = time.perf_counter() - t0
    if command is None:
        command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    from dsacache import __version__

    date = datetime.now(UTC).isoformat(timespec="seconds")
    settings = {**data.settings, "python": platform.python_version()}
    timings = {k: f"{v:.2f} s" for k, v in data.timings.items()}
    name = data.trace.path.name.removesuffix(".dsatrace")
    layers = _layer_table(data)
    page = jinja2.Template(_TEMPLATE, autoescape=False).render(
        name=html.escape(name),
        command=html.escape(command),
        date=date,
        version=__version__,
        settings=_html_table(_kv_table(settings)),
        trace_meta=_html_table(_kv_table(_trace_meta(data.trace))),
        summary=_html_table(_summary_table(data.stats)),
        figs=[{**f, "caption": html.escape(f["caption"])} for f in rendered],
        layers=_html_table(layers),
        timings=_html_table(_kv_table(timings)),
    )
    out.write_text(page)
    md = [
        f"# dsacache report: {name}",
        "",
        f"Command: `{command}`  ",
        f"Written {date} by dsacache {__version__}. Self-contained HTML: `{out.name}`.",
        "",
        "## Run",
        "",
        markdown_table(_kv_table(settings)),
        "",
        "## Trace",
        "",
        markdown_table(_kv_table(_trace_meta(data.trace))),
        "",
        "## Summary statistics",
        "",
        markdown_table(_summary_table(data.stats)),
        "",
    ]
    for fig_name, table_md in md_figs:
        md += [
            f"## {TITLES[fig_name]}",
            "",
            f"![{TITLES[fig_name]}]({assets.name}/{fig_name}.png)",
            "",
            CAPTIONS[fig_name],
            "",
        ]
        if table_md:
            md += [table_md, ""]
    md += ["## Per layer", "", markdown_table(layers), ""]
    out.with_suffix(".md").write_text("\n".join(md))
    return out
