"""Which replacement policy fits the H100's unhinted decode profiles best, at the fitted
geometry? The bundled profiles of the decode-step driver (dsacache/data/h100/
decode-steps.parquet) without eviction hints, a window or FlashMLA's evict_first query are
simulated with the H100 profile's geometry (28 MiB, 16 ways, `hash`, 64-B fill) under each
policy; the reuse probe (the fit's own data) is shown beside them.

    python docs/results/h100-decode/policy-search-1207/policy_search.py OUT.csv
"""

import sys
from dataclasses import replace

import pandas as pd

from dsacache import calibration

POLICIES = ["lru", "srrip", "brrip", "drrip", "plru", "fifo", "random", "sieve"]

base = calibration.fitted("h100")
models = tuple(replace(base, policy=p, last_ways=0) for p in POLICIES)
steps = pd.read_parquet(calibration.kernel_measurements("h100")[0])
rows = []
for name, part in steps.groupby("config", sort=True):
    part = part.reset_index(drop=True)
    args = calibration.driver_args(part)
    hinted = args.index_evict or args.kv_evict or calibration.query_hint(args)
    if hinted or args.persist_layers > 0:
        continue
    rows += calibration.compare_decode_step(str(name), part, models)
    print(name, flush=True)
reuse = calibration.measured("h100", "reuse")

rows += calibration.compare_measurement("reuse", reuse, models)
df = calibration._errors(rows)
df.to_csv(sys.argv[1], index=False)
df["class"] = df["point"].str.split().str[-1]
kern = df[df["experiment"] != "reuse"]
summary = kern.groupby(["policy", "class"])["error_points"].agg(
    median=lambda e: e.abs().median(), mean=lambda e: e.abs().mean(), max=lambda e: e.abs().max()
)
print(summary.unstack("class").round(2).to_string())
worst = kern.assign(abs_err=kern["error_points"].abs()).groupby(["policy", "experiment"])["abs_err"].max()
print(worst.unstack("policy").round(1).to_string())
print(df[df["experiment"] == "reuse"].groupby("policy")["error_points"].apply(lambda e: e.abs().mean()).round(2))
