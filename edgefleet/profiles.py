"""Hardware target profiles: what a device is, what runs there, how to quantize for it.

One TOML file per target in `hardware/profiles/` (shipped as the package
`edgefleet.hardware`). `host_profile()` picks the profile that matches this
machine, for `--target host` and `--profile host`; the environment variable
EDGEFLEET_HOST_PROFILE names the profile `host` stands for instead (to convert
or test as on another machine, e.g. without VNNI).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.errors import LocalError
from edgefleet.validation import describe_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

QuantFormat = Literal["QDQ", "QOperator"]
QuantTypes = Literal["U8S8", "S8S8", "U8U8"]
Calibration = Literal["MinMax", "Percentile", "Entropy"]
Runtime = Literal["onnxruntime", "tflite"]

HOST = "host"
HOST_PROFILE_ENV = "EDGEFLEET_HOST_PROFILE"


class UnknownProfileError(LocalError):
    """No hardware profile has that name, or none matches this machine."""


class QuantizationSettings(BaseModel):
    """Which quantization settings are valid and sensible on a target."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    static: bool
    dynamic: bool
    formats: list[QuantFormat]
    types: list[QuantTypes]
    reduce_range: list[bool]
    per_channel: list[bool]
    calibration: list[Calibration]
    forbidden: list[str] = Field(default_factory=list)  # "FORMAT:TYPES" pairs

    def allows(self, quant_format: str, types: str) -> bool:
        return f"{quant_format}:{types}" not in self.forbidden


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    description: str
    arch: str
    cpu_features: list[str]
    memory_mib: int = Field(gt=0)
    threads: int = Field(ge=1)
    runtimes: list[Runtime]
    execution_providers: list[str]
    quantization: QuantizationSettings

    def matches_host(self, machine: str, cpu_flags: Iterable[str]) -> bool:
        """True when this profile describes a machine of that arch with those CPU flags."""
        flags = set(cpu_flags)
        return machine == self.arch and all(
            any(feature in flag for flag in flags) for feature in self.cpu_features
        )


def _profile_files() -> dict[str, Path]:
    directory = resources.files("edgefleet.hardware") / "profiles"
    return {
        entry.name.removesuffix(".toml"): Path(str(entry))
        for entry in directory.iterdir()
        if entry.name.endswith(".toml")
    }


def _parse(path: Path) -> Profile:
    try:
        profile = Profile.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else exc
        raise LocalError(f"hardware profile {path} is invalid: {detail}") from exc
    if profile.name != path.stem:
        raise LocalError(f"hardware profile {path} names itself {profile.name!r}")
    return profile


@cache
def all_profiles() -> dict[str, Profile]:
    """Every shipped profile by name."""
    return {name: _parse(path) for name, path in sorted(_profile_files().items())}


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def host_profile() -> Profile:
    """The profile EDGEFLEET_HOST_PROFILE names, else the most specific that matches this machine.

    Raises:
        UnknownProfileError: none matches, or the variable names no profile.
    """
    forced = os.environ.get(HOST_PROFILE_ENV)
    if forced:
        if forced not in all_profiles():
            raise UnknownProfileError(
                f"{HOST_PROFILE_ENV}={forced!r} names no hardware profile: set it to one of "
                f"{', '.join(all_profiles())}, or unset it to match this machine"
            )
        return all_profiles()[forced]
    machine = platform.machine()
    flags = cpu_flags()
    matching = [p for p in all_profiles().values() if p.matches_host(machine, flags)]
    if not matching:
        raise UnknownProfileError(
            f"no hardware profile matches this machine ({machine}); name one of: "
            f"{', '.join(all_profiles())}"
        )
    return max(matching, key=lambda p: len(p.cpu_features))


def load_profile(name: str) -> Profile:
    """The profile called `name`, or the host's for `host`.

    Raises:
        UnknownProfileError: no such profile.
    """
    if name == HOST:
        return host_profile()
    try:
        return all_profiles()[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown target {name!r}: choose one of {', '.join(all_profiles())}, or 'host' "
            "(see `edgefleet targets list`)"
        ) from None
