"""Which devices a rollout selects, and in which order its stages take them.

A selector is `tag=value` pairs separated by commas (`site=berlin,line=2`);
a device matches when it carries every pair. The empty selector selects
every device the bundle supports.

The order is a deterministic shuffle keyed by the rollout: the first stage of
a rollout takes devices spread over the fleet rather than the alphabetically
first ones, two rollouts take different canaries, and a replica (or a restart)
that computes the order again gets the same one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.tags import TAG_NAME, TAG_VALUE

MAX_SELECTOR_CHARS = 2048
MAX_SELECTOR_PAIRS = 32
_KEY = TAG_NAME  # the tag rules of edgefleet.server.tags
_VALUE = TAG_VALUE


def parse_selector(text: str | None) -> dict[str, str]:
    """Parse `tag=value,...` into a dict; None, empty or blank text selects everything.

    Whitespace around keys and values is dropped. Keys start with a letter or
    digit and hold letters, digits and `_.:/-` (at most 64); values are 1-128
    characters without `,`, `=` or control characters.

    Raises:
        InvalidRequestError: an item is not `tag=value`, a tag repeats, or a key
            or value has characters or a length outside the rules.
    """
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_SELECTOR_CHARS:
        raise InvalidRequestError(f"selector: longer than {MAX_SELECTOR_CHARS} characters")
    selector: dict[str, str] = {}
    for position, item in enumerate(text.split(","), start=1):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InvalidRequestError(
                f"selector: item {position} {item.strip()!r} is not tag=value"
            )
        if not _KEY.fullmatch(key):
            raise InvalidRequestError(
                f"selector: tag {key!r} must be 1-64 letters, digits or _.:/- "
                "and start with a letter or digit"
            )
        if not _VALUE.fullmatch(value):
            raise InvalidRequestError(
                f"selector: value {value!r} of tag {key!r} must be 1-128 characters "
                "without ',', '=' or control characters"
            )
        if key in selector:
            raise InvalidRequestError(f"selector: tag {key!r} is given twice")
        selector[key] = value
    if len(selector) > MAX_SELECTOR_PAIRS:
        raise InvalidRequestError(f"selector: more than {MAX_SELECTOR_PAIRS} tags")
    return selector


def format_selector(selector: Mapping[str, str]) -> str:
    """The selector as `tag=value,...` (what `parse_selector` reads back), sorted by tag."""
    return ",".join(f"{key}={selector[key]}" for key in sorted(selector))


def matches(tags: Mapping[str, object], selector: Mapping[str, str]) -> bool:
    """Whether a device with `tags` carries every pair of `selector` (values as strings)."""
    return all(key in tags and str(tags[key]) == value for key, value in selector.items())


def _rank(rollout_id: int, device_id: str) -> bytes:
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()


def order_selection(rollout_id: int, device_ids: Iterable[str]) -> list[str]:
    """The selected devices in the order the rollout's stages take them.

    Sorted by sha256(f"{rollout_id}:{device_id}") (ties, which would need a
    hash collision, by id); repeated ids appear once.
    """
    unique = set(device_ids)
    return sorted(unique, key=lambda device_id: (_rank(rollout_id, device_id), device_id))


__all__ = ["format_selector", "matches", "order_selection", "parse_selector"]
