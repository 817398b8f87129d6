"""`edgefleet emulate`: ARM bundles' smoke tests on an emulated ARM userland (qemu-user)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgefleet.emulate.agent import run_agent
from edgefleet.emulate.root import ARCHITECTURES, default_cache, ensure_root
from edgefleet.emulate.smoke import run_emulated_smoke
from edgefleet.trust import load_trust_chain

_arch_option = click.option(
    "--arch",
    "arch_name",
    required=True,
    type=click.Choice(sorted(ARCHITECTURES)),
    help="arm64 (profile aarch64: onnxruntime and LiteRT) or armhf (armv7-tflite: tflite-runtime).",
)
_cache_option = click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_cache,
    show_default="~/.cache/edgefleet-arm",
    help="Where the roots are kept, one per architecture and package list.",
)


@click.group()
def emulate() -> None:
    """Prove ARM bundles before a fleet sees them: their smoke tests on an emulated ARM
    userland (qemu-user, a Debian root), and an agent there as a lab device. Correctness
    only: no emulated timing stands for a real device's."""


@emulate.command("build-root")
@_arch_option
@_cache_option
def build_root_command(arch_name: str, cache: Path) -> None:
    """Build the emulated root for ARCH, unless the cache holds it for this package list."""
    root = ensure_root(ARCHITECTURES[arch_name], cache)
    click.echo(f"{arch_name} root ready: {root.path} ({root.describe()})")


@emulate.command("smoke")
@click.argument(
    "bundle_path", metavar="BUNDLE", type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@_arch_option
@click.option(
    "--trust",
    "trust_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The trust root the bundle is verified against (as a device's).",
)
@_cache_option
def smoke_command(bundle_path: Path, arch_name: str, trust_path: Path, cache: Path) -> None:
    """Verify BUNDLE and run its smoke test on the emulated ARCH userland, as an agent does.

    Exits 0 when the model loads in the ARM build of its runtime and gives the
    expected outputs within smoke.json's tolerance; 1 (`refused [...]`) when
    the bundle does not verify, is for no profile of ARCH, or fails there.
    """
    trust = load_trust_chain(trust_path)
    result = run_emulated_smoke(bundle_path, trust, ARCHITECTURES[arch_name], cache)
    click.echo(
        f"OK {arch_name}: {result.bundle}: {result.samples} smoke samples match their expected "
        f"outputs ({result.runtime} under emulation; correctness only, no timing)"
    )


@emulate.command(
    "agent", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@_arch_option
@_cache_option
@click.argument("agent_args", metavar="AGENT_ARGS...", nargs=-1, type=click.UNPROCESSED)
def agent_command(arch_name: str, cache: Path, agent_args: tuple[str, ...]) -> None:
    """Run `edgefleet agent AGENT_ARGS` on the emulated ARCH userland: a lab device without
    ARM hardware, e.g. `edgefleet emulate agent --arch arm64 -- run --config agent.toml`.

    Its benchmark results say the device is emulated, and the converter's report says so
    beside every figure from it (correctness only). Exits with the agent's status.
    """
    sys.exit(run_agent(ARCHITECTURES[arch_name], list(agent_args), cache))
