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


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in logs and lease tables."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


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
    host: str = "127.0.0.1"
    port: int = 8080
    # Base URL devices download bundles from (directive HTTP sources); default http://host:port.
    public_url: str | None = None
    open_enrollment: bool = False
    server_key_passphrase: bytes | None = None
    replica_id: str = field(default_factory=default_replica_id)
    share_group: str = "edgefleet-server"
    directive_ttl: dt.timedelta = dt.timedelta(days=7)
    fleet_timestamp_period: dt.timedelta = dt.timedelta(minutes=10)
    fleet_timestamp_ttl: dt.timedelta = dt.timedelta(hours=1)
    driver_interval_s: float = 1.0
    lease_ttl: dt.timedelta = dt.timedelta(seconds=15)
    telemetry_bucket: dt.timedelta = dt.timedelta(minutes=5)
    telemetry_retention: dt.timedelta = dt.timedelta(days=30)
    telemetry_flush_s: float = 1.0
    status_reports_kept: int = 20
    # Drift checks (docs/drift.md): how often the evaluator looks for new windows, how
    # long a window is (widened up to drift_window_max while too few samples came in),
    # and how many windows in a row open or close an alert.
    drift_interval_s: float = 60.0
    drift_window: dt.timedelta = dt.timedelta(minutes=15)
    drift_window_max: dt.timedelta = dt.timedelta(hours=1)
    drift_persistence: int = 2
    offline_after: dt.timedelta = dt.timedelta(seconds=120)  # no heartbeat for this long
    # A device message dated further ahead of this server's clock is refused (docs/server.md).
    max_clock_ahead: dt.timedelta = dt.timedelta(minutes=5)
    api_rate_per_minute: int = 600  # per token (per client address when unauthenticated)
    # Proxies whose X-Forwarded-For names the client (comma-separated addresses or
    # networks, "*" any); None trusts no proxy header: the client is the TCP peer.
    forwarded_allow_ips: str | None = None
    max_bundle_bytes: int = 4 * 1024**3
    block_size: int = 64 * 1024

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir)

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def broker_url(self) -> str:
        if self.mqtt_url:
            return self.mqtt_url
        return f"mqtt://127.0.0.1:{self.mqtt_port}"
