"""The sparse decode kernels with their split merge launched normally and as a programmatic
dependent launch (``pdl=True``), same process, on a GPU of compute capability >= 9.0.

At batch 8 the sparse GQA kernel moves 12.6 MB (about 4 us at the copy bandwidth) and takes
about 7 us with its merge; the merge starts only once the attention kernel has drained. A
dependent launch schedules the merge's programs while the attention kernel's last programs
finish. For each kernel and shape: the CUDA-graph median of both launches, 3 repetitions in
turn, their ratio, and a check that both give the same bits.

    python benchmarks/bench_pdl.py [--shapes 8x65536,64x65536] [--kernels gqa,mla] [--out F.csv]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TRITON_INTERPRET", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tune_kernels import cases, graph_us, inputs  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8x65536,8x131072,64x65536")
    p.add_argument("--kernels", default="gqa,mla")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the timings here (.csv)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("bench_pdl needs a GPU of compute capability 9.0 or later")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        bsz, ctx = (int(v) for v in shape.split("x"))
        x = inputs(bsz, ctx, gen)
        for kernel in args.kernels.split(","):
            call, _ = cases(kernel, x)
            # a sanity check only: the GPU tests run other inputs between, so that a merge
            # reading too early would show (here the partials' blocks come back unchanged)
            plain, dependent = call(), call(pdl=True)
            same = all(torch.equal(a, b) for a, b in zip(plain, dependent, strict=True))
            for rep in range(args.repeats):
                for pdl in (False, True):
                    us = graph_us(lambda call=call, pdl=pdl: call(pdl=pdl))
                    rows.append({"kernel": kernel, "batch": bsz, "context": ctx, "rep": rep,
                                 "pdl": pdl, "us": us, "same_bits": same})  # fmt: skip
        del x
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    df["gpu"] = torch.cuda.get_device_name()
    if args.out:
        df.to_csv(args.out, index=False)
    med = df.groupby(["kernel", "batch", "context", "pdl"])["us"].median().unstack("pdl")
    med["dependent / normal"] = med[True] / med[False]
    print(med.round(3).to_string())
    print("same bits:", df.groupby(["kernel", "batch", "context"])["same_bits"].all().to_dict())
    if not df["same_bits"].all():
        raise SystemExit(1)
    print("median ratio:", round(statistics.median(med["dependent / normal"]), 3))


if __name__ == "__main__":
    main()
