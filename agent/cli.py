"""`edgefleet agent`: configure, run and operate the on-device agent."""

from __future__ import annotations

import grp
import http.client
import io
import logging
import os
import signal
import ssl
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import numpy as np
from pydantic import ValidationError

# The heavy parts (onnxruntime, paho, urllib, the installer) are imported in the
# commands that need them: `agent init` and `--help` stay light.
from edgefleet.agent.client import AgentRequestError
from edgefleet.agent.config import load_config, settle_device_id, write_config
from edgefleet.agent.enrolltoken import write_enroll_token
from edgefleet.agent.layout import StateLayout
from edgefleet.agentconfig import AgentConfig
from edgefleet.cli.errors import EXIT_REFUSED, EXIT_USAGE
from edgefleet.cli.options import echo_json, json_option
from edgefleet.errors import EdgefleetError, UsageError
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


def _local_api_port(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """`--local-api-port`: a TCP port, 0 (a free port, picked at start) or `none` (no API)."""
    if value.lower() == "none":
        return None
    if value.isdigit() and int(value) <= 65535:
        return int(value)
    raise click.BadParameter(f"{value!r} is not a port (0 to 65535) or none")


# The option of `agent init` that sets each field, to name it when a value is refused.
INIT_OPTIONS = {
    "device_id": "--device-id",
    "server_url": "--server",
    "mqtt.url": "--mqtt",
}


def _refused_option(exc: ValidationError) -> UsageError:
    """One line naming the `agent init` option whose value the configuration refused."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    reason = first["msg"].removeprefix("Value error, ")
    return UsageError(f"{INIT_OPTIONS.get(field, field)}: {reason}")


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise UsageError(
            f"--group {name}: no such group here; create it first (the service's user and "
            "group: `systemd-sysusers`, docs/agent.md)"
        ) from None


def _check_tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Raises: UsageError naming the file that does not load, or --cert without --key."""
    if (cert is None) != (key is None):
        raise UsageError("--cert and --key go together: the client certificate and its key")
    if ca is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"--ca {ca}: not a CA certificate in PEM ({exc}); give the fleet CA's ca.crt"
            ) from None
    if cert is not None and key is not None:
        try:
            ssl.create_default_context().load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"--cert {cert} --key {key}: not a PEM certificate and its unencrypted key ({exc})"
            ) from None


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
@click.option(
    "--server",
    "server_url",
    help="Fleet server URL, http:// or https:// (bundle downloads, enrollment).",
)
@click.option(
    "--enroll-token",
    help="One-time enrollment token from the fleet server; kept in the state directory "
    "until the device enrolled, then deleted.",
)
@click.option(
    "--local-api-port",
    metavar="PORT|none",
    default="8765",
    callback=_local_api_port,
    show_default=True,
    help="Port of the local HTTP API on 127.0.0.1 (one per agent on a machine); 0: a free "
    "port picked at start; none: no local API.",
)
@click.option(
    "--group",
    help="Group that may read the configuration (the service's, e.g. edgefleet): mode 0640 "
    "instead of 0600.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Configuration file to write (agent.toml); missing directories are created (0755).",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The fleet CA's certificate (PEM): trusted for the fleet server's HTTPS and the "
    "broker's mqtts:// (instead of the system's CAs).",
)
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Client certificate for the broker (PEM; with --key). Without it, an mqtts:// "
    "device uses the certificate it gets at enrollment.",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The private key of --cert (PEM).",
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
    local_api_port: int | None,
    group: str | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    output: Path,
    force: bool,
) -> None:
    """Write the agent's configuration for this device.

    The trust root is checked now (its signatures) so that a wrong file is
    caught at flashing time, not when the first update arrives.
    """
    if output.exists() and not force:
        raise UsageError(f"{output} exists: pass --force to overwrite it")
    if enroll_token is not None and server_url is None:
        raise UsageError("--enroll-token needs --server: the token is for that fleet server")
    _check_tls_files(ca_file, cert_file, key_file)
    try:
        trust = load_trust_root(trust_path)
    except EdgefleetError as exc:
        raise UsageError(
            f"--trust {trust_path}: not a trust root ({exc}); give the trust.json the fleet's "
            "operator made (`edgefleet keys init`), not a key"
        ) from None
    resolved = load_profile(profile).name
    try:
        config = AgentConfig.model_validate(
            {
                "device_id": device_id,
                "profile": resolved,
                "state_dir": state_dir.resolve(),
                "trust_root": trust_path.resolve(),
                "server_url": server_url,
                "server_ca_file": ca_file.resolve() if ca_file else None,
                "mqtt": {
                    "url": mqtt_url,
                    "ca_file": ca_file.resolve() if ca_file else None,
                    "cert_file": cert_file.resolve() if cert_file else None,
                    "key_file": key_file.resolve() if key_file else None,
                },
                "local_api": {"enabled": False}
                if local_api_port is None
                else {"port": local_api_port},
            }
        )
    except ValidationError as exc:
        raise _refused_option(exc) from None
    group_id = _group_id(group) if group is not None else None
    try:
        write_config(output, config, group=group_id)
    except OSError as exc:
        for_group = f" for group {group}" if group is not None else ""
        hint = "; run it as root" if isinstance(exc, PermissionError) else ""
        raise UsageError(f"cannot write {output}{for_group}: {exc.strerror or exc}{hint}") from None
    if enroll_token is not None:
        try:
            write_enroll_token(StateLayout(config.state_dir), enroll_token)
        except OSError as exc:
            hint = "; run it as root" if isinstance(exc, PermissionError) else ""
            raise UsageError(
                f"cannot keep the enrollment token in {config.state_dir}: "
                f"{exc.strerror or exc}{hint}"
            ) from None
    api = (
        f"local API on {config.local_api.host}:{local_api_port}"
        if local_api_port is not None
        else "no local API"
    )
    click.echo(
        f"wrote {output}: device {device_id}, profile {resolved}, trust root version "
        f"{trust.version}, state in {config.state_dir}, {api}"
        + (f", broker {mqtt_url}" if mqtt_url else ", no broker (offline: `agent install`)")
    )


def read_config(config_path: Path, *, make_device_id: bool = False) -> AgentConfig:
    """The configuration, its device id settled (`make_device_id`: make it for an
    agent.toml that says device_id = "auto", when it is not made yet)."""
    config = load_config(config_path, os.environ)
    try:
        return settle_device_id(config, make=make_device_id)
    except OSError as exc:
        raise UsageError(
            f"cannot keep the device id in {config.state_dir}: {exc.strerror or exc}"
        ) from None


def _layout(config: AgentConfig) -> StateLayout:
    return StateLayout(config.state_dir)


def _offline_installer(config: AgentConfig) -> Installer:
    from edgefleet.agent.install import Installer
    from edgefleet.agent.runner import load_agent_trust

    layout = _layout(config)
    return Installer(config, layout, load_agent_trust(config, layout))


def _agent_to_change(config: AgentConfig) -> str | None:
    """The running agent's URL for an install or a rollback; None: none runs, do it here.

    Raises:
        UsageError: the agent runs without its local API: it cannot be asked, and a change
            behind its back would not reach the model it serves.
    """
    from edgefleet.agent.client import running_agent

    running = running_agent(_layout(config))
    if running is None:
        return None
    if running.url is None:
        raise UsageError(
            f"the agent (pid {running.pid}) runs without its local API ([local_api] "
            "enabled = false), so it cannot take this: stop it first (systemctl stop "
            "edgefleet-agent), or give it a local API (`agent init --local-api-port`)"
        )
    return running.url


def _relay(exc: AgentRequestError) -> NoReturn:
    """Report the running agent's refusal or error as if it happened here."""
    kind = "refused" if exc.status == 422 else "error"
    click.echo(f"{kind} [{exc.code}]: {exc}", err=True)
    raise click.exceptions.Exit(EXIT_REFUSED if kind == "refused" else EXIT_USAGE)


def _agent_stopped(exc: OSError, doing: str) -> NoReturn:
    """The agent hung up before it answered: it stopped (or was killed) meanwhile."""
    from edgefleet.wire import error_code

    click.echo(
        f"error [{error_code(exc)}]: {exc}: the agent stopped while {doing}; run "
        "`edgefleet agent status` to see what it did",
        err=True,
    )
    raise click.exceptions.Exit(EXIT_USAGE)


def _echo_status(status: dict[str, Any]) -> None:
    click.echo(f"install state:   {status['state']}")
    click.echo(f"serving:         {status['current'] or 'nothing installed'}")
    click.echo(f"previous:        {status['previous'] or '-'}")
    if status.get("challenger"):
        click.echo(f"in shadow:       {status['challenger']}")
    floors = status["security_floors"]
    shown = ", ".join(f"{name} {floors[name]}" for name in sorted(floors))
    click.echo(f"security floors: {shown or 'none'}")
    click.echo(
        f"trust root:      version {status['trust_root_version']} "
        f"(expires {status['trust_root_expires']})"
    )
    if status.get("refused"):
        click.echo(f"last refused:    {status['refused']} (nothing changed)")
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
    from edgefleet.agent.statelock import acquire

    config = read_config(config_path, make_device_id=True)
    # Before anything else: a second agent on this state directory is refused.
    running = Agent(config, state_lock=acquire(_layout(config)))
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, _: running.stop(signal.Signals(signum).name))
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
    help="One-time enrollment token (default: the one `agent init --enroll-token` kept until "
    "enrollment; none: the server must allow open enrollment).",
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

    config = read_config(config_path, make_device_id=True)
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
    from edgefleet.agent.client import call_json, running_agent, stale_pid
    from edgefleet.agent.diagnostics import redact
    from edgefleet.agent.enroll import load_enroll_failure, load_enrollment
    from edgefleet.agent.runner import status_dict

    config = read_config(config_path)
    status = status_dict(_offline_installer(config))
    running = running_agent(_layout(config))
    url = running.url if running is not None else None
    status["device_id"], status["profile"] = config.device_id, config.profile
    status["running"] = running is not None
    enrollment = load_enrollment(_layout(config))
    status["enrolled_with"] = enrollment.server_url if enrollment else None
    failure = load_enroll_failure(_layout(config)) if enrollment is None else None
    status["enrollment_error"] = failure["reason"] if failure else None
    if url is not None:
        status["model"] = call_json(url, "GET", "/v1/model")
        health = call_json(url, "GET", "/v1/health")
        status["drift"] = health.get("drift")
        status["link"] = health.get("link")
        status["health"] = health.get("status")
        status["health_detail"] = health.get("detail")
    if as_json:
        echo_json(status)
        return
    click.echo(f"device:          {config.device_id} ({config.profile})")
    if running is None:
        stale = stale_pid(_layout(config))
        was = f" (stale localapi.json from pid {stale})" if stale is not None else ""
        click.echo(f"agent:           not running{was}")
    elif url is None:
        click.echo(f"agent:           running (pid {running.pid}) without its local API")
    else:
        click.echo(f"agent:           running at {url}")
    if status.get("health"):
        detail = f": {status['health_detail']}" if status.get("health_detail") else ""
        click.echo(f"health:          {status['health']}{detail}")
    if status["enrolled_with"]:
        click.echo(f"enrolled with:   {status['enrolled_with']}")
    elif config.server_url:
        why = status["enrollment_error"] or "no attempt finished yet (`agent run` enrolls)"
        click.echo(f"enrolled with:   not enrolled yet with {redact(config.server_url)}: {why}")
    else:
        click.echo("enrolled with:   no fleet server")
    if status.get("link"):
        click.echo(f"broker link:     {status['link']}")
    if status.get("drift"):
        click.echo(f"drift:           {status['drift']}")
    _echo_status(status)
    for step in status.get("model", {}).get("steps", []):
        click.echo(_step_line(step))


def _step_line(step: dict[str, Any]) -> str:
    """One step of the fallback chain as `agent status` shows it."""
    failed = sum(step["failures"].values())
    limit = f"{step['timeout_ms']:g} ms"
    if step["timeout_per_sample_ms"]:
        limit += f" + {step['timeout_per_sample_ms']:g} ms per sample"
    load_error = step.get("load_error")
    return (
        f"  fallback step {step['step']}: {step['model']}, "
        + (f"does not load ({load_error}), " if load_error else "")
        + f"breaker {step['breaker']}, "
        f"{step['answered']} answered, {failed} failed, time limit {limit}"
    )


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
    from edgefleet.agent.client import change
    from edgefleet.agent.runner import status_dict
    from edgefleet.agent.statelock import acquire

    config = read_config(config_path)
    url = _agent_to_change(config)
    if url is not None:
        try:
            status = change(_layout(config), url, "/v1/install", bundle_path)
        except AgentRequestError as exc:
            _relay(exc)
        except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
            _agent_stopped(exc, "installing")
    else:
        # No agent to go through: hold the state directory, so none starts meanwhile.
        with acquire(_layout(config), "agent install"):
            installer = _offline_installer(config)
            installer.install_file(bundle_path)
            status = status_dict(installer)
    _echo_status(status)


@agent.command("rollback")
@config_option
def rollback_command(config_path: Path) -> None:
    """Serve the previous version again."""
    from edgefleet.agent.client import change
    from edgefleet.agent.runner import status_dict
    from edgefleet.agent.statelock import acquire

    config = read_config(config_path)
    url = _agent_to_change(config)
    if url is not None:
        try:
            status = change(_layout(config), url, "/v1/rollback")
        except AgentRequestError as exc:
            _relay(exc)
        except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
            _agent_stopped(exc, "rolling back")
    else:
        with acquire(_layout(config), "agent rollback"):
            installer = _offline_installer(config)
            installer.rollback()
            status = status_dict(installer)
    _echo_status(status)


def read_inputs(path: Path, model: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """The inputs in `path`: an .npz (one array per input), or an .npy for a one-input model.

    `model` is the served version as `/v1/model` describes it ("current"), or None.

    Raises:
        UsageError: not an .npz or .npy, or an .npy while the model takes other than one input.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path} is not a readable .npz or .npy file: {exc}") from exc
    if not isinstance(loaded, np.ndarray):
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    names = [spec["name"] for spec in model["inputs"]] if model else []
    if len(names) != 1:
        takes = (
            f"the model takes {len(names)} inputs ({', '.join(names)})"
            if model
            else "no model is installed to name it"
        )
        raise UsageError(
            f"{path} holds one array, but {takes}: pass an .npz with one array per input name"
        )
    return {names[0]: loaded}


@agent.command("predict")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help=".npz with one array per model input, or .npy for a model with one input; samples first.",
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
    from edgefleet.agent.client import call, call_json, running_agent_url
    from edgefleet.agent.inference import Predictor

    config = read_config(config_path)
    if output is not None and not output.parent.is_dir():
        raise UsageError(
            f"-o {output}: the directory {output.parent} does not exist; create it first, "
            "or write the outputs elsewhere"
        )
    url = running_agent_url(_layout(config))
    if url is not None:
        try:
            model = call_json(url, "GET", "/v1/model")
            body = io.BytesIO()
            np.savez(body, **read_inputs(input_path, model["current"]))  # type: ignore[arg-type]
            raw = call(url, "POST", "/v1/predict/batch", body.getvalue(), "application/x-npz")
        except AgentRequestError as exc:
            _relay(exc)
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            outputs = {name: archive[name] for name in archive.files}
        answered = "the running agent"
    else:
        predictor = Predictor.open(_layout(config), config.inference, config.profile)
        try:
            inputs = read_inputs(input_path, predictor.model_info().as_dict()["current"])
            prediction = predictor.predict(inputs)
        finally:
            predictor.close()
        outputs = prediction.outputs
        answered = f"{prediction.model} ({prediction.step}, in this process)"
    for name, values in outputs.items():
        click.echo(f"{name}: shape {list(values.shape)} {values.dtype}")
    if output is not None:
        try:
            with atomic_writer(output) as handle:
                np.savez(handle, **outputs)
        except OSError as exc:
            raise UsageError(f"-o {output}: cannot write it: {exc.strerror or exc}") from None
        click.echo(f"wrote {output}")
    click.echo(f"answered by {answered}")
