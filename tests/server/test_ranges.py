"""Range header parsing (RFC 9110 section 14) and reading byte ranges of a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefleet.server.errors import InvalidRequestError, StorageError
from edgefleet.server.ranges import (
    RangeNotSatisfiableError,
    content_range,
    iter_file,
    parse_range,
    unsatisfied_range,
)

LENGTH = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("bytes=0-0", (0, 0)),
        ("bytes=0-499", (0, 499)),
        ("bytes=500-999", (500, 999)),
        ("bytes=500-", (500, 999)),
        ("bytes=999-", (999, 999)),
        ("bytes=0-", (0, 999)),
        ("bytes=900-5000", (900, 999)),  # the end is clamped to the file
        ("bytes=0-99999999999999999999999999999999999999", (0, 999)),
        ("bytes=-1", (999, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-1000", (0, 999)),
        ("bytes=-5000", (0, 999)),  # a suffix longer than the file: all of it
        ("bytes=-99999999999999999999999999999999999999", (0, 999)),
        ("Bytes=10-19", (10, 19)),  # the unit is case-insensitive
        (" bytes=10-19 ", (10, 19)),
        ("bytes= 10-19", (10, 19)),
        ("bytes=10-19,", (10, 19)),  # empty list elements are ignored
        ("bytes=, 10-19", (10, 19)),
        ("bytes=0010-0019", (10, 19)),
        ("items=0-5", None),  # an unknown unit must be ignored: the whole file
        ("x=1", None),
    ],
)
def test_parse_range_accepts(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, LENGTH) == expected


@pytest.mark.parametrize(
    "header",
    [
        "bytes",  # no '='
        "0-10",
        "bytes=",
        "bytes=,",
        "bytes=-",
        "bytes=5",
        "bytes=a-b",
        "bytes=1-a",
        "bytes=+1-5",  # int() would take these; RFC digits are ASCII only
        "bytes=1_0-20",
        "bytes=\u0661-\u0665",  # Arabic-Indic digits
        "bytes=1 - 5",
        "bytes=-1-5",
        "bytes=5-1",  # ends before it starts
        "bytes=0-1,5-9",  # several ranges
        "bytes=0-1, 0-1",
        "bytes=1000-",  # starts at the end
        "bytes=1000-1000",
        "bytes=5000-6000",
        "bytes=99999999999999999999999999999999999999-",
        "bytes=-0",  # an empty suffix
    ],
)
def test_parse_range_refuses(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError) as caught:
        parse_range(header, LENGTH)
    assert caught.value.length == LENGTH
    assert isinstance(caught.value, InvalidRequestError)  # never a 500 when unmapped


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=0-0", "bytes=-1"])
def test_no_range_of_an_empty_file_is_satisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, 0)
    assert parse_range(None, 0) is None


def test_content_range_values() -> None:
    assert content_range(10, 19, LENGTH) == "bytes 10-19/1000"
    assert unsatisfied_range(LENGTH) == "bytes */1000"


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(200_003)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("start", "end", "chunk"),
    [(0, 200_002, 65_536), (5, 5, 65_536), (65_535, 131_072, 1000), (199_000, 200_002, 7)],
)
def test_iter_file_yields_exactly_the_range_in_bounded_chunks(
    data_file: tuple[Path, bytes], start: int, end: int, chunk: int
) -> None:
    path, data = data_file
    chunks = list(iter_file(path, start, end, chunk))
    assert b"".join(chunks) == data[start : end + 1]
    assert all(0 < len(part) <= chunk for part in chunks)


def test_iter_file_with_an_empty_range_yields_nothing(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    assert list(iter_file(path, 0, -1)) == []


def test_iter_file_fails_at_once_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        iter_file(tmp_path / "missing", 0, 10)


def test_iter_file_of_a_truncated_file_raises_instead_of_ending_short(
    data_file: tuple[Path, bytes],
) -> None:
    path, data = data_file
    chunks = iter_file(path, 0, len(data) - 1, 100_000)
    assert len(next(chunks)) == 100_000
    with open(path, "r+b") as handle:
        handle.truncate(150_000)
    assert len(next(chunks)) == 50_000
    with pytest.raises(StorageError, match="truncated"):
        next(chunks)


def test_iter_file_closes_the_file_when_closed_early(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    before = len(os.listdir("/proc/self/fd"))
    chunks = iter_file(path, 0, 200_002, 1000)
    next(chunks)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    chunks.close()
    assert len(os.listdir("/proc/self/fd")) == before
