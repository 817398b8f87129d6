"""`edgefleet server`: run the fleet server; create API tokens.

Flags become one `ServerSettings` here; nothing below reads the environment.
The server's modules (FastAPI, SQLAlchemy, the broker) are imported inside the
commands, so `edgefleet server --help` stays light.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import urllib.parse
from pathlib import Path

import click

from edgefleet.cli.options import passphrase_env_option, passphrase_from_env
from edgefleet.errors import UsageError
from edgefleet.server.principals import Role
from edgefleet.server.settings import ServerSettings, sqlite_url

DEFAULT_DATA_DIR = Path("edgefleet-data")

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
@data_option
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP listen address.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="HTTP port."
)
@click.option(
    "--public-url",
    metavar="URL",
    help="The URL devices download bundles from, when not http://HOST:PORT "
    "(behind a proxy, or --host 0.0.0.0).",
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
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def run_command(
    db_url: str | None,
    mqtt_url: str | None,
    embedded_broker: bool,
    mqtt_port: int,
    data_dir: Path,
    host: str,
    port: int,
    public_url: str | None,
    forwarded_allow_ips: str | None,
    open_enrollment: bool,
    trust_path: Path,
    server_key_path: Path,
    passphrase_env: str | None,
    webhook_url: str | None,
    webhook_secret_env: str | None,
    verbose: bool,
) -> None:
    """Run the fleet server until SIGTERM or Ctrl-C.

    Several replicas may share one PostgreSQL database (--db) and one broker
    (--mqtt): they split the device messages between them, and the database
    decides which replica drives each rollout.
    """
    if mqtt_url and embedded_broker:
        raise UsageError("--mqtt and --embedded-broker exclude each other: choose one broker")
    webhook = webhook_from_options(webhook_url, webhook_secret_env)
    settings = ServerSettings(
        data_dir=data_dir.resolve(),
        trust_path=trust_path.resolve(),
        server_key_path=server_key_path.resolve(),
        db_url=db_url,
        mqtt_url=mqtt_url,
        embedded_broker=embedded_broker,
        mqtt_port=mqtt_port,
        host=host,
        port=port,
        public_url=public_url,
        forwarded_allow_ips=check_forwarded_allow_ips(forwarded_allow_ips),
        open_enrollment=open_enrollment,
        server_key_passphrase=passphrase_from_env(passphrase_env),
        webhook_url=webhook[0] if webhook else None,
        webhook_secret=webhook[1] if webhook else None,
    )
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # Alembic narrates its plugins and each migration step at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
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
