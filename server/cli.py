"""`edgefleet server`: run the fleet server; create API tokens.

Flags become one `ServerSettings` here; nothing below reads the environment.
The server's modules (FastAPI, SQLAlchemy, the broker) are imported inside the
commands, so `edgefleet server --help` stays light.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import shlex
import ssl
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import click

from edgefleet.cli.options import parse_duration, passphrase_env_option, passphrase_from_env
from edgefleet.errors import UsageError
from edgefleet.server.principals import Role
from edgefleet.server.settings import (
    DEFAULT_SHARE_GROUP,
    ServerSettings,
    default_replica_name,
    sqlite_url,
)

DEFAULT_DATA_DIR = Path("edgefleet-data")
REPLICA_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

data_option = click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Data directory: pushed bundles, and the SQLite database unless --db is given.",
)
db_option = click.option(
    "--db",
    "db_url",
    metavar="URL",
    help="Database URL, e.g. postgresql://user:pass@host/edgefleet (needed for several "
    "replicas) [default: sqlite in the data directory].",
)


@click.group()
def server() -> None:
    """The fleet server: bundles, devices, rollouts, over HTTP and MQTT.

    \b
    First run, on one machine:
      edgefleet keys init keys/
      edgefleet server run --embedded-broker --trust keys/trust.json \\
          --server-key keys/server.key
      edgefleet server token create --role admin --name me    # another shell; prints it
    Clients (`edgefleet bundles|rollout|devices`) then use --server and --token
    (or EDGEFLEET_SERVER and EDGEFLEET_TOKEN).
    """


def check_forwarded_allow_ips(text: str | None) -> str | None:
    """`--forwarded-allow-ips` normalised ("a, b" -> "a,b"), or None when not given.

    uvicorn would take a mistyped address as a literal that never matches, and
    silently put every client behind the proxy into one rate limit bucket.

    Raises:
        UsageError: an item is neither an IP address, a network nor "*" alone.
    """
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if items == ["*"]:
        return "*"
    for item in items:
        try:
            ipaddress.ip_network(item)  # as uvicorn reads it: no host bits in a network
        except ValueError:
            raise UsageError(
                f"--forwarded-allow-ips: {item!r} is not an IP address or network "
                "(comma-separated; '*' alone trusts any)"
            ) from None
    return ",".join(items)


def webhook_from_options(url: str | None, secret_env: str | None) -> tuple[str, bytes] | None:
    """(URL, secret) of the webhook that alert events go to; None without `--webhook-url`.

    Raises:
        UsageError: the URL is not http(s)://host/..., or the secret's variable is
            not named, not set or empty (an unsigned event could be forged).
    """
    if url is None:
        if secret_env is not None:
            raise UsageError("--webhook-secret-env needs --webhook-url: where should events go?")
        return None
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--webhook-url {url!r}: give an http:// or https:// URL with a host")
    if secret_env is None:
        raise UsageError(
            "--webhook-url needs --webhook-secret-env VAR: the environment variable holding "
            "the secret events are signed with"
        )
    secret = os.environ.get(secret_env, "")
    if not secret:
        raise UsageError(
            f"--webhook-secret-env {secret_env}: that environment variable is not set or "
            "empty; set it to the secret the webhook's receiver verifies signatures with"
        )
    return url, secret.encode("utf-8")


def reload_command_from_option(command: str | None) -> tuple[str, ...]:
    """`--broker-reload-command`, split like a shell line.

    Raises:
        UsageError: unbalanced quotes, or nothing to run.
    """
    if command is None:
        return ()
    try:
        words = tuple(shlex.split(command))
    except ValueError as exc:
        raise UsageError(f"--broker-reload-command {command!r}: {exc}") from None
    if not words:
        raise UsageError("--broker-reload-command is empty: name the command to run")
    return words


def check_mqtt_tls(
    mqtt_url: str | None, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> None:
    """Refuse TLS files that would be silently unused or half a client identity.

    Raises:
        UsageError: TLS files without an mqtts:// --mqtt URL, or a certificate without
            its key (or a key without its certificate).
    """
    given = [name for name, path in (("--mqtt-ca", ca_file), ("--mqtt-cert", cert_file),
                                     ("--mqtt-key", key_file)) if path is not None]  # fmt: skip
    if given and not (mqtt_url or "").startswith("mqtts://"):
        raise UsageError(
            f"{', '.join(given)} need --mqtt mqtts://HOST:PORT: the files are used only over TLS"
        )
    if (cert_file is None) != (key_file is None):
        raise UsageError("--mqtt-cert and --mqtt-key go together: give both or neither")


def replica_name_from_option(given: str | None) -> str:
    """The replica's name: `--replica-name`, else the host's name.

    Raises:
        UsageError: the name is not 1 to 64 letters, digits, '.', '_' or '-'.
    """
    name = given if given is not None else default_replica_name()
    if not REPLICA_NAME.fullmatch(name):
        what = "--replica-name" if given is not None else "the host's name, the default"
        raise UsageError(
            f"{what} {name!r} cannot name a replica: pass --replica-name with 1 to 64 "
            "letters, digits, '.', '_' or '-'"
        )
    return name


def share_group_from_file(path: Path | None) -> str:
    """The share group name in `--share-group-file` (one line); the default without it.

    Raises:
        UsageError: the file is missing or unreadable, or holds no valid name.
    """
    if path is None:
        return DEFAULT_SHARE_GROUP
    from edgefleet.server.mqtt.link import SHARED_KINDS, kind_share_filter

    try:
        name = path.read_bytes().decode("ascii").strip()
        for kind in SHARED_KINDS:
            kind_share_filter(name, kind)
    except FileNotFoundError:
        raise UsageError(
            f"--share-group-file {path} does not exist: pass the share-group file that "
            "`edgefleet broker config` wrote in its output directory"
        ) from None
    except OSError as exc:
        raise UsageError(f"--share-group-file {path} cannot be read: {exc.strerror}") from None
    except (UnicodeDecodeError, UsageError):
        raise UsageError(
            f"--share-group-file {path} does not hold a share group name (one line of "
            "letters, digits, '.', '_' or '-', as `edgefleet broker config` writes)"
        ) from None
    return name


def check_https_files(cert_file: Path | None, key_file: Path | None) -> None:
    """Raises: UsageError when only one is given, or they are not a certificate and its key."""
    if (cert_file is None) != (key_file is None):
        raise UsageError("--tls-cert and --tls-key go together: give both or neither")
    if cert_file is None or key_file is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"--tls-cert {cert_file} --tls-key {key_file}: not a PEM certificate and its "
            f"unencrypted key ({exc}); e.g. issue them with the fleet CA or your own"
        ) from None


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_duration(value, f"--{param.name}".replace("_", "-"))


class DriftTimings(NamedTuple):
    telemetry_bucket: dt.timedelta
    drift_interval_s: float
    drift_window: dt.timedelta
    drift_window_max: dt.timedelta


def drift_timings(
    telemetry_bucket: int | None,
    drift_interval: int | None,
    drift_window: int | None,
    drift_window_max: int | None,
) -> DriftTimings:
    """The telemetry and drift timings from the options in seconds; defaults where not given.

    Raises:
        UsageError: a bucket wider than the drift window, or a window wider than its maximum.
    """
    default = ServerSettings(Path(), Path(), Path())

    def duration(seconds: int | None, otherwise: dt.timedelta) -> dt.timedelta:
        return otherwise if seconds is None else dt.timedelta(seconds=seconds)

    timings = DriftTimings(
        telemetry_bucket=duration(telemetry_bucket, default.telemetry_bucket),
        drift_interval_s=default.drift_interval_s if drift_interval is None else drift_interval,
        drift_window=duration(drift_window, default.drift_window),
        drift_window_max=duration(drift_window_max, default.drift_window_max),
    )
    if timings.telemetry_bucket > timings.drift_window:
        raise UsageError(
            f"--telemetry-bucket ({_seconds(timings.telemetry_bucket)}) is wider than "
            f"--drift-window ({_seconds(timings.drift_window)}): a drift window holds whole "
            "buckets; shorten the bucket or widen the window"
        )
    if timings.drift_window > timings.drift_window_max:
        raise UsageError(
            f"--drift-window ({_seconds(timings.drift_window)}) is wider than "
            f"--drift-window-max ({_seconds(timings.drift_window_max)}): widen "
            "--drift-window-max too"
        )
    return timings


def _seconds(duration: dt.timedelta) -> str:
    return f"{duration.total_seconds():.0f} s"


@server.command("run")
@db_option
@click.option(
    "--mqtt",
    "mqtt_url",
    metavar="URL",
    help="An external broker: mqtt://[user:password@]host:1883, or mqtts://...:8883 for TLS "
    "[default: mqtt://127.0.0.1:1883].",
)
@click.option(
    "--embedded-broker",
    is_flag=True,
    help="Run an MQTT broker inside the server (one machine, demos) instead of --mqtt.",
)
@click.option(
    "--mqtt-port",
    type=click.IntRange(1, 65535),
    default=1883,
    show_default=True,
    help="Port of the embedded broker.",
)
@click.option(
    "--mqtt-host",
    default="127.0.0.1",
    show_default=True,
    help="Listen address of the embedded broker: loopback only (it has no TLS and no "
    "authentication; beyond one machine use `edgefleet broker config` and mosquitto).",
)
@click.option(
    "--mqtt-ca",
    "mqtt_ca_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="With --mqtt mqtts://...: the CA certificate the broker's is checked against "
    "[default: the system's CAs].",
)
@click.option(
    "--mqtt-cert",
    "mqtt_cert_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="With --mqtt mqtts://...: this replica's client certificate (its broker identity, "
    "e.g. server-edgefleet.crt from `edgefleet broker config`); needs --mqtt-key.",
)
@click.option(
    "--mqtt-key",
    "mqtt_key_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The private key of --mqtt-cert.",
)
@data_option
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP listen address.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="HTTP port."
)
@click.option(
    "--public-url",
    metavar="URL",
    help="The URL devices download bundles from, when not http://HOST:PORT (https:// with "
    "--tls-cert) (behind a proxy, or --host 0.0.0.0).",
)
@click.option(
    "--tls-cert",
    "tls_cert_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Serve HTTPS with this certificate (PEM, chain included); needs --tls-key "
    "[default: plain HTTP, e.g. behind a proxy that terminates TLS].",
)
@click.option(
    "--tls-key",
    "tls_key_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The private key of --tls-cert (PEM, unencrypted).",
)
@click.option(
    "--forwarded-allow-ips",
    metavar="ADDRS",
    help="Behind a reverse proxy or load balancer: the proxies' addresses or networks "
    "(comma-separated, e.g. 10.0.0.0/8,::1; '*' any) whose X-Forwarded-For names the "
    "client, so per-address rate limits apply per client [default: trust no proxy header].",
)
@click.option(
    "--open-enrollment",
    is_flag=True,
    help="Let devices enroll without a token (a lab; never a fleet in the field).",
)
@click.option(
    "--ca",
    "ca_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The fleet CA (`edgefleet ca init DIR`): sign devices' client certificates at "
    "enrollment and renewal [default: no certificates].",
)
@click.option(
    "--crl",
    "crl_path",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the certificate revocation list in FILE (beside the broker), rewritten at "
    "start and after each device removal; needs --ca.",
)
@click.option(
    "--share-group-file",
    "share_group_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file holding the server's secret share group name (OUT/share-group from "
    "`edgefleet broker config`; the same for every replica): a device must know the name "
    "to join the server's shared subscriptions [default: the well-known edgefleet-server].",
)
@click.option(
    "--replica-name",
    metavar="NAME",
    help="This replica's name, which its MQTT session is kept under so that a restart "
    "resumes it: unique among the replicas (letters, digits, '.', '_', '-') "
    "[default: the host's name].",
)
@click.option(
    "--broker-reload-command",
    metavar="CMD",
    help="Run CMD (split like a shell line, run without one) after the CRL file changes, "
    "e.g. 'systemctl restart mosquitto'; needs --crl.",
)
@click.option(
    "--trust",
    "trust_path",
    required=True,
    metavar="trust.json",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The trust root: which release keys may sign bundles, which server keys directives.",
)
@click.option(
    "--server-key",
    "server_key_path",
    required=True,
    metavar="server.key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The server's private key, listed in the trust root; signs directives.",
)
@passphrase_env_option
@click.option(
    "--webhook-url",
    metavar="URL",
    help="POST alert events (opened, resolved, acknowledged) to this http(s) URL, signed "
    "and retried [default: no events].",
)
@click.option(
    "--webhook-secret-env",
    metavar="VAR",
    help="Name of an environment variable holding the secret that signs webhook events "
    "(HMAC-SHA256); required with --webhook-url.",
)
@click.option(
    "--telemetry-bucket",
    metavar="DURATION",
    callback=_duration,
    help="Sum devices' telemetry into buckets this long (e.g. 90s, 5m, 1h), the unit of "
    "drift windows and rollout gates [default: 5m].",
)
@click.option(
    "--drift-interval",
    metavar="DURATION",
    callback=_duration,
    help="How often the drift checks look for windows to judge [default: 60s].",
)
@click.option(
    "--drift-window",
    metavar="DURATION",
    callback=_duration,
    help="How much telemetry one drift or accuracy check judges; at least --telemetry-bucket "
    "[default: 15m].",
)
@click.option(
    "--drift-window-max",
    metavar="DURATION",
    callback=_duration,
    help="How far a window widens while too few samples came in; at least --drift-window "
    "[default: 1h].",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def run_command(
    db_url: str | None,
    mqtt_url: str | None,
    embedded_broker: bool,
    mqtt_port: int,
    mqtt_host: str,
    mqtt_ca_file: Path | None,
    mqtt_cert_file: Path | None,
    mqtt_key_file: Path | None,
    data_dir: Path,
    host: str,
    port: int,
    public_url: str | None,
    tls_cert_file: Path | None,
    tls_key_file: Path | None,
    forwarded_allow_ips: str | None,
    open_enrollment: bool,
    ca_dir: Path | None,
    crl_path: Path | None,
    share_group_file: Path | None,
    replica_name: str | None,
    broker_reload_command: str | None,
    trust_path: Path,
    server_key_path: Path,
    passphrase_env: str | None,
    webhook_url: str | None,
    webhook_secret_env: str | None,
    telemetry_bucket: int | None,
    drift_interval: int | None,
    drift_window: int | None,
    drift_window_max: int | None,
    verbose: bool,
) -> None:
    """Run the fleet server until SIGTERM or Ctrl-C.

    Several replicas may share one PostgreSQL database (--db) and one broker
    (--mqtt): they split the device messages between them, and the database
    decides which replica drives each rollout.
    """
    if mqtt_url and embedded_broker:
        raise UsageError("--mqtt and --embedded-broker exclude each other: choose one broker")
    check_mqtt_tls(mqtt_url, mqtt_ca_file, mqtt_cert_file, mqtt_key_file)
    check_https_files(tls_cert_file, tls_key_file)
    if embedded_broker:
        from edgefleet.server.mqtt.broker import check_loopback

        check_loopback(mqtt_host)
    webhook = webhook_from_options(webhook_url, webhook_secret_env)
    timings = drift_timings(telemetry_bucket, drift_interval, drift_window, drift_window_max)
    reload_command = reload_command_from_option(broker_reload_command)
    share_group = share_group_from_file(share_group_file)
    if crl_path is not None and ca_dir is None:
        raise UsageError("--crl needs --ca: the CRL is signed by the fleet CA")
    if reload_command and crl_path is None:
        raise UsageError("--broker-reload-command needs --crl: it runs after the CRL changes")
    settings = ServerSettings(
        data_dir=data_dir.resolve(),
        trust_path=trust_path.resolve(),
        server_key_path=server_key_path.resolve(),
        db_url=db_url,
        mqtt_url=mqtt_url,
        embedded_broker=embedded_broker,
        mqtt_port=mqtt_port,
        mqtt_host=mqtt_host,
        mqtt_ca_file=mqtt_ca_file.resolve() if mqtt_ca_file else None,
        mqtt_cert_file=mqtt_cert_file.resolve() if mqtt_cert_file else None,
        mqtt_key_file=mqtt_key_file.resolve() if mqtt_key_file else None,
        host=host,
        port=port,
        public_url=public_url,
        tls_cert_file=tls_cert_file.resolve() if tls_cert_file else None,
        tls_key_file=tls_key_file.resolve() if tls_key_file else None,
        forwarded_allow_ips=check_forwarded_allow_ips(forwarded_allow_ips),
        open_enrollment=open_enrollment,
        ca_dir=ca_dir.resolve() if ca_dir else None,
        crl_path=crl_path.resolve() if crl_path else None,
        broker_reload_command=reload_command,
        share_group=share_group,
        replica_name=replica_name_from_option(replica_name),
        server_key_passphrase=passphrase_from_env(passphrase_env),
        webhook_url=webhook[0] if webhook else None,
        webhook_secret=webhook[1] if webhook else None,
        telemetry_bucket=timings.telemetry_bucket,
        drift_interval_s=timings.drift_interval_s,
        drift_window=timings.drift_window,
        drift_window_max=timings.drift_window_max,
    )
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # Alembic narrates its plugins and each migration step at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if mqtt_cert_file is not None and share_group_file is None:
        logging.getLogger(__name__).warning(
            "--mqtt-cert without --share-group-file: the server subscribes under the well-known "
            "share group %r, which a device of the broker could join and divert reports from; "
            "pass --share-group-file OUT/share-group from `edgefleet broker config`",
            share_group,
        )
    from edgefleet.server.runner import run_server

    run_server(settings)


@server.group("token")
def token() -> None:
    """API tokens, created on the server's own machine (no token needed yet)."""


@token.command("create")
@click.option(
    "--role",
    type=click.Choice([role.value for role in Role]),
    required=True,
    help="viewer: read; operator: also push bundles and run rollouts; admin: also tokens, audit.",
)
@click.option("--name", required=True, help="Who or what holds it: shown in the audit log.")
@data_option
@db_option
def token_create_command(role: str, name: str, data_dir: Path, db_url: str | None) -> None:
    """Create an API token; prints only the token.

    Works on the server's database directly, so the first admin token needs
    no token: give --data or --db as `server run` got them. It never creates
    a database (a token in a database no server reads would be refused); a
    PostgreSQL database not migrated yet is migrated first. The database
    keeps only the token's hash: it cannot be shown again.

    \b
      export EDGEFLEET_TOKEN=$(edgefleet server token create --role operator --name ci)
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from edgefleet.server.db.migrate import open_database
    from edgefleet.server.tokens import create_api_token

    url = db_url or sqlite_url(data_dir)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(f"--db {url!r}: not a database URL") from None
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise UsageError(
            f"no server database at {Path(parsed.database or '').resolve()}: pass --data DIR "
            "(or --db URL) as given to `edgefleet server run`; it creates the database"
        )
    db = open_database(url)
    try:
        with db.session() as session:
            secret, _ = create_api_token(session, name, Role(role))
    finally:
        db.dispose()
    click.echo(secret)
    click.echo(f"created {role} token {name!r}; it is not shown again", err=True)
