"""The ``dsacache sweep``, ``place`` and ``route`` commands (registered on the main CLI group).

Heavy imports (dask, pandas, matplotlib) happen inside the commands, so ``dsacache --help``
stays fast.
"""

from __future__ import annotations

import click

from dsacache.cli_common import PLOT, TABLE, load_trace, save_table
from dsacache.errors import DsacacheError


def _sweep_help() -> str:
    from dsacache.simulator.sweep import describe_params

    return describe_params()


@click.command()
@click.argument("trace", type=click.Path())
@click.option("--grid", "grid_file", type=click.Path(), default=None, help="TOML grid file.")
@click.option(
    "--param",
    "params",
    multiple=True,
    help="NAME=v1,v2 (repeatable; adds to or replaces --grid's values for NAME).",
)
@click.option("--out", required=True, type=click.Path(), help="Output dataset directory.")
@click.option("--jobs", type=int, default=None, help="Local worker processes (default: CPUs).")
@click.option("--scheduler", default=None, help="Run on a Dask cluster instead: tcp://host:port.")
@click.option("--resume", is_flag=True, help="Skip cells already finished in --out.")
@click.option("--force", is_flag=True, help="Delete the previous sweep in --out first.")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary table.")
def sweep(trace, grid_file, params, out, jobs, scheduler, resume, force, quiet) -> None:
    """Replay TRACE under every combination of parameter values (a grid), in parallel on
    Dask, one Parquet part per finished cell in --out (resumable).

    \b
    Parameters (NAME in --param and in the grid file):
      policy           policy spec (dsacache policies), e.g. token-lru
      reservation      bytes reserved by 'reserve' policies; ignored by others
      gpu, cache_size, ways, set_hash, layout, batch, page_tokens, page_order,
      seed, classes (index+kv+append), reads_per_token, heads, weight_bytes
      backend          triton or flashmla: the stream reads as that kernel does
    A policy spec's own key=value items stay with it: policy=lru,reserve:bytes=8MiB,inner=lru
    is two policies. A plug-in policy is named FILE.py:NAME (workers load the file; with
    --scheduler, trace and plug-in paths must exist on the workers too).

    \b
    Grid file (TOML):
      policy = ["lru", "token-lru"]
      cache_size = ["16MiB", "32MiB"]
      batch = [1, 4]

    \b
    Example:
      dsacache sweep t.dsatrace --param policy=lru,fifo --param cache_size=8MiB,16MiB --out sw
      dsacache sweep t.dsatrace --grid grid.toml --out sw --resume
      dsacache sweep t.dsatrace --grid grid.toml --out sw --scheduler tcp://10.0.0.5:8786
    """
    from dsacache.simulator.sweep import load_grid, parse_params, run_sweep, summarize_sweep

    grid = load_grid(grid_file) if grid_file else {}
    grid.update(parse_params(params))
    if not grid:
        raise DsacacheError("sweep needs --grid FILE or at least one --param NAME=v1,v2")
    if resume and force:
        raise DsacacheError("--resume and --force exclude each other")
    result = run_sweep(
        load_trace(trace),
        grid,
        out,
        jobs=jobs,
        scheduler=scheduler,
        resume=resume,
        force=force,
        progress=not quiet,
    )
    click.echo(
        f"{len(result.cells)} cell(s): {len(result.ran)} run, {len(result.skipped)} already "
        f"finished; {result.wall_s:.1f} s -> {result.out}"
    )
    if not quiet:
        import pandas as pd

        table = summarize_sweep(result.load())
        varied = [n for n in grid if table[n].nunique() > 1] or ["policy"]
        cols = [*varied, "hit_rate", "kv_hit_rate", "MB_from_memory_per_step"]
        table = table.sort_values(varied, kind="stable")
        with pd.option_context("display.width", 200, "display.max_rows", 200):
            click.echo(table[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))


def _placement_options(f):
    options = [
        click.option(
            "--placement",
            default="pages:rr",
            show_default=True,
            help="UNIT:SCHEME[,key=value]: tokens|pages : contiguous|rr|hash "
            "(keys page_tokens, seed, length, home=request|first|last).",
        ),
        click.option("--gpus", type=int, default=8, show_default=True, help="GPUs per node."),
        click.option("--nodes", type=int, default=1, show_default=True, help="Nodes."),
        click.option(
            "--layout", default=None, help="KV layout (default: the trace's), e.g. mla-fp8."
        ),
        click.option(
            "--requests", type=int, default=None, help="Only requests 0..N-1 (default: all)."
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


_ROWS = click.option(
    "--rows", type=click.IntRange(min=1), default=16, show_default=True, help="Steps printed."
)


def _positive(gpus: int, nodes: int) -> None:
    for name, value in (("--gpus", gpus), ("--nodes", nodes)):
        if value < 1:
            raise DsacacheError(f"{name} must be >= 1, got {value}")


def _show(df, limit: int) -> str:
    if len(df) > limit:
        half = max(limit // 2, 1)
        import pandas as pd

        gap = pd.DataFrame(index=pd.Index(["..."], name=df.index.name), columns=df.columns)
        df = pd.concat([df.head(half), gap.astype(object), df.tail(half)])
    return df.to_string(float_format=lambda x: f"{x:.3f}", na_rep="")


@click.command()
@click.argument("trace", type=click.Path())
@_placement_options
@click.option(
    "--out",
    type=TABLE,
    default=None,
    help="Save tokens per (step, layer, request, group, owner) (.parquet/.csv).",
)
@_ROWS
def place(trace, placement, gpus, nodes, layout, requests, out, rows) -> None:
    """Shard TRACE's KV over GPUs and nodes and count, per decode step, where the selected
    tokens live relative to the query's GPU and what fetching them would move.

    \b
    Example:
      dsacache place t.dsatrace --placement pages:rr --gpus 8 --nodes 2
      dsacache place t.dsatrace --placement tokens:contiguous,home=last --gpus 4
    """
    from dsacache.simulator.placement import parse_placement
    from dsacache.simulator.placement import place as run_place

    _positive(gpus, nodes)
    spec = parse_placement(placement, gpus, nodes)
    pc = run_place(load_trace(trace), spec, layout=layout, requests=requests)
    steps = pc.per_step()
    if out:
        save_table(pc.to_frame(), out, index=False)
    click.echo(
        f"placement {spec.spec} over {gpus} GPU(s) x {nodes} node(s); "
        f"{pc.bytes_per_token} B per selected token"
    )
    click.echo(_show(steps, rows))
    t = pc.totals()
    click.echo(
        f"\nselected tokens: {t['local_pct']:.1f}% on the query's GPU, {t['intra_pct']:.1f}% on "
        f"another GPU of its node, {t['inter_pct']:.1f}% on another node"
    )
    click.echo(
        f"always-fetch moves {t['fetch_MB_per_step']:.3f} MB per step; "
        f"{t['tokens_per_remote_page']:.2f} selected tokens per remote page; "
        f"busiest owner / mean owner = {t['imbalance_mean']:.2f}"
    )


@click.command()
@click.argument("trace", type=click.Path())
@_placement_options
@click.option(
    "--fabric",
    default="h100-nvlink-ib",
    show_default=True,
    help="Cluster preset: h100-nvlink-ib, h100-pcie-ib, h200-nvlink-ib.",
)
@click.option(
    "--coef",
    "coefs",
    multiple=True,
    help="Override a coefficient, e.g. ib.probe_s=8e-6 or move_s_per_token=0 (repeatable).",
)
@click.option(
    "--calibrated",
    default=None,
    help="Use the coefficients measured on this GPU (bundled: h200): move, compute, launch, "
    "merge and the PCIe link; --coef still overrides them.",
)
@click.option("--plot", type=PLOT, default=None, help="Save a plot (.png, .pdf or .svg).")
@click.option(
    "--out",
    type=TABLE,
    default=None,
    help="Save costs per (step, layer, request, group) (.parquet/.csv).",
)
@_ROWS
def route(
    trace, placement, gpus, nodes, layout, requests, fabric, coefs, calibrated, plot, out, rows
) -> None:
    """Route the query or fetch the KV? Cost every decode step of TRACE with its KV sharded
    over GPUs and nodes: always-fetch, always-route, and the cost model's per-owner choice.

    \b
    Example:
      dsacache route t.dsatrace --placement pages:rr --gpus 8 --nodes 2 --fabric h100-nvlink-ib
      dsacache route t.dsatrace --gpus 4 --nodes 4 --coef ib.probe_s=8e-6 --plot route.png
      dsacache route t.dsatrace --gpus 8 --fabric h200-nvlink-ib --calibrated h200
    """
    from dsacache.simulator.routefetch import plot as make_plot
    from dsacache.simulator.routefetch import route_vs_fetch

    _positive(gpus, nodes)
    overrides: dict[str, float | str] = {}
    if calibrated:
        from dsacache.calibration import route_coefficients

        overrides.update(route_coefficients(calibrated))
    for item in coefs:
        key, eq, value = item.partition("=")
        if not eq:
            raise DsacacheError(f"--coef {item!r}: expected NAME=VALUE, e.g. ib.probe_s=8e-6")
        overrides[key.strip()] = value.strip()
    res = route_vs_fetch(
        load_trace(trace),
        placement,
        gpus=gpus,
        nodes=nodes,
        fabric=fabric,
        layout=layout,
        requests=requests,
        overrides=overrides,
    )
    m = res.model
    if calibrated and m.arch.name != "MLA":
        raise DsacacheError(
            f"--calibrated {calibrated}: the measured coefficients are sparse MLA kernel timings "
            f"(DeepSeek-V3.2 shapes); this trace replays as {m.arch.name} (try --layout mla-fp8)"
        )
    click.echo(
        f"placement {res.placement_spec} over {gpus} GPU(s) x {nodes} node(s) on {fabric}; "
        f"{m.arch.describe()}; {m.bytes_per_token} B per token"
    )
    for kind in (1, 2):
        if kind == 2 and nodes == 1:
            continue
        click.echo(
            f"break-even over {m.links[kind].name}: route when an owner holds more than "
            f"{m.break_even(kind):.1f} selected tokens"
        )
    steps = res.per_step()
    if out:
        save_table(res.units, out, index=False)
    click.echo(_show(steps, rows))
    t = res.totals()
    click.echo(
        f"\nper step: always-fetch {t['fetch_ms_per_step']:.3f} ms, always-route "
        f"{t['route_ms_per_step']:.3f} ms, model {t['model_ms_per_step']:.3f} ms "
        f"(routes {t['routed_pct']:.1f}% of remote owners)"
    )
    click.echo(
        f"model saves {t['saving_vs_fetch_pct']:.1f}% vs always-fetch and "
        f"{t['saving_vs_route_pct']:.1f}% vs always-route"
    )
    click.echo(f"({m.table().attrs['status']}; times are serialised, no overlap modelled)")
    if plot:
        make_plot(res, plot)
        click.echo(f"plot -> {plot}")


COMMANDS = (sweep, place, route)
