"""Semantic versions (semver.org 2.0.0), parsed and ordered."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
SEMVER_PATTERN = _SEMVER.pattern

# A derived release counter packs MAJOR.MINOR.PATCH into one integer.
_PART_LIMIT = 1_000_000
# The largest release counter (or security floor) anything makes or accepts: a signed
# 64-bit integer, what the server's database stores (BIGINT, SQLite INTEGER).
MAX_RELEASE_COUNTER = 2**63 - 1
# The largest MAJOR whose every MINOR.PATCH packs into a counter at or below the bound.
MAX_DERIVED_MAJOR = MAX_RELEASE_COUNTER // _PART_LIMIT**2 - 1


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        """Raises: ValueError when `text` is not a semantic version."""
        match = _SEMVER.match(text)
        if not match:
            raise ValueError(
                f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])"
            )
        major, minor, patch, pre, _build = match.groups()
        return cls(int(major), int(minor), int(patch), tuple(pre.split(".")) if pre else ())

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release ranks above its pre-releases; numeric identifiers rank below
        # alphanumeric ones and compare as numbers (semver 2.0.0, section 11).
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def derived_release_counter(self) -> int:
        """MAJOR.MINOR.PATCH as one non-decreasing integer; pre-releases share their release's.

        Raises: ValueError when MAJOR, MINOR or PATCH is too large to pack.
        """
        if self.minor >= _PART_LIMIT or self.patch >= _PART_LIMIT:
            raise ValueError("minor or patch above 999999: set the release counter explicitly")
        if self.major > MAX_DERIVED_MAJOR:
            raise ValueError(
                f"major version {self.major} is too large to derive a release counter from: "
                f"the largest major version allowed is {MAX_DERIVED_MAJOR} (counters are at "
                f"most {MAX_RELEASE_COUNTER}); set the release counter explicitly"
            )
        return (self.major * _PART_LIMIT + self.minor) * _PART_LIMIT + self.patch
