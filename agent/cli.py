"""`edgefleet agent`: configure, run and operate the on-device agent."""

from __future__ import annotations

import io
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import numpy as np

# The heavy parts (onnxruntime, paho, urllib, the installer) are imported in the
# commands that need them: `agent init` and `--help` stay light.
from edgefleet.agent.client import AgentRequestError
from edgefleet.agent.config import AgentConfig, MqttSettings, load_config, write_config
from edgefleet.agent.layout import StateLayout
from edgefleet.cli.errors import EXIT_REFUSED, EXIT_USAGE
from edgefleet.cli.options import echo_json, json_option
from edgefleet.errors import UsageError
from edgefleet.fileio import atomic_writer
from edgefleet.profiles import load_profile
from edgefleet.trust import load_trust_root

if TYPE_CHECKING:
    from edgefleet.agent.install import Installer

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/edgefleet/agent.toml"),
    show_default=True,
    help="The agent's configuration (written by `edgefleet agent init`).",
)


@click.group()
def agent() -> None:
    """The on-device agent: installs signed bundles crash-safely, serves the model, reports."""


@agent.command("init")
@click.option("--device-id", required=True, help="This device's id: letters, digits, . _ -")
@click.option(
    "--trust",
    "trust_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The trust root flashed with the agent (trust.json, version 1 or newer).",
)
@click.option(
    "--profile", required=True, help="Hardware profile (`edgefleet targets list`), or host."
)
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the agent keeps installed versions, downloads and its state.",
)
@click.option("--mqtt", "mqtt_url", help="Broker URL: mqtt://host:1883 or mqtts://host:8883.")
@click.option("--server", "server_url", help="Fleet server URL (bundle downloads, enrollment).")
@click.option("--enroll-token", help="One-time enrollment token from the fleet server.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Configuration file to write (agent.toml).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing configuration file.")
def init_command(
    device_id: str,
    trust_path: Path,
    profile: str,
    state_dir: Path,
    mqtt_url: str | None,
    server_url: str | None,
    enroll_token: str | None,
    output: Path,
    force: bool,
) -> None:
    """Write the agent's configuration for this device.

    The trust root is checked now (its signatures) so that a wrong file is
    caught at flashing time, not when the first update arrives.
    """
    if output.exists() and not force:
        raise UsageError(f"{output} exists: pass --force to overwrite it")
    trust = load_trust_root(trust_path)
    resolved = load_profile(profile).name
    try:
        config = AgentConfig(
            device_id=device_id,
            profile=resolved,
            state_dir=state_dir.resolve(),
            trust_root=trust_path.resolve(),
            server_url=server_url,
            enroll_token=enroll_token,
            mqtt=MqttSettings(url=mqtt_url),
        )
    except ValueError as exc:
        raise UsageError(f"invalid setting: {exc}") from exc
    write_config(output, config)
    click.echo(
        f"wrote {output}: device {device_id}, profile {resolved}, trust root version "
        f"{trust.version}, state in {config.state_dir}"
        + (f", broker {mqtt_url}" if mqtt_url else ", no broker (offline: `agent install`)")
    )


def read_config(config_path: Path) -> AgentConfig:
    return load_config(config_path, os.environ)


def _layout(config: AgentConfig) -> StateLayout:
    return StateLayout(config.state_dir)


def _offline_installer(config: AgentConfig) -> Installer:
    from edgefleet.agent.install import Installer
    from edgefleet.agent.runner import load_agent_trust

    layout = _layout(config)
    return Installer(config, layout, load_agent_trust(config, layout))


def _relay(exc: AgentRequestError) -> NoReturn:
    """Report the running agent's refusal or error as if it happened here."""
    kind = "refused" if exc.status == 422 else "error"
    click.echo(f"{kind} [{exc.code}]: {exc}", err=True)
    raise click.exceptions.Exit(EXIT_REFUSED if kind == "refused" else EXIT_USAGE)


def _echo_status(status: dict[str, Any]) -> None:
    click.echo(f"install state:   {status['state']}")
    click.echo(f"serving:         {status['current'] or 'nothing installed'}")
    click.echo(f"previous:        {status['previous'] or '-'}")
    if status.get("challenger"):
        click.echo(f"in shadow:       {status['challenger']}")
    click.echo(f"security floor:  {status['security_floor']}")
    if status.get("reason"):
        click.echo(f"last reason:     {status['reason']}")


@agent.command("run")
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def run_command(config_path: Path, verbose: bool) -> None:
    """Run the agent: serve the model, take directives, report health (until SIGTERM)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from edgefleet.agent.runner import Agent

    running = Agent(read_config(config_path))
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: running.stopping.set())
    running.run()


def parse_tags(values: tuple[str, ...]) -> dict[str, str]:
    """`("site=berlin", "line=3")` -> `{"site": "berlin", "line": "3"}`.

    Raises:
        UsageError: an item without `=` or with an empty key, or a key given twice.
    """
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"tag {item!r} is not key=value")
        if key.strip() in tags:
            raise UsageError(f"tag {key.strip()!r} is given twice")
        tags[key.strip()] = value.strip()
    return tags


@agent.command("enroll")
@config_option
@click.option(
    "--server", "server_url", help="Fleet server URL (default: server_url of the config)."
)
@click.option(
    "--token",
    help="One-time enrollment token (default: enroll_token of the config; none: the server "
    "must allow open enrollment).",
)
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A tag for this device (repeat)."
)
@json_option
def enroll_command(
    config_path: Path,
    server_url: str | None,
    token: str | None,
    tags: tuple[str, ...],
    as_json: bool,
) -> None:
    """Enroll this device with the fleet server: make its signing key, register the public half.

    From then on the server accepts this device's reports only when signed by
    that key. `agent run` enrolls by itself when server_url is set; this command
    is for doing it by hand (another server, a new token, tags).
    """
    from edgefleet.agent.enroll import enroll

    config = read_config(config_path)
    enrollment = enroll(
        config, _layout(config), server_url=server_url, token=token, tags=parse_tags(tags)
    )
    if as_json:
        echo_json(
            {
                "device_id": enrollment.device_id,
                "server_url": enrollment.server_url,
                "public_key": enrollment.public_key,
                "tags": enrollment.tags,
            }
        )
        return
    click.echo(
        f"enrolled {enrollment.device_id} with {enrollment.server_url} "
        f"(key {enrollment.public_key[:16]}...)"
    )
    if enrollment.tags:
        click.echo("tags: " + ", ".join(f"{k}={v}" for k, v in sorted(enrollment.tags.items())))


@agent.command("status")
@config_option
@json_option
def status_command(config_path: Path, as_json: bool) -> None:
    """Install state, installed versions, and whether the agent is running."""
    from edgefleet.agent.client import call_json, running_agent_url
    from edgefleet.agent.enroll import load_enrollment
    from edgefleet.agent.runner import status_dict

    config = read_config(config_path)
    status = status_dict(_offline_installer(config))
    url = running_agent_url(_layout(config))
    status["running"] = url is not None
    enrollment = load_enrollment(_layout(config))
    status["enrolled_with"] = enrollment.server_url if enrollment else None
    if url is not None:
        status["model"] = call_json(url, "GET", "/v1/model")
    if as_json:
        echo_json(status)
        return
    click.echo(f"device:          {config.device_id} ({config.profile})")
    click.echo(f"agent:           {'running at ' + url if url else 'not running'}")
    click.echo(f"enrolled with:   {status['enrolled_with'] or 'no fleet server'}")
    _echo_status(status)
    steps = status.get("model", {}).get("steps", [])
    for step in steps:
        click.echo(f"  fallback step {step.get('name')}: {step.get('breaker', '-')}")


@agent.command("install")
@click.argument(
    "bundle_path",
    metavar="BUNDLE_FILE",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@config_option
def install_command(bundle_path: Path, config_path: Path) -> None:
    """Install a bundle from a file (a USB stick on an offline device).

    Every check of a network install applies: signatures, files, profile,
    security floor, compatibility, smoke test, health check. Goes through the
    running agent when there is one, so the new model is health-checked under
    its live traffic.
    """
    from edgefleet.agent.client import call_json, running_agent_url
    from edgefleet.agent.runner import status_dict

    config = read_config(config_path)
    url = running_agent_url(_layout(config))
    if url is not None:
        try:
            status = call_json(url, "POST", "/v1/install", {"path": str(bundle_path.resolve())})
        except AgentRequestError as exc:
            _relay(exc)
    else:
        installer = _offline_installer(config)
        installer.install_file(bundle_path)
        status = status_dict(installer)
    _echo_status(status)


@agent.command("rollback")
@config_option
def rollback_command(config_path: Path) -> None:
    """Serve the previous version again."""
    from edgefleet.agent.client import call_json, running_agent_url
    from edgefleet.agent.runner import status_dict

    config = read_config(config_path)
    url = running_agent_url(_layout(config))
    if url is not None:
        try:
            status = call_json(url, "POST", "/v1/rollback")
        except AgentRequestError as exc:
            _relay(exc)
    else:
        installer = _offline_installer(config)
        installer.rollback()
        status = status_dict(installer)
    _echo_status(status)


@agent.command("predict")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help=".npz with one array per model input, samples first.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help=".npz to write the outputs to.",
)
@config_option
def predict_command(input_path: Path, output: Path | None, config_path: Path) -> None:
    """Run a batch file through the model.

    Through the running agent when there is one (so the predictions are
    monitored like any other), in this process otherwise.
    """
    from edgefleet.agent.client import call, running_agent_url
    from edgefleet.agent.inference import Predictor

    config = read_config(config_path)
    url = running_agent_url(_layout(config))
    if url is not None:
        try:
            raw = call(
                url, "POST", "/v1/predict/batch", input_path.read_bytes(), "application/x-npz"
            )
        except AgentRequestError as exc:
            _relay(exc)
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            outputs = {name: archive[name] for name in archive.files}
        answered = "the running agent"
    else:
        with np.load(input_path, allow_pickle=False) as archive:
            inputs = {name: archive[name] for name in archive.files}
        predictor = Predictor.open(_layout(config), config.inference, config.profile)
        try:
            prediction = predictor.predict(inputs)
        finally:
            predictor.close()
        outputs = prediction.outputs
        answered = f"{prediction.model} ({prediction.step}, in this process)"
    for name, values in outputs.items():
        click.echo(f"{name}: shape {list(values.shape)} {values.dtype}")
    if output is not None:
        with atomic_writer(output) as handle:
            np.savez(handle, **outputs)
        click.echo(f"wrote {output}")
    click.echo(f"answered by {answered}")
