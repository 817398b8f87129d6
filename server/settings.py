"""The fleet server's settings: one frozen value built by the CLI (or a test).

Library code never reads the environment; `edgefleet server run` turns flags
into a `ServerSettings` and everything else receives it.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

# The server's share group name without `--share-group-file`: a name every device could
# guess, fine on the loopback-only embedded broker (docs/security.md, "Limits").
DEFAULT_SHARE_GROUP = "edgefleet-server"


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in logs and lease tables."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def default_replica_name() -> str:
    """The host's name: the same after a restart, so the replica resumes its MQTT session."""
    return socket.gethostname()


def sqlite_url(data_dir: Path) -> str:
    """The default database: `server.db` in the data directory."""
    return f"sqlite:///{Path(data_dir).resolve() / 'server.db'}"


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    trust_path: Path
    server_key_path: Path
    db_url: str | None = None  # None: SQLite in data_dir
    mqtt_url: str | None = None  # mqtt://host:port of an external broker
    embedded_broker: bool = False
    mqtt_port: int = 1883  # of the embedded broker
    mqtt_host: str = "127.0.0.1"  # of the embedded broker: loopback only (no TLS, no auth)
    # For an mqtts:// broker: the CA to trust (None: the system's) and this replica's
    # client certificate and key (its broker identity, CN server:NAME).
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    # GET /api/v1/health answers 503 once the MQTT link has been down this long.
    mqtt_down_grace_s: float = 10.0
    host: str = "127.0.0.1"
    port: int = 8080
    # Base URL devices download bundles from (directive HTTP sources); default http://host:port.
    public_url: str | None = None
    open_enrollment: bool = False
    # The fleet CA (`edgefleet ca init`) that signs devices' client certificates at
    # enrollment and renewal; None: enrollment answers carry no certificate.
    ca_dir: Path | None = None
    # The certificate revocation list kept current for the broker, and the command
    # (already split, run without a shell) that makes the broker reread it.
    crl_path: Path | None = None
    broker_reload_command: tuple[str, ...] = ()
    server_key_passphrase: bytes | None = None
    replica_id: str = field(default_factory=default_replica_id)
    # Names the replica's MQTT session (server/replicaname.py); unique among running replicas.
    replica_name: str = field(default_factory=default_replica_name)
    # How long the broker keeps a replica's session after the connection was lost, queueing
    # its share of the device messages: a replica restarted meanwhile reads them; one gone
    # for good stops absorbing them by the time another replica takes over its leases.
    mqtt_session_expiry: dt.timedelta = dt.timedelta(seconds=15)
    share_group: str = DEFAULT_SHARE_GROUP
    directive_ttl: dt.timedelta = dt.timedelta(days=7)
    # A diagnostics request unanswered this long is expired (its directive expires too).
    diagnostics_ttl: dt.timedelta = dt.timedelta(minutes=5)
    # A benchmark's results arriving later than this are refused (its directives expire too).
    benchmark_ttl: dt.timedelta = dt.timedelta(minutes=30)
    fleet_timestamp_period: dt.timedelta = dt.timedelta(minutes=10)
    fleet_timestamp_ttl: dt.timedelta = dt.timedelta(hours=1)
    driver_interval_s: float = 1.0
    lease_ttl: dt.timedelta = dt.timedelta(seconds=15)
    telemetry_bucket: dt.timedelta = dt.timedelta(minutes=5)
    telemetry_retention: dt.timedelta = dt.timedelta(days=30)
    telemetry_flush_s: float = 1.0
    status_reports_kept: int = 20
    dead_letters_kept: int = 1000  # messages the database refused, set aside (deadletters.py)
    # Drift checks (docs/drift.md): how often the evaluator looks for new windows, how
    # long a window is (widened up to drift_window_max while too few samples came in),
    # and how many windows in a row open or close an alert.
    drift_interval_s: float = 60.0
    drift_window: dt.timedelta = dt.timedelta(minutes=15)
    drift_window_max: dt.timedelta = dt.timedelta(hours=1)
    drift_persistence: int = 2
    # Cohorts (docs/drift.md): fewer devices than this are not judged as a cohort (each
    # device is already); at most this many tag cohorts per bundle version and tick.
    drift_min_cohort_devices: int = 2
    drift_max_tag_cohorts: int = 50
    # Accuracy from labels (docs/drift.md): an accuracy-drop alert needs at least
    # accuracy_min_labels labelled answers in a window, accuracy significantly below the
    # reference minus accuracy_drop_tolerance (at the rate accuracy_false_alarm), or an
    # RMSE above the reference x (1 + accuracy_drop_tolerance).
    accuracy_drop_tolerance: float = 0.05
    accuracy_min_labels: int = 50
    accuracy_false_alarm: float = 0.01
    # Alert events POSTed to a webhook (docs/server.md "Webhooks"), signed with HMAC-SHA256
    # under webhook_secret; without a URL no event is recorded and nothing is sent.
    webhook_url: str | None = None
    webhook_secret: bytes | None = field(default=None, repr=False)
    webhook_max_attempts: int = 12  # then a delivery is given up (failed) until retried
    webhook_timeout_s: float = 10.0
    webhook_interval_s: float = 5.0
    offline_after: dt.timedelta = dt.timedelta(seconds=120)  # no heartbeat for this long
    # A device message dated further ahead of this server's clock is refused (docs/server.md).
    max_clock_ahead: dt.timedelta = dt.timedelta(minutes=5)
    api_rate_per_minute: int = 600  # per token (per client address when unauthenticated)
    # Proxies whose X-Forwarded-For names the client (comma-separated addresses or
    # networks, "*" any); None trusts no proxy header: the client is the TCP peer.
    forwarded_allow_ips: str | None = None
    # HTTPS: the API's certificate (chain) and its key, PEM; None serves plain HTTP.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_bundle_bytes: int = 4 * 1024**3
    # A device's upload of raw inputs (docs/server.md, "Raw inputs"): larger ones are
    # refused (413); one dated further back than the replay window too.
    max_sample_bytes: int = 64 * 1024**2
    sample_replay_window: dt.timedelta = dt.timedelta(minutes=10)
    block_size: int = 64 * 1024

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir)

    @property
    def scheme(self) -> str:
        """How the API is served: https with a TLS certificate, http otherwise."""
        return "https" if self.tls_cert_file is not None else "http"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"{self.scheme}://{self.host}:{self.port}").rstrip("/")

    @property
    def broker_url(self) -> str:
        if self.mqtt_url:
            return self.mqtt_url
        return f"mqtt://127.0.0.1:{self.mqtt_port}"
