"""Field types and error text shared by every schema of the core."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ValidationError

from edgefleet.errors import MalformedDocumentError
from edgefleet.timefmt import parse_time


def _check_time(value: str) -> str:
    # Inside a validator, a ValueError lets pydantic name the field; our own error would
    # escape its ValidationError unwrapped.
    try:
        parse_time(value)
    except MalformedDocumentError as exc:
        raise ValueError(str(exc)) from None
    return value


# An RFC 3339 UTC time to the second (see edgefleet.timefmt).
Timestamp = Annotated[str, AfterValidator(_check_time)]


def describe_validation_error(exc: ValidationError, root: str = "document") -> str:
    """One line naming the first invalid field and why, for error messages."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or root
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    reason = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for ValueErrors
    return f"{where}: {reason}{more}"
