"""Overlap producing the next item of a stream with using the current one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def read_ahead(items: Iterable[T]) -> Iterator[T]:
    """``items`` in order, the next one produced by a worker thread while the caller uses the
    current one; the worker's error is raised where its item would have come. Pays off when
    one side releases the GIL (Parquet decoding, numpy on large arrays, the nogil replay
    loops); at most two items are alive at once."""
    items = iter(items)
    end = object()
    with ThreadPoolExecutor(1, thread_name_prefix="dsacache-read-ahead") as pool:
        pending = pool.submit(next, items, end)
        while (item := pending.result()) is not end:
            pending = pool.submit(next, items, end)
            yield item
