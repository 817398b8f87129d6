"""Times in signed documents: RFC 3339 strings in UTC, to the second, ending in Z.

`parse_time` takes the canonical form `YYYY-MM-DDTHH:MM:SSZ` (what `format_time`
writes) on a fast path: an ASCII-digit regex, then `datetime.fromisoformat` of all
but the Z, which for exactly that shape yields the same datetime or the same refusal
(month 13, February 30, second 60, year 0) as the strptime format. Anything
else still goes through `strptime`, so the set of accepted texts is unchanged,
including the looser forms strptime lets through (`2026-1-1T0:0:0Z`, a lower
case `t`/`z`, a space-padded day, non-ASCII digits). Results are cached
(datetimes are immutable): a message's times are checked by its schema and then
read again, and a fleet's windows share their boundaries.
"""

from __future__ import annotations

import datetime as dt
import functools
import re

from edgefleet.errors import MalformedDocumentError

_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# [0-9], not \d: \d also matches other scripts' digits, which fromisoformat refuses.
_CANONICAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


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
        return _parse_text(text)
    except TypeError as exc:  # not a string (the cache, or the regex, says so)
        raise _malformed(text) from exc


@functools.lru_cache(maxsize=4096)
def _parse_text(text: str) -> dt.datetime:
    """`parse_time` of a string (a refusal raises and is not cached)."""
    try:
        if _CANONICAL.fullmatch(text):
            # All but the Z: Python 3.10's fromisoformat does not read it.
            return dt.datetime.fromisoformat(text[:19]).replace(tzinfo=dt.timezone.utc)
        return dt.datetime.strptime(text, _FORMAT).replace(tzinfo=dt.timezone.utc)
    except ValueError as exc:
        raise _malformed(text) from exc


def _malformed(text: object) -> MalformedDocumentError:
    return MalformedDocumentError(f"time {text!r} is not of the form YYYY-MM-DDTHH:MM:SSZ")
