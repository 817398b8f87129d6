"""Enrollment: the device tells the fleet server who it is and which key speaks for it.

    POST {server_url}/api/v1/devices/enroll      (JSON, no API token)
    {"device_id", "public_key", "profile", "arch", "runtimes", "agent_version",
     "tags", "enroll_token", "csr"}

The device makes its Ed25519 key (`state_dir/device.key`, `DeviceKey`) the
first time it needs one, and never sends it anywhere: the server gets the
public half and from then on accepts from this device id only messages that
key signed (`edgefleet.mqtt.devicesig`). `csr` is the signing request for the
device's TLS key (`edgefleet.agent.tlsidentity`, made here too); the answer's
`certificate` and `ca_certificate`, when the server has a CA, are stored in
`state_dir/tls/` for the broker connection. A device whose TLS key cannot be
made enrolls without a csr (logged). HTTPS trusts `server_ca_file` when set.
An enrollment token, when the server
requires one, is a one-time secret from an operator; it also carries tags the
server gives the device. `agent init` keeps it in `state_dir/enroll-token`
(`edgefleet.agent.enrolltoken`) until it is used. A 200 or 201 answer is
recorded in `state_dir/enrolled.json` (server, device id, public key), so the
agent knows not to enroll again, and the kept token is deleted: once enrolled,
no file of the device holds it. A token sent over plain
http:// to another host is logged as a warning (once per server URL): anyone on
the way could read it and use it first.

Errors are either fatal (`EnrollmentRefusedError`: the server said no, with its
reason; a new token or setting is needed) or transient
(`ServerUnreachableError`: no answer, 5xx, 429), which `AutoEnroller` retries
with jittered exponential backoff on its own thread, so a device whose server is
away keeps serving inference meanwhile.

Standard library only (urllib): a device carries no HTTP client library.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import logging
import platform
import random
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from typing import Any

from edgefleet import __version__
from edgefleet.agent.enrolltoken import forget_enroll_token, read_enroll_token
from edgefleet.agent.errors import (
    ConfigError,
    EnrollmentRefusedError,
    ServerUnreachableError,
)
from edgefleet.agent.install.compat import RUNTIMES
from edgefleet.agent.layout import PRIVATE_FILE, StateLayout
from edgefleet.agent.tlsidentity import (
    TlsIdentityError,
    describe_unreachable,
    ensure_signing_request,
    https_opener,
    server_ssl_context,
    store_certificate,
)
from edgefleet.agentconfig import AgentConfig, check_server_url
from edgefleet.backoff import Backoff
from edgefleet.errors import EdgefleetError, KeyFileError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.timefmt import format_time, utcnow
from edgefleet.wire import API_PREFIX

log = logging.getLogger(__name__)

ENROLL_PATH = f"{API_PREFIX}/devices/enroll"
# The runtimes a profile names, and the modules that provide each.
RUNTIME_MODULES: dict[str, tuple[str, ...]] = dict(RUNTIMES.values())
MAX_ANSWER_BYTES = 1 << 20

_cleartext_warned: set[str] = set()  # server URLs warned about (once per process)
_cleartext_lock = threading.Lock()


@dataclass(frozen=True)
class Enrollment:
    """What `enrolled.json` records of a successful enrollment."""

    server_url: str
    device_id: str
    public_key: str
    enrolled_at: str
    tags: dict[str, str] = field(default_factory=dict)  # as the server answered, when it did

    def matches(self, config: AgentConfig, key: DeviceKey) -> bool:
        """True when this enrollment is of this device, key and server."""
        return (
            self.device_id == config.device_id
            and self.public_key == key.public_hex
            and config.server_url is not None
            and self.server_url == config.server_url.rstrip("/")
        )


def normalize_server_url(url: str) -> str:
    """`url` without a trailing slash.

    Raises:
        ConfigError: not an http:// or https:// URL with a host.
    """
    try:
        return check_server_url(url)
    except ValueError as exc:
        raise ConfigError(f"server URL {exc}") from None


def is_cleartext_to_another_host(url: str) -> bool:
    """True when `url` is plain http:// to a host that is not this machine (a loopback
    address or `localhost`): what is sent there can be read on the way."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name


def _warn_cleartext_token(base: str) -> None:
    with _cleartext_lock:
        if base in _cleartext_warned:
            return
        _cleartext_warned.add(base)
    log.warning(
        "sending the enrollment token to %s over plain http://: anyone on the way can read "
        "it and enroll a device of their own with it before this one does; use an https:// "
        "server_url",
        base,
    )


def load_device_key(layout: StateLayout) -> DeviceKey | None:
    """This device's key, or None when it has none yet.

    Raises:
        KeyFileError: the key file exists but is broken or readable by others.
    """
    if not layout.device_key.exists():
        return None
    return DeviceKey.load(layout.device_key)


def ensure_device_key(layout: StateLayout) -> DeviceKey:
    """This device's key, made and saved (mode 0600) if it has none.

    Raises:
        KeyFileError: the key file exists but is broken or readable by others.
        OSError: the state directory refused the new file.
    """
    key = load_device_key(layout)
    if key is None:
        layout.root.mkdir(parents=True, exist_ok=True)
        key = DeviceKey.generate()
        key.save(layout.device_key)
        log.info("made this device's signing key %s", layout.device_key)
    return key


def load_enrollment(layout: StateLayout) -> Enrollment | None:
    """The recorded enrollment, or None when there is none or it cannot be read."""
    try:
        raw = json.loads(layout.enrollment_file.read_bytes())
        return Enrollment(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring %s: %s", layout.enrollment_file, exc)
        return None


def is_enrolled(config: AgentConfig, layout: StateLayout, key: DeviceKey) -> bool:
    """True when this device enrolled `key` with the configured server."""
    enrollment = load_enrollment(layout)
    return enrollment is not None and enrollment.matches(config, key)


def installed_runtimes() -> list[str]:
    """The inference runtimes importable here, found without importing them."""
    return [
        runtime
        for runtime, modules in RUNTIME_MODULES.items()
        if any(importlib.util.find_spec(module) is not None for module in modules)
    ]


def enroll_request(
    config: AgentConfig,
    key: DeviceKey,
    *,
    token: str | None,
    tags: Mapping[str, str] | None = None,
    csr: bytes | None = None,
) -> dict[str, Any]:
    """The JSON body of the enrollment request."""
    return {
        "device_id": config.device_id,
        "public_key": key.public_hex,
        "profile": config.profile,
        "arch": platform.machine() or "unknown",
        "runtimes": installed_runtimes(),
        "agent_version": __version__,
        "tags": dict(tags or {}),
        "enroll_token": token,
        "csr": None if csr is None else csr.decode("ascii"),
    }


def enroll(
    config: AgentConfig,
    layout: StateLayout,
    *,
    server_url: str | None = None,
    token: str | None = None,
    tags: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Enrollment:
    """Enroll this device (making its key if needed) and record it in enrolled.json.

    `server_url` defaults to the configuration's, `token` to the one `agent init` kept
    (`enroll-token` in the state directory), which is deleted once enrolled.

    Raises:
        ConfigError: no server URL, or not an http(s) URL.
        OSError: the kept token cannot be read, or the state directory refused a write.
        KeyFileError: the device key file is broken.
        EnrollmentRefusedError: the server answered 4xx (its reason in the message).
        ServerUnreachableError: no answer, a 5xx or a 429 (`retry_after` when it said).
    """
    url = server_url or config.server_url
    if not url:
        raise ConfigError("no fleet server: set server_url in agent.toml or pass --server")
    base = normalize_server_url(url)
    key = ensure_device_key(layout)
    if token is None:
        token = read_enroll_token(layout) or config.legacy_enroll_token
    csr = _signing_request(config, layout)
    body = enroll_request(config, key, token=token, tags=tags, csr=csr)
    if body["enroll_token"] is not None and is_cleartext_to_another_host(base):
        _warn_cleartext_token(base)
    status, answer = _post_json(base + ENROLL_PATH, body, timeout, server_ssl_context(config))
    if isinstance(answer, dict):
        try:
            store_certificate(layout, answer)
        except TlsIdentityError as exc:
            log.error("enrolled, but the certificate in the answer is not kept: %s", exc)
    answered_tags = answer.get("tags") if isinstance(answer, dict) else None
    enrollment = Enrollment(
        server_url=base,
        device_id=config.device_id,
        public_key=key.public_hex,
        enrolled_at=format_time(utcnow()),
        tags={str(k): str(v) for k, v in answered_tags.items()}
        if isinstance(answered_tags, dict)
        else {},
    )
    atomic_write_bytes(
        layout.enrollment_file,
        json.dumps(asdict(enrollment), indent=2).encode() + b"\n",
        mode=PRIVATE_FILE,
    )
    forget_enroll_token(layout)
    layout.enroll_failure_file.unlink(missing_ok=True)
    log.info("enrolled %s with %s (HTTP %d)", config.device_id, base, status)
    return enrollment


def record_enroll_failure(layout: StateLayout, server_url: str, reason: str) -> None:
    """Keep why the last enrollment attempt failed, for `agent status` (mode 0600;
    removed once the device enrolled). A state directory that cannot take it is logged."""
    try:
        atomic_write_bytes(
            layout.enroll_failure_file,
            json.dumps(
                {"server_url": server_url, "reason": reason, "at": format_time(utcnow())}
            ).encode()
            + b"\n",
            mode=PRIVATE_FILE,
        )
    except OSError as exc:
        log.warning("cannot keep why enrollment failed in %s: %s", layout.root, exc)


def load_enroll_failure(layout: StateLayout) -> dict[str, str] | None:
    """What `record_enroll_failure` kept: server_url, reason, at; None when nothing is."""
    try:
        raw = json.loads(layout.enroll_failure_file.read_bytes())
        return {key: str(raw[key]) for key in ("server_url", "reason", "at")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _signing_request(config: AgentConfig, layout: StateLayout) -> bytes | None:
    """The TLS signing request to enroll with, or None (logged) when the key cannot be made."""
    try:
        return ensure_signing_request(layout, config.device_id)
    except TlsIdentityError as exc:
        log.error("%s: enrolling without a certificate request", exc)
        return None


def _post_json(
    url: str, body: dict[str, Any], timeout: float, context: ssl.SSLContext | None
) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    # No environment proxies, as for downloads: a device talks to its server directly.
    try:
        with https_opener(context).open(request, timeout=timeout) as response:
            status = int(response.status)
            raw = response.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        raise _http_error(url, exc) from exc
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        raise ServerUnreachableError(describe_unreachable(url, exc)) from exc
    if status not in (200, 201):
        raise ServerUnreachableError(f"the fleet server answered HTTP {status} to enrollment")
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, {}  # accepted; the answer's details are only informative


def _http_error(
    url: str, exc: urllib.error.HTTPError
) -> EnrollmentRefusedError | ServerUnreachableError:
    try:
        raw = exc.read(MAX_ANSWER_BYTES)
    except (OSError, HTTPException):
        raw = b""
    code, detail = "", raw.decode("utf-8", "replace").strip()[:500]
    try:
        answer = json.loads(raw)
        if isinstance(answer, dict):
            code = str(answer.get("error") or "")
            detail = str(answer.get("detail") or detail)
    except ValueError:
        pass
    said = f"{detail} [{code}]" if code else detail or exc.reason
    if exc.code in (408, 429) or exc.code >= 500:
        return ServerUnreachableError(
            f"the fleet server at {url} answered {exc.code}: {said}",
            retry_after=_retry_after(exc.headers.get("Retry-After")),
        )
    return EnrollmentRefusedError(f"the fleet server refused enrollment ({exc.code}): {said}")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


ENROLL_BACKOFF = Backoff(initial=2.0, maximum=300.0)


class AutoEnroller:
    """Enrolls in the background until it succeeds, the server refuses, or `stopping` is set.

    For `edgefleet agent run`: serving never waits for it.
    """

    def __init__(
        self,
        config: AgentConfig,
        layout: StateLayout,
        stopping: threading.Event,
        *,
        backoff: Backoff = ENROLL_BACKOFF,
        on_enrolled: Callable[[Enrollment], None] | None = None,
        timeout: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.stopping = stopping
        self.backoff = backoff
        self.on_enrolled = on_enrolled
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.attempts = 0
        self.enrollment: Enrollment | None = None
        self.last_error: str | None = None
        self.done = threading.Event()  # enrolled, refused, or stopped
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Raises: RuntimeError when called twice."""
        if self._thread is not None:
            raise RuntimeError("the enroller was started already")
        self._thread = threading.Thread(target=self.run, name="edgefleet-enroll", daemon=True)
        self._thread.start()

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.done.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.enrollment = enroll(self.config, self.layout, timeout=self.timeout)
            except ServerUnreachableError as exc:
                delay = self.backoff.delay(self.attempts, self.rng)
                if exc.retry_after is not None:
                    delay = min(max(delay, exc.retry_after), self.backoff.maximum)
                self.attempts += 1
                self.last_error = str(exc)
                self._keep_failure()
                log.warning("enrollment: %s; trying again in %.0f s", exc, delay)
                self.stopping.wait(delay)
                continue
            except (EnrollmentRefusedError, ConfigError, KeyFileError) as exc:
                self.attempts += 1
                self.last_error = str(exc)
                self._keep_failure()
                log.error(
                    "enrollment failed for good: %s. The device serves on, but the server "
                    "ignores its reports until it enrolls: fix the setting or token and "
                    "restart the agent, or run `edgefleet agent enroll`",
                    exc,
                )
                return
            except (OSError, EdgefleetError) as exc:
                delay = self.backoff.delay(self.attempts, self.rng)
                self.attempts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._keep_failure()
                log.warning("enrollment: %s; trying again in %.0f s", self.last_error, delay)
                self.stopping.wait(delay)
                continue
            self.attempts += 1
            self.last_error = None
            if self.on_enrolled is not None:
                try:
                    self.on_enrolled(self.enrollment)
                except Exception:
                    log.exception("on_enrolled callback failed")
            return

    def _keep_failure(self) -> None:
        if self.config.server_url and self.last_error:
            record_enroll_failure(self.layout, self.config.server_url, self.last_error)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
