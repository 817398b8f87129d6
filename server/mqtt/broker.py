"""The embedded MQTT broker for one-machine setups and the demo (`--embedded-broker`).

`iotcore` compiles rumqttd into a Python wheel and runs it in a child process
(rumqttd has no shutdown API; the child exits when our end of its stdin pipe
closes, so it never outlives the server). We hand it a rumqttd TOML config with
one MQTT 5 listener, because the server's link needs MQTT 5 (shared
subscriptions, session expiry) and the agent speaks MQTT 5 by default.

What it does, checked by tests/server/test_broker.py with paho clients:
- QoS 1 messages are queued for an offline persistent session and delivered
  when the client returns (directives reach a device that was away);
- shared subscriptions (`$share/group/filter`) spread messages over the group
  (round robin), so replicas share the ingest;
- the Last Will is published (and retained) when a connection dies.

It listens on loopback only (`--mqtt-host`, default 127.0.0.1; any other
address is refused at start): it has no TLS and no authentication, so anyone
who reached it could read every directive and report, publish as any device,
join the server's shared subscriptions and overwrite the retained fleet
topics. A fleet beyond one machine uses mosquitto with the configuration
`edgefleet broker config` writes (TLS, client certificates, per-device ACLs).

Supervised: a thread watches the child; when it ends unasked (killed, crashed)
it is reaped at once (no zombie), the end is logged in one line, and a new
child is started on the same port after a backoff (`RESTART_BACKOFF`, reset
once a child ran `STABLE_AFTER_S`); `restarts` counts them. The server's link
reconnects by itself and publishes its retained messages again.

Limits (why mosquitto, EMQX or another clustered broker is the choice for a
real fleet): sessions, queued messages and retained messages live in memory
only, so a broker restart forgets them; there is no MQTT 3.1.1 listener on the
same port (agents must use `protocol = "5"`, their default).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.backoff import Backoff
from edgefleet.brokerconf import MAX_PACKET_BYTES
from edgefleet.errors import UsageError
from edgefleet.extras import install_hint
from edgefleet.server.errors import BrokerError

if TYPE_CHECKING:
    from iotcore import Broker

log = logging.getLogger(__name__)

RESTART_BACKOFF = Backoff(initial=0.5, maximum=30.0)
STABLE_AFTER_S = 60.0  # a child that ran this long restarts the backoff from its start
WATCH_INTERVAL_S = 0.2  # how often the supervisor looks at the child

# Largest device message plus the topic and MQTT framing; rumqttd's default (20 KiB)
# would cut off telemetry windows and block data.
MAX_PAYLOAD_BYTES = MAX_PACKET_BYTES


def check_loopback(host: str) -> None:
    """Refuse a listen address of the embedded broker beyond this machine.

    Raises:
        UsageError: `host` is not an IPv4 loopback address, saying what to use instead.
    """
    try:
        loopback = ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(
            f"--mqtt-host {host}: the embedded broker has no TLS and no authentication, so "
            "it listens on loopback only (127.0.0.1 or another 127.x address); for devices "
            "on other machines "
            "write a locked-down mosquitto configuration with `edgefleet broker config` "
            "and pass --mqtt mqtts://HOST:PORT"
        )


def broker_config(host: str, port: int, *, max_connections: int = 20_000) -> str:
    """The rumqttd TOML for one MQTT 5 listener on host:port."""
    return f"""\
id = 0

[router]
id = 0
max_connections = {max_connections}
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "{host}:{port}"
next_connection_delay_ms = 1

    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {MAX_PAYLOAD_BYTES}
    max_inflight_count = 100
"""


class EmbeddedBroker:
    """An iotcore (rumqttd) broker in a supervised child process, listening on host:port
    (loopback)."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        config_dir: Path | None = None,
        backoff: Backoff = RESTART_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        """Raises: UsageError when `host` is not a loopback address (`check_loopback`)."""
        check_loopback(host)
        self.host = host
        self.port = port
        self.restarts = 0  # children started again after one ended unasked
        self._config_dir = config_dir
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._broker: Broker | None = None
        self._lock = threading.Lock()  # start, restart and stop, one at a time
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        broker = self._broker
        return broker is not None and broker.is_running

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker, return once it accepts connections, and supervise it.

        Raises:
            BrokerError: iotcore is not installed, the port is taken, or the
                broker did not come up within `timeout`.
            RuntimeError: called while running.
        """
        if self._broker is not None:
            raise RuntimeError("the embedded broker is already running")
        try:
            from iotcore import Broker  # optional: only the embedded broker needs it
        except ImportError as exc:
            raise BrokerError(
                "the embedded broker needs the iotcore package: " + install_hint("server")
            ) from exc
        directory = self._config_dir
        if directory is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="edgefleet-broker-")
            directory = Path(self._tempdir.name)
        config = directory / "rumqttd.toml"
        config.write_text(broker_config(self.host, self.port))
        try:
            broker = Broker(port=self.port, listen=self.host, config_path=str(config))
            broker.start(timeout)
        except (OSError, RuntimeError, ValueError) as exc:
            self._cleanup()
            raise BrokerError(
                f"cannot start the embedded broker on {self.host}:{self.port}: {exc}"
            ) from exc
        self._broker = broker
        self._stopping.clear()
        self._supervisor = threading.Thread(
            target=self._supervise,
            args=(broker, timeout),
            name="edgefleet-broker-supervisor",
            daemon=True,
        )
        self._supervisor.start()

    def stop(self) -> None:
        """Stop the broker (its sessions and retained messages are forgotten). Idempotent."""
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.join()
        with self._lock:
            broker, self._broker = self._broker, None
            if broker is not None:
                broker.stop()
        self._cleanup()

    def _supervise(self, broker: Broker, timeout: float) -> None:
        """Watch the child; reap and restart it (with backoff) whenever it ends unasked."""
        retry = 0
        started = time.monotonic()
        while not self._stopping.wait(WATCH_INTERVAL_S):
            if broker.is_running:  # polling the child also reaps it once it ended
                continue
            if time.monotonic() - started >= STABLE_AFTER_S:
                retry = 0
            delay = self._backoff.delay(retry, self._rng)
            log.warning(
                "the embedded MQTT broker on %s:%d ended unexpectedly; restarting it in %.1f s",
                self.host,
                self.port,
                delay,
            )
            broker.stop()  # closes our end of its stdin pipe
            retry += 1
            while not self._stopping.wait(delay):
                with self._lock:
                    if self._stopping.is_set():
                        return
                    try:
                        broker.start(timeout)
                    except (OSError, RuntimeError) as exc:
                        delay = self._backoff.delay(retry, self._rng)
                        retry += 1
                        log.warning(
                            "cannot restart the embedded MQTT broker: %s; trying again in %.1f s",
                            exc,
                            delay,
                        )
                        continue
                self.restarts += 1
                started = time.monotonic()
                log.info("embedded MQTT broker restarted (restart %d)", self.restarts)
                break

    def _cleanup(self) -> None:
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "MAX_PAYLOAD_BYTES",
    "RESTART_BACKOFF",
    "BrokerError",
    "EmbeddedBroker",
    "broker_config",
    "check_loopback",
]
