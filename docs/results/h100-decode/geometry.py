"""Which L2 geometry predicts the H100's decode-kernel profiles best? The bundled H100 profile
pins LRU 28 MiB 16-way `hash` (calibrate's default search found 27 MiB 16-way `mix` on the
reuse curve, and the probes could not tell them apart). This re-simulates every configuration
of dsacache/data/h100/decode-steps.parquet with each candidate and prints the error summary.

    python docs/results/h100-decode/geometry.py > docs/results/h100-decode/geometry.txt
"""

import pandas as pd

from dsacache import calibration
from dsacache.calibration import Model

MiB = 2**20
CANDIDATES = [
    calibration.H100_FIT,
    Model("lru", 27 * MiB, 16, "mix", fill=64),
    Model("lru", 28 * MiB, 16, "mix", fill=64),
    Model("lru", 30 * MiB, 16, "mix", fill=64),
]

m = pd.read_parquet(calibration.kernel_measurements("h100")[0])
rows = []
for name, part in m.groupby("config", sort=True):
    rows += calibration.compare_decode_step(str(name), part.reset_index(drop=True), tuple(CANDIDATES))
df = calibration._errors(rows)
summary = df.groupby("model").agg(
    hit_median=("error_points", lambda e: e.abs().median()),
    hit_mean=("error_points", lambda e: e.abs().mean()),
    hit_max=("error_points", lambda e: e.abs().max()),
    dram_median_pct=("dram_error_pct", lambda e: e.abs().median()),
    dram_mean_pct=("dram_error_pct", lambda e: e.abs().mean()),
)
print(f"{len(m['config'].unique())} configurations, {len(df) // len(CANDIDATES)} points each")
print(summary.round(2).to_string())
