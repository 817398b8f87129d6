"""`edgefleet simulate`: many simulated devices against a fleet server and its broker."""

from __future__ import annotations

import signal
import threading
import urllib.parse
from pathlib import Path
from types import FrameType

import click

from edgefleet.errors import UsageError
from edgefleet.simulate.device import DEFAULT_PROFILE
from edgefleet.simulate.network import Simulation, SimulationSettings
from edgefleet.trust import load_trust_chain


def default_broker_url(server_url: str) -> str:
    """The broker beside the server: mqtt://<the server's host>:1883."""
    host = urllib.parse.urlsplit(server_url).hostname
    if not host:
        raise UsageError(f"--server {server_url!r} is not an http(s)://host[:port] URL")
    return f"mqtt://{host}:1883"


def parse_serving(text: str) -> tuple[str, str]:
    """`--serving NAME@VERSION` as (name, version)."""
    name, _, version = text.partition("@")
    if not name or not version:
        raise UsageError(f"--serving {text!r} is not NAME@VERSION (e.g. digits@1.0.0)")
    return name, version


@click.command("simulate")
@click.option("--devices", "count", required=True, type=click.IntRange(min=1), help="How many.")
@click.option("--server", "server_url", required=True, help="The fleet server's URL (enrollment).")
@click.option(
    "--mqtt",
    "broker_url",
    help="The broker, mqtt://host[:port] (default: the server's host, port 1883).",
)
@click.option(
    "--trust",
    "trust_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The fleet's trust root: directives and bundles are verified with it.",
)
@click.option(
    "--enroll-token",
    help="An enrollment claim with at least N uses (`devices enroll-token --uses N`).",
)
@click.option("--prefix", default="sim", show_default=True, help="Device ids are PREFIX-<random>.")
@click.option(
    "--profile", default=DEFAULT_PROFILE, show_default=True, help="The devices' hardware profile."
)
@click.option(
    "--heartbeat-seconds",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
)
@click.option(
    "--telemetry-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
)
@click.option(
    "--fail-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of installs that fail (after their download).",
)
@click.option(
    "--offline-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Chance, at each heartbeat, that a device goes offline.",
)
@click.option(
    "--offline-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="How long a device stays offline.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop after this many seconds (default: at Ctrl-C).",
)
@click.option(
    "--serving",
    metavar="NAME@VERSION",
    help="Every device serves this bundle from the start (installed before it enrolled), "
    "so it sends telemetry at once [default: none until a rollout installs one].",
)
@click.option(
    "--forwarded-for",
    is_flag=True,
    help="Enroll each device with an X-Forwarded-For address of its own (10.x.y.z), as a load "
    "balancer in front of the server names it: with the server's --forwarded-allow-ips, the "
    "per-address enrollment limit applies per device, not to this one machine.",
)
@click.option("--seed", type=int, help="Seed the random choices (ids, failures, offline periods).")
def simulate(
    count: int,
    server_url: str,
    broker_url: str | None,
    trust_path: Path,
    enroll_token: str | None,
    prefix: str,
    profile: str,
    heartbeat_seconds: float,
    telemetry_seconds: float,
    fail_rate: float,
    offline_rate: float,
    offline_seconds: float,
    duration: float | None,
    serving: str | None,
    forwarded_for: bool,
    seed: int | None,
) -> None:
    """Run N simulated devices that speak the real device protocol, in one process.

    Each device has its own key and MQTT identity: it enrolls over HTTP, says
    it is online (its Last Will says offline), sends signed heartbeats and
    telemetry windows, and answers directives: verified with --trust, the
    bundle downloaded from the directive's HTTP source and verified, its status
    reported, signed, up to committed (or failed, at --fail-rate). For scale
    tests and for qualifying a deployment (docs/scale.md, "Simulating a
    fleet"). Needs the simulate extra (paho-mqtt and httpx).

    Ctrl-C stops: every device says offline; a summary line is printed.
    """
    settings = SimulationSettings(
        devices=count,
        server_url=server_url,
        broker_url=broker_url or default_broker_url(server_url),
        trust=load_trust_chain(trust_path),
        enroll_token=enroll_token,
        prefix=prefix,
        profile=profile,
        heartbeat_s=heartbeat_seconds,
        telemetry_s=telemetry_seconds,
        fail_rate=fail_rate,
        offline_rate=offline_rate,
        offline_seconds=offline_seconds,
        serving=parse_serving(serving) if serving else None,
        forwarded_for=forwarded_for,
        seed=seed,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    simulation = Simulation(settings)
    try:
        simulation.enroll()
        click.echo(f"{count} devices enrolled with {server_url}; running (Ctrl-C stops)", err=True)
        if duration is not None:
            timer = threading.Timer(duration, stop.set)
            timer.daemon = True
            timer.start()
        simulation.run(stop)
    finally:
        simulation.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo(simulation.summary())
