"""Generate the comparison of the real decode kernels' measured L2 hit rates and DRAM bytes
with dsacache's model (docs/decode_compare.md quotes its output):

    python docs/make_decode_compare.py [--gpu h100|h200] [--bundle GRID_DIR]

Writes docs/results/<gpu>-decode/compare.csv (one row per configuration, step and class),
table.md (one row per configuration) and docs/img/decode_compare_<gpu>.png (simulated vs
measured). CPU only: it reads the bundled profiles (`dsacache compare --kernels`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dsacache import calibration  # noqa: E402
from dsacache.tracer.synth import SPEC_PREFIX, parse_spec  # noqa: E402
from dsacache.traces import open_trace  # noqa: E402

DOCS = Path(__file__).parent


def describe(args) -> dict:
    """Trace, shape and L2 option of one profiled configuration."""
    if args.trace.startswith(SPEC_PREFIX):
        s = parse_spec(args.trace)
        trace, context, k, layers, steps = "synthetic", s.context, s.k, s.layers, s.steps
    else:
        t = open_trace(args.trace)
        totals = t.manifest["totals"]
        trace, context, k = args.trace, totals["max_position"], t.indexer["k"]
        layers, steps = totals["layers"], args.steps
    option = [f"index {args.index_evict}"] if args.index_evict else []
    option += [f"KV {args.kv_evict}"] if args.kv_evict else []
    if args.persist_layers:
        option.append(f"window over {args.persist_layers} layers, hitRatio {args.hit_ratio}")
    return {"trace": trace, "kernel": f"{args.layout}, {args.backend}", "context": context,
            "k": k, "batch": args.batch, "layers x steps": f"{layers} x {steps}",
            "L2 option": ", ".join(option) or "-"}  # fmt: skip


def table(df: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name, g in profiles.groupby("config"):
        x = df[df["experiment"] == name]
        index = x[x["point"].str.endswith("index")]["error_points"].abs()
        kv = x[x["point"].str.endswith("kv")]
        later = kv[~kv["point"].str.startswith("step 0")]
        rows.append({"config": name, **describe(calibration.driver_args(g)),
                     "index err mean/max": f"{index.mean():.1f} / {index.max():.1f}",
                     "KV err mean/max": f"{kv['error_points'].abs().mean():.1f} / "
                                        f"{kv['error_points'].abs().max():.1f}",
                     "KV hit, measured (steps 1+)": f"{later['measured'].mean():.1%}",
                     "KV hit, model": f"{later['simulated'].mean():.1%}",
                     "DRAM err (median)": f"{x['dram_error_pct'].abs().median():.1f}%"})  # fmt: skip
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for role, marker in (("index", "s"), ("kv", "o")):
        x = df[df["point"].str.endswith(role)]
        ax.scatter(x["measured"] * 100, x["simulated"] * 100, s=14, marker=marker, label=role)
    ax.plot([0, 100], [0, 100], "k--", lw=0.8)
    ax.set_xlabel("measured L2 hit rate of the modelled reads (%)")
    ax.set_ylabel("simulated (%)")
    ax.set_title("Real decode kernels on the GPU vs dsacache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bundle(grid_dir: Path, gpu: str) -> Path:
    """Concatenate the grid's profiles (``grid_dir/NAME.parquet``, one per configuration) into
    the bundled ``dsacache/data/<gpu>/decode-steps.parquet``, with a ``config`` column."""
    parts = [pd.read_parquet(f).assign(config=f.stem) for f in sorted(grid_dir.glob("*.parquet"))]
    if not parts:
        raise SystemExit(f"no profiles in {grid_dir}")
    df = pd.concat(parts, ignore_index=True)
    df = df[["config", *[c for c in df.columns if c != "config"]]]
    out = calibration.DATA_DIR / gpu / "decode-steps.parquet"
    df.to_parquet(out, index=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", default="h100")
    p.add_argument(
        "--bundle", type=Path, help="first bundle this folder of decode_grid.sh profiles"
    )
    a = p.parse_args()
    gpu = a.gpu
    if a.bundle:
        print("bundled", bundle(a.bundle, gpu))
    paths = calibration.kernel_measurements(gpu)
    df = calibration.compare_files([str(x) for x in paths], gpu)
    out = DOCS / "results" / f"{gpu}-decode"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "compare.csv", index=False)
    t = table(df, pd.concat(pd.read_parquet(x) for x in paths))
    e = df["error_points"].abs()
    per_config = df.groupby("experiment")["error_points"].apply(lambda s: s.abs().max())
    summary = (
        f"All {len(df)} points ({len(per_config)} configurations): |simulated - measured| hit "
        f"rate median {e.median():.2f}, mean {e.mean():.2f}, max {e.max():.1f} points; "
        f"{(per_config <= 6).sum()} configurations within 6 points at every point. DRAM bytes "
        f"read: median |error| {df['dram_error_pct'].abs().median():.2f}%, mean "
        f"{df['dram_error_pct'].abs().mean():.1f}%."
    )
    (out / "table.md").write_text(t.to_markdown(index=False) + "\n\n" + summary + "\n")
    plot(df, DOCS / "img" / f"decode_compare_{gpu}.png")
    print(summary)


if __name__ == "__main__":
    main()
