"""An edgefleet agent on the emulated ARM userland: a lab device without ARM hardware.

`edgefleet emulate agent --arch arm64 -- run --config FILE` runs `edgefleet
agent run --config FILE` with the root's Python under qemu-user: the ARM
builds of its dependencies (`Architecture.agent_wheels`, the runtimes; arm64 only) and this
machine's edgefleet code, as installed here (a tree of links to the core's
files and to the agent's and the hardware profiles' packages, wherever the
install put them; the code is pure Python). It enrolls, takes directives and
measures benchmark requests as any agent does. Correctness only: it sets
`EMULATED_ENV`, so its benchmark results say the device is emulated and the
converter's report says so beside every figure from it; an emulated CPU's
latency stands for no real one.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import edgefleet
from edgefleet.benchwire import EMULATED_ENV
from edgefleet.emulate.root import Architecture, Root, ensure_root
from edgefleet.errors import LocalError

AGENT_PACKAGES = ("agent", "hardware")  # edgefleet.agent, edgefleet.hardware


def _package_directory(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LocalError(f"{name} is not installed: install edgefleet[agent] on this machine")
    return Path(next(iter(spec.submodule_search_locations)))


def link_package(into: Path) -> Path:
    """`into`/edgefleet: links to this machine's edgefleet code, the agent's included."""
    core = Path(edgefleet.__file__).parent
    package = into / "edgefleet"
    package.mkdir()
    for entry in core.iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in AGENT_PACKAGES:
        if not (package / name).exists():  # an editable install keeps them apart
            (package / name).symlink_to(_package_directory(f"edgefleet.{name}"))
    return into


def agent_environment(root: Root, code: Path) -> dict[str, str]:
    """This environment (the agent's settings), with the root's Python paths and the label."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    environment.update(root.environment())
    environment["PYTHONPATH"] = os.pathsep.join((str(code), str(root.wheels)))
    environment["PYTHONSAFEPATH"] = "1"  # its children too: never edgefleet from the cwd
    environment[EMULATED_ENV] = f"{root.arch.qemu}: {root.describe()}"
    return environment


def run_agent(arch: Architecture, args: list[str], cache: Path | None = None) -> int:
    """Run `edgefleet agent ARGS` on the emulated `arch` root until it ends; its exit status.
    SIGTERM is passed on to it (a terminal's SIGINT reaches it directly).

    Raises:
        LocalError: `arch`'s root holds no agent (armhf).
        EmulatorMissingError, RootBuildError: see `ensure_root`.
    """
    if not arch.agent_wheels:
        raise LocalError(
            f"the {arch.name} root runs smoke tests only, no agent (PyPI has no {arch.machine} "
            "wheels of its dependencies): use --arch arm64"
        )
    root = ensure_root(arch, cache)
    with tempfile.TemporaryDirectory(prefix="edgefleet-emulated-agent-") as scratch:
        code = link_package(Path(scratch))
        agent = subprocess.Popen(
            root.python("-m", "edgefleet", "agent", *args), env=agent_environment(root, code)
        )
        previous_term = signal.signal(signal.SIGTERM, lambda *_: agent.terminate())
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            status = agent.wait()
            return status if status >= 0 else 128 - status  # as a shell reports a signal
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, previous_int)
