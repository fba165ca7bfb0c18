"""Capture the same prompts with the eager and the triton backend and measure how far apart
they are (run on a GPU host; under ``TRITON_INTERPRET=1`` it also runs, slowly, on the CPU).

    python -m dsacache.tracer.backend_check --out DIR [--device cuda] \\
        [--indexer-weights lightning.pt] [--k 64 --steps 32 --prompt-tokens 1024 --requests 4]

For each indexer (oracle; lightning when ``--indexer-weights`` is given) and granularity it
runs three captures of the same settings and prompts:

1. ``triton`` with ``check=True``: every sparse layer also recomputes the eager selection and
   attention on the same inputs: per-layer share of identical selections, identical modulo
   ties (``kernel_attention.selection_ties``), max |kernel - eager output|, max relative
   score difference (also warms the Triton JIT up);
2. ``eager`` and 3. ``triton``, independent (timed): per-layer share of identical rows, the
   share of decode steps whose rows are all identical, the mean Jaccard similarity of the
   selections, and each request's first step whose generated token differs (after it the two
   decodes see different text; before it they differ only by bf16 vs float32 drift), and the
   share of rows before it that are identical modulo drift ties (``drift_gap`` <=
   ``DRIFT_RTOL`` = 10%: a swapped token's score that close to both captures' k-th scores,
   relative to the k-th score for the oracle, to the row's largest score for lightning), with
   the distribution of that gap.

``DIR/backend_check.json`` holds everything, with timings (sparse step time per backend) and
the device; the traces stay in ``DIR`` too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from dsacache.errors import DsacacheError

DRIFT_RTOL = 0.1  # two free-running captures: a swap within 10% of the k-th score's scale


def drift_gap(
    ra: np.ndarray, sa: np.ndarray, rb: np.ndarray, sb: np.ndarray, free: np.ndarray,
    relative_to: str = "kth",
) -> float:  # fmt: skip
    """How far from a near-tie two selections of one row are (0 when identical): the largest
    distance of a token in one selection but not the other (by its recorded score ``sa`` or
    ``sb``) from either selection's k-th score (the smallest score among its tokens for which
    ``free``, a bool mask over positions, is true: not forced in as sink or window), divided
    by the k-th score (``relative_to="kth"``, for attention mass, whose drift is relative) or
    by the row's largest |score| (``"max"``, for lightning scores, which can be near 0)."""
    if np.array_equal(ra, rb):
        return 0.0
    fa, fb = free[ra], free[rb]
    if not fa.any() or not fb.any():
        return float("inf")
    tha, thb = float(sa[fa].min()), float(sb[fb].min())
    worst = 0.0
    for mine, scores, other in ((ra, sa, rb), (rb, sb, ra)):
        for s in scores[~np.isin(mine, other)]:
            for th in (tha, thb):
                if relative_to == "kth":
                    scale = abs(th)
                else:
                    scale = max(float(np.abs(sa).max()), float(np.abs(sb).max()))
                worst = max(worst, abs(float(s) - th) / max(scale, 1e-12))
    return worst


def compare_traces(eager: Any, triton: Any) -> dict[str, Any]:
    """End-to-end agreement of two traces of the same settings (``Trace`` objects; with
    scores, for the near-tie measure ``drift_gap``: relative to the k-th score for the oracle,
    to the row's largest score for the lightning indexer)."""
    a, b = eager.read_all(), triton.read_all()
    if len(a) != len(b) or not all(
        np.array_equal(getattr(a, c), getattr(b, c))
        for c in ("request", "step", "layer", "group", "position")
    ):
        raise DsacacheError("the two traces do not hold the same rows")
    n = len(a)
    same = np.zeros(n, dtype=bool)
    gap = np.zeros(n)
    jac = np.zeros(n)
    relative_to = "kth" if eager.indexer.get("kind") == "oracle" else "max"
    sink, window = int(eager.indexer["sink"]), int(eager.indexer["window"])
    scored = a.scores is not None and b.scores is not None
    for i in range(n):
        ra, rb = a.row(i), b.row(i)
        same[i] = np.array_equal(ra, rb)
        inter = np.intersect1d(ra, rb, assume_unique=True).size
        jac[i] = inter / max(1, ra.size + rb.size - inter)
        if same[i] or not scored:
            gap[i] = 0.0 if same[i] else np.inf
            continue
        pos = int(a.position[i])
        free = np.ones(pos, dtype=bool)
        free[:sink] = False
        free[max(0, pos - window) :] = False
        sa = a.scores[a.offsets[i] : a.offsets[i + 1]]
        sb = b.scores[b.offsets[i] : b.offsets[i + 1]]
        gap[i] = drift_gap(ra, sa, rb, sb, free, relative_to)
    layers = int(a.layer.max()) + 1
    steps = int(a.step.max()) + 1
    per_layer = [float(same[a.layer == layer].mean()) for layer in range(layers)]
    per_step = [bool(same[a.step == s].all()) for s in range(steps)]
    gen_a = [p["generated_ids"] for p in eager.manifest["capture"]["prompts"]]
    gen_b = [p["generated_ids"] for p in triton.manifest["capture"]["prompts"]]
    first = []
    for x, y in zip(gen_a, gen_b, strict=True):
        diff = [i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v]
        first.append(diff[0] if diff else None)
    # generated_ids[0] comes from the prefill; step s consumes generated_ids[s]
    before = np.ones(n, dtype=bool)
    for r, f in enumerate(first):
        if f is not None:
            before &= ~((a.request == r) & (a.step >= f))
    return {
        "rows": n,
        "rows_identical": float(same.mean()),
        "rows_identical_per_layer": [round(x, 5) for x in per_layer],
        "steps_identical": float(np.mean(per_step)),
        "first_step_not_identical": next((s for s, ok in enumerate(per_step) if not ok), None),
        "jaccard_mean": float(jac.mean()),
        "jaccard_min": float(jac.min()),
        "first_generated_token_difference_per_request": first,
        "rows_before_token_difference": int(before.sum()),
        "rows_identical_before_token_difference": float(same[before].mean())
        if before.any()
        else None,
        "rows_identical_modulo_drift_ties_before_token_difference": float(
            (gap[before] <= DRIFT_RTOL).mean()
        )
        if before.any() and scored
        else None,
        "drift_rtol": DRIFT_RTOL,
        "drift_relative_to": "k-th score" if relative_to == "kth" else "row's largest score",
        "drift_gap_before_token_difference": {
            "p50": float(np.quantile(gap[before], 0.5)),
            "p99": float(np.quantile(gap[before], 0.99)),
            "max": float(gap[before].max()),
        }
        if before.any() and scored
        else None,
    }


def run_check(
    out: str | Path,
    *,
    device: str = "cuda",
    indexer_weights: str = "",
    granularities: tuple[str, ...] = ("layer", "group"),
    model: str = "smollm2-135m",
    k: int = 64,
    steps: int = 32,
    prompt_tokens: int = 1024,
    requests: int = 4,
    sink: int = 4,
    window: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the captures described in the module docstring; write and return the JSON."""
    import torch

    from dsacache.tracer.capture import CaptureConfig, _device_name, _versions, capture_trace
    from dsacache.tracer.models import load_backbone
    from dsacache.traces import open_trace

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(model, device=device, quiet=not progress)
    indexers = ["oracle"] + (["lightning"] if indexer_weights else [])
    results = []
    for indexer in indexers:
        for gran in granularities:
            base = CaptureConfig(
                model=model, indexer=indexer, k=k, steps=steps, prompt_tokens=prompt_tokens,
                requests=requests, sink=sink, window=window, granularity=gran, device=device,
                indexer_weights=indexer_weights if indexer == "lightning" else "",
            )  # fmt: skip
            name = f"{indexer}-{gran}"
            runs: dict[str, Any] = {}
            for label, backend, check in (
                ("triton_check", "triton", True),
                ("eager", "eager", False),
                ("triton", "triton", False),
            ):
                cfg = replace(base, backend=backend)
                path = out / f"{name}-{label}.dsatrace"
                t0 = time.perf_counter()
                res = capture_trace(
                    cfg, path, overwrite=True, backbone=backbone, check=check, progress=progress
                )
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                runs[label] = {"result": res, "seconds": time.perf_counter() - t0, "path": path}
                if progress:
                    print(f"{name} {label}: {runs[label]['seconds']:.1f} s", file=sys.stderr)
            chk = runs["triton_check"]["result"].check
            e2e = compare_traces(
                open_trace(runs["eager"]["path"]), open_trace(runs["triton"]["path"])
            )
            timing = {
                label: {
                    "capture_s": round(runs[label]["seconds"], 3),
                    "sparse_per_step_s": runs[label]["result"].timing_s["sparse_per_step"],
                    "decode_per_step_s": runs[label]["result"].timing_s["decode_per_step"],
                }
                for label in ("eager", "triton")
            }
            results.append(
                {
                    "name": name,
                    "config": asdict(base),
                    "same_inputs": chk,
                    "same_inputs_summary": {
                        "identical_min_layer": min(chk["identical_per_layer"]),
                        "identical_modulo_ties_min_layer": min(
                            chk["identical_modulo_ties_per_layer"]
                        ),
                        "steps_identical": chk["steps_identical"],
                        "steps_identical_modulo_ties": chk["steps_identical_modulo_ties"],
                        "max_abs_out_diff": max(chk["max_abs_out_diff_per_layer"]),
                        "max_abs_out": max(chk["max_abs_out_per_layer"]),
                        "max_score_diff_rel": max(chk["max_score_diff_rel_per_layer"]),
                    },
                    "end_to_end": e2e,
                    "agreement_sparse_vs_dense": {
                        label: runs[label]["result"].agreement for label in ("eager", "triton")
                    },
                    "timing": timing,
                    "sparse_speedup_triton_vs_eager": round(
                        timing["eager"]["sparse_per_step_s"]
                        / max(timing["triton"]["sparse_per_step_s"], 1e-9),
                        3,
                    ),
                }
            )
    report = {
        "tool": "python -m dsacache.tracer.backend_check",
        "command": " ".join(sys.argv),
        "device": _device_name(device),
        "versions": {**_versions(), **_triton_version()},
        "results": results,
    }
    (out / "backend_check.json").write_text(json.dumps(report, indent=1))
    return report


def _triton_version() -> dict[str, str]:
    try:
        import triton

        return {"triton": triton.__version__}
    except ImportError:  # pragma: no cover
        return {}


def summary(report: dict[str, Any]) -> str:
    """A few lines per configuration for the terminal."""
    lines = [f"device: {report['device']}"]
    for r in report["results"]:
        s, e, t = r["same_inputs_summary"], r["end_to_end"], r["timing"]
        lines.append(
            f"{r['name']}: same inputs: identical (min layer) {s['identical_min_layer']:.4f}, "
            f"modulo ties {s['identical_modulo_ties_min_layer']:.4f}, steps identical "
            f"{s['steps_identical']:.3f}, max |out diff| {s['max_abs_out_diff']:.3g} "
            f"(max |out| {s['max_abs_out']:.3g}), max rel score diff {s['max_score_diff_rel']:.3g}"
        )
        lines.append(
            f"  end to end: rows identical {e['rows_identical']:.4f}, steps identical "
            f"{e['steps_identical']:.3f}, Jaccard mean {e['jaccard_mean']:.4f} "
            f"(min {e['jaccard_min']:.3f}), identical modulo drift ties before the first token "
            f"difference {e['rows_identical_modulo_drift_ties_before_token_difference']} "
            f"(gap {e['drift_gap_before_token_difference']}), "
            "first token difference "
            f"{e['first_generated_token_difference_per_request']}"
        )
        lines.append(
            f"  sparse step: eager {t['eager']['sparse_per_step_s'] * 1e3:.2f} ms, triton "
            f"{t['triton']['sparse_per_step_s'] * 1e3:.2f} ms "
            f"(x{r['sparse_speedup_triton_vs_eager']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m dsacache.tracer.backend_check --out DIR``."""
    p = argparse.ArgumentParser(
        prog="python -m dsacache.tracer.backend_check", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", required=True, help="folder for the traces and backend_check.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--indexer-weights", default="", help="lightning weights (train-indexer)")
    p.add_argument("--granularity", action="append", choices=["layer", "group"])
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        report = run_check(
            args.out, device=args.device, indexer_weights=args.indexer_weights,
            granularities=tuple(args.granularity or ("layer", "group")), model=args.model,
            k=args.k, steps=args.steps, prompt_tokens=args.prompt_tokens,
            requests=args.requests, sink=args.sink, window=args.window, progress=not args.quiet,
        )  # fmt: skip
    except DsacacheError as e:
        print(f"backend_check: error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"wrote {Path(args.out) / 'backend_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
