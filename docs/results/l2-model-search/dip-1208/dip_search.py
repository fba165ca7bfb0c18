"""Does adaptive insertion (DIP, ``dip_policy.py``) fit the unhinted decode profiles and the
reuse probe better than LRU at each GPU's fitted geometry?

    python docs/results/l2-model-search/dip-1208/dip_search.py OUT.csv
"""

import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from dsacache import calibration
from dsacache.policies import load_plugin

load_plugin(str(Path(__file__).with_name("dip_policy.py")))
POLICIES = ["lru", "dip", "dip:epsilon=0.125", "dip:psel_bits=6"]

rows = []
for gpu in ("h100", "h200"):
    base = calibration.fitted(gpu)
    models = tuple(replace(base, policy=p, last_ways=0) for p in POLICIES)
    steps = pd.read_parquet(calibration.kernel_measurements(gpu)[0])
    for name, part in steps.groupby("config", sort=True):
        part = part.reset_index(drop=True)
        args = calibration.driver_args(part)
        if args.index_evict or args.kv_evict or calibration.query_hint(args) or args.persist_layers:
            continue
        for row in calibration.compare_decode_step(str(name), part, models):
            rows.append({**row, "gpu": gpu})
        print(gpu, name, flush=True)
    for row in calibration.compare_measurement("reuse", calibration.measured(gpu, "reuse"), models):
        rows.append({**row, "gpu": gpu})
df = calibration._errors(rows)
df.to_csv(sys.argv[1], index=False)
df["class"] = df["point"].str.split().str[-1]
df["abs"] = df["error_points"].abs()
kern = df[df["experiment"] != "reuse"]
summary = kern.groupby(["gpu", "policy", "class"])["abs"].agg(["median", "mean", "max"])
print(summary.unstack("class").round(2).to_string())
print(
    kern.groupby(["gpu", "experiment", "policy"])["abs"]
    .max()
    .unstack("policy")
    .round(1)
    .to_string()
)
print(df[df["experiment"] == "reuse"].groupby(["gpu", "policy"])["abs"].mean().round(2).to_string())
