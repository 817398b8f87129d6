"""`edgefleet server run`: one replica of the fleet server, assembled and run.

Start order (each step can fail with one clear error line): the HTTP port is
bound first (a port in use stops the start before anything else runs), then
keys and trust root file, database (migrations applied), the stored trust roots
reconciled with the file (`edgefleet.server.trustroots`), the embedded broker if
asked for (supervised: restarted when its process ends), the MQTT link (ingestion
of status, heartbeats, telemetry and block requests; on each connect every stored
trust root republished retained and a new fleet timestamp published), the
background loops (rollout driver, fleet timestamp, trust roots stored by other
replicas, retention, drift evaluator, and webhook delivery when a webhook URL is set)
and finally the HTTP API in the foreground, serving on the socket bound first.
SIGINT or SIGTERM stop the API; everything else then stops in reverse order,
and the ingestion's last batch is written before the process exits.

Several replicas may run on one PostgreSQL database and one broker: MQTT
shared subscriptions spread the device messages over them, and leases in the
database decide which replica drives each rollout, publishes the fleet
timestamp, judges drift and delivers webhook events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import gc
import logging
import signal
import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from edgefleet.errors import UsageError
from edgefleet.fleetca import load_ca
from edgefleet.keys import load_private_key
from edgefleet.mqtt.session import TlsFiles
from edgefleet.server.api.app import create_app
from edgefleet.server.bundles import BundleStore
from edgefleet.server.certificates import CrlFile
from edgefleet.server.context import ServerContext
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.devices import DeviceKeyCache
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.drift.evaluator import DriftEvaluator
from edgefleet.server.errors import StorageError
from edgefleet.server.fleettime import FleetTimestamper
from edgefleet.server.mqtt.blockservice import BlockService
from edgefleet.server.mqtt.broker import EmbeddedBroker
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.mqtt.link import ServerLink
from edgefleet.server.mqtt.retention import run_retention
from edgefleet.server.replicaname import claim_replica_name, name_worker, release_replica_name
from edgefleet.server.rollouts.driver import RolloutDriver
from edgefleet.server.rollouts.resend import Returns
from edgefleet.server.settings import ServerSettings
from edgefleet.server.trustroots import open_trust_roots
from edgefleet.server.webhooks.delivery import WebhookDeliverer
from edgefleet.server.webhooks.events import record_alert_events
from edgefleet.trust import TrustRoot, load_trust_root
from edgefleet.worker import Worker

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 30.0
WORKER_STOP_TIMEOUT_S = 30.0  # a rollout driver tick may be notifying a large stage
BROKER_CONNECT_TIMEOUT_S = 30.0


def driver_worker(driver: RolloutDriver, interval: float) -> Worker:
    """The rollout driver's loop: a tick every `interval` seconds.

    A tick that used all its directives (a large stage) is followed by the next
    one at once, so notifying a big fleet is not paced by the interval; not when
    nothing got out (a broker down): that would spin.
    """

    def drive() -> None:
        report = driver.tick()
        if report.saturated and report.published > 0:
            worker.wake()

    worker = Worker("edgefleet-driver", drive, interval)
    return worker


def timestamp_worker(timestamper: FleetTimestamper) -> Worker:
    """The fleet timestamp's loop, ticked well within the lease so that the
    replica that publishes keeps its lease."""
    lease_refresh = max(0.5, timestamper.settings.lease_ttl.total_seconds() / 3)
    return Worker("edgefleet-fleet-timestamp", timestamper.tick, lease_refresh)


def retention_worker(
    db: Database, settings: ServerSettings, interval: float = MAINTENANCE_INTERVAL_S
) -> Worker:
    """Retention every `interval` seconds: old telemetry deleted, silent devices offline."""
    return Worker("edgefleet-retention", functools.partial(run_retention, db, settings), interval)


def drift_worker(evaluator: DriftEvaluator) -> Worker:
    """The drift evaluator's loop: a tick every `drift_interval_s`; only the replica
    holding its lease judges (the lease outlives two intervals, so it keeps it)."""
    return Worker("edgefleet-drift", evaluator.tick, evaluator.settings.drift_interval_s)


def webhook_worker(deliverer: WebhookDeliverer) -> Worker:
    """Webhook delivery every `webhook_interval_s`; a tick that left deliveries due is
    followed by the next one at once."""

    def deliver() -> None:
        if deliverer.tick().saturated:
            worker.wake()

    worker = Worker("edgefleet-webhooks", deliver, deliverer.settings.webhook_interval_s)
    return worker


class FleetServer:
    """The parts of one replica; `start()`, then serve the API, then `close()`."""

    def __init__(self, settings: ServerSettings) -> None:
        """Load keys and trust root, open and migrate the database, reconcile the stored
        trust roots with the file.

        Raises:
            TrustRootError, KeyFileError, UsageError: bad trust root, server key or fleet CA;
                a file that does not chain with the stored roots; a server key the newest
                one does not list (ServerKeyNotListedError).
            StorageError: the database cannot be opened or migrated.
        """
        self.settings = settings
        file_root = load_trust_root(settings.trust_path)
        self.server_key = load_private_key(settings.server_key_path, settings.server_key_passphrase)
        self.ca = load_ca(settings.ca_dir) if settings.ca_dir is not None else None
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db: Database = open_database(settings.database_url)
        try:
            self.trust = open_trust_roots(
                self.db,
                file_root,
                self.server_key.public.keyid,
                source=f"--trust {settings.trust_path}",
            )
        except BaseException:
            self.db.dispose()
            raise
        self.crl: CrlFile | None = None
        if self.ca is not None and settings.crl_path is not None:
            self.crl = CrlFile(self.db, self.ca, settings.crl_path, settings.broker_reload_command)
        self.deliverer: WebhookDeliverer | None = None
        if settings.webhook_url is not None:
            record_alert_events(self.db, settings.base_url)
            self.deliverer = WebhookDeliverer(self.db, settings)
        self.bundles = BundleStore(settings.data_dir, self.trust.current)
        self.broker: EmbeddedBroker | None = None
        if settings.embedded_broker:
            self.broker = EmbeddedBroker(settings.mqtt_port, host=settings.mqtt_host)
        self.device_keys = DeviceKeyCache(self.db)
        self.ingest: Ingestor | None = None
        self.link: ServerLink | None = None
        self.workers: list[Worker] = []  # the background loops, in start order
        self._name_worker: Worker | None = None  # renews the replica's name once claimed
        self._timestamp_again: Callable[[], None] | None = None  # once the loops run

    def start(self) -> ServerContext:
        """Start the broker, the MQTT link and the background loops; return the API's context.

        Raises:
            BrokerError: the embedded broker cannot start.
            UsageError: the broker cannot be reached in time, or the CRL file cannot be written.
        """
        settings = self.settings
        removed = self.bundles.remove_stale_uploads()
        if removed:
            log.info("removed %d upload(s) left by an earlier run", removed)
        with self.db.session() as session:
            self.bundles.check_files(session)
        if self.crl is not None:
            try:
                self.crl.refresh()
            except OSError as exc:
                raise UsageError(
                    f"cannot write the revocation list {self.crl.path}: {exc.strerror or exc}; "
                    "pass --crl a file in a writable directory"
                ) from exc
        if self.broker is not None:
            self.broker.start()
            log.info("embedded MQTT broker listening on %s", self.broker.url)
        broker_url = self.broker.url if self.broker is not None else settings.broker_url
        claim_replica_name(self.db, settings)
        self._name_worker = name_worker(self.db, settings)
        self._name_worker.start()
        self.link = ServerLink(
            broker_url,
            f"edgefleet-server-{settings.replica_name}",
            None if self.broker is not None else settings.share_group,  # docs/server.md
            self._handle_message,
            when_stored=self._when_stored,
            retained=self.trust.retained_messages,
            on_connect=self._link_connected,
            session_expiry_s=int(settings.mqtt_session_expiry.total_seconds()),
            tls=TlsFiles(settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file),
        )
        issuer = DirectiveIssuer([self.server_key], settings)
        context = ServerContext(
            settings=settings,
            db=self.db,
            trust=self.trust,
            bundles=self.bundles,
            publisher=self.link,
            issuer=issuer,
            device_keys=self.device_keys,
            ca=self.ca,
            crl=self.crl,
            link=self.link,
            broker=self.broker,
        )
        blocks = BlockService(self.bundles, self.db, context.publisher)
        returns = Returns()
        self.ingest = Ingestor(
            self.db, self.device_keys, settings, blocks=blocks.handle, on_return=returns.add
        )
        context.ingest = self.ingest
        self.ingest.start()
        self.link.start()
        where = self.link.address.where  # the URL may carry a password
        if not self.link.wait_connected(BROKER_CONNECT_TIMEOUT_S):
            self.close()
            raise UsageError(
                f"cannot reach the MQTT broker at {where} within "
                f"{BROKER_CONNECT_TIMEOUT_S:.0f} s: start mosquitto, pass --mqtt URL, "
                "or run with --embedded-broker"
            )
        log.info(
            "connected to the MQTT broker at %s as replica %s (%s)",
            where,
            settings.replica_name,
            settings.replica_id,
        )
        link = self.link
        driver = RolloutDriver(
            self.db,
            issuer,
            context.publisher,
            settings,
            returns=returns,
            connects=lambda: link.connects,
            stage_telemetry=context.stage_telemetry,
        )
        timestamper = FleetTimestamper(
            self.db, [self.server_key], self.trust.current.version, context.publisher, settings
        )
        self.trust.add_listener(functools.partial(_name_in_timestamps, timestamper))
        timestamps = timestamp_worker(timestamper)
        self._timestamp_again = functools.partial(_publish_timestamp_again, timestamper, timestamps)
        self.workers = [
            driver_worker(driver, settings.driver_interval_s),
            timestamps,
            Worker(
                "edgefleet-trust-roots",
                self.trust.refresh,
                settings.fleet_timestamp_period.total_seconds(),
            ),
            retention_worker(self.db, settings),
            drift_worker(DriftEvaluator(self.db, settings)),
        ]
        if self.deliverer is not None:
            self.workers.append(webhook_worker(self.deliverer))
        for worker in self.workers:
            worker.start()
        return context

    def _link_connected(self) -> None:
        """The link (re)connected: a restarted broker forgot the retained fleet timestamp."""
        if self._timestamp_again is not None:
            self._timestamp_again()

    def _handle_message(self, topic: str, payload: bytes) -> None:
        assert self.ingest is not None  # set before the link starts
        self.ingest.handle(topic, payload)

    def _when_stored(self, callback: Callable[[], None]) -> None:
        assert self.ingest is not None  # set before the link starts
        self.ingest.when_stored(callback)

    def close(self) -> None:
        """Stop everything in reverse order; the ingestion's last batch is written. Idempotent."""
        for worker in reversed(self.workers):
            worker.stop(WORKER_STOP_TIMEOUT_S)
        if self.link is not None:
            self.link.stop()
        if self._name_worker is not None:
            self._name_worker.stop(WORKER_STOP_TIMEOUT_S)
            self._name_worker = None
            try:
                release_replica_name(self.db, self.settings)
            except StorageError as exc:  # the claim then expires by itself
                log.warning("replica name not released: %s", exc)
        if self.ingest is not None:
            self.ingest.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.deliverer is not None:
            self.deliverer.close()
        self.db.dispose()


def _publish_timestamp_again(timestamper: FleetTimestamper, worker: Worker) -> None:
    timestamper.publish_again()
    worker.wake()


def _name_in_timestamps(timestamper: FleetTimestamper, root: TrustRoot) -> None:
    timestamper.trust_version = root.version


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound (not yet listening) at `host`:`port`.

    Bound as uvicorn would bind it, but before anything else of the server starts.

    Raises:
        UsageError: the port is taken, or the address cannot be bound (the message
            names the option to change).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"--port {port}: {host}:{port} is already in use (another server?): "
                "stop what listens there, or pass another --port"
            ) from None
        reason = exc.strerror or str(exc)
        raise UsageError(f"--host {host} --port {port}: cannot listen there: {reason}") from None
    return sock


def run_server(settings: ServerSettings) -> None:
    """Run one replica until SIGINT or SIGTERM.

    Raises:
        UsageError: the HTTP port is taken; nothing else was started.
        Everything `FleetServer` and `FleetServer.start` raise, before the API serves.
    """
    sock = bind_http_socket(settings.host, settings.port)
    try:
        # With --port 0 the system chose the port: directives and logs name that one.
        settings = dataclasses.replace(settings, port=sock.getsockname()[1])
        _run_bound(settings, sock)
    finally:
        sock.close()


class FreshFiles:
    """What a start is about to create in the data directory: the directory itself, the
    SQLite database and its companions, the bundle directories. A start refused before
    it serves removes those of them it created (and only those), so that it leaves
    nothing behind: `server token create` must not find a database no server ran."""

    def __init__(self, settings: ServerSettings) -> None:
        data = settings.data_dir
        files = []
        if settings.db_url is None:
            database = data / "server.db"
            files = [database.with_name(database.name + s) for s in ("", "-wal", "-shm")]
            files.append(database.with_name(database.name + "-journal"))
        self.files = [path for path in files if not path.exists()]
        # Directories, deepest first, removed only when empty.
        dirs = [data / "uploads", data / "bundles", data]
        self.dirs = [path for path in dirs if not path.exists()]

    def remove(self) -> None:
        for path in self.files:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s after the refused start: %s", path, exc)
        for path in self.dirs:
            # Not empty (something else put a file there), or gone: left as it is.
            with contextlib.suppress(OSError):
                path.rmdir()


def _run_bound(settings: ServerSettings, sock: socket.socket) -> None:
    fresh = FreshFiles(settings)
    try:
        server = FleetServer(settings)
    except BaseException:
        fresh.remove()
        raise
    serving = False
    try:
        context = server.start()
        app = create_app(context)
        # What start-up built lives as long as the process: keep it out of the garbage
        # collector's scans (they showed as the p95 tail of large API answers).
        gc.freeze()
        config = http_config(app, settings)
        log.info(
            "fleet server %s: API on %s://%s:%d/api/v1 (docs at /api/v1/docs), database %s%s",
            settings.replica_id,
            settings.scheme,
            settings.host,
            settings.port,
            _safe_url(server.db),
            ", open enrollment" if settings.open_enrollment else "",
        )
        # uvicorn stops gracefully on SIGINT/SIGTERM and then raises the signal again
        # with the handler it found; this one turns SIGTERM (systemd's stop) into a
        # normal exit so that everything below still stops in order.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        serving = True
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        log.info("stopping")
        server.close()
        if not serving:
            fresh.remove()


def http_config(app: FastAPI, settings: ServerSettings) -> uvicorn.Config:
    """How uvicorn serves the API: address, HTTPS when given a certificate, and which
    proxies may name the client.

    Without `settings.forwarded_allow_ips` no proxy header is read (uvicorn on
    its own would trust X-Forwarded-For from 127.0.0.1, or from what the
    FORWARDED_ALLOW_IPS environment variable says): the client address, which
    rate limiting keys on, is the TCP peer's.
    """
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips or "",
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _safe_url(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=True)
