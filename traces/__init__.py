"""Trace format (writer, reader, validation) and the small real traces bundled with dsacache.

Depends on numpy and pyarrow only: everything that reads or writes a trace goes through here.
"""

from pathlib import Path

from dsacache.traces.format import (
    SCHEMA_VERSION,
    SelectionBatch,
    Trace,
    TraceWriter,
    check_rows,
    open_trace,
)

DATA_DIR = Path(__file__).parent / "data"


MAIN_TRACE = "smollm2-135m-oracle-k256"  # the demo's and the examples' real trace
SMALL_TRACE = "smollm2-135m-oracle-k64"  # quick runs and reports; it carries indexer scores


def bundled() -> list[str]:
    """Names of the traces shipped inside the package."""
    if not DATA_DIR.exists():
        return []
    return sorted(p.name.removesuffix(".dsatrace") for p in DATA_DIR.glob("*.dsatrace"))


def bundled_path(name: str) -> Path:
    """Path of a bundled trace by name (see ``bundled()``)."""
    from dsacache.errors import TraceError

    path = DATA_DIR / f"{name}.dsatrace"
    if not path.exists():
        raise TraceError(f"no bundled trace {name!r}; available: {', '.join(bundled()) or 'none'}")
    return path


__all__ = [
    "MAIN_TRACE",
    "SMALL_TRACE",
    "SCHEMA_VERSION",
    "SelectionBatch",
    "Trace",
    "TraceWriter",
    "bundled",
    "bundled_path",
    "check_rows",
    "open_trace",
]
