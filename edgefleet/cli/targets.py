"""`edgefleet targets`: the hardware profiles models are converted for and agents run on."""

from __future__ import annotations

import os

import click

from edgefleet.cli.options import echo_json, echo_table, json_option
from edgefleet.profiles import (
    HOST_PROFILE_ENV,
    UnknownProfileError,
    all_profiles,
    host_profile,
    load_profile,
)


@click.group()
def targets() -> None:
    """List and show hardware target profiles (hardware/profiles/)."""


@targets.command("list")
@json_option
def list_command(as_json: bool) -> None:
    """Every profile; the one matching this machine (or EDGEFLEET_HOST_PROFILE's) is marked."""
    try:
        host = host_profile().name
    except UnknownProfileError:
        if os.environ.get(HOST_PROFILE_ENV):
            raise  # the variable is wrong, not the machine: say so, as `targets show host` does
        host = None
    profiles = all_profiles()
    if as_json:
        echo_json({"host": host, "profiles": [p.model_dump() for p in profiles.values()]})
        return
    rows = [
        (("* " if name == host else "  ") + name, p.arch, ", ".join(p.runtimes), p.description)
        for name, p in profiles.items()
    ]
    echo_table(("profile", "arch", "runtimes", "description"), rows)
    click.echo("\n* matches this machine" if host else "\nno profile matches this machine")


@targets.command("show")
@click.argument("name")
@json_option
def show_command(name: str, as_json: bool) -> None:
    """One profile in full (NAME may be `host`)."""
    profile = load_profile(name)
    if as_json:
        echo_json(profile.model_dump())
        return
    q = profile.quantization
    click.echo(f"{profile.name}: {profile.description}")
    for label, value in (
        ("arch", profile.arch),
        ("cpu features", ", ".join(profile.cpu_features)),
        ("memory", f"{profile.memory_mib} MiB"),
        ("threads", profile.threads),
        ("runtimes", ", ".join(profile.runtimes)),
        ("providers", ", ".join(profile.execution_providers) or "-"),
        ("static quant", "yes" if q.static else "no"),
        ("dynamic quant", "yes" if q.dynamic else "no"),
        ("formats", ", ".join(q.formats) or "-"),
        ("types", ", ".join(q.types) or "-"),
        ("per-channel", ", ".join(str(v).lower() for v in q.per_channel) or "-"),
        ("reduce range", ", ".join(str(v).lower() for v in q.reduce_range) or "-"),
        ("calibration", ", ".join(q.calibration) or "-"),
        ("never", ", ".join(q.forbidden) or "-"),
    ):
        click.echo(f"  {label + ':':<15}{value}")
