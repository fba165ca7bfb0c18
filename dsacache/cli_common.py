"""Helpers shared by the CLI modules (kept free of heavy imports)."""

from __future__ import annotations

from pathlib import Path

from dsacache.errors import DsacacheError


def load_trace(path: str):
    """Open a trace (the trace module is imported only when a command runs)."""
    from dsacache.traces import open_trace

    return open_trace(path)


def save_table(df, out: str, index: bool = False) -> None:
    """Write a DataFrame to ``out`` as Parquet or CSV, chosen by the file name."""
    path = Path(out)
    if path.suffix == ".csv":
        df.to_csv(path, index=index)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=index)
    else:
        raise DsacacheError(f"--out {out}: use a .parquet or .csv file name")
