"""Run a workload under Nsight Compute and read its L2/DRAM counters into a DataFrame.

Reuse across kernels is only visible with ``--cache-control none`` (no flush between
kernels) and ``--replay-mode application`` (kernel replay saves and restores memory and
leaves the L2 cold even so). Clocks are left as the GPU runs them (``--clock-control none``).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from dsacache.errors import DsacacheError

METRICS = (
    "lts__t_sector_hit_rate.pct",
    "lts__t_sectors_srcunit_tex_op_read.sum",
    "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum",
    "lts__t_requests_srcunit_ltcfabric.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "gpu__time_duration.sum",
)


def ncu_command(
    command: list[str],
    kernel_regex: str | None = None,
    metrics: tuple[str, ...] = METRICS,
    launch_skip: int = 0,
    launch_count: int | None = None,
    ncu: str = "ncu",
) -> list[str]:
    """The ncu command line that profiles ``command`` without flushing caches between kernels."""
    cmd = [
        ncu, "--cache-control", "none", "--replay-mode", "application", "--clock-control",
        "none", "--csv", "--page", "raw", "--metrics", ",".join(metrics),
    ]  # fmt: skip
    if kernel_regex:
        cmd += ["--kernel-name", f"regex:{kernel_regex}"]
    if launch_skip:
        cmd += ["--launch-skip", str(launch_skip)]
    if launch_count:
        cmd += ["--launch-count", str(launch_count)]
    return cmd + list(command)


def parse_ncu_csv(text: str) -> pd.DataFrame:
    """Parse ``ncu --csv --page raw`` output (program output before the table is skipped)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise DsacacheError("ncu printed no metrics table (did any kernel match the filter?)")
    table = pd.read_csv(io.StringIO("\n".join(lines[start:])), thousands=",")
    table = table.iloc[1:]  # the units row
    for col in table.columns:
        if col.startswith(("lts__", "dram__", "gpu__")):
            table[col] = pd.to_numeric(table[col].astype(str).str.replace(",", ""), errors="coerce")
    return table.reset_index(drop=True)


def device_metadata() -> dict[str, object]:
    """GPU, driver, clocks and library versions (NVML and torch), for the measured data."""
    meta: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        meta.update(
            gpu=pynvml.nvmlDeviceGetName(h),
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
        )
    except Exception as e:  # NVML missing or no GPU: record why
        meta["nvml_error"] = str(e)
    try:
        import torch

        props = torch.cuda.get_device_properties(0)
        meta.update(
            torch=torch.__version__,
            cuda=torch.version.cuda,
            l2_bytes=int(props.L2_cache_size),
            sms=int(props.multi_processor_count),
        )
        import triton

        meta["triton"] = triton.__version__
    except Exception as e:
        meta["torch_error"] = str(e)
    try:
        meta["ncu"] = (
            subprocess.run(["ncu", "--version"], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    except (OSError, IndexError) as e:
        meta["ncu_error"] = str(e)
    return meta


def profile(
    command: list[str],
    kernel_regex: str | None = None,
    plan: str | None = None,
    timeout: float = 1800,
    raw_path: str | None = None,
    **kw,
) -> pd.DataFrame:
    """Run ``command`` under ncu; one row per profiled kernel with its counters, joined with
    the workload's launch plan (a JSON list, one object per measured launch) when given."""
    if shutil.which(kw.get("ncu", "ncu")) is None:
        raise DsacacheError("ncu (Nsight Compute) is not on PATH; profile needs a GPU host with it")
    cmd = ncu_command(command, kernel_regex, **kw)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if raw_path:
        with open(raw_path, "w") as f:
            f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DsacacheError(f"ncu failed (exit {proc.returncode}): {' | '.join(tail)}")
    df = parse_ncu_csv(proc.stdout)
    keep = ["ID", "Kernel Name", "Block Size", "Grid Size", *kw.get("metrics", METRICS)]
    df = df[[c for c in keep if c in df.columns]]
    if plan:
        with open(plan) as f:
            launches = pd.DataFrame(json.load(f))
        if len(launches) != len(df):
            raise DsacacheError(
                f"ncu measured {len(df)} kernels but the workload planned {len(launches)}"
            )
        df = pd.concat([launches, df], axis=1)
    meta = device_metadata()
    meta["command"] = " ".join(cmd)
    df.attrs.update(meta)
    for key, value in meta.items():
        df[f"meta_{key}"] = str(value)
    return df


def option_words(options: dict[str, object]) -> list[str]:
    """``{"--sizes": "8MiB", "--k": None}`` as command-line words (``None`` values left out)."""
    return [word for flag, v in options.items() if v is not None for word in (flag, str(v))]


def probe(experiment: str, options: dict[str, object], raw_path: str | None = None) -> pd.DataFrame:
    """Measure one known-answer probe (``python -m dsacache.kernels.probes EXPERIMENT``) under
    ncu; ``options`` are its flags (``{"--sizes": "8MiB,16MiB"}``; ``None`` values left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        plan = str(Path(tmp) / "plan.json")
        cmd = [sys.executable, "-m", "dsacache.kernels.probes", experiment, "--plan", plan]
        cmd += option_words(options)
        return profile(cmd, "^l2probe", plan, raw_path=raw_path)
