"""The locked-down mosquitto broker's configuration and ACL, as text (`edgefleet broker config`).

Pure functions: the command writes what they return. What the configuration
enforces (mosquitto 2.0; tests/server/test_broker_lockdown.py checks each on a
real mosquitto):
- one TLS listener that requires a client certificate issued by the fleet CA
  and not revoked (`crlfile`); no anonymous access;
- the certificate's common name is the user name and the client id, so no
  identity can take another's client id (and its queued messages);
- the ACL: a server identity (CN `server:NAME`, which no device id can be)
  reads and writes the whole `edgefleet/v1/#` tree; a device (CN = its device
  id) writes only its own device-to-server topics, reads only its own
  server-to-device topics and the retained fleet topics (timestamp, trust
  roots), and nothing else.

mosquitto 2.0 checks the ACL file when a client publishes and when a message
is delivered, never when a client subscribes: a shared subscription
(`$share/GROUP/FILTER`) is checked message by message against the topic
delivered. A device that joined one of the server's share groups would be
delivered nothing it may not read, but what the broker handed it as a member
would be lost to the server. So the group name is a secret (`new_share_group`,
OUT/share-group) that the server reads from a file (`server run
--share-group-file`); docs/security.md, "Limits".
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from edgefleet.errors import UsageError
from edgefleet.mqtt.messages import MAX_MESSAGE_BYTES
from edgefleet.mqtt.topics import (
    DEVICES_PREFIX,
    NAMESPACE,
    TRUST_ROOT_FILTER,
    Direction,
    TopicKind,
    fleet_accepts_topic,
    fleet_timestamp_topic,
)

# The largest device message plus its topic and the MQTT framing.
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + 4096
SERVER_IDENTITY_PREFIX = "server:"
DEFAULT_SERVER_IDENTITY = "edgefleet"
CONF_FILE = "mosquitto.conf"
ACL_FILE = "acl"
CA_FILE = "ca.crt"
CERT_FILE = "broker.crt"
KEY_FILE = "broker.key"
CRL_FILE = "crl.pem"
SHARE_GROUP_FILE = "share-group"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,55}$")


def server_identity(name: str) -> str:
    """The broker identity (certificate CN, user name, client id) of server replica `name`.

    Raises:
        UsageError: `name` is not 1-56 letters, digits, '.', '_' or '-'.
    """
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"server identity {name!r} is not valid: 1-56 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return SERVER_IDENTITY_PREFIX + name


def server_identity_files(name: str) -> tuple[str, str]:
    """The certificate and key file names of server identity `name`."""
    return f"server-{name}.crt", f"server-{name}.key"


def new_share_group() -> str:
    """A random share group name: `edgefleet-` and 32 hex digits (128 bits).

    The server appends `.KIND` (at most 12 characters) and stays within the
    64 characters of a share group name (edgefleet.mqtt.topics.shared_filter).
    """
    return f"edgefleet-{secrets.token_hex(16)}"


def acl_text(server_names: Sequence[str]) -> str:
    """The mosquitto ACL file: full access for each server identity, own topics for devices."""
    lines = ["# edgefleet: written by `edgefleet broker config`", ""]
    for name in server_names:
        lines += [
            f"user {server_identity(name)}",
            f"topic readwrite {NAMESPACE}/#",
            "",
        ]
    lines.append("# every device: its own certificate's name is %u")
    for kind in TopicKind:
        access = "write" if kind.direction is Direction.FROM_DEVICE else "read"
        lines.append(f"pattern {access} {DEVICES_PREFIX}/%u/{kind.value}")
    lines += [
        f"pattern read {fleet_timestamp_topic()}",
        f"pattern read {fleet_accepts_topic()}",
        f"pattern read {TRUST_ROOT_FILTER}",
        "",
    ]
    return "\n".join(lines)


def mosquitto_conf(directory: Path, port: int, user: str) -> str:
    """mosquitto.conf for one TLS listener on `port`, naming files in `directory` (absolute).

    `user`: who owns those files; mosquitto started as root runs as that user.
    """
    out = Path(directory).resolve()
    return f"""\
# edgefleet: written by `edgefleet broker config`; run: mosquitto -c {out / CONF_FILE}
per_listener_settings false
user {user}
allow_anonymous false
acl_file {out / ACL_FILE}
persistence true
persistence_location {out}/
max_packet_size {MAX_PACKET_BYTES}

listener {port}
cafile {out / CA_FILE}
certfile {out / CERT_FILE}
keyfile {out / KEY_FILE}
crlfile {out / CRL_FILE}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
"""


__all__ = [
    "ACL_FILE",
    "CONF_FILE",
    "DEFAULT_SERVER_IDENTITY",
    "MAX_PACKET_BYTES",
    "SHARE_GROUP_FILE",
    "acl_text",
    "mosquitto_conf",
    "new_share_group",
    "server_identity",
    "server_identity_files",
]
