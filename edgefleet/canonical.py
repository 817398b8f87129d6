"""Canonical JSON: the one byte form of every document that is signed.

Keys sorted, no insignificant whitespace, UTF-8, and no floating-point numbers
(their text form is not canonical across languages), so a signature made here
verifies wherever the same object is rebuilt. Parsing refuses duplicate keys,
which different parsers would resolve differently.
"""

from __future__ import annotations

import json
from typing import Any

from edgefleet.errors import MalformedDocumentError, UsageError


def _check_canonical(value: Any, path: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return
    if isinstance(value, float):
        raise UsageError(f"{path}: floats cannot be signed; store {value!r} as a string")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UsageError(f"{path}: object keys must be strings, got {key!r}")
            _check_canonical(item, f"{path}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_canonical(item, f"{path}[{index}]")
        return
    raise UsageError(f"{path}: {type(value).__name__} has no canonical JSON form")


def canonical_json(value: Any) -> bytes:
    """Encode `value` as canonical JSON bytes.

    Raises:
        UsageError: the value holds a float or a type without a JSON form.
    """
    _check_canonical(value, "$")
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # in C; a duplicate shows as a shorter dict
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedDocumentError(f"duplicate key {key!r} in JSON object")
            seen.add(key)
    return result


def _refuse_constant(name: str) -> Any:
    raise MalformedDocumentError(f"{name} is not valid JSON")


# One decoder for every call and thread, as `json.loads` shares its default one (given
# hooks, it would build a new decoder per call); a decode keeps no state between calls.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant
)


def parse_json(data: bytes, what: str) -> Any:
    """Parse untrusted JSON bytes, refusing duplicate keys, NaN and Infinity.

    Raises:
        MalformedDocumentError: not UTF-8, not JSON, or ambiguous JSON.
    """
    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):  # refused the way json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except UnicodeDecodeError as exc:
        raise MalformedDocumentError(f"{what} is not UTF-8 text") from exc
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers over Python's digit limit.
        raise MalformedDocumentError(f"{what} is not valid JSON: {exc}") from exc
