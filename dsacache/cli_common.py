"""Helpers shared by the CLI modules (kept free of heavy imports)."""

from __future__ import annotations

from pathlib import Path

import click

from dsacache.errors import DsacacheError

TABLE_SUFFIXES = (".parquet", ".csv")


class TablePath(click.Path):
    """``--out`` for a table: a .parquet or .csv file in a directory that exists, checked when
    the command line is read, before any work (``save_table`` writes it)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value, param, ctx):
        path = Path(super().convert(value, param, ctx))
        if path.suffix not in TABLE_SUFFIXES:
            self.fail(f"{value}: use a .parquet or .csv file name", param, ctx)
        if not path.parent.is_dir():
            self.fail(f"{value}: its directory {path.parent} does not exist", param, ctx)
        return str(path)


TABLE = TablePath()


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
