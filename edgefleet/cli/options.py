"""Options and output helpers shared by the core's command groups."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from edgefleet.bundle.manifest import NAME_RULE, check_bundle_name, check_version_text
from edgefleet.errors import UsageError
from edgefleet.keys import SigningKey, load_private_key
from edgefleet.tables import format_columns

passphrase_env_option = click.option(
    "--passphrase-env",
    metavar="VAR",
    help="Name of an environment variable holding the passphrase of the private key(s).",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "duration") -> int:
    """`90`, `90s`, `30m`, `24h`, `7d` -> seconds; `what` names it in the error.

    Raises: UsageError for any other form or zero.
    """
    match = _DURATION.match(text)
    if match is None or int(match.group(1)) == 0:
        raise UsageError(f"{what} {text!r}: expected a positive number with s, m, h or d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def semver_option(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> str | None:
    """A click callback: a semantic version, or a usage error before any work."""
    if value is not None:
        try:
            check_version_text(value, "")
        except UsageError as exc:
            raise click.BadParameter(str(exc).strip()) from None
    return value


def bundle_name_option(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> str | None:
    """A click callback: a bundle's model name, or a usage error before any work."""
    if value is not None:
        try:
            check_bundle_name(value, "")
        except UsageError as exc:
            raise click.BadParameter(str(exc).strip()) from None
    return value


BUNDLE_NAME_HELP = f"Model name: {NAME_RULE}."


def passphrase_from_env(variable: str | None) -> bytes | None:
    """The passphrase held by environment variable `variable`, if one was named.

    Raises: UsageError when the variable is not set or empty.
    """
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise UsageError(f"--passphrase-env {variable}: that environment variable is not set")
    return value.encode("utf-8")


def load_signing_keys(paths: Sequence[Path], passphrase_env: str | None) -> list[SigningKey]:
    passphrase = passphrase_from_env(passphrase_env)
    return [load_private_key(path, passphrase) for path in paths]


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain aligned table."""
    click.echo(format_columns([headers, *rows]))


class ProgressBar:
    """A byte-count progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, total: int, label: str) -> None:
        stream = sys.stderr
        self._bar = (
            click.progressbar(length=total, label=label, file=stream, show_pos=False)
            if stream.isatty()
            else None
        )

    def __enter__(self) -> ProgressBar:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)
