"""A bundle's smoke test on the emulated ARM userland, exactly as an ARM agent runs it.

The bundle is verified against the trust root and extracted here (as a device
does), then the root's Python runs the agent's own smoke test on it under
qemu-user (`guest.py`): the model must load in the ARM build of its runtime
and give the expected outputs within smoke.json's tolerance. No timing is
taken from the emulated run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import edgefleet
from edgefleet.bundle import extract_bundle
from edgefleet.emulate import guest
from edgefleet.emulate.root import Architecture, ensure_root
from edgefleet.errors import BundleError, LocalError, ProfileMismatchError
from edgefleet.profiles import all_profiles
from edgefleet.trust import TrustRoot

GUEST_TIMEOUT_S = 1800  # a hung emulator, not a slow one: emulation is many times slower


class EmulatedSmokeTestError(BundleError):
    """The bundle's smoke test fails on the emulated ARM userland: it would fail on ARM."""


@dataclass(frozen=True)
class EmulatedSmokeResult:
    bundle: str  # name@version
    runtime: str  # the ARM runtime that ran it, with its version
    samples: int


def _agent_directory() -> Path:
    spec = importlib.util.find_spec("edgefleet.agent")
    if spec is None or not spec.submodule_search_locations:
        raise LocalError("the agent's package is not installed: it holds the smoke test")
    return Path(next(iter(spec.submodule_search_locations)))


def _check_profiles(profiles: list[str], arch: Architecture) -> None:
    known = all_profiles()
    if not any(name in known and known[name].arch == arch.machine for name in profiles):
        raise ProfileMismatchError(
            f"the bundle is for {', '.join(profiles)}, none of them an {arch.machine} profile: "
            f"the {arch.name} root runs bundles for "
            + ", ".join(n for n, p in known.items() if p.arch == arch.machine)
        )


def run_emulated_smoke(
    bundle: Path, trust: TrustRoot, arch: Architecture, cache: Path | None = None
) -> EmulatedSmokeResult:
    """Verify `bundle` and run its smoke test on the emulated `arch` root.

    Raises:
        Everything `extract_bundle` raises (a bundle that does not verify).
        ProfileMismatchError: the bundle lists no profile of this architecture.
        EmulatedSmokeTestError: the model does not load, crashes, or answers
            outside its tolerance on the emulated ARM userland.
        EmulatorMissingError, RootBuildError: see `ensure_root`.
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-arm-") as scratch:
        version = Path(scratch) / "version"
        manifest = extract_bundle(bundle, version, trust).manifest
        name = f"{manifest.name}@{manifest.version}"
        _check_profiles(manifest.profiles, arch)
        root = ensure_root(arch, cache)
        command = root.python(
            "-P",
            guest.__file__,
            str(Path(edgefleet.__file__).parent),
            str(_agent_directory()),
            str(version),
        )
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=root.environment(),
                timeout=GUEST_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmulatedSmokeTestError(
                f"{arch.name}: {name}'s smoke test did not finish within {GUEST_TIMEOUT_S} s"
            ) from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = done.stderr.strip().splitlines()
        detail = errors[-1] if errors else f"exit status {done.returncode}"
        raise EmulatedSmokeTestError(f"{arch.name}: {name} crashed under {arch.qemu}: {detail}")
    answer = json.loads(lines[-1])
    if "failed" in answer:
        raise EmulatedSmokeTestError(f"{arch.name}: {name}: {answer['failed']}")
    return EmulatedSmokeResult(name, str(answer["runtime"]), int(answer["samples"]))
