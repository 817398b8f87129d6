"""Options and small parsers shared by the client's command groups.

`@client_command` gives a command `--server` (or EDGEFLEET_SERVER) and
`--token` (or EDGEFLEET_TOKEN) and hands it an open `ApiClient` as `client`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import click

from edgefleet.client.api import DEFAULT_SERVER, ApiClient
from edgefleet.errors import UsageError

# A row's id as an argument (ids are 32-bit integers on PostgreSQL).
ROW_ID = click.IntRange(1, 2**31 - 1)

# How many rows a list command asks for (the server answers at most 1000).
limit_option = click.option(
    "--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="How many."
)


def client_command(func: Callable[..., None]) -> Callable[..., None]:
    """Add --server and --token to a command; call it with `client=ApiClient(...)`."""

    @click.option(
        "--server",
        "server_url",
        envvar="EDGEFLEET_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        metavar="URL",
        help="The fleet server's URL (or set EDGEFLEET_SERVER).",
    )
    @click.option(
        "--token",
        envvar="EDGEFLEET_TOKEN",
        metavar="TOKEN",
        help="API token (or set EDGEFLEET_TOKEN); an admin creates one with "
        "`edgefleet server token create`.",
    )
    @functools.wraps(func)
    def wrapper(server_url: str, token: str | None, **kwargs: Any) -> None:
        with ApiClient(server_url, token) as client:
            func(client=client, **kwargs)

    return wrapper


def parse_tags(values: Sequence[str], option: str = "--tag") -> dict[str, str]:
    """`("site=berlin", "line=3")` -> {"site": "berlin", "line": "3"}.

    Raises: UsageError on an entry without `=` or with an empty key.
    """
    tags: dict[str, str] = {}
    for value in values:
        key, sep, tag_value = value.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} {value!r}: expected KEY=VALUE")
        tags[key.strip()] = tag_value.strip()
    return tags


def parse_bundle_ref(text: str) -> tuple[str, str]:
    """`demo@1.2.0` -> ("demo", "1.2.0").

    Raises: UsageError when it is not NAME@VERSION.
    """
    name, sep, version = text.partition("@")
    if not sep or not name or not version:
        raise UsageError(f"bundle {text!r}: expected NAME@VERSION, e.g. demo@1.2.0")
    return name, version


def cell(value: object) -> str:
    """A table cell: '-' for nothing, yes/no for booleans, times shortened."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    text = str(value)
    return short_time(text) if _looks_like_time(text) else text


def _looks_like_time(text: str) -> bool:
    return len(text) >= 19 and text[4] == "-" and text[10] == "T"


def short_time(text: str) -> str:
    """`2026-11-25T23:02:29.123456+00:00` -> `2026-11-25 23:02:29` (times are UTC)."""
    return text[:19].replace("T", " ")


def page_footer(what: str, offset: int, shown: int, total: int | None) -> str | None:
    """`alerts 1-100 of 462 (--offset for more)` under a page that is not everything;
    None when the page holds every row."""
    if total is None or (offset == 0 and shown >= total):
        return None
    return f"{what} {offset + 1}-{offset + shown} of {total} (--offset for more)"


def empty_page(what: str, offset: int, total: int | None, nothing: str) -> str:
    """What an empty page says: `nothing`, or that --offset is past the end."""
    if offset and total:
        return (
            f"--offset {offset} is past the end: {total} {what} match "
            "(--offset 0 for the first page)"
        )
    return nothing
