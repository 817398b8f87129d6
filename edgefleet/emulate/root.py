"""The emulated ARM userland: a Debian root per architecture, with the runtimes' ARM wheels.

The root is Debian 12 (bookworm) unpacked by mmdebstrap's `extract` variant
(no maintainer script runs, so no binfmt support is needed; the two library
links Debian's alternatives would make are made here). Its Python 3.11 is
the newest that tflite-runtime publishes 32-bit ARM wheels for (LiteRT has
none for armv7l). Python and numpy come from Debian; pydantic, onnxruntime
and LiteRT are the ARM wheels from PyPI, fetched by this Python's pip for the
root's platform (never built). The programs run under qemu-user (`qemu-aarch64`,
`qemu-arm`) with the root as their library prefix, through `PYTHON_LAUNCHER`:
a shell script that starts qemu-user on the root's Python and names itself
the program (qemu's `-0`), so that `sys.executable` is the launcher and a
child process the emulated Python starts (the agent's benchmark children) is
emulated too, with no binfmt_misc registration on this machine.

Cached under CACHE/ARCH/KEY (CACHE: ~/.cache/edgefleet-arm), KEY a digest of
everything the root is made of: changing a list below builds a new root and
removes the old one. A root is built in a temporary sibling and renamed into
place only when complete, so a half-built root is never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefleet.errors import LocalError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PYTHON = "3.11"
DEBIAN_PACKAGES = ("python3", "python3-numpy", "libstdc++6")
SUPPORT_WHEELS = ("pydantic==2.14.4",)  # installed with their dependencies
# The agent's other dependencies, with theirs (cffi): for `edgefleet emulate agent`.
# PyPI has no 32-bit ARM wheels of PyNaCl or cryptography: arm64 only.
AGENT_WHEELS = ("click==8.5.1", "pynacl==1.6.2", "cryptography==51.0.1", "paho-mqtt==2.2.0")
WHEEL_DIR = "opt/edgefleet/site-packages"
PYTHON_LAUNCHER = "usr/bin/python3-emulated"  # beside python3: the same prefix
LAUNCHER_SCRIPT = """#!/bin/sh
root=$(cd "$(dirname "$0")/../.." && pwd -P)
exec {qemu} -L "$root" -0 "$0" "$root/usr/bin/python3" "$@"
"""
INSTALL_HINT = "apt-get install qemu-user mmdebstrap"


class EmulatorMissingError(LocalError):
    """qemu-user, mmdebstrap or pip is not installed on this machine."""


class RootBuildError(LocalError):
    """The emulated root could not be built (the mirror or PyPI unreachable, a package gone)."""


@dataclass(frozen=True)
class Architecture:
    name: str  # Debian's: arm64, armhf
    machine: str  # what a hardware profile's `arch` says: aarch64, armv7l
    qemu: str
    triplet: str
    wheel_platforms: tuple[str, ...]
    runtime_wheels: tuple[str, ...]  # installed without dependencies (numpy is Debian's)
    agent_wheels: tuple[str, ...] = ()  # installed with their dependencies


ARCHITECTURES = {
    "arm64": Architecture(
        name="arm64",
        machine="aarch64",
        qemu="qemu-aarch64",
        triplet="aarch64-linux-gnu",
        wheel_platforms=(
            "manylinux_2_28_aarch64",
            "manylinux_2_27_aarch64",
            "manylinux_2_17_aarch64",
            "manylinux2014_aarch64",
        ),
        # The newest that Debian 12's qemu-user (7.2) runs: onnxruntime 1.28 and
        # ai-edge-litert 2.2 and later crash under it as they load.
        runtime_wheels=("onnxruntime==1.26.0", "ai-edge-litert==2.1.0"),
        agent_wheels=AGENT_WHEELS,
    ),
    "armhf": Architecture(
        name="armhf",
        machine="armv7l",
        qemu="qemu-arm",
        triplet="arm-linux-gnueabihf",
        wheel_platforms=("manylinux_2_34_armv7l", "manylinux_2_17_armv7l", "manylinux2014_armv7l"),
        runtime_wheels=("tflite-runtime==2.14.0",),
    ),
}


@dataclass(frozen=True)
class Root:
    arch: Architecture
    path: Path

    @property
    def wheels(self) -> Path:
        return self.path / WHEEL_DIR

    def python(self, *args: str) -> list[str]:
        """The command that runs the root's Python with `args` under qemu-user."""
        return [str(self.path / PYTHON_LAUNCHER), *args]

    def environment(self) -> dict[str, str]:
        """The environment for `python()`: nothing of this machine's Python leaks in."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(self.wheels),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        }

    def describe(self) -> str:
        wheels = ", ".join(w.replace("==", " ") for w in self.arch.runtime_wheels)
        return f"Debian {SUITE} {self.arch.name}, Python {PYTHON}, {wheels}"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet-arm"


def root_key(arch: Architecture) -> str:
    """A digest of everything the root is made of."""
    recipe = {
        "suite": SUITE,
        "mirror": MIRROR,
        "python": PYTHON,
        "debian": DEBIAN_PACKAGES,
        "support": SUPPORT_WHEELS,
        "launcher": LAUNCHER_SCRIPT,
        "arch": asdict(arch),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:32]


def check_tools(arch: Architecture) -> None:
    """Raises: EmulatorMissingError naming what to install."""
    missing = [tool for tool in (arch.qemu, "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        raise EmulatorMissingError(
            f"{' and '.join(missing)} not found: the emulated ARM check needs qemu-user and "
            f"mmdebstrap ({INSTALL_HINT})"
        )
    if importlib.util.find_spec("pip") is None:
        raise EmulatorMissingError(
            f"pip is not installed in {sys.prefix}: it fetches the ARM wheels "
            f"({sys.executable} -m ensurepip)"
        )


def ensure_root(arch: Architecture, cache: Path | None = None) -> Root:
    """The root for `arch`, built first unless the cache holds it.

    Raises:
        EmulatorMissingError: qemu-user, mmdebstrap or pip is missing.
        RootBuildError: a build step failed; nothing is left in the cache.
    """
    check_tools(arch)
    directory = (cache or default_cache()) / arch.name
    final = directory / root_key(arch)
    if final.is_dir():
        return Root(arch, final)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory))
    try:
        _build(arch, staging)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():  # else another build finished first: use that one
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in directory.iterdir():
        if old != final and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return Root(arch, final)


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise RootBuildError(f"{what} failed: {detail}")


def _build(arch: Architecture, tree: Path) -> None:
    _run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=extract",
            f"--arch={arch.name}",
            f"--include={','.join(DEBIAN_PACKAGES)}",
            SUITE,
            str(tree),
            MIRROR,
        ],
        f"building the Debian {SUITE} {arch.name} root (mmdebstrap)",
    )
    launcher = tree / PYTHON_LAUNCHER
    launcher.write_text(LAUNCHER_SCRIPT.format(qemu=arch.qemu))
    launcher.chmod(0o755)
    libraries = tree / "usr/lib" / arch.triplet
    for name, subdirectory in (("libblas.so.3", "blas"), ("liblapack.so.3", "lapack")):
        (libraries / name).symlink_to(f"{subdirectory}/{name}")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        f"--python-version={PYTHON}",
        "--implementation=cp",
        f"--abi=cp{PYTHON.replace('.', '')}",
        *(f"--platform={platform}" for platform in arch.wheel_platforms),
        f"--target={tree / WHEEL_DIR}",
    ]
    support = (*SUPPORT_WHEELS, *arch.agent_wheels)
    _run([*pip, *support], f"fetching {', '.join(support)} for {arch.name}")
    _run(
        [*pip, "--no-deps", *arch.runtime_wheels],
        f"fetching {', '.join(arch.runtime_wheels)} for {arch.name}",
    )
