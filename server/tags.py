"""Device tags: the one set of rules for their names, values and number.

Tags come from a device's enrollment request, from an enrollment token (an
operator's word, merged over the device's), and are read back by selectors
(`site=berlin,line=2`: rollouts, and the devices list's tag filters). One rule
everywhere means every tag a device can be given can also be selected:

- a name is 1-64 characters: letters, digits and `_.:/-`, starting with a
  letter or digit (names appear in selectors and URLs);
- a value is 1-128 characters without `,`, `=` (the selector's separators)
  or control characters (PostgreSQL text refuses NUL);
- a device or token carries at most `MAX_TAGS` tags.

Pydantic models use `TagName` and `TagValue` (a 422 names the field); other
code calls `check_tags`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import Field

from edgefleet.server.errors import InvalidRequestError

MAX_TAGS = 32
MAX_NAME_CHARS = 64
MAX_VALUE_CHARS = 128
TAG_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"
TAG_VALUE_PATTERN = r"^[^,=\x00-\x1f\x7f]{1,128}$"
TAG_NAME = re.compile(TAG_NAME_PATTERN)
TAG_VALUE = re.compile(TAG_VALUE_PATTERN)

TagName = Annotated[str, Field(pattern=TAG_NAME_PATTERN)]
TagValue = Annotated[str, Field(pattern=TAG_VALUE_PATTERN)]


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """A copy of `tags` when they follow the rules (the module docstring).

    Raises:
        InvalidRequestError: more than `MAX_TAGS` tags, a name or value that is
            not a string, or one outside the rules.
    """
    if len(tags) > MAX_TAGS:
        raise InvalidRequestError(f"at most {MAX_TAGS} tags, not {len(tags)}")
    checked: dict[str, str] = {}
    for name, value in tags.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidRequestError("tags must map strings to strings")
        if TAG_NAME.fullmatch(name) is None:
            raise InvalidRequestError(
                f"tag {name[:MAX_NAME_CHARS]!r}: a name is 1-{MAX_NAME_CHARS} letters, "
                "digits or _.:/- and starts with a letter or digit"
            )
        if TAG_VALUE.fullmatch(value) is None:
            raise InvalidRequestError(
                f"tag {name!r}: a value is 1-{MAX_VALUE_CHARS} characters without ',', '=' "
                "or control characters"
            )
        checked[name] = value
    return checked


__all__ = [
    "MAX_TAGS",
    "TAG_NAME",
    "TAG_NAME_PATTERN",
    "TAG_VALUE",
    "TAG_VALUE_PATTERN",
    "TagName",
    "TagValue",
    "check_tags",
]
