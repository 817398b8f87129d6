"""The running agent: wires installer, predictor, telemetry, MQTT link and local API.

Startup order matters for crash safety: the installer counts the restart of an
install that a power cut interrupted, and rolls it back when it must, BEFORE the
predictor loads `current`, so a model that crashed the process is rolled back
before it is served again; an install that goes on (a health check, say) then
continues once the predictor and the local API serve, so that it sees live traffic.
The challenger of a shadow install (persisted by the installer) is handed to
the predictor once it is open; a challenger that does not load is logged and
left out, never a reason not to serve. Before all that the local API's port is
bound (unless `[local_api] enabled = false`): a taken port stops the agent at
once with the setting to change, before a restart loop could count as restarts
of an interrupted install. localapi.json records the running agent's pid, and
its API's address (none when the API is off).

Threads: the main loop (telemetry windows, heartbeats, systemd watchdog), one
install worker (an `edgefleet.worker.Worker`: directives from the inbox, one at
a time; a failure it does not expect is logged and the directive tried again
later), the MQTT link's network thread, the local API's request threads, and,
while a device with a `server_url` is not yet enrolled, the enroller
(`edgefleet.agent.enroll`), which retries in the background so that serving
never waits for the server, and the certificate worker
(`edgefleet.agent.tlsidentity`), which renews the device's client certificate
for the broker before it expires. With mqtts:// and no configured client
certificate, the link starts only once the device has its enrolled one.
The device key is made at start when a server is configured, so the link
signs every message from the first one; the server accepts them once the
enrollment of that key went through.

Fleet timestamps and trust roots arrive in the link's thread and are handed to
the install worker (in memory: both are retained, so the broker sends them
again at the next connect), which alone writes state.json: newer trust roots
first, N+1 after N, then the newest timestamp, then the directives. The
server's announcement of the fields it accepts is verified in the link's thread
(it changes only what the link leaves out of what it sends, and nothing is
written) and handed to the link (`edgefleet.mqtt.fieldsets`).

A directive is persisted to inbox/ in the link's thread before it is
acknowledged, so a crash between the broker's delivery and the install loses
nothing. A diagnostics directive goes the same way (its sequence is the
device's directive sequence): the install worker answers it with the log
lines a `LogRing` on the root logger kept in memory and `full_status()`
(`edgefleet.agent.diagnostics`).
A benchmark directive too; the install worker hands it to the benchmark
worker, which measures the request's candidates in bounded child processes
and sends the results (`edgefleet.agent.benchmark`).

The main loop pets the systemd watchdog only while the install worker and the
link live: if either has ended, systemd restarts the agent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgefleet.agent.benchmark import BenchmarkRunner
from edgefleet.agent.diagnostics import LogRing, diagnostics_answer, redact, system_figures
from edgefleet.agent.enroll import (
    AutoEnroller,
    ensure_device_key,
    is_enrolled,
    load_device_key,
    load_enroll_failure,
    load_enrollment,
)
from edgefleet.agent.errors import InstallInProgressError
from edgefleet.agent.heartbeat import (
    AgentReport,
    HeartbeatSource,
    breaker_reports,
    directive_answer,
    link_report,
)
from edgefleet.agent.inference import Predictor
from edgefleet.agent.inference.info import ModelInfo
from edgefleet.agent.install import Installer
from edgefleet.agent.install.engine import describe
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.link import AgentLink
from edgefleet.agent.localapi import LocalApi, issue_token, listen, listen_unix
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.reservoir import DeviceDrift
from edgefleet.agent.sdnotify import notify, watchdog_interval_seconds
from edgefleet.agent.statelock import StateLock, acquire
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agent.tlsidentity import (
    CertificateRenewer,
    link_settings,
    server_ssl_context,
    waits_for_certificate,
)
from edgefleet.agent.transport.blocks import MqttBlockFetcher
from edgefleet.agent.transport.http import HttpFetcher
from edgefleet.agent.transport.sources import SourcesFetcher
from edgefleet.agent.upload import UPLOAD_POLL_SECONDS, SampleUploader
from edgefleet.agent.versions import InstalledVersion
from edgefleet.agentconfig import AgentConfig
from edgefleet.errors import EdgefleetError, KeyFileError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.mqtt.directives import Directive, verify_fleet_accepts
from edgefleet.mqtt.messages import MAX_PROBLEM_CHARS, StatusReport
from edgefleet.mqtt.topics import TopicKind
from edgefleet.profiles import load_profile
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot, load_trust_root
from edgefleet.worker import Worker

log = logging.getLogger(__name__)
TICK_SECONDS = 0.5
INBOX_POLL_SECONDS = 2.0  # the install worker looks at inbox/ this often unless woken
MAX_PENDING_TRUST_ROOTS = 16  # newer trust roots kept until the one before them is taken
BENCHMARK_POLL_SECONDS = 60.0  # the benchmark worker's step, unless woken by a request
RENEWAL_POLL_SECONDS = 60.0  # the certificate worker's step (it checks hourly, backs off)


def load_agent_trust(config: AgentConfig, layout: StateLayout) -> TrustRoot:
    """The trust root a state.json without one trusts: state/trust/root.json, which older
    agents copied from the flashed file, else the flashed file. The installer writes it into
    state.json with its next state, and from then on state.json holds the device's root."""
    layout.create()
    return load_trust_root(layout.trust_root if layout.trust_root.exists() else config.trust_root)


def _digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


class _Reporter:
    """Status reports go to the MQTT outbox; on a device without a broker, to the log.

    A report says whether the device may be frozen out (`frozen_reason()`), as heartbeats do.
    """

    def __init__(self, link: AgentLink | None, frozen_reason: Callable[[], str | None]) -> None:
        self.link = link
        self._frozen_reason = frozen_reason
        # While the agent starts, the installer sends its last report again (it may not
        # have gone out): that is no news for the log.
        self.resending = False

    def report(self, status: StatusReport) -> None:
        reason = f": {status.reason}" if status.reason else ""
        if self.resending:
            log.debug(
                "install %s%s (reported again after the restart)", status.install_state, reason
            )
        else:
            log.info("install %s%s", status.install_state, reason)
        frozen = self._frozen_reason()
        if frozen is not None:
            status = status.model_copy(update={"frozen_reason": frozen[:MAX_PROBLEM_CHARS]})
        if self.link is not None:
            self.link.publish(TopicKind.STATUS, status)


def status_dict(installer: Installer) -> dict[str, Any]:
    status = installer.status()
    return {
        "state": status.state.value,
        "current": status.current,
        "previous": status.previous,
        "reason": status.reason,
        "refused": status.refused,
        "last_directive_sequence": status.last_directive_sequence,
        "security_floors": status.security_floors,
        "challenger": status.challenger,
        "trust_root_version": status.trust_root.version,
        "trust_root_expires": status.trust_root.signed.expires,
    }


class Agent:
    def __init__(self, config: AgentConfig, state_lock: StateLock | None = None) -> None:
        """`state_lock`: the state directory's lock, when the caller took it before
        building the agent (`agent run` does); else `run` takes it first."""
        self.config = config
        self.layout = StateLayout(config.state_dir)
        self.state_lock = state_lock
        self.profile = load_profile(config.profile)
        self.stopping = threading.Event()
        # Fleet timestamps and trust roots arrive on the link's thread; the install worker
        # verifies and persists them (it alone writes state.json), newer roots first.
        self._trust_lock = threading.Lock()
        self._fleet_payload = b""  # the last fleet timestamp received
        self._accepts_payload = b""  # the last announcement of accepted fields taken
        self._accepts_sequence = 0
        self._pending_timestamp: bytes | None = None
        self._pending_roots: dict[int, bytes] = {}  # version -> document, not yet next
        self._refused_roots: deque[bytes] = deque(maxlen=MAX_PENDING_TRUST_ROOTS)  # digests
        self._fleet_expires: dt.datetime | None = None
        self._frozen_reason: str | None = None  # set while the newest fleet timestamp expired
        self.device_key = self._load_device_key()
        self.enroller: AutoEnroller | None = None
        self.link: AgentLink | None = None
        # mqtts:// without a configured client certificate: the link starts once
        # enrollment (or a renewal request) brought the device its own.
        self._link_waits = waits_for_certificate(config, self.layout)
        self._link_lock = threading.Lock()  # the enroller and the renewal worker both call
        if config.mqtt.url:
            outbox = Outbox(self.layout.outbox, config.telemetry.outbox_max_bytes)
            self.link = AgentLink(
                config.device_id,
                link_settings(config, self.layout),
                outbox,
                on_directive=self._receive_directive,
                on_fleet_timestamp=self._receive_fleet_timestamp,
                on_fleet_accepts=self._receive_fleet_accepts,
                on_trust_root=self._receive_trust_root,
                device_key=self.device_key,
            )
        fetcher = SourcesFetcher(
            http=HttpFetcher(ssl_context=server_ssl_context(config, system_cas=True)),
            blocks=MqttBlockFetcher(self.link) if self.link is not None else None,
        )
        self.drift = DeviceDrift(config.drift, self.layout.samples)
        self.telemetry = TelemetryRecorder(
            config.device_id, None, config.telemetry.window_seconds, drift=self.drift
        )
        self.predictor: Predictor | None = None
        self.reporter = _Reporter(self.link, lambda: self._frozen_reason)
        self.stop_reason: str | None = None  # why `stopping` was set, for the log
        self.log_ring = LogRing()  # installed on the root logger while `run` runs
        self.installer = Installer(
            config,
            self.layout,
            load_agent_trust(config, self.layout),
            fetcher,
            self.reporter,
            probe=self.telemetry,
            on_activated=self._reload,
            on_shadow=self._set_challenger,
            on_diagnostics=self._answer_diagnostics,
            on_benchmark=self._take_benchmark,
        )
        self._trust_version = self.installer.trust.version
        self.heartbeats = HeartbeatSource(config.device_id, self.layout.root)
        self.install_worker = Worker("edgefleet-install", self._install_inbox, INBOX_POLL_SECONDS)
        self.upload_worker = self._sample_upload_worker()
        self.renewal_worker = self._certificate_renewal_worker()
        self.benchmarks = self._benchmark_runner()
        self.benchmark_worker: Worker | None = None
        if self.benchmarks is not None:
            self.benchmark_worker = Worker(
                "edgefleet-benchmark", self.benchmarks.step, BENCHMARK_POLL_SECONDS
            )
            self.benchmarks.wake = self.benchmark_worker.wake
        self._watchdog_withheld = False

    def _load_device_key(self) -> DeviceKey | None:
        """The key that signs this device's messages; made now when a server is configured.

        A broken key file is logged, not fatal: the device serves on, unsigned.
        """
        try:
            if self.config.server_url:
                return ensure_device_key(self.layout)
            return load_device_key(self.layout)
        except (KeyFileError, OSError) as exc:
            log.error(
                "device key: %s: messages go out unsigned and the device does not enroll", exc
            )
            return None

    def _sample_upload_worker(self) -> Worker | None:
        """The worker that uploads kept raw inputs: only with `[drift] upload_inputs = true`."""
        key, server_url = self.device_key, self.config.server_url
        if not self.config.drift.upload_inputs or key is None or server_url is None:
            return None
        uploader = SampleUploader(
            server_url,
            self.config.device_id,
            key,
            self.layout.samples,
            current_file=lambda: self.drift.current_file,
            is_enrolled=lambda: is_enrolled(self.config, self.layout, key),
            ssl_context=server_ssl_context(self.config),
        )
        return Worker("edgefleet-sample-upload", uploader.step, UPLOAD_POLL_SECONDS)

    def _benchmark_runner(self) -> BenchmarkRunner | None:
        """What measures benchmark requests: it needs a server_url and a device key."""
        key, server_url = self.device_key, self.config.server_url
        if key is None or server_url is None:
            return None
        return BenchmarkRunner(
            self.config.device_id,
            self.config.profile,
            max(1, min(self.profile.threads, os.cpu_count() or 1)),
            self.layout.root / "benchmarks",
            server_url,
            key,
            lambda: self.installer.trust,
            server_ssl_context(self.config),
        )

    def _take_benchmark(self, directive: Directive) -> None:
        """The installer's `on_benchmark`: queue it for the benchmark worker."""
        if self.benchmarks is None:
            log.warning(
                "benchmark request %d ignored: measuring needs a server_url and a device key",
                directive.request_id,
            )
            return
        self.benchmarks.submit(directive)

    def _certificate_renewal_worker(self) -> Worker | None:
        """The worker that renews the enrolled client certificate (or asks for the one an
        enrolled device lacks while its link waits): with a server and a device key."""
        key, server_url = self.device_key, self.config.server_url
        if key is None or server_url is None:
            return None
        renewer = CertificateRenewer(
            self.config,
            self.layout,
            server_url,
            key,
            on_renewed=self._certificate_arrived,
            wanted=lambda: self._link_waits and is_enrolled(self.config, self.layout, key),
        )
        return Worker("edgefleet-certificate", renewer.step, RENEWAL_POLL_SECONDS)

    def _certificate_arrived(self) -> None:
        """A certificate was stored: a waiting link loads it and starts; a running link
        presents it from its next connect."""
        link = self.link
        if link is None or self.config.mqtt.cert_file is not None:
            return
        settings = link_settings(self.config, self.layout)
        if settings.cert_file is None:
            return  # the server has no CA: still nothing to connect with
        with self._link_lock:
            link.load_tls_files(settings)
            if self._link_waits and not self.stopping.is_set():
                self._link_waits = False
                log.info("this device has its certificate: connecting to the broker")
                link.start()

    def _start_link(self) -> None:
        if self.link is None:
            return
        if self._link_waits:
            log.warning(
                "the broker needs this device's certificate (mqtts://, no [mqtt] cert_file): "
                "the MQTT link waits until enrollment brings it"
            )
            return
        self.link.start()

    def _start_enrollment(self) -> None:
        """Enroll in the background when a server is configured and this key is not enrolled."""
        if self.config.legacy_enroll_token is not None:
            log.warning(
                "agent.toml holds enroll_token (written by an older agent); it is used until "
                "the device enrolls: remove that line, the token belongs in no configuration file"
            )
        key = self.device_key
        if not self.config.server_url or key is None:
            return
        if is_enrolled(self.config, self.layout, key):
            return
        self.enroller = AutoEnroller(
            self.config,
            self.layout,
            self.stopping,
            on_enrolled=lambda _enrollment: self._certificate_arrived(),
        )
        self.enroller.start()

    def _reload(self, _version: object) -> None:
        if self.predictor is not None:
            self.predictor.reload()

    def _set_challenger(self, version: InstalledVersion | None) -> None:
        """The installer's `on_shadow`; before the predictor opens, `run` asks instead.

        Raises: InferenceError when the challenger does not load (the shadow install fails).
        """
        if self.predictor is not None:
            self.predictor.set_challenger(version.directory if version else None)

    def _start_challenger(self) -> None:
        """Hand the predictor the persisted challenger; a broken one is logged, not fatal."""
        assert self.predictor is not None
        try:
            challenger = self.installer.challenger()
            if challenger is not None:
                self.predictor.set_challenger(challenger.directory)
        except EdgefleetError as exc:
            log.warning("the challenger does not run in shadow: %s", describe(exc))

    # --- MQTT callbacks (the link's network thread) -----------------------------------------

    def _receive_directive(self, payload: bytes) -> None:
        # Persist before the PUBACK (sent when this returns); the worker installs.
        name = f"{time.time_ns():020d}.directive"
        atomic_write_bytes(self.layout.inbox / name, payload)
        self.install_worker.wake()

    def _receive_fleet_timestamp(self, payload: bytes) -> None:
        with self._trust_lock:
            if payload == self._fleet_payload:
                return  # the retained timestamp, redelivered on every reconnect
            self._fleet_payload = self._pending_timestamp = payload
        self.install_worker.wake()

    def _receive_fleet_accepts(self, payload: bytes) -> None:
        """Narrow what the link sends to the fields the server announced it accepts.

        Raises what `verify_fleet_accepts` raises (the link counts and logs it).
        """
        link = self.link
        if link is None or not payload or payload == self._accepts_payload:
            return  # cleared, or the retained announcement redelivered on a reconnect
        accepts = verify_fleet_accepts(
            payload, self.installer.trust, last_sequence=self._accepts_sequence
        )
        first = not self._accepts_sequence
        self._accepts_payload, self._accepts_sequence = payload, accepts.sequence
        link.narrowing.accept(accepts.messages)
        (log.info if first else log.debug)(
            "the server announced the fields it accepts (announcement %d)", accepts.sequence
        )

    def _receive_trust_root(self, version: int, payload: bytes) -> None:
        """Keep a newer trust root until the worker can take it (at most
        MAX_PENDING_TRUST_ROOTS wait; the lowest versions are kept, the next one first)."""
        if not payload:
            return  # a retained topic being cleared
        with self._trust_lock:
            if version <= self._trust_version or _digest(payload) in self._refused_roots:
                return
            pending = self._pending_roots
            if version not in pending and len(pending) >= MAX_PENDING_TRUST_ROOTS:
                highest = max(pending)
                if version > highest:
                    return  # comes again, retained, at the next connect
                del pending[highest]
            pending[version] = payload
        self.install_worker.wake()

    # --- install worker ---------------------------------------------------------------------

    def _apply_trust_messages(self) -> None:
        """Take the pending trust roots N+1, N+2, ... in order, then the newest fleet timestamp.

        A refused root is logged once and dropped (retained, it comes again at each
        connect and is ignored); the versions after it wait. When another installer
        holds the state directory, what is pending waits for the next step.
        """
        while (next_root := self._next_pending_root()) is not None:
            version, payload = next_root
            try:
                root = self.installer.accept_trust_root(payload)
            except InstallInProgressError:
                return
            except EdgefleetError as exc:
                log.warning("trust root version %d refused: %s", version, describe(exc))
                with self._trust_lock:
                    self._refused_roots.append(_digest(payload))
                    self._pending_roots.pop(version, None)
                break
            with self._trust_lock:
                self._trust_version = root.version
            log.info(
                "trust root version %d accepted (expires %s)", root.version, root.signed.expires
            )
        self._apply_fleet_timestamp()

    def _next_pending_root(self) -> tuple[int, bytes] | None:
        with self._trust_lock:
            for stale in [v for v in self._pending_roots if v <= self._trust_version]:
                del self._pending_roots[stale]
            version = self._trust_version + 1
            payload = self._pending_roots.get(version)
        return None if payload is None else (version, payload)

    def _apply_fleet_timestamp(self) -> None:
        with self._trust_lock:
            payload, self._pending_timestamp = self._pending_timestamp, None
        if payload is None:
            return
        try:
            stamp = self.installer.accept_fleet_timestamp(payload)
        except InstallInProgressError:
            with self._trust_lock:
                self._pending_timestamp = self._pending_timestamp or payload
            return
        except EdgefleetError as exc:
            log.warning("fleet timestamp refused: %s", describe(exc))
            return
        self._fleet_expires = stamp.expires_at
        self._frozen_reason = None

    def _install_inbox(self) -> None:
        """The install worker's step: trust messages first (`_apply_trust_messages`), then
        install the directives in inbox/, oldest first.

        A refused or failed directive is logged and removed. Anything else (an
        OSError: a full disk, a broken outbox) leaves it in inbox/ and reaches the
        worker, which logs it and tries again one interval later.
        """
        self._apply_trust_messages()
        for path in sorted(self.layout.inbox.glob("*.directive")):
            if self.stopping.is_set():
                return
            try:
                self.installer.install_directive(path.read_bytes())
            except EdgefleetError as exc:
                log.warning("directive %s: %s", path.name, describe(exc))
            path.unlink(missing_ok=True)

    def _answer_diagnostics(self, directive: Directive) -> None:
        """The installer's `on_diagnostics`: send the recent log lines and the full status."""
        if self.link is None:  # directives arrive over the link: never without one
            return
        answer = diagnostics_answer(directive, self.log_ring.lines(), self.full_status())
        self.link.publish(TopicKind.DIAGNOSTICS, answer)
        log.info("diagnostics request %d answered", directive.request_id)

    def full_status(self) -> dict[str, Any]:
        """What `agent status --json` shows, and what only the running agent knows: link
        counters, trust root version, frozen out, the system's figures. No key, no token."""
        info = self.predictor.model_info() if self.predictor else None
        enrollment = load_enrollment(self.layout)
        link = self.link
        return {
            **status_dict(self.installer),
            "device_id": self.config.device_id,
            "profile": self.config.profile,
            "running": True,
            "enrolled_with": redact(enrollment.server_url) if enrollment else None,
            "enrollment_error": None
            if enrollment is not None or (failure := load_enroll_failure(self.layout)) is None
            else redact(failure["reason"]),
            "model": info.as_dict() if info else None,
            "drift": self.drift.status.describe(),
            "link": None
            if link is None
            else {**asdict(link.counters()), "outbox_depth": len(link.outbox)},
            "frozen_reason": self._frozen_reason,
            "system": system_figures(self.layout.root),
        }

    def _describe_link(self) -> str:
        link = self.link
        return "none: this device runs offline" if link is None else link.describe()

    def install_upload(self, path: Path) -> dict[str, Any]:
        """Install a bundle the local API received into downloads/ (`LocalApi`)."""
        self.installer.install_upload(path)
        return status_dict(self.installer)

    def rollback(self) -> dict[str, Any]:
        self.installer.rollback()
        return status_dict(self.installer)

    # --- main loop --------------------------------------------------------------------------

    def _beat(self) -> None:
        info = self.predictor.model_info() if self.predictor else None
        current = info.current if info else None
        status = self.installer.status()
        beat = self.heartbeats.beat(
            status.state.value,
            current.name if current else None,
            current.version if current else None,
            status.security_floors,
            self.report(info),
        )
        if self.link is not None:
            self.link.publish(TopicKind.HEARTBEAT, beat)

    def report(self, info: ModelInfo | None) -> AgentReport:
        """What the next heartbeat says of the agent itself (`info`: the served model's)."""
        link = self.link
        status = self.installer.status()
        return AgentReport(
            link=None if link is None else link_report(link.counters(), len(link.outbox)),
            breakers=breaker_reports(info) if info else None,
            trust_root_version=self._trust_version,
            frozen_reason=self._frozen_reason,
            answered=directive_answer(status.state, status.install),
        )

    def _check_frozen_out(self) -> None:
        # The server publishes a fresh signed timestamp on a schedule; when the newest
        # one has expired, someone between server and device is withholding updates.
        if self._fleet_expires is not None and utcnow() >= self._fleet_expires:
            self._frozen_reason = (
                f"the newest fleet timestamp expired at {format_time(self._fleet_expires)} "
                "and no newer one arrived: updates may be withheld between the fleet server "
                "and this device"
            )
            log.warning("frozen out? %s", self._frozen_reason)
            self._fleet_expires = None  # warn once per expired timestamp

    def _flush_telemetry(self) -> None:
        while self.telemetry.is_due():
            window = self.telemetry.close_window()
            if window is None:
                return
            if self.link is not None:
                self.link.publish(TopicKind.TELEMETRY, window)

    def _workers_alive(self) -> bool:
        """Whether the install worker and the MQTT link still run.

        The systemd watchdog is petted only while they do: an agent that serves
        but installs no directive any more is restarted by systemd. The first
        time one is found dead, that is logged.
        """
        dead = [
            name
            for name, alive in (
                ("install worker", self.install_worker.alive),
                ("MQTT link", self.link is None or self._link_waits or self.link.alive),
            )
            if not alive
        ]
        if dead and not self._watchdog_withheld:
            self._watchdog_withheld = True
            log.critical(
                "the %s ended, so directives are no longer installed: the systemd watchdog "
                "is no longer petted, and systemd (when it runs the agent) restarts the agent",
                " and the ".join(dead),
            )
        return not dead

    def _start_local_api(
        self, listeners: tuple[socket.socket, socket.socket] | None
    ) -> LocalApi | None:
        """Serve the local API on `listeners` (TCP, Unix socket; None: it is off) with a
        fresh token in api-token (mode 0600), and record this process in localapi.json,
        so that the CLI on this device finds the agent (or knows it runs without its API)."""
        assert self.predictor is not None
        api: LocalApi | None = None
        address: dict[str, Any] = {"host": None, "port": None}
        if listeners is not None:
            token = issue_token(self.layout.local_api_token)
            api = LocalApi(
                self.predictor,
                self.config.local_api.host,
                self.config.local_api.port,
                install=self.install_upload,
                rollback=self.rollback,
                install_state=lambda: self.installer.status().state.value,
                token=token,
                uploads=self.layout.downloads,
                max_bundle_bytes=self.config.limits.max_bundle_bytes,
                drift=lambda: self.drift.status.describe(),
                link=self._describe_link,
                listener=listeners[0],
                unix_listener=listeners[1],
            )
            api.start()
            address["host"], address["port"] = api.address
            log.info("agent %s serving on %s:%d", self.config.device_id, *api.address)
        else:
            log.info("agent %s running without its local API", self.config.device_id)
        atomic_write_bytes(
            self.layout.local_api_file, json.dumps({**address, "pid": os.getpid()}).encode()
        )
        return api

    def stop(self, reason: str) -> None:
        """Ask `run` to stop; `reason` ("SIGTERM", ...) is logged with "stopping"."""
        self.stop_reason = self.stop_reason or reason
        self.stopping.set()

    def _remove_runtime_files(self, with_api: bool) -> None:
        """Remove what this agent wrote for the CLI: localapi.json when it records this
        process, api.sock and api-token when this agent's API made them."""
        try:
            recorded = json.loads(self.layout.local_api_file.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == os.getpid():
            self.layout.local_api_file.unlink(missing_ok=True)
        if with_api:
            self.layout.local_api_socket.unlink(missing_ok=True)
            self.layout.local_api_token.unlink(missing_ok=True)

    def run(self) -> None:
        """Serve until `stopping` is set (SIGTERM, SIGINT, or a caller).

        Raises:
            AgentRunningError: another agent runs on this state directory (its lock,
                `edgefleet.agent.statelock`, is taken before anything else).
            ConfigError: the local API's port cannot be listened on; checked before
                anything else, so that a restart loop over a taken port does not count
                as restarts of an interrupted install.
        """
        if self.state_lock is None:
            self.state_lock = acquire(self.layout)
        try:
            self._run()
        finally:
            self.state_lock.release()
            self.state_lock = None

    def _run(self) -> None:
        settings = self.config.local_api
        listeners = (
            (listen(settings.host, settings.port), listen_unix(self.layout.local_api_socket))
            if settings.enabled
            else None
        )
        logging.getLogger().addHandler(self.log_ring)
        # A restart is counted, and a model that crashed the process rolled back, before
        # the predictor loads `current`; an install that goes on continues once the agent
        # serves, so that its health check judges the model on live traffic.
        self.reporter.resending = True
        try:
            interrupted = self.installer.prepare_resume()
        finally:
            self.reporter.resending = False
        self.predictor = Predictor.open(
            self.layout, self.config.inference, self.profile, self.telemetry
        )
        self._start_challenger()
        api = self._start_local_api(listeners)
        if interrupted is not None:
            log.info("resuming an install interrupted at %s", interrupted.value)
            self.installer.finish_resume()
        self._start_link()
        self._start_enrollment()
        self.install_worker.start()
        if self.upload_worker is not None:
            self.upload_worker.start()
        if self.renewal_worker is not None:
            self.renewal_worker.start()
        if self.benchmark_worker is not None:
            self.benchmark_worker.start()
        notify("READY=1")
        watchdog = watchdog_interval_seconds()
        next_beat = next_pet = 0.0
        try:
            while not self.stopping.wait(TICK_SECONDS):
                now = time.monotonic()
                self._flush_telemetry()
                self._check_frozen_out()
                if now >= next_beat:
                    self._beat()
                    next_beat = now + self.config.telemetry.heartbeat_seconds
                alive = self._workers_alive()
                if watchdog is not None and alive and now >= next_pet:
                    notify("WATCHDOG=1")
                    next_pet = now + watchdog
        finally:
            log.info("stopping (%s)", self.stop_reason or "asked to")
            notify("STOPPING=1")
            if api is not None:
                api.stop()
            self._remove_runtime_files(api is not None)
            self.install_worker.stop(timeout=10)
            if self.upload_worker is not None:
                self.upload_worker.stop(timeout=10)
            if self.renewal_worker is not None:
                self.renewal_worker.stop(timeout=10)
            if self.benchmark_worker is not None:
                self.benchmark_worker.stop(timeout=10)
            if self.link is not None:
                self.link.stop()
            self.predictor.close()
            log.info("stopped")
            logging.getLogger().removeHandler(self.log_ring)
