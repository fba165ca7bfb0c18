"""The L2 model search of docs/l2_model_search.md (issue #8). Run from outside the repo root:

    python run.py grid h100 reuse-grid-h100.csv     # reuse-probe MAE per policy/capacity/ways/hash (resumes)
    python run.py heldout h100 lru 28 32 hash [x]   # compare() on one model, appended to heldout.csv

Non-LRU policies (and a trailing ``x``) run only the probes without hints: ``hints`` and
``persist`` keep LRU order whatever the base policy. The ``mix`` set index is not in the
engine; the doc gives the patch used for it.
"""

import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dsacache import calibration as c

HERE = Path(__file__).parent
STEPS = {"lru": 1, "srrip": 2, "plru": 2, "random": 4, "brrip": 4, "drrip": 4}  # MiB


def grid(gpu: str, out: str) -> None:
    lo, hi = {"h100": (18, 50), "h200": (22, 62)}[gpu]
    m = c.measured(gpu, "reuse")
    s = m[m.role == "second"]
    sizes, meas = s.bytes.tolist(), s.hit.to_numpy()
    done = set()
    try:
        d = pd.read_csv(out)
        done = set(zip(d.policy, d.ways, d.hash, d.mib, strict=True))
    except FileNotFoundError:
        open(out, "w").write("gpu,policy,ways,hash,mib,capacity,mae,maxerr\n")
    for pol, step in STEPS.items():
        for w, h in itertools.product((8, 16, 24, 32), ("mod", "xor", "hash")):
            for mib in range(lo, hi + 1, step):
                if pol in ("brrip", "drrip") and (w == 24 or mib % 8 != lo % 8):
                    continue
                if pol in ("random", "plru") and w == 24 or (pol, w, h, mib) in done:
                    continue
                unit = w * 128  # 24 ways: the capacity rounds to a multiple of 3 KiB
                cap = round(mib * 2**20 / unit) * unit
                e = np.abs(c.simulate_reuse(sizes, c.Model(pol, cap, w, h)) - meas) * 100
                with open(out, "a") as f:
                    f.write(f"{gpu},{pol},{w},{h},{mib},{cap},{e.mean():.3f},{e.max():.2f}\n")


def heldout(gpu: str, pol: str, mib: str, ways: str, h: str, *nohint: str) -> None:
    w = int(ways)
    cap = round(float(mib) * 2**20 / (w * 128)) * w * 128
    model = c.Model(pol, cap, w, h)
    no_hints = bool(nohint) or pol != "lru"
    df = c.compare(gpu, (model,))
    hinted = df["policy"].str.startswith(("hints", "persist"))
    if no_hints:  # a probe's hints replace the base policy: those rows say nothing about it
        df, hinted = df[~hinted], hinted[~hinted]

    def stats(e):
        e = e.abs()
        return f"{e.median():.2f},{e.mean():.2f},{e.max():.1f},{len(e)}"

    full = "n/a,n/a,n/a,0" if no_hints else stats(df["error_points"])
    line = f"{gpu},{model.label},{full},{stats(df[~hinted]['error_points'])}"
    with open(HERE / "heldout.csv", "a") as f:
        f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    t = time.time()
    {"grid": grid, "heldout": heldout}[sys.argv[1]](*sys.argv[2:])
    print(f"{time.time() - t:.0f} s", file=sys.stderr)
