"""``dsacache analyze`` and ``dsacache report``: trace statistics and the HTML report.

Registered by dsacache/cli.py through ``COMMANDS``; pandas, matplotlib and the simulator load
only when a command runs, so ``dsacache --help`` stays fast.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from dsacache.cli_common import load_trace
from dsacache.errors import DsacacheError
from dsacache.units import format_size


def _windows(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DsacacheError(
            f"--windows {text!r}: expected step counts separated by commas, e.g. 1,2,4,8"
        ) from None
    if not values or min(values) < 1:
        raise DsacacheError(f"--windows {text!r}: every window must be >= 1 step")
    return values


@click.command()
@click.argument("trace", type=click.Path())
@click.option(
    "--out", type=click.Path(), default=None, help="Directory for the tables (created if needed)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "csv"]),
    default="parquet",
    show_default=True,
)
@click.option("--layout", default=None, help="KV layout that sizes a token (default: the trace's).")
@click.option("--requests", type=int, default=None, help="Analyze requests 0..N-1 only.")
@click.option("--page-tokens", type=int, default=64, show_default=True, help="Tokens per page.")
@click.option(
    "--windows",
    default="1,2,4,8,16",
    show_default=True,
    help="Working-set windows in steps, comma-separated.",
)
@click.option("--sinks", type=int, default=None, help="Attention-sink tokens (default: trace's).")
@click.option(
    "--window", type=int, default=None, help="Recent-window tokens (default: the trace's)."
)
@click.option("--no-cross-layer", is_flag=True, help="Skip the layer x layer overlap matrix.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze(
    trace, out, fmt, layout, requests, page_tokens, windows, sinks, window, no_cross_layer, quiet
) -> None:
    """Selection statistics of a trace: step-to-step overlap, reuse distance, recency,
    sink/window shares, pages touched, working sets and cross-layer overlap.

    \b
    Example:
      dsacache analyze t.dsatrace --out stats/
      dsacache analyze t.dsatrace --out stats/ --format csv --windows 1,4,16
    """
    from dsacache.simulator.analyze import analyze as run_analyze

    stats = run_analyze(
        load_trace(trace), layout=layout, requests=requests, page_tokens=page_tokens,
        windows=_windows(windows), sinks=sinks, window=window,
        cross_layer=not no_cross_layer, progress=not quiet,
    )  # fmt: skip
    s = stats.summary()
    click.echo(
        f"{s['model']}: {s['requests']} request(s) x {s['steps']} steps x {s['layers']} layers "
        f"x {s['groups']} group(s), k={s['k']}, {s['token_bytes']} B per token and layer"
    )
    click.echo(
        f"overlap with the previous step   Jaccard {s['jaccard']:.3f}, share of k {s['reused']:.3f}"
    )
    click.echo(
        f"sinks / recent window            {s['sink_share']:.3f} / {s['window_share']:.3f} "
        f"(first {s['sinks']}, last {s['window']} tokens)"
    )
    click.echo(f"median recency                   {s['recency_median']:.0f} tokens back")
    click.echo(
        f"pages per selection              {s['pages_per_selection']:.1f} "
        f"({s['page_tokens']}-token pages; a page fetch moves "
        f"{s['page_fetch_amplification']:.1f}x the selected bytes)"
    )
    click.echo(f"adjacent-layer Jaccard           {s['adjacent_layer_jaccard']:.3f}")
    ws = ", ".join(f"{w}: {format_size(int(b))}" for w, b in s["working_set_bytes"].items())
    click.echo(f"working set (steps: bytes)       {ws}")
    if out:
        paths = stats.save(out, fmt)
        click.echo(f"{len(paths)} files -> {out}")


@click.command()
@click.argument("trace", type=click.Path())
@click.option(
    "--out", type=click.Path(), default="report.html", show_default=True, help="HTML file."
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    help="Policy to replay; repeat for several (default: lru, hints:index=first, belady).",
)
@click.option("--no-replay", is_flag=True, help="Statistics and MRCs only (no policy replay).")
@click.option(
    "--gpu",
    default="h100",
    show_default=True,
    help="GPU preset or profile (.json); h100 and h200 replay the L2 model calibrated on "
    "their measurements (h100-calibrated, h200-calibrated).",
)
@click.option("--cache-size", default=None, help="Replay this L2 size instead, e.g. 24MiB.")
@click.option("--layout", default=None, help="KV layout spec (default: the trace's).")
@click.option("--batch", type=int, default=None, help="Requests decoded together (default: all).")
@click.option(
    "--sample-rate", type=float, default=0.01, show_default=True, help="SHARDS sampling rate."
)
@click.option("--no-opt", is_flag=True, help="Skip the OPT points of the miss-ratio curves.")
@click.option(
    "--plugin", "plugins", multiple=True, type=click.Path(), help="File registering policies."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def report(
    trace, out, policies, no_replay, gpu, cache_size, layout, batch, sample_rate, no_opt, plugins,
    quiet,
) -> None:  # fmt: skip
    """Write an HTML report (self-contained) and a Markdown variant: miss-ratio curves (LRU,
    SHARDS, OPT), policy comparison, per-layer hit rates, overlap and recency plots.

    \b
    Example:
      dsacache report t.dsatrace --out report.html
      dsacache report t.dsatrace --out r.html --policy lru --policy reserve:bytes=16MiB
    """
    from dsacache.policies import load_plugin, make_policy
    from dsacache.report import DEFAULT_POLICIES, write_report

    for plugin in plugins:
        load_plugin(plugin)
    chosen = [] if no_replay else list(policies or DEFAULT_POLICIES)
    for spec in chosen:  # bad policy specs fail before any trace is read
        make_policy(spec)
    command = " ".join(shlex.quote(a) for a in ["dsacache", *sys.argv[1:]])
    path = write_report(
        load_trace(trace), out, policies=chosen, gpu=gpu, cache_size=cache_size, layout=layout,
        batch=batch, sample_rate=sample_rate, opt=not no_opt, command=command,
        progress=not quiet,
    )  # fmt: skip
    click.echo(f"report -> {path} (Markdown: {Path(path).with_suffix('.md')})")


COMMANDS = (analyze, report)
