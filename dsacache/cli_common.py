"""Helpers shared by the CLI modules (kept free of heavy imports)."""

from __future__ import annotations

from pathlib import Path

import click

from dsacache.errors import DsacacheError


class OutputFile(click.Path):
    """An output file option: one of ``suffixes``, in a directory that exists, checked when
    the command line is read, before any work."""

    def __init__(self, suffixes: tuple[str, ...]) -> None:
        super().__init__(dir_okay=False)
        self.suffixes = suffixes

    def convert(self, value, param, ctx):
        path = Path(super().convert(value, param, ctx))
        if path.suffix not in self.suffixes:
            self.fail(f"{value}: use a {' or '.join(self.suffixes)} file name", param, ctx)
        if not path.parent.is_dir():
            self.fail(f"{value}: its directory {path.parent} does not exist", param, ctx)
        return str(path)


TABLE = OutputFile((".parquet", ".csv"))  # written by save_table
PLOT = OutputFile((".png", ".pdf", ".svg"))


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
