"""The ``dsacache`` command line. Every error a user can cause ends as one line and exit 2."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

import click

from dsacache.cli_common import TABLE, load_trace, save_table
from dsacache.errors import DsacacheError
from dsacache.simulator.engine import SET_HASHES
from dsacache.units import format_size, parse_size


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        # OSError: a path the user gave is missing, a directory, not writable, or the disk full
        except (DsacacheError, OSError) as e:
            click.echo(f"dsacache: error: {e}", err=True)
            sys.exit(2)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except DsacacheError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


class SizeListType(click.ParamType):
    """Comma-separated sizes (``8MiB,16MiB``), given on as a comma-separated list of bytes."""

    name = "sizes"

    def convert(self, value, param, ctx):
        try:
            return ",".join(str(parse_size(v)) for v in str(value).split(","))
        except DsacacheError as e:
            self.fail(str(e), param, ctx)


SIZES = SizeListType()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsacache")
def main() -> None:
    """dsacache: replay DSA decode traces through GPU last-level-cache models.

    \b
    Example:
      dsacache synth --preset smollm2-135m --steps 32 --out t.dsatrace
      dsacache replay t.dsatrace --gpu h100 --policy lru --policy fifo
    """


@main.command()
@click.option("--preset", "preset_name", default=None, help="deepseek-v3.2 or smollm2-135m.")
@click.option(
    "--like",
    type=click.Path(),
    default=None,
    help="Fit the statistical knobs to this trace; scale comes from the other options.",
)
@click.option("--layers", type=int, help="Transformer layers.")
@click.option("--groups", type=int, help="KV groups with their own selection (1 for MLA).")
@click.option("--requests", type=int, help="Requests (sequences) decoded.")
@click.option("--context", type=int, help="Context length at the first decode step.")
@click.option("--steps", type=int, help="Decode steps.")
@click.option("-k", "--k", "k", type=int, help="Tokens selected per step, layer and group.")
@click.option("--keep", type=float, help="Share of the previous step's picks kept (0..1).")
@click.option("--recency-window", type=int, help="Tokens counted as the recent window.")
@click.option("--recency-weight", type=float, help="Share of fresh picks from the window.")
@click.option("--return-weight", type=float, help="Share of fresh picks re-selected from history.")
@click.option("--history", type=int, help="Steps of history that returning picks come from.")
@click.option("--sinks", type=int, help="Attention-sink tokens always selected.")
@click.option("--layer-variation", type=float, help="Per-layer spread of --keep (0..1).")
@click.option("--seed", type=int, help="Random seed.")
@click.option(
    "--out", required=True, type=click.Path(), help="Output trace directory (NAME.dsatrace)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing trace at --out.")
@click.option("--resume", is_flag=True, help="Continue an interrupted synth at --out (same knobs).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(preset_name, like, out, force, resume, quiet, **knobs) -> None:
    """Generate a synthetic DSA trace with explicit statistical knobs.

    \b
    Example:
      dsacache synth --preset smollm2-135m --steps 32 --out t.dsatrace
      dsacache synth --layers 4 --k 64 --context 1024 --keep 0.6 --out small.dsatrace
      dsacache synth --preset deepseek-v3.2 --like real.dsatrace --steps 16 --out ds.dsatrace
    """
    from dsacache.tracer.synth import SynthConfig, preset, synthesize

    if preset_name:
        cfg = preset(preset_name, **knobs)
    else:
        cfg = SynthConfig(**{k: v for k, v in knobs.items() if v is not None})
    if like:
        from dsacache.tracer.fit import like as fit_like

        cfg = fit_like(load_trace(like), cfg)
        click.echo(
            f"fitted to {like}: keep={cfg.keep:.3f} return_weight={cfg.return_weight:.3f} "
            f"recency_weight={cfg.recency_weight:.3f} layer_variation={cfg.layer_variation:.3f}"
        )
    synthesize(cfg, out, overwrite=force, progress=not quiet, resume=resume)
    _print_info(load_trace(out).validate())


def _print_info(info: dict) -> None:
    click.echo(f"trace            {info['path']}")
    click.echo(f"complete         {'yes' if info['complete'] else 'no (writer did not finish)'}")
    for key in ("parts", "rows", "requests", "steps", "layers", "groups", "k", "indices"):
        click.echo(f"{key:<16} {info[key]:,}")
    click.echo(f"stored           {format_size(info['bytes'])}")
    click.echo(f"bytes per index  {info['bytes_per_index']:.3f}")


@main.command()
@click.argument("trace", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(trace, as_json) -> None:
    """Summarize a trace: rows, steps, layers, groups, k, bytes per stored index.

    \b
    Example:
      dsacache info t.dsatrace
    """
    tr = load_trace(trace)
    summary = tr.validate()
    if as_json:
        click.echo(json.dumps({**summary, "model": tr.model, "indexer": tr.indexer}, indent=1))
        return
    _print_info(summary)
    click.echo(f"model            {tr.model.get('name', '?')} ({tr.model.get('attention', '?')})")
    click.echo(f"indexer          {tr.indexer.get('kind', '?')}, k={tr.indexer.get('k', '?')}")


@main.command()
@click.argument("trace", type=click.Path(exists=True))
def recover(trace) -> None:
    """Finish a GPU capture that died before encoding its spool (TRACE.spool beside TRACE).

    The decode-step driver's capture appends raw steps to the spool during the decode and
    encodes them into the trace when it closes; this does that encoding for a run that
    never closed, keeping every complete step.

    \b
    Example:
      dsacache recover replayed.dsatrace
    """
    from dsacache.traces.spool import recover as recover_spool

    steps = recover_spool(trace)
    click.echo(f"{trace}: {steps} step(s) recovered from the spool; the trace is complete")


@main.command()
@click.argument("trace", type=click.Path())
def validate(trace) -> None:
    """Check every part of a trace (checksums, schema, index ranges); exit 2 on a problem.

    \b
    Example:
      dsacache validate t.dsatrace
    """
    summary = load_trace(trace).validate()
    state = "complete" if summary["complete"] else "incomplete (all finished parts are valid)"
    click.echo(f"ok: {summary['parts']} part(s), {summary['rows']:,} rows, {state}")


def _workload(
    layout, batch, page_tokens, page_order, seed, classes, weight_bytes, reads_per_token, heads,
    kv_loads_apart,
):  # fmt: skip
    from dsacache.simulator import Workload

    return Workload(
        layout=layout or "",
        batch=batch,
        page_tokens=page_tokens,
        page_order=page_order,
        seed=seed,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
        weight_bytes=weight_bytes,
        reads_per_token=reads_per_token,
        heads=heads,
        kv_loads_apart=kv_loads_apart,
    )


def _replay_options(f):
    options = [
        click.option(
            "--gpu",
            default="h100",
            show_default=True,
            help="GPU preset (h100, h200, a100), a calibrated one (h100-calibrated, "
            "h200-calibrated: the L2 as fit to measurements) or a profile from `dsacache "
            "calibrate` (.json).",
        ),
        click.option(
            "--cache-size",
            type=SIZE,
            default=None,
            help="L2 size (default: the GPU's), e.g. 24MiB.",
        ),
        click.option(
            "--ways", type=int, default=None, help="Associativity (default: the GPU preset's)."
        ),
        click.option(
            "--set-hash",
            type=click.Choice(list(SET_HASHES)),
            default=None,
            help="Set-index hash (default: the GPU preset's; mod for the nominal presets).",
        ),
        click.option(
            "--fill",
            type=int,
            default=None,
            help="Bytes the memory returns per miss unit, a power of two from the sector to "
            "the line (default: the GPU preset's; h200: 64).",
        ),
        click.option(
            "--layout",
            default=None,
            help="KV layout spec (default: from the trace's model), e.g. mla-fp8.",
        ),
        click.option(
            "--batch", type=int, default=1, show_default=True, help="Requests decoded together."
        ),
        click.option("--page-tokens", type=int, default=64, show_default=True),
        click.option(
            "--page-order",
            type=click.Choice(["contiguous", "shuffled"]),
            default="contiguous",
            show_default=True,
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed of the shuffled page order.",
        ),
        click.option(
            "--classes",
            default="index,kv,append",
            show_default=True,
            help="Traffic classes: weights,index,kv,append,query,partials (query: each "
            "kernel's query read per request and layer before its own reads: the indexer's 64 "
            "heads x 128 and the attention kernel's heads x the layout's query width, bf16; "
            "partials: the split-K partial outputs the attention kernel writes, sized by "
            "--backend).",
        ),
        click.option(
            "--weight-bytes",
            type=SIZE,
            default=0,
            help="Weights read per layer per step (class 'weights').",
        ),
        click.option(
            "--reads-per-token",
            type=int,
            default=1,
            show_default=True,
            help="CTAs reading each selected token (kernel tiling).",
        ),
        click.option(
            "--heads",
            type=int,
            default=0,
            show_default=True,
            help="Query heads of the attention kernel, for the query class (0: the trace model's).",
        ),
        click.option(
            "--kv-loads-apart",
            is_flag=True,
            help="Read each KV record's parts with separate loads (MLA latent, scales, RoPE), "
            "as our sparse MLA kernel does (kernel tiling; token policies then see each part).",
        ),
        click.option(
            "--backend",
            default=None,
            help="Read the KV, the query and the split-K partials as this attention kernel "
            "does (triton: ours, flashmla: DeepSeek's FP8 sparse decode), the tiling the "
            "decode comparison checks against ncu; takes the place of --reads-per-token and "
            "--kv-loads-apart. Add the query and partials classes to stream those.",
        ),
        click.option(
            "--plugin",
            "plugins",
            multiple=True,
            type=click.Path(),
            help="Python file registering extra policies.",
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@main.command()
@click.argument("trace", type=click.Path())
@click.option(
    "--policy",
    "policies",
    multiple=True,
    default=["lru"],
    show_default=True,
    help="Policy spec; repeat for several (one pass).",
)
@_replay_options
@click.option(
    "--out",
    type=TABLE,
    default=None,
    help="Save per (policy, step, layer, class) counters (.parquet or .csv).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Policies replayed at once [default: one per policy, up to the CPU count].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def replay(
    trace, policies, gpu, cache_size, ways, set_hash, fill, plugins, backend, out, threads, quiet,
    **wl,
) -> None:  # fmt: skip
    """Replay a trace through a GPU L2 model under one or more policies.

    \b
    Example:
      dsacache replay t.dsatrace --gpu h100 --layout mla-fp8 --batch 8 --policy lru --policy fifo --out r.parquet
    """
    from dsacache.policies import load_plugin, make_policy
    from dsacache.simulator import replay as run_replay
    from dsacache.simulator import summarize
    from dsacache.simulator.workload import check_partials_backend

    for plugin in plugins:
        load_plugin(plugin)
    for spec in policies:  # bad policy specs fail before any trace is read
        make_policy(spec)
    tr = load_trace(trace)
    workload = _workload(**wl)
    check_partials_backend(workload.classes, backend)
    if backend:
        from dsacache.kernels.decode_step import backend_workload

        workload = backend_workload(workload, tr, backend, gpu)
    df = run_replay(
        tr,
        policies=list(policies),
        gpu=gpu,
        cache_size=cache_size,
        ways=ways,
        set_hash=set_hash,
        fill=fill,
        workload=workload,
        progress=not quiet,
        threads=threads,
    )
    if out:
        save_table(df, out)
    click.echo(
        f"cache {format_size(df.attrs['cache_bytes'])}, {df.attrs['ways']}-way; layout {df.attrs['layout']}; batch {df.attrs['batch']}"
    )
    click.echo(summarize(df).to_string(float_format=lambda x: f"{x:.4f}"))


@main.command()
def policies() -> None:
    """List the registered cache policies with their parameters.

    \b
    Example:
      dsacache policies
    """
    from dsacache.policies import registered

    for name, p in sorted(registered().items()):
        params = ", ".join(x.describe() for x in p.params) or "no parameters"
        click.echo(f"{name:<12} {p.description}\n{'':<12} {params}")


@main.command()
@click.option(
    "--steps",
    type=int,
    default=4,
    show_default=True,
    help="Decode steps of the DeepSeek-V3.2-shaped trace.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--report",
    "report_path",
    default="dsacache-report.html",
    show_default=True,
    type=click.Path(),
    help="Where to write the HTML report of the smallest bundled trace.",
)
def demo(steps, quiet, report_path) -> None:
    """The main job in one command: replay the bundled real trace and a DeepSeek-V3.2-shaped
    one through the H100 L2 model calibrated on measurements, with several policies, show how
    far the model is from the measured GPU, and write an HTML report of the real trace.

    \b
    Example:
      dsacache demo
    """
    from dsacache import calibration
    from dsacache.simulator import Workload, summarize
    from dsacache.simulator import replay as run_replay
    from dsacache.simulator.presets import gpu_preset
    from dsacache.tracer.synth import preset, synthesize
    from dsacache.traces import MAIN_TRACE, SMALL_TRACE, bundled, bundled_path

    # the L2 geometry and memory times fit to the H100's probes (dsacache/data/h100/profile.json)
    model = f"H100 L2 as {gpu_preset('h100-calibrated').verified} (the L2 reports 50 MiB)"

    def show(title, trace, policies, batch):
        df = run_replay(
            trace, policies=policies, gpu="h100-calibrated", workload=Workload(batch=batch),
            progress=not quiet,
        )  # fmt: skip
        click.echo(f"\n{title}, batch {batch}, layout {df.attrs['layout']}\n{model}")
        click.echo(summarize(df).to_string(float_format=lambda x: f"{x:.4f}"))

    with tempfile.TemporaryDirectory() as tmp:
        if MAIN_TRACE in bundled():
            path = bundled_path(MAIN_TRACE)
            click.echo(f"bundled real trace: {path.name}")
            tr = load_trace(path)
            _print_info(tr.validate())
            policies = [
                "lru",
                "token-lru",
                "hints:index=first",
                "reserve:bytes=8MiB,scope=learned",
                "belady",
                "reserve:bytes=8MiB,inner=token-belady",
            ]
            show("Real trace", tr, policies, 4)
        path = Path(tmp) / "deepseek.dsatrace"
        synthesize(preset("deepseek-v3.2", steps=steps), path, progress=not quiet)
        policies = [
            "lru",
            "hints:index=first",
            "reserve:bytes=16MiB",
            "reserve:bytes=16MiB,admit=second",
            "reserve:bytes=16MiB,scope=learned",
            "belady",
        ]
        show(
            "DeepSeek-V3.2-shaped synthetic trace (61 layers, k=2048, 32K context)",
            load_trace(path),
            policies,
            1,
        )
    for gpu in ("h100", "h200"):
        model = calibration.fitted(gpu)
        df = calibration.compare(gpu, (model,))
        err = df.groupby("experiment")["error_points"].apply(lambda e: e.abs().mean())
        click.echo(
            f"\nModel ({model.label}) vs measured {gpu.upper()} (ncu), mean |error| in "
            "hit-rate points per probe:"
        )
        click.echo(err.round(2).to_string())
    if SMALL_TRACE in bundled():
        from dsacache.report import write_report

        html = write_report(
            load_trace(bundled_path(SMALL_TRACE)), report_path, command="dsacache demo"
        )
        click.echo(f"\nreport (miss-ratio curves, policies, per-layer hit rates): {html}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--kernel", "kernel_regex", default=None, help="Profile only kernels matching this regex."
)
@click.option(
    "--plan",
    type=click.Path(),
    default=None,
    help="JSON launch plan the workload writes (joined row by row).",
)
@click.option("--launch-skip", type=int, default=0, show_default=True)
@click.option("--launch-count", type=int, default=None)
@click.option("--out", required=True, type=TABLE, help="Measured counters (.parquet or .csv).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def profile(kernel_regex, plan, launch_skip, launch_count, out, command) -> None:
    """Run COMMAND under Nsight Compute (no cache flush between kernels, application replay)
    and save the L2/DRAM counters of every profiled kernel with GPU metadata.

    \b
    Example:
      dsacache profile --kernel '^l2probe' --out m.parquet -- python my_decode.py
    """
    from dsacache.kernels.ncu import profile as run_profile

    df = run_profile(
        list(command), kernel_regex, plan, launch_skip=launch_skip, launch_count=launch_count
    )
    save_table(df, out)
    click.echo(f"{len(df)} kernel(s) measured -> {out}")


@main.command()
@click.argument(
    "experiment", type=click.Choice(["reuse", "hint", "beside", "gather", "twice", "decode"])
)
@click.option("--out", required=True, type=click.Path(), help="Measured counters (.parquet).")
@click.option(
    "--sizes",
    type=SIZES,
    default=None,
    help="reuse, hint: buffer sizes, e.g. 8MiB,16MiB,32MiB; beside: KV bytes per layer.",
)
@click.option(
    "--beside", type=SIZE, default=None, help="beside: bytes of the normal buffer per layer."
)
@click.option(
    "--kv-reads", type=click.IntRange(1, 2), default=None, help="beside: KV reads per layer."
)
@click.option(
    "--between",
    type=SIZES,
    default=None,
    help="hint, gather: bytes streamed between the two reads.",
)
@click.option(
    "--evict",
    type=click.Choice(["", "evict_first", "evict_last"]),
    default=None,
    help="hint: L2 hint of the first read; beside: of the KV reads (default evict_last).",
)
@click.option("--k", "k", type=int, default=None, help="gather, twice: tokens selected.")
@click.option(
    "--row-bytes",
    type=click.IntRange(4),
    default=None,
    help="gather, twice: bytes per token row (656).",
)
@click.option(
    "--context", type=int, default=None, help="gather, twice, decode: tokens in the context."
)
@click.option("--layers", type=int, default=None, help="decode, beside: layers.")
@click.option("--steps", type=int, default=None, help="decode: decode steps.")
@click.option(
    "--keep", type=float, default=None, help="gather, twice, decode: share of picks kept per step."
)
@click.option(
    "--index-evict",
    type=click.Choice(["", "evict_first", "evict_last"]),
    default=None,
    help="decode: L2 hint of the indexer-key loads.",
)
@click.option(
    "--kv-evict",
    type=click.Choice(["", "evict_first", "evict_last"]),
    default=None,
    help="decode: L2 hint of the KV gathers.",
)
@click.option(
    "--kv-first-from",
    type=int,
    default=None,
    help="decode: KV of layers >= this loads with evict_first.",
)
@click.option(
    "--persist-layers",
    type=int,
    default=None,
    help="decode: L2 persisting window over the KV of the first N layers.",
)
@click.option("--hit-ratio", type=float, default=None, help="decode: the window's hitRatio.")
@click.option(
    "--set-aside", type=SIZE, default=None, help="decode: persisting L2 set-aside, e.g. 30MiB."
)
@click.option("--raw", type=click.Path(), default=None, help="Also keep ncu's raw output here.")
def probe(
    experiment, out, sizes, beside, kv_reads, between, evict, k, row_bytes, context, layers, steps, keep,
    index_evict, kv_evict, kv_first_from, persist_layers, hit_ratio, set_aside, raw,
) -> None:  # fmt: skip
    """Measure a known-answer L2 experiment on the GPU under ncu (see kernels/probes.py).

    \b
    Example:
      dsacache probe reuse --out reuse.parquet
      dsacache probe hint --evict evict_last --sizes 8MiB,24MiB --between 0,32MiB --out h.parquet
      dsacache probe beside --evict evict_last --sizes 1MiB --beside 1MiB --layers 32 --out b.parquet
      dsacache probe gather --k 2048 --context 32768 --out gather.parquet
      dsacache probe twice --k 2048 --context 32768 --out twice.parquet
      dsacache probe decode --layers 8 --context 8192 --steps 4 --out decode.parquet
    """
    from dsacache.kernels.ncu import option_words
    from dsacache.kernels.ncu import probe as run_probe

    if row_bytes is not None and row_bytes % 4:
        raise click.BadParameter(f"{row_bytes} is not a multiple of 4", param_hint="--row-bytes")
    options = {"--sizes": sizes, "--beside": beside, "--kv-reads": kv_reads, "--between": between, "--evict": evict, "--k": k,
               "--row-bytes": row_bytes,
               "--context": context,
               "--layers": layers, "--steps": steps, "--keep": keep,
               "--index-evict": index_evict, "--kv-evict": kv_evict,
               "--kv-first-from": kv_first_from, "--persist-layers": persist_layers,
               "--hit-ratio": hit_ratio, "--set-aside": set_aside}  # fmt: skip
    if experiment == "beside":  # before ncu starts: the probe would refuse them under it
        from dsacache.kernels import probes

        a = probes.parser().parse_args([experiment, "--plan", "-", *option_words(options)])
        try:
            probes.check_beside([parse_size(x) for x in a.sizes.split(",")],
                                parse_size(a.beside), a.layers, a.kv_reads)  # fmt: skip
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    df = run_probe(experiment, options, raw)
    save_table(df, out)
    click.echo(f"{len(df)} kernel(s) measured -> {out}")


@main.command()
@click.option(
    "--gpu",
    default=None,
    help="Whose bundled measurements (default h100), or whose fitted model simulates the "
    "--measured files (default: the GPU their metadata names).",
)
@click.option(
    "--measured",
    "measured_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A `dsacache probe` measurement to compare instead of the bundled ones (repeatable).",
)
@click.option(
    "--kernels",
    is_flag=True,
    help="Compare the bundled profiles of the real decode kernels (the decode-step driver "
    "under ncu) instead of the probes.",
)
@click.option("--out", type=TABLE, default=None, help="Save the table (.parquet or .csv).")
def compare(gpu, measured_paths, kernels, out) -> None:
    """Simulated vs measured L2 hit rates and DRAM bytes: on the GPU probes bundled with
    dsacache, on the bundled profiles of the real decode kernels (--kernels), or on your own
    (--measured: made with `dsacache probe`, or `dsacache profile` of the decode-step driver).

    The model (the GPU's profile, `dsacache calibrate`) is fit to the reuse probe only; the DSA-shaped probes (decode steps, gathers,
    eviction hints) and the kernels are predictions. --out writes one row per (experiment,
    point, model) with the measured and simulated values and their errors.

    \b
    Example:
      dsacache compare --gpu h100
      dsacache compare --gpu h200 --kernels --out cmp.csv
      dsacache compare --measured decode.parquet --out cmp.csv
    """
    from dsacache import calibration

    if kernels and not measured_paths:
        measured_paths = calibration.kernel_measurements(gpu or "h100")
        if not measured_paths:
            raise click.UsageError(f"no bundled kernel profiles for gpu {gpu or 'h100'!r}")
    if measured_paths:
        df = calibration.compare_files(list(measured_paths), gpu)
    else:
        df = calibration.compare(gpu or "h100")
    if out:
        save_table(df, out)
    table = df.pivot_table(
        index=["experiment", "point"], columns="model", values=["measured", "simulated"], sort=False
    )
    click.echo(table.round(3).to_string())
    err = df.groupby(["experiment", "model"])["error_points"].apply(lambda e: e.abs().mean())
    click.echo("\nmean |simulated - measured| L2 hit rate (points):")
    click.echo(err.round(2).unstack("model").to_string())
    dram = df.groupby(["experiment", "model"])["dram_error_points"].apply(
        lambda e: e.abs().median()
    )
    click.echo(
        "\nmedian |simulated - measured| DRAM bytes read, in points of the bytes read through "
        "the L2 (the relative error is the CSV's dram_error_pct):"
    )
    click.echo(dram.round(2).unstack("model").to_string())
    overall = df.groupby("model").agg(
        hit_median_points=("error_points", lambda e: e.abs().median()),
        hit_max_points=("error_points", lambda e: e.abs().max()),
        dram_median_pct=("dram_error_pct", lambda e: e.abs().median()),
        dram_median_points=("dram_error_points", lambda e: e.abs().median()),
    )
    click.echo("\nall points:")
    click.echo(overall.round(2).to_string())


REUSE_SIZES = "8MiB,16MiB,24MiB,28MiB,32MiB,36MiB,40MiB,44MiB,48MiB,56MiB,64MiB,80MiB"
GATHER_PROBE = {"--k": 2048, "--context": 32768, "--between": "0,16MiB", "--row-bytes": 656}
HINT_PROBE = {"--evict": "evict_last", "--sizes": "4MiB,8MiB,16MiB,24MiB",
              "--between": "0,8MiB,16MiB,32MiB,64MiB"}  # fmt: skip


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: comma-separated integers >= 1", param_hint=what)
    return values


@main.command()
@click.option(
    "--out", type=click.Path(dir_okay=False), required=True, help="The GPU profile (.json)."
)
@click.option("--run", is_flag=True, help="Measure the probes on this GPU first (needs ncu); "
              "they are saved beside --out.")  # fmt: skip
@click.option("--gpu", default=None, help="Refit the probes bundled for this GPU (h100, h200).")
@click.option("--reuse", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A `dsacache probe reuse` measurement.")  # fmt: skip
@click.option("--gather", "gathers", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="`dsacache probe gather` measurements, for the fill unit (repeatable).")  # fmt: skip
@click.option("--hint", "hints", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="`dsacache probe hint --evict evict_last` measurements, for the ways the L2 "
              "keeps evict_last lines in (repeatable).")  # fmt: skip
@click.option("--capacities", default=None, help="MiB searched, e.g. 24-40 (default: 40-70% "
              "of the L2 the GPU reports).")  # fmt: skip
@click.option("--ways", default="8,16,24,32", show_default=True, help="Associativities searched.")
@click.option("--set-hashes", default="hash,mix", show_default=True, help="Set indexes searched.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calibrate(out, run, gpu, reuse, gathers, hints, capacities, ways, set_hashes, quiet) -> None:
    """Fit the L2 model and the memory coefficients to known-answer probes; write a GPU
    profile that `replay --gpu PROFILE.json` (and the API's gpu=) simulates with.

    The reuse probe (read S bytes twice, S = 8-80 MiB) fits the L2 geometry: LRU with the
    effective capacity, ways and set index whose second-read hit rates are closest; the
    gather probe's DRAM bytes fit the fill unit; an evict_last hint probe's DRAM bytes fit how
    many ways per set the L2 keeps evict_last lines in without a set-aside; the reuse kernels'
    durations fit HBM latency and bandwidth and the L2 bandwidth.

    \b
    Example:
      dsacache calibrate --run --out h200.json          # on a GPU host with Nsight Compute
      dsacache calibrate --gpu h200 --out h200.json     # refit the bundled H200 probes
      dsacache calibrate --reuse reuse.parquet --gather gather.parquet --out mine.json
      dsacache replay TRACE --gpu mine.json
    """
    from dsacache import calibration

    if not out.lower().endswith(".json"):
        raise click.BadParameter(f"{out!r}: a GPU profile's name ends in .json (replay --gpu "
                                 "tells profiles by it)", param_hint="--out")  # fmt: skip
    sources = sum(bool(x) for x in (run, gpu, reuse))
    if sources != 1:
        raise click.UsageError("give exactly one of --run, --gpu or --reuse")
    if (gathers or hints) and not reuse:
        raise click.UsageError("--gather and --hint go with --reuse")
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # before minutes of measuring
    if run:
        from dsacache.kernels.ncu import probe as run_probe

        folder = Path(out).parent
        reuse = str(folder / "l2-reuse.parquet")
        gathers = (str(folder / "l2-gather-rows-656.parquet"),)
        hints = (str(folder / "l2-hint-evict_last.parquet"),)
        for path, experiment, options in ((reuse, "reuse", {"--sizes": REUSE_SIZES}),
                                          (gathers[0], "gather", GATHER_PROBE),
                                          (hints[0], "hint", HINT_PROBE)):  # fmt: skip
            click.echo(f"measuring the {experiment} probe under ncu -> {path}")
            save_table(run_probe(experiment, options), path)
    elif gpu:
        folder = calibration.DATA_DIR / gpu.lower()
        if not (folder / "l2-reuse.parquet").exists():
            raise click.BadParameter(
                f"no bundled reuse probe for {gpu!r}; have: "
                + ", ".join(sorted(p.parent.name for p in calibration.DATA_DIR.glob("*/l2-reuse.parquet"))),
                param_hint="--gpu",
            )  # fmt: skip
        reuse = str(folder / "l2-reuse.parquet")
        gathers = tuple(str(p) for p in sorted(folder.glob("l2-gather*.parquet")))
        hints = tuple(str(p) for p in sorted(folder.glob("l2-hint-evict_last*.parquet")))
    span = None
    if capacities:
        try:
            low, high = (int(x) for x in capacities.split("-"))
        except ValueError:
            raise click.BadParameter(f"{capacities!r}: use LOW-HIGH in MiB, e.g. 24-40",
                                     param_hint="--capacities") from None  # fmt: skip
        if not 1 <= low <= high:
            raise click.BadParameter(f"{capacities!r}: need 1 <= LOW <= HIGH",
                                     param_hint="--capacities")  # fmt: skip
        span = range(low, high + 1)
    hashes = [h for h in set_hashes.split(",") if h]
    unknown = [h for h in hashes if h not in SET_HASHES]
    if unknown or not hashes:
        raise click.BadParameter(f"{set_hashes!r}: choose from {', '.join(SET_HASHES)}",
                                 param_hint="--set-hashes")  # fmt: skip
    profile = calibration.calibrate(
        reuse, list(gathers), capacities_mib=span, ways=_int_list(ways, "--ways"),
        set_hashes=hashes, progress=not quiet, hint_paths=list(hints),
    )  # fmt: skip
    profile["command"] = shlex.join(["dsacache", *sys.argv[1:]])
    Path(out).write_text(json.dumps(profile, indent=1, allow_nan=False) + "\n")
    if not gathers:
        click.echo("no gather probe: the fill unit is one sector, not fitted (add --gather)",
                   err=True)  # fmt: skip
    click.echo(f"{profile['summary']}\n-> {out} (use: dsacache replay TRACE --gpu {out})")


def _register_commands() -> None:
    """Commands that live in their own modules (each imports its heavy dependencies lazily)."""
    import importlib

    for module in ("cli_capture", "cli_analyze", "cli_sweep"):
        try:
            mod = importlib.import_module(f"dsacache.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"dsacache.{module}":
                raise
            continue
        for command in getattr(mod, "COMMANDS", ()):
            main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
