"""Times in signed documents: RFC 3339 strings in UTC, to the second, ending in Z."""

from __future__ import annotations

import datetime as dt

from edgefleet.errors import MalformedDocumentError

_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utcnow() -> dt.datetime:
    """The current time in UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def format_time(moment: dt.datetime) -> str:
    """Format an aware datetime as `YYYY-MM-DDTHH:MM:SSZ`."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: pass an aware datetime in UTC")
    return moment.astimezone(dt.timezone.utc).strftime(_FORMAT)


def parse_time(text: str) -> dt.datetime:
    """Parse `YYYY-MM-DDTHH:MM:SSZ` into an aware datetime.

    Raises:
        MalformedDocumentError: any other form.
    """
    try:
        return dt.datetime.strptime(text, _FORMAT).replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError) as exc:
        raise MalformedDocumentError(
            f"time {text!r} is not of the form YYYY-MM-DDTHH:MM:SSZ"
        ) from exc
