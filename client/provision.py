"""`edgefleet devices provision`: a directory to copy into a device's root filesystem.

    DIR/etc/edgefleet/agent.toml          0640 (group fixed at first boot: tmpfiles.d below)
    DIR/etc/edgefleet/trust.json          0644, the trust root (checked here)
    DIR/etc/edgefleet/ca.crt              0644, the fleet CA (HTTPS and mqtts://)
    DIR/etc/systemd/system/edgefleet-agent.service
    DIR/etc/systemd/system/multi-user.target.wants/edgefleet-agent.service  (a link to it)
    DIR/usr/lib/sysusers.d/edgefleet.conf     the service's user and group
    DIR/usr/lib/tmpfiles.d/edgefleet.conf     agent.toml's group, once that group exists
    DIR/var/lib/edgefleet/enroll-token    0600 in a 0700 directory: the enrollment token

The unit and the two .conf files are the ones edgefleet.hardware ships. One
device: a one-use token and its id. A golden image (--claim): one token N
devices enroll with, and `device_id = "auto"` (each makes its own id at first
start). The directory is built beside DIR and renamed into place at the end.
"""

from __future__ import annotations

import importlib.resources
import os
import secrets
import shutil
import ssl
import tempfile
from pathlib import Path

import click
from pydantic import ValidationError

from edgefleet.agentconfig import AUTO_DEVICE_ID, AgentConfig, dump_config, make_directories
from edgefleet.cli.options import parse_duration
from edgefleet.client.api import ApiClient
from edgefleet.client.options import cell, client_command, parse_tags
from edgefleet.errors import UsageError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.profiles import HOST, load_profile
from edgefleet.trust import load_trust_root
from edgefleet.wire import ConflictError, NotFoundError

STATE_DIR = "/var/lib/edgefleet"
CONFIG_DIR = "/etc/edgefleet"
UNIT = "edgefleet-agent.service"
# What edgefleet.hardware ships -> where it goes in the root filesystem.
SYSTEMD_FILES = {
    UNIT: f"etc/systemd/system/{UNIT}",
    "edgefleet-sysusers.conf": "usr/lib/sysusers.d/edgefleet.conf",
    "edgefleet-tmpfiles.conf": "usr/lib/tmpfiles.d/edgefleet.conf",
}
# The option that sets each configuration field, to name it when a value is refused.
OPTIONS = {
    "device_id": "DEVICE_ID",
    "device_id_prefix": "--id-prefix",
    "server_url": "--server",
    "mqtt.url": "--mqtt",
}


@click.command("provision")
@click.argument("device_id", metavar="[DEVICE_ID]", required=False)
@click.option(
    "--claim",
    is_flag=True,
    help="A golden image: no DEVICE_ID; one token --uses devices enroll with, each "
    "making its own id at first start.",
)
@click.option(
    "--uses",
    type=click.IntRange(1, 100_000),
    metavar="N",
    help="With --claim: how many devices may enroll with the image's token.",
)
@click.option(
    "--id-prefix",
    metavar="PREFIX",
    help="With --claim: each device's id is PREFIX-<12 hex digits> (default: device).",
)
@click.option(
    "--expires",
    default="7d",
    show_default=True,
    metavar="DURATION",
    help="How long the token stays valid (90s, 30m, 24h, 7d): until the last first boot.",
)
@click.option(
    "--profile",
    required=True,
    help="The device's hardware profile (`edgefleet targets list`); not `host`.",
)
@click.option(
    "--trust",
    "trust_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The fleet's trust root (trust.json): checked, then flashed.",
)
@click.option(
    "--ca-cert",
    "ca_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The fleet CA's certificate (ca.crt of `edgefleet ca init`).",
)
@click.option(
    "--mqtt", "mqtt_url", required=True, help="The broker as devices reach it: mqtts://host:8883."
)
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag given to the device(s)."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The directory to write (a root-filesystem overlay).",
)
@click.option("--force", is_flag=True, help="Replace a directory that is not empty.")
@client_command
def provision_command(
    client: ApiClient,
    device_id: str | None,
    claim: bool,
    uses: int | None,
    id_prefix: str | None,
    expires: str,
    profile: str,
    trust_path: Path,
    ca_path: Path,
    mqtt_url: str,
    tags: tuple[str, ...],
    output: Path,
    force: bool,
) -> None:
    """Write DIR for one device, or (--claim) for a golden image, and create its token.

    \b
    One device (a one-use token):
      edgefleet devices provision cam-017 --profile aarch64 \\
          --trust keys/trust.json --ca-cert ca/ca.crt --mqtt mqtts://broker:8883 -o cam-017/
    A golden image (one token for N devices, each makes its id at first start):
      edgefleet devices provision --claim --uses 100 --expires 30d --id-prefix cam ...
    Copy DIR into the image's root: sudo cp -a --no-preserve=ownership DIR/. /mnt/
    (docs/provisioning.md). The server URL (--server) is the one written for
    the device: give the address devices reach it at.
    """
    if claim == (device_id is not None):
        raise UsageError("give a DEVICE_ID (one device) or --claim (a golden image), not both")
    if claim and uses is None:
        raise UsageError("--claim needs --uses N: how many devices may enroll with the image")
    if not claim and (uses is not None or id_prefix is not None):
        raise UsageError("--uses and --id-prefix go with --claim")
    if device_id == AUTO_DEVICE_ID:
        raise UsageError(f"{AUTO_DEVICE_ID!r} is not a device id here: use --claim")
    if profile == HOST:
        raise UsageError(
            "--profile host would be this machine's profile, not the device's: name the "
            "device's profile (`edgefleet targets list`), e.g. --profile aarch64"
        )
    ttl = parse_duration(expires)
    token_tags = parse_tags(tags)
    output = output.absolute()
    _check_output(output, force)
    config = _agent_config(
        device_id or AUTO_DEVICE_ID, id_prefix, load_profile(profile).name, client, mqtt_url
    )
    trust = load_trust_root(trust_path)
    _check_ca(ca_path)
    if device_id is not None:
        _check_not_enrolled(client, device_id)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        _write_overlay(staging, config, trust.raw, ca_path.read_bytes())
        answer = client.create_enroll_token(token_tags, ttl, uses or 1)
        token_file = staging / STATE_DIR.lstrip("/") / "enroll-token"
        atomic_write_bytes(token_file, str(answer["token"]).encode("utf-8") + b"\n", 0o600)
        _put_in_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    who = f"device {device_id}" if device_id else f"a golden image for {uses} devices"
    click.echo(
        f"wrote {output}: {who}, profile {config.profile}, trust root version {trust.version}, "
        f"enrollment token valid until {cell(answer.get('expires_at'))} UTC"
    )
    click.echo(
        f"copy it into the root filesystem: sudo cp -a --no-preserve=ownership {output}/. /mnt/"
    )


class AlreadyEnrolledError(ConflictError):
    """The device id to provision is enrolled already (its card would be refused)."""


def _check_not_enrolled(client: ApiClient, device_id: str) -> None:
    """Ask the server: a card for an id enrolled with another key is refused at first
    boot ("enrolled with another key"), so it is not written."""
    try:
        client.get_device(device_id)
    except NotFoundError:
        return
    raise AlreadyEnrolledError(
        f"device {device_id!r} is enrolled already: a card for it would be refused at "
        f"first boot; remove the device first (`edgefleet devices remove {device_id}`) "
        "or choose another id"
    )


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UsageError(f"-o {output} is not empty: pass --force to replace it")
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: {output.parent} does not exist; create it first")


def _agent_config(
    device_id: str, id_prefix: str | None, profile: str, client: ApiClient, mqtt_url: str
) -> AgentConfig:
    """agent.toml as `agent init` writes it, with the paths of the root filesystem."""
    ca_file = f"{CONFIG_DIR}/ca.crt"
    try:
        return AgentConfig.model_validate(
            {
                "device_id": device_id,
                "device_id_prefix": id_prefix,
                "profile": profile,
                "state_dir": STATE_DIR,
                "trust_root": f"{CONFIG_DIR}/trust.json",
                "server_url": client.base_url,
                "server_ca_file": ca_file,
                "mqtt": {"url": mqtt_url, "ca_file": ca_file},
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        reason = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"{OPTIONS.get(field, field)}: {reason}") from None


def _check_ca(ca_path: Path) -> None:
    try:
        ssl.create_default_context(cafile=str(ca_path))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"--ca-cert {ca_path}: not a CA certificate in PEM ({exc}); give the fleet CA's ca.crt"
        ) from None


def _write_overlay(root: Path, config: AgentConfig, trust: bytes, ca_certificate: bytes) -> None:
    """Everything but the token, with exact modes (whatever the umask): `cp -a` copies
    the modes of the directories too, the overlay's root included."""
    root.chmod(0o755)
    config_dir = root / CONFIG_DIR.lstrip("/")
    make_directories(config_dir)
    atomic_write_bytes(config_dir / "agent.toml", dump_config(config).encode("utf-8"), 0o640)
    atomic_write_bytes(config_dir / "trust.json", trust, 0o644)
    atomic_write_bytes(config_dir / "ca.crt", ca_certificate, 0o644)
    shipped = importlib.resources.files("edgefleet.hardware") / "systemd"
    for name, target in SYSTEMD_FILES.items():
        make_directories((root / target).parent)
        atomic_write_bytes(root / target, (shipped / name).read_bytes(), 0o644)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    make_directories(wants)
    (wants / UNIT).symlink_to(f"../{UNIT}")
    state_dir = root / STATE_DIR.lstrip("/")
    make_directories(state_dir.parent)
    state_dir.mkdir(0o700)
    state_dir.chmod(0o700)


def _put_in_place(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`; an `output` there before (empty, or --force) goes."""
    if not output.exists():
        os.rename(staging, output)
        return
    replaced = output.with_name(f".{output.name}.replaced-{secrets.token_hex(4)}")
    os.rename(output, replaced)
    os.rename(staging, output)
    shutil.rmtree(replaced)
