"""FlashMLA's query repeats that miss in flight, applied to the comparison's FlashMLA rows.

The H200 probe `docs/results/h200-decode/flashmla-parts.parquet` runs FlashMLA at cold L2 on
an empty selection, so its L2 reads are the query's (128 heads x 576 bf16 = 4608 sectors per
request) read q times. If every repeat hit, the hit rate would be (q - 1) / q; the share of
repeats that miss (with no DRAM bytes beyond one read) is 1 - measured / that. In the model
every repeat hits (the reads are back to back), and a miss in flight fetches nothing and
changes no cache state, so counting m x (q - 1) x 4608 sectors per request and layer as
misses lowers the simulated KV-class hit rate by exactly that share of the point's sectors.
Prints the worst |error| per FlashMLA configuration as compared and so adjusted.

    python docs/results/h100-decode/flashmla_query_inflight.py
"""

from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[3]
READ = "lts__t_sectors_srcunit_tex_op_read.sum"
HIT = "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum"
QUERY_SECTORS = 128 * 576 * 2 // 32
# batch, k and layers of the FlashMLA rows (docs/decode_grid.sh)
SHAPES = {"f01": (1, 2048, 16), "f02": (1, 2048, 16), "f03": (8, 2048, 4), "f04": (1, 2048, 8),
          "f05": (64, 2048, 4), "f06": (1, 2048, 16), "f07": (8, 256, 16)}  # fmt: skip


def repeat_misses() -> dict[tuple[int, int], tuple[float, float]]:
    """(batch, k) -> (query reads per call, share of the repeats that miss)."""
    p = pd.read_parquet(ROOT / "docs/results/h200-decode/flashmla-parts.parquet")
    p = p[(p["selection"] == "none") & (p["call"] == "cold")]
    out = {}
    for _, r in p.iterrows():
        q = r[READ] / (r["batch"] * QUERY_SECTORS)
        out[int(r["batch"]), int(r["k"])] = (q, 1 - (r[HIT] / r[READ]) / ((q - 1) / q))
    return out


def main() -> None:
    misses = repeat_misses()
    for (b, k), (q, m) in sorted(misses.items()):
        print(f"batch {b} x k {k}: query read {q:.2f} times, {100 * m:.1f}% of repeats miss")
    for gpu in ("h100", "h200"):
        d = pd.read_csv(ROOT / f"docs/results/{gpu}-decode/compare.csv")
        d = d[d["experiment"].isin(SHAPES) & d["point"].str.contains("kv")].copy()

        def adjusted(r):
            b, k, layers = SHAPES[r["experiment"]]
            q, m = misses[b, k]
            sectors = r["measured_read_bytes"] / 32
            return r["error_points"] - 100 * m * (q - 1) * QUERY_SECTORS * b * layers / sectors

        d["adjusted"] = d.apply(adjusted, axis=1)
        worst = d.groupby("experiment")[["error_points", "adjusted"]].agg(lambda x: x.abs().max())
        print(gpu, worst.round(1).T.to_string(), sep="\n")


if __name__ == "__main__":
    main()
