"""Route the query or fetch the KV: a per-step cost model for sharded sparse attention.

When a request's selected KV tokens live on other GPUs or nodes (``placement``), its decode
step can either **fetch** each remote owner's selected tokens to the query's GPU, or **route**
the query to each owner, compute a partial attention there and return the partial output
plus one log-sum-exp per head, merged at home (Ma, Eitzinger, Köstler, Wellein, "Move the
Query, Not the Cache", 2026). Per remote owner ``o`` holding ``n`` selected tokens over a
link with probe latency ``P`` and effective bandwidth ``B``::

    fetch(n) = P + n*b/B + n*m + n*c                 probe, transfer, move, compute (home)
    route(n) = P + q/B + (L + n*c) + r/B + M         probe, query, compute (owner), return, merge

``b`` bytes per token (layout), ``m`` move-the-cache cost per fetched token (gather issue,
re-layout, RoPE re-rotation), ``c`` attention compute per token (the same on either GPU),
``q`` routed query bytes, ``r`` returned partial output + log-sum-exp bytes, ``L`` launch of
the owner's partial-attention kernel, ``M`` merge of one partial at home. Probe latency and
compute appear on both sides and cancel, which gives the closed-form break-even::

    route  iff  n > n* = (q + r + B*(L + M)) / (b + B*m)

Remote operations of one step are costed one after another (no overlap modelled), so a
step's cost is the sum over its (layer, request, group) queries and their remote owners,
plus the local owner's compute. The *model* strategy picks route or fetch per owner.

All coefficients are **defaults to be calibrated**: link figures from Ma et al. (read second
hand, PAPERS.md), GPU figures from dsacache's H100 fit, the rest stated assumptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from dsacache.errors import DsacacheError
from dsacache.simulator.layouts import KVLayout
from dsacache.simulator.placement import LINK_KINDS, PlacementCounts
from dsacache.units import parse_spec

UNCALIBRATED = "model with default (uncalibrated) coefficients"
TERMS = ("probe", "transfer", "move", "compute", "return", "merge")


@dataclass(frozen=True)
class Link:
    """A link type: fixed cost of one small remote operation and effective bandwidth."""

    name: str
    probe_s: float
    bandwidth: float  # bytes/s, effective for decode-sized transfers
    source: str = ""


LINKS: dict[str, Link] = {
    "nvlink": Link(
        "nvlink",
        3e-6,
        20e9,
        "Ma et al.: small decode transfers are issue-limited, NVLink ~18-25 GB/s effective; "
        "probe 'a few us' (3 us assumed)",
    ),
    "pcie": Link(
        "pcie",
        8e-6,
        12e9,
        "assumption (no figure in PAPERS.md): PCIe Gen5 peer access, small transfers",
    ),
    "ib": Link(
        "ib",
        16e-6,
        25e9,
        "Ma et al.: H100 + InfiniBand, device-initiated RDMA, probe ~16 us, ~25 GB/s effective",
    ),
}


@dataclass(frozen=True)
class Fabric:
    """A cluster: the link between GPUs of a node, between nodes, and the GPU's own speed."""

    name: str
    intra: str  # key into LINKS
    inter: str  # key into LINKS
    flops: float  # effective FLOP/s of a decode attention kernel
    hbm_bandwidth: float  # bytes/s
    launch_s: float  # fixed cost of one kernel (the owner's partial attention)
    source: str = ""


_H100 = dict(
    flops=400e12,
    hbm_bandwidth=2.31e12,
    launch_s=3.0e-6,
    source="HBM 2.31 TB/s and 3.0 us per kernel: dsacache's fit to measured H100 kernel "
    "durations (calibration.fit_hierarchy); 400 TFLOP/s effective attention: assumption "
    "(~40% of dense bf16 peak)",
)
FABRICS: dict[str, Fabric] = {
    "h100-nvlink-ib": Fabric("h100-nvlink-ib", "nvlink", "ib", **_H100),
    "h100-pcie-ib": Fabric("h100-pcie-ib", "pcie", "ib", **_H100),
    "h200-nvlink-ib": Fabric(
        "h200-nvlink-ib",
        "nvlink",
        "ib",
        flops=400e12,
        hbm_bandwidth=3.3e12,
        launch_s=3.0e-6,
        source="H100 figures with HBM scaled by the H200/H100 datasheet ratio: assumption",
    ),
}

# Gather cost per fetched token beyond bytes / bandwidth. Ma et al. gathered 2048 selected
# entries from one holder in ~1.3 ms over InfiniBand; less one probe (16 us) and the bytes
# (2048 x 656 B at 25 GB/s = 54 us) that leaves ~0.6 us per token. Measured for MLA only.
_MOVE = 0.6e-6


@dataclass(frozen=True)
class ArchRow:
    """How an attention architecture sizes the routed query and the returned partial."""

    name: str
    qk_dim: str  # formula, for the docs
    v_dim: str
    move_s_per_token: float
    note: str


ARCHS: dict[str, ArchRow] = {
    "MLA": ArchRow(
        "MLA",
        "kv_lora_rank + rope_dim (absorbed query, 512 + 64)",
        "kv_lora_rank (latent output before W_UV, 512)",
        _MOVE,
        "move cost derived from Ma et al.'s 2048-entry gather (see _MOVE)",
    ),
    "GQA": ArchRow("GQA", "head_dim", "head_dim", _MOVE, "move cost copied from MLA: uncalibrated"),
    "GTA": ArchRow(
        "GTA", "head_dim", "head_dim (tied K/V state)", _MOVE, "move cost copied from MLA"
    ),
    "GLA": ArchRow(
        "GLA", "latent + rope (one latent group)", "latent", _MOVE, "move cost copied from MLA"
    ),
}
_LAYOUT_ARCH = {"mla-fp8": "MLA", "mla-bf16": "MLA", "gqa": "GQA", "gta": "GTA", "gla": "GLA"}


@dataclass(frozen=True)
class Arch:
    """An architecture resolved for one trace: the shapes of one routed query unit."""

    name: str
    heads: int  # query heads served by one selection
    qk_dim: int
    v_dim: int
    move_s_per_token: float
    dtype_bytes: int = 2  # bf16 query and partial output
    lse_bytes: int = 4  # fp32 log-sum-exp per head

    @property
    def query_bytes(self) -> int:
        """Bytes of one routed query: heads x qk_dim x dtype."""
        return self.heads * self.qk_dim * self.dtype_bytes

    @property
    def return_bytes(self) -> int:
        """Bytes of one returned partial: heads x v_dim x dtype + one log-sum-exp per head."""
        return self.heads * (self.v_dim * self.dtype_bytes + self.lse_bytes)

    @property
    def flops_per_token(self) -> int:
        """Attention FLOPs per selected token: q.k and p.v for every head."""
        return 2 * self.heads * (self.qk_dim + self.v_dim)

    def describe(self) -> str:
        """One line with the shapes used."""
        return (
            f"{self.name}: query {self.query_bytes:,} B ({self.heads} heads x {self.qk_dim} x "
            f"{self.dtype_bytes} B), return {self.return_bytes:,} B ({self.heads} x "
            f"{self.v_dim} x {self.dtype_bytes} B + {self.lse_bytes} B log-sum-exp per head)"
        )


def resolve_arch(model: dict[str, Any], layout: KVLayout, groups: int) -> Arch:
    """The architecture of a trace's model on ``layout`` with ``groups`` selections per layer."""
    name = _LAYOUT_ARCH.get(layout.name) or str(model.get("attention", "")).upper()
    if name not in ARCHS:
        raise DsacacheError(
            f"no route/fetch coefficients for layout {layout.name!r} / attention "
            f"{model.get('attention')!r}; known architectures: {', '.join(ARCHS)}"
        )
    params = parse_spec(layout.spec or layout.name, "layout").params
    default_heads = 128 if name == "MLA" else int(model.get("kv_heads", 1) or 1)
    heads = int(model.get("heads", default_heads) or default_heads)
    per_selection = max(heads // max(groups, 1), 1)
    if name == "MLA":
        latent = int(params.get("latent", model.get("kv_lora_rank", 512)))
        rope = int(params.get("rope", model.get("rope_dim", 64)))
        qk, v = latent + rope, latent
    elif name == "GLA":
        latent = int(params.get("latent", 256))
        qk, v = latent + int(params.get("rope", 64)), latent
    else:
        head_dim = int(params.get("head_dim", model.get("head_dim", 128)))
        qk = v = head_dim
    return Arch(name, per_selection, qk, v, ARCHS[name].move_s_per_token)


_COEF_KEYS = (
    "<link>.probe_s",
    "<link>.bandwidth",
    "move_s_per_token",
    "query_bytes",
    "return_bytes",
    "launch_s",
    "flops",
    "hbm_bandwidth",
    "compute_s_per_token",
    "merge_s",
)


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the route-vs-fetch model for one architecture on one fabric.

    ``links`` is indexed by link kind: 0 local (free), 1 intra-node, 2 inter-node."""

    fabric: str
    arch: Arch
    bytes_per_token: int
    links: tuple[Link, Link, Link]
    query_bytes: int
    return_bytes: int
    move_s_per_token: float
    compute_s_per_token: float
    launch_s: float
    merge_s: float
    overrides: dict[str, float] = field(default_factory=dict, compare=False)

    @classmethod
    def build(
        cls,
        arch: Arch,
        bytes_per_token: int,
        fabric: str = "h100-nvlink-ib",
        overrides: dict[str, float | str] | None = None,
    ) -> CostModel:
        """Defaults from the tables, then ``overrides`` (keys as in ``coefficient_keys()``)."""
        if fabric not in FABRICS:
            raise DsacacheError(f"unknown fabric {fabric!r}; choose one of: {', '.join(FABRICS)}")
        fab = FABRICS[fabric]
        over = {k: _float(k, v) for k, v in (overrides or {}).items()}
        links = dict(LINKS)
        scalars: dict[str, float] = {
            "flops": fab.flops,
            "hbm_bandwidth": fab.hbm_bandwidth,
            "launch_s": fab.launch_s,
            "move_s_per_token": arch.move_s_per_token,
            "query_bytes": arch.query_bytes,
            "return_bytes": arch.return_bytes,
        }
        for key, value in over.items():
            link, dot, attr = key.partition(".")
            if dot and link in links and attr in ("probe_s", "bandwidth"):
                links[link] = replace(links[link], **{attr: value}, source="override")
            elif key in scalars or key in ("compute_s_per_token", "merge_s"):
                scalars[key] = value
            else:
                raise DsacacheError(
                    f"unknown coefficient {key!r}; allowed: {', '.join(_COEF_KEYS)} "
                    f"(<link> one of {', '.join(LINKS)})"
                )
        for key, value in scalars.items():
            if value < 0 or (key in ("flops", "hbm_bandwidth") and value <= 0):
                raise DsacacheError(f"coefficient {key}={value} must be positive")
        for link in links.values():
            if link.bandwidth <= 0 or link.probe_s < 0:
                raise DsacacheError(
                    f"link {link.name}: bandwidth must be > 0 and probe_s >= 0, got "
                    f"{link.bandwidth} and {link.probe_s}"
                )
        compute = scalars.get("compute_s_per_token")
        if compute is None:  # roofline of one token: FLOPs or its bytes from HBM
            compute = max(
                arch.flops_per_token / scalars["flops"], bytes_per_token / scalars["hbm_bandwidth"]
            )
        merge = scalars.get("merge_s")
        if merge is None:  # read one partial (output + log-sum-exp) from HBM and rescale it
            merge = scalars["return_bytes"] / scalars["hbm_bandwidth"]
        local = Link("local", 0.0, math.inf, "same GPU")
        return cls(
            fabric,
            arch,
            int(bytes_per_token),
            (local, links[fab.intra], links[fab.inter]),
            int(scalars["query_bytes"]),
            int(scalars["return_bytes"]),
            scalars["move_s_per_token"],
            compute,
            scalars["launch_s"],
            merge,
            over,
        )

    def _link(self, kind) -> tuple[np.ndarray, np.ndarray]:
        kind = np.asarray(kind, np.int64)
        probe = np.array([lk.probe_s for lk in self.links])[kind]
        bw = np.array([lk.bandwidth for lk in self.links])[kind]
        return probe, bw

    def fetch_terms(self, n, kind) -> dict[str, np.ndarray]:
        """Seconds of each term to fetch ``n`` tokens from an owner over link ``kind``
        (kind 0, the query's own GPU: only the compute)."""
        n = np.asarray(n, np.float64)
        probe, bw = self._link(kind)
        remote = np.asarray(kind) > 0
        zero = np.zeros(np.broadcast(n, probe).shape)
        return {
            "probe": probe + zero,
            "transfer": n * self.bytes_per_token / bw + zero,
            "move": np.where(remote, n * self.move_s_per_token, 0.0) + zero,
            "compute": n * self.compute_s_per_token + zero,
            "return": zero,
            "merge": zero,
        }

    def route_terms(self, n, kind) -> dict[str, np.ndarray]:
        """Seconds of each term to route the query to an owner holding ``n`` tokens (kind 0,
        the query's own GPU: only the compute)."""
        n = np.asarray(n, np.float64)
        probe, bw = self._link(kind)
        remote = np.asarray(kind) > 0
        zero = np.zeros(np.broadcast(n, probe).shape)
        return {
            "probe": probe + zero,
            "transfer": self.query_bytes / bw + zero,
            "move": zero,
            "compute": np.where(remote, self.launch_s, 0.0) + n * self.compute_s_per_token + zero,
            "return": self.return_bytes / bw + zero,
            "merge": np.where(remote, self.merge_s, 0.0) + zero,
        }

    def fetch_cost(self, n, kind) -> np.ndarray:
        """Seconds to fetch ``n`` tokens over link ``kind`` and attend to them at home."""
        return sum(self.fetch_terms(n, kind).values())

    def route_cost(self, n, kind) -> np.ndarray:
        """Seconds to route the query, attend at the owner, return and merge."""
        return sum(self.route_terms(n, kind).values())

    def decide(self, n, kind) -> np.ndarray:
        """True where routing is cheaper than fetching (ties fetch)."""
        return self.route_cost(n, kind) < self.fetch_cost(n, kind)

    def break_even(self, kind: int | str) -> float:
        """Closed form: route iff n > n* = (q + r + B (L + M)) / (b + B m), per link kind
        (0/``local``, 1/``intra``, 2/``inter``)."""
        if isinstance(kind, str):
            if kind not in LINK_KINDS:
                raise DsacacheError(f"link kind {kind!r} unknown; choose one of: {LINK_KINDS}")
            kind = LINK_KINDS.index(kind)
        if kind == 0:
            return math.inf  # local tokens are never moved
        bw = self.links[kind].bandwidth
        num = self.query_bytes + self.return_bytes + bw * (self.launch_s + self.merge_s)
        return num / (self.bytes_per_token + bw * self.move_s_per_token)

    def table(self) -> pd.DataFrame:
        """The coefficients in use, one row each, with their source."""
        rows = []
        for lk in self.links[1:]:
            rows.append((f"{lk.name}.probe_s", lk.probe_s, lk.source))
            rows.append((f"{lk.name}.bandwidth", lk.bandwidth, lk.source))
        rows += [
            ("bytes_per_token", self.bytes_per_token, "layout"),
            ("query_bytes", self.query_bytes, self.arch.describe()),
            ("return_bytes", self.return_bytes, "partial output + log-sum-exp"),
            ("move_s_per_token", self.move_s_per_token, ARCHS[self.arch.name].note),
            ("compute_s_per_token", self.compute_s_per_token, FABRICS[self.fabric].source),
            ("launch_s", self.launch_s, FABRICS[self.fabric].source),
            ("merge_s", self.merge_s, "return_bytes / HBM bandwidth"),
        ]
        df = pd.DataFrame(rows, columns=["coefficient", "value", "source"])
        over = f"; overridden: {', '.join(self.overrides)}" if self.overrides else ""
        df.attrs["status"] = UNCALIBRATED + over
        return df


def coefficient_keys() -> tuple[str, ...]:
    """Names accepted as overrides by ``CostModel.build``."""
    return _COEF_KEYS


def _float(key: str, value: float | str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DsacacheError(f"coefficient {key}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise DsacacheError(f"coefficient {key}={value!r} is not a finite number")
    return number


def model_for_trace(
    trace,
    fabric: str = "h100-nvlink-ib",
    *,
    layout: str | None = None,
    overrides: dict[str, float | str] | None = None,
) -> CostModel:
    """The cost model for a trace's architecture and layout on ``fabric``."""
    from dsacache.simulator.stream import layout_and_groups

    kv, groups = layout_and_groups(trace, layout)
    arch = resolve_arch(trace.model, kv, groups)
    return CostModel.build(arch, kv.selection_bytes(groups), fabric, overrides)


UNIT_COLUMNS = (
    "step",
    "layer",
    "request",
    "group",
    "home",
    "local_tokens",
    "remote_tokens",
    "remote_owners",
    "routed_owners",
    "fetch_bytes",
    "route_bytes",
    "model_bytes",
    "fetch_s",
    "route_s",
    "model_s",
)


@dataclass
class RouteResult:
    """Route vs fetch for every query unit (step, layer, request, group) of a trace."""

    units: pd.DataFrame  # columns UNIT_COLUMNS
    terms: pd.DataFrame  # seconds per term (rows TERMS) for fetch, route and model
    model: CostModel
    placement_spec: str
    owners: int

    def per_step(self) -> pd.DataFrame:
        """One row per decode step: tokens, bytes and seconds of the three strategies."""
        g = self.units.groupby("step")
        out = pd.DataFrame(
            {
                "queries": g.size(),
                "remote_tokens": g["remote_tokens"].sum(),
                "fetch_MB": g["fetch_bytes"].sum() / 1e6,
                "route_MB": g["route_bytes"].sum() / 1e6,
                "fetch_ms": g["fetch_s"].sum() * 1e3,
                "route_ms": g["route_s"].sum() * 1e3,
                "model_ms": g["model_s"].sum() * 1e3,
                "routed_pct": 100 * g["routed_owners"].sum() / g["remote_owners"].sum().clip(1),
            }
        )
        return out

    def totals(self) -> dict[str, float]:
        """Whole-trace sums and the model's saving against always-fetch and always-route."""
        u = self.units
        steps = max(u["step"].nunique(), 1)
        fetch, route, model = (float(u[c].sum()) for c in ("fetch_s", "route_s", "model_s"))
        contacted = int(u["remote_owners"].sum())
        return {
            "steps": steps,
            "fetch_ms_per_step": fetch * 1e3 / steps,
            "route_ms_per_step": route * 1e3 / steps,
            "model_ms_per_step": model * 1e3 / steps,
            "routed_pct": 100 * int(u["routed_owners"].sum()) / contacted if contacted else 0.0,
            "saving_vs_fetch_pct": 100 * (1 - model / fetch) if fetch else 0.0,
            "saving_vs_route_pct": 100 * (1 - model / route) if route else 0.0,
            "remote_token_pct": 100
            * float(u["remote_tokens"].sum())
            / max(float((u["remote_tokens"] + u["local_tokens"]).sum()), 1.0),
        }


def evaluate(pc: PlacementCounts, model: CostModel) -> RouteResult:
    """Cost every query unit of ``pc`` under always-fetch, always-route and the model's
    per-owner choice."""
    n = pc.counts
    kind = pc.links
    contacted = (kind > 0) & (n > 0)
    ft = model.fetch_terms(n, kind)
    rt = model.route_terms(n, kind)
    f = sum(ft.values())
    r = sum(rt.values())
    route_here = contacted & (r < f)
    home_tokens = np.take_along_axis(n, pc.home[:, None], axis=1)[:, 0]
    local_s = home_tokens * model.compute_s_per_token
    f_s = np.where(contacted, f, 0.0).sum(axis=1) + local_s
    r_s = np.where(contacted, r, 0.0).sum(axis=1) + local_s
    m_s = np.where(route_here, r, np.where(contacted, f, 0.0)).sum(axis=1) + local_s
    fetch_b = np.where(contacted, n * model.bytes_per_token, 0)
    route_b = np.where(contacted, model.query_bytes + model.return_bytes, 0)
    units = pd.DataFrame(
        {
            "step": pc.step,
            "layer": pc.layer,
            "request": pc.request,
            "group": pc.group,
            "home": pc.home,
            "local_tokens": home_tokens,
            "remote_tokens": np.where(contacted, n, 0).sum(axis=1),
            "remote_owners": contacted.sum(axis=1),
            "routed_owners": route_here.sum(axis=1),
            "fetch_bytes": fetch_b.sum(axis=1),
            "route_bytes": route_b.sum(axis=1),
            "model_bytes": np.where(route_here, route_b, fetch_b).sum(axis=1),
            "fetch_s": f_s,
            "route_s": r_s,
            "model_s": m_s,
        }
    )
    home_compute = float(local_s.sum())
    rows = {}
    for term in TERMS:
        fv = np.where(contacted, ft[term], 0.0)
        rv = np.where(contacted, rt[term], 0.0)
        extra = home_compute if term == "compute" else 0.0
        rows[term] = {
            "fetch": float(fv.sum()) + extra,
            "route": float(rv.sum()) + extra,
            "model": float(np.where(route_here, rv, fv).sum()) + extra,
        }
    terms = pd.DataFrame(rows).T
    terms.index.name = "term"
    return RouteResult(units, terms, model, pc.placement.spec, pc.placement.owners)


def route_vs_fetch(
    trace,
    placement: str = "pages:rr",
    *,
    gpus: int = 8,
    nodes: int = 1,
    fabric: str = "h100-nvlink-ib",
    layout: str | None = None,
    requests: int | None = None,
    overrides: dict[str, float | str] | None = None,
) -> RouteResult:
    """Place ``trace``'s KV over ``gpus`` x ``nodes`` and cost route vs fetch per step."""
    from dsacache.simulator.placement import parse_placement, place

    spec = parse_placement(placement, gpus, nodes)
    model = model_for_trace(trace, fabric, layout=layout, overrides=overrides)
    pc = place(trace, spec, layout=layout, requests=requests)
    return evaluate(pc, model)


def plot(result: RouteResult, path: str) -> None:
    """Two panels: per-step time of always-fetch, always-route and the model's choice; and
    the cost of one remote owner vs its selected tokens per link, with the break-even."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result.per_step()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for col, label, style in (("fetch_ms", "always fetch", "-"), ("route_ms", "always route", "-"),
                              ("model_ms", "model (per owner)", ":")):  # fmt: skip
        ax1.plot(steps.index, steps[col], style, label=label, linewidth=2 if style == ":" else 1)
    ax1.set_xlabel("decode step")
    ax1.set_ylabel("remote attention time per step (ms, serialised)")
    ax1.set_title(f"{result.placement_spec} over {result.owners} GPUs in all")
    ax1.legend()
    m = result.model
    top = max(4 * max(m.break_even(k) for k in (1, 2)), 64)
    n = np.linspace(0, top, 200)
    for kind, style in ((1, "-"), (2, "--")):
        name = m.links[kind].name
        ax2.plot(n, m.fetch_cost(n, kind) * 1e6, style, color="C0", label=f"fetch over {name}")
        ax2.plot(n, m.route_cost(n, kind) * 1e6, style, color="C1", label=f"route over {name}")
        ax2.axvline(m.break_even(kind), color="gray", linestyle=style, linewidth=0.8)
    ax2.set_xlabel("selected tokens on one remote owner")
    ax2.set_ylabel("cost (us)")
    ax2.set_title(f"{m.arch.name} on {m.fabric}: break-even (gray)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
