"""Small helpers for queries over many rows: IN (...) lists in chunks, datetimes made aware."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

IN_CHUNK = 500  # values per IN (...) list: well within every backend's parameter limit


def in_chunks(items: Iterable[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    """`items` in lists of at most `size`, in order."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def as_utc(value: dt.datetime) -> dt.datetime:
    """A datetime read by a Core query as aware UTC (SQLite hands back naive ones)."""
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


__all__ = ["IN_CHUNK", "as_utc", "in_chunks"]
