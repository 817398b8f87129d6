"""The `edgefleet` command.

Each deployable contributes a group of subcommands, imported only when that
group runs: `edgefleet --help` and the core groups load no optional dependency,
so a device with only `edgefleet[agent]` never imports FastAPI, SQLAlchemy or
onnx. A group whose extra is not installed says which extra to install.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import click

from edgefleet import __version__
from edgefleet.cli.errors import MissingExtraError, run_with_error_handling
from edgefleet.extras import install_hint


@dataclass(frozen=True)
class _LazyCommand:
    target: str  # "module:attribute"
    help: str
    extra: str | None  # the pip extra that provides its dependencies


# Name -> where the command lives. A deployable adds its group here.
COMMANDS: dict[str, _LazyCommand] = {
    "keys": _LazyCommand(
        "edgefleet.cli.keys:keys", "Create keys and the trust root; rotate them.", None
    ),
    "bundle": _LazyCommand(
        "edgefleet.cli.bundle:bundle", "Build, verify and inspect signed bundles.", None
    ),
    "targets": _LazyCommand(
        "edgefleet.cli.targets:targets", "List and show hardware target profiles.", None
    ),
    "ca": _LazyCommand(
        "edgefleet.cli.ca:ca", "The fleet CA: create it, issue TLS certificates.", None
    ),
    "broker": _LazyCommand(
        "edgefleet.cli.broker:broker",
        "Write a locked-down mosquitto configuration; check a broker for the fleet.",
        None,
    ),
    "emulate": _LazyCommand(
        "edgefleet.cli.emulate:emulate",
        "Run ARM bundles' smoke tests on an emulated ARM userland (qemu-user).",
        None,
    ),
    "agent": _LazyCommand(
        "edgefleet.agent.cli:agent",
        "Run the on-device agent; install, roll back, predict, status.",
        "agent",
    ),
    "server": _LazyCommand(
        "edgefleet.server.cli:server", "Run the fleet server; create API tokens.", "server"
    ),
    "bundles": _LazyCommand(
        "edgefleet.client.bundles:bundles",
        "Push bundles to the fleet server; list and show them.",
        "client",
    ),
    "trust": _LazyCommand(
        "edgefleet.client.trust:trust",
        "Hand the fleet server a newer trust root; show the one it holds.",
        "client",
    ),
    "rollout": _LazyCommand(
        "edgefleet.client.rollouts:rollout",
        "Start, watch, pause, resume and abort staged rollouts.",
        "client",
    ),
    "devices": _LazyCommand(
        "edgefleet.client.devices:devices",
        "List enrolled devices, show one; enrollment tokens, images to provision.",
        "client",
    ),
    "alerts": _LazyCommand(
        "edgefleet.client.alerts:alerts",
        "List drift alerts; acknowledge them.",
        "client",
    ),
    "demo": _LazyCommand(
        "edgefleet.demo.cli:demo",
        "Show the whole loop on this machine: a fleet, traffic, rollouts, a bad version.",
        "all",
    ),
    "webhooks": _LazyCommand(
        "edgefleet.client.webhooks:webhooks",
        "Alert events sent to the server's webhook: list undelivered ones, retry.",
        "client",
    ),
    "dead-letters": _LazyCommand(
        "edgefleet.client.deadletters:dead_letters",
        "Messages the server's database refused: list, show, replay, discard.",
        "client",
    ),
    "samples": _LazyCommand(
        "edgefleet.client.samples:samples",
        "Raw inputs devices kept while drifting: list them, download one.",
        "client",
    ),
    "simulate": _LazyCommand(
        "edgefleet.simulate.cli:simulate",
        "Simulated devices speaking the real protocol, many per process (scale tests).",
        "simulate",
    ),
    "convert": _LazyCommand(
        "edgefleet.converter.cli:convert_command",
        "Quantize a model for a target, prove it, sign it.",
        "converter",
    ),
}


# Another name for a group: resolved when it runs, never listed.
ALIASES = {"device": "devices"}

_RUNNING_GROUP = "edgefleet.cli.group"


def _missing_extra(group: str | None, exc: ImportError) -> MissingExtraError | None:
    """What to report for `exc`, raised while command group `group` loaded or ran.

    A module of the group's extra that is not installed: which extra to
    install. None for any other import error (of edgefleet itself, or under a
    core group, whose dependencies are always installed): a bug, not a setup.
    """
    entry = COMMANDS.get(group or "")
    if entry is None or entry.extra is None or (exc.name or "edgefleet").startswith("edgefleet"):
        return None
    return MissingExtraError(
        f"'edgefleet {group}' needs the {entry.extra} extra ({exc}): " + install_hint(entry.extra)
    )


class _LazyGroup(click.Group):
    """Imports each group when it runs; a module its extra provides that is missing,
    at import or while a command runs, becomes one `error [missing-extra]` line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd_name = ALIASES.get(cmd_name, cmd_name)
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        ctx.meta[_RUNNING_GROUP] = cmd_name
        module_name, attribute = entry.target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ImportError as exc:
            missing = _missing_extra(ctx.meta.get(_RUNNING_GROUP), exc)
            if missing is None:
                raise
            raise missing from exc

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing the help of each group must not import it.
        rows = [(name, COMMANDS[name].help) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
def cli() -> None:
    """edgefleet: take a trained model to a fleet of edge devices and keep it healthy there.

    \b
    A first run, on one machine:
      edgefleet keys init keys/
      edgefleet bundle build model-dir/ --name demo --version 1.0.0 \\
          --profile x86_64-avx2 --key keys/release.key -o demo.efb
      edgefleet bundle verify demo.efb --trust keys/trust.json

    Exit status: 0 success, 1 input refused (verification failed), 2 usage or
    local error (a missing file, a wrong passphrase).
    """


def main() -> None:
    sys.exit(run_with_error_handling(cli))
