"""Times in signed documents: `parse_time` accepts exactly what strptime's format accepts.

The fast path (a regex, then `fromisoformat`) must not widen or narrow the set
of accepted texts: every case is checked against the strptime reference the
module used before, refusals included.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest

from edgefleet import errors
from edgefleet.timefmt import format_time, parse_time

UTC = dt.timezone.utc


def reference(text: object) -> dt.datetime | None:
    """What `strptime` with the documented format makes of `text` (None: refused)."""
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(  # type: ignore[arg-type]
            tzinfo=UTC
        )
    except (TypeError, ValueError):
        return None


def outcome(text: object) -> dt.datetime | None:
    try:
        return parse_time(text)  # type: ignore[arg-type]
    except errors.MalformedDocumentError:
        return None


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-01T00:00:00Z",
        "2024-02-29T23:59:59Z",  # leap day
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        # refused by both: impossible dates and times
        "2026-02-29T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-00-01T00:00:00Z",
        "2026-01-00T00:00:00Z",
        "2026-01-32T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:60:00Z",
        "2026-01-01T00:00:60Z",
        "2026-01-01T00:00:61Z",
        "0000-01-01T00:00:00Z",
        # refused by both: other shapes
        "",
        "2026-01-01",
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00+00:00",
        "2026-01-01T00:00:00.5Z",
        "2026-01-01 00:00:00Z",
        "2026-01-01T00:00:00Z ",
        " 2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z\n",
        "20260-01-01T00:00:00Z",
        # accepted by strptime's format, off the fast path: kept as they were
        "2026-1-1T0:0:0Z",
        "2026-01-01t00:00:00z",
        "2026-01- 1T00:00:00Z",
        "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",  # full-width digits
    ],
)
def test_parse_time_agrees_with_the_strptime_format(text: str) -> None:
    assert outcome(text) == reference(text)


def test_parse_time_refuses_what_is_not_a_string() -> None:
    for value in (None, 20260101, b"2026-01-01T00:00:00Z", ["2026-01-01T00:00:00Z"]):
        with pytest.raises(errors.MalformedDocumentError, match="YYYY-MM-DDTHH:MM:SSZ"):
            parse_time(value)  # type: ignore[arg-type]


def test_parse_time_agrees_on_random_texts_of_the_canonical_shape() -> None:
    # Digits biased to the edges of each field, so impossible dates come up often.
    rng = random.Random(20260101)
    pools = {
        "year": ["0000", "0001", "1970", "2024", "2026", "2100", "9999"],
        "month": ["00", "01", "02", "09", "10", "12", "13", "99"],
        "day": ["00", "01", "28", "29", "30", "31", "32"],
        "hour": ["00", "09", "23", "24", "99"],
        "minute": ["00", "59", "60"],
        "second": ["00", "59", "60", "61"],
    }
    for _ in range(3000):
        p = {name: rng.choice(values) for name, values in pools.items()}
        text = f"{p['year']}-{p['month']}-{p['day']}T{p['hour']}:{p['minute']}:{p['second']}Z"
        assert outcome(text) == reference(text), text


def test_parse_time_round_trips_format_time_as_aware_utc() -> None:
    moment = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    parsed = parse_time(format_time(moment))
    assert parsed == moment
    assert parsed.utcoffset() == dt.timedelta(0)


def test_a_refused_time_is_refused_again() -> None:
    # Results are cached; refusals must not be.
    for _ in range(2):
        with pytest.raises(errors.MalformedDocumentError):
            parse_time("2026-02-30T00:00:00Z")
