"""The device's TLS identity: its X.509 client certificate for the broker, and trust in the
fleet CA for HTTPS.

    STATE_DIR/tls/
      device.key    ECDSA P-256 key (mode 0600), made on this device once; it never leaves it
      device.csr    the signing request for that key, sent at enrollment and at renewal
      device.crt    the certificate the fleet server issued (mode 0600)
      ca.crt        the fleet CA's certificate, as the server sent it (mode 0644)
      device.json   {"issued_at", "not_after"} of device.crt, so that the agent decides on
                    renewal without parsing X.509

The agent process never imports `cryptography` (docs/adr/0004): the key and the
request are made by a short child process (`sys.executable -c`, using
`edgefleet.fleetca.make_key_and_csr`), which writes the key itself; the agent
reads only the request. Renewal sends the same request again (the key stays),
signed with the device's Ed25519 key (`edgefleet.certwire`), once less than a
third of the certificate's lifetime is left: checked at start and every hour,
a failure logged in one line and retried with backoff. A renewed certificate is
loaded into the MQTT link's TLS context and used from its next connect.

`server_ssl_context` is what every HTTPS request of the agent (enrollment,
renewal, uploads) trusts: `server_ca_file` when configured, the system's CAs
otherwise; downloads trust both (a bundle may come from another host).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from edgefleet.agent.errors import AgentError, ConfigError
from edgefleet.agent.layout import PRIVATE_FILE, StateLayout
from edgefleet.agentconfig import AgentConfig, MqttSettings
from edgefleet.backoff import Backoff
from edgefleet.certwire import certificate_path, renewal_request
from edgefleet.errors import MalformedDocumentError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.timefmt import format_time, parse_time, utcnow

log = logging.getLogger(__name__)

PUBLIC_FILE = 0o644
RENEW_CHECK_SECONDS = 3600.0
RENEW_BACKOFF = Backoff(initial=60.0, maximum=3600.0)
MAX_ANSWER_BYTES = 1 << 20
TIMEOUT_SECONDS = 30.0

# Runs in a child process, so that `cryptography` never loads into the agent's.
_MAKE_KEY_AND_CSR = (
    "import sys\n"
    "from pathlib import Path\n"
    "from edgefleet.fleetca import make_key_and_csr, write_private_pem\n"
    "key, csr = make_key_and_csr(sys.argv[1])\n"
    "write_private_pem(Path(sys.argv[2]), key)\n"
    "sys.stdout.buffer.write(csr)\n"
)


class TlsIdentityError(AgentError):
    """The device's TLS key could not be made, or its certificate not obtained."""


@dataclass(frozen=True)
class CertificateFiles:
    """Where this device's TLS identity lives (`StateLayout.tls_dir`)."""

    key: Path
    csr: Path
    certificate: Path
    ca_certificate: Path
    validity: Path

    @classmethod
    def of(cls, layout: StateLayout) -> CertificateFiles:
        return cls(
            key=layout.tls_key,
            csr=layout.tls_dir / "device.csr",
            certificate=layout.tls_certificate,
            ca_certificate=layout.tls_ca_certificate,
            validity=layout.tls_dir / "device.json",
        )

    @property
    def has_certificate(self) -> bool:
        return self.certificate.exists() and self.key.exists()


def ensure_signing_request(layout: StateLayout, device_id: str) -> bytes:
    """This device's signing request (PEM); the key and request are made the first time.

    Raises:
        TlsIdentityError: the child process that makes them failed.
    """
    files = CertificateFiles.of(layout)
    if files.key.exists() and files.csr.exists():
        return files.csr.read_bytes()
    layout.create()
    try:
        made = subprocess.run(
            [sys.executable, "-c", _MAKE_KEY_AND_CSR, device_id, str(files.key)],
            capture_output=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TlsIdentityError(f"cannot make the device's TLS key: {exc}") from exc
    if made.returncode != 0 or not made.stdout.startswith(b"-----BEGIN"):
        lines = made.stderr.decode("utf-8", "replace").strip().splitlines()
        raise TlsIdentityError(
            f"cannot make the device's TLS key: {lines[-1] if lines else made.returncode}"
        )
    atomic_write_bytes(files.csr, made.stdout, mode=PUBLIC_FILE)
    log.info("made this device's TLS key %s", files.key)
    return made.stdout


def store_certificate(layout: StateLayout, answer: dict[str, Any]) -> bool:
    """Write the certificate of an enrollment or renewal answer; False when it holds none.

    Raises:
        TlsIdentityError: the answer's certificate fields are not what the server sends.
        OSError: the state directory refused a write.
    """
    certificate, not_after, ca = (
        answer.get("certificate"),
        answer.get("certificate_not_after"),
        answer.get("ca_certificate"),
    )
    if certificate is None:
        return False
    if not (isinstance(certificate, str) and isinstance(not_after, str)):
        raise TlsIdentityError("the server's answer holds a certificate without its not-after")
    expiry = _parse_not_after(not_after)
    files = CertificateFiles.of(layout)
    if isinstance(ca, str):
        atomic_write_bytes(files.ca_certificate, ca.encode("ascii"), mode=PUBLIC_FILE)
    atomic_write_bytes(files.certificate, certificate.encode("ascii"), mode=PRIVATE_FILE)
    validity = {"issued_at": format_time(utcnow()), "not_after": format_time(expiry)}
    atomic_write_bytes(files.validity, json.dumps(validity).encode() + b"\n", mode=PRIVATE_FILE)
    log.info("stored this device's certificate %s (valid until %s)", files.certificate, not_after)
    return True


def _parse_not_after(text: str) -> dt.datetime:
    """An ISO 8601 time as JSON carries it (`Z` or an offset; naive means UTC).

    Raises:
        TlsIdentityError: not such a time.
    """
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise TlsIdentityError(f"the certificate's not-after {text!r} is not a time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def renewal_due(layout: StateLayout, now: dt.datetime | None = None) -> bool:
    """True when the stored certificate has less than a third of its lifetime left (or its
    validity file is unreadable); False when the device has no certificate."""
    files = CertificateFiles.of(layout)
    if not files.certificate.exists():
        return False
    try:
        validity = json.loads(files.validity.read_bytes())
        issued_at, not_after = parse_time(validity["issued_at"]), parse_time(validity["not_after"])
    except (OSError, ValueError, KeyError, TypeError, MalformedDocumentError):
        return True
    return (not_after - (now or utcnow())) < (not_after - issued_at) / 3


def link_settings(config: AgentConfig, layout: StateLayout) -> MqttSettings:
    """`[mqtt]` with the enrolled identity filled in for mqtts://: the enrolled certificate
    and key when none is configured and the device has one, and the fleet CA from
    enrollment when no ca_file is configured and the device has it."""
    settings = config.mqtt
    if settings.url is None or not settings.url.startswith("mqtts://"):
        return settings
    files = CertificateFiles.of(layout)
    update: dict[str, Path] = {}
    if settings.cert_file is None and files.has_certificate:
        update.update(cert_file=files.certificate, key_file=files.key)
    if settings.ca_file is None and files.ca_certificate.exists():
        update["ca_file"] = files.ca_certificate
    return settings.model_copy(update=update)


def waits_for_certificate(config: AgentConfig, layout: StateLayout) -> bool:
    """True when the link needs the certificate enrollment brings: mqtts://, no configured
    client certificate, a server to enroll with, and none enrolled yet."""
    settings = config.mqtt
    return (
        settings.url is not None
        and settings.url.startswith("mqtts://")
        and settings.cert_file is None
        and config.server_url is not None
        and not CertificateFiles.of(layout).has_certificate
    )


def server_ssl_context(config: AgentConfig, *, system_cas: bool = False) -> ssl.SSLContext | None:
    """The TLS context for the fleet server: trusting `server_ca_file` (and the system's CAs
    too with `system_cas`: downloads may come from other hosts), or None (the system's CAs)
    when none is configured.

    Raises:
        ConfigError: the file does not load, naming it.
    """
    if config.server_ca_file is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(config.server_ca_file))
        if system_cas:
            context.load_default_certs()
        return context
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"server_ca_file {config.server_ca_file} cannot be loaded ({exc}): give the fleet "
            "CA's certificate (PEM), e.g. `edgefleet agent init --ca ca.crt`"
        ) from exc


def https_opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    """A urllib opener trusting `context` (None: the system's CAs) and no environment proxy."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def describe_unreachable(url: str, exc: BaseException) -> str:
    """One line for a request that got no answer; an untrusted certificate says what to do."""
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"the fleet server at {url} has a certificate this device does not trust "
            f"({reason.verify_message}): set server_ca_file to the CA that issued it "
            "(`edgefleet agent init --ca FILE`)"
        )
    return f"cannot reach the fleet server at {url}: {reason}"


def renew_certificate(
    config: AgentConfig, layout: StateLayout, server_url: str, key: DeviceKey
) -> None:
    """Ask the server for a new certificate for this device's key, and store it.

    Raises:
        TlsIdentityError: no answer, a refusal, or an answer without a certificate.
        ConfigError: server_ca_file does not load.
        OSError: the state directory refused a write.
    """
    csr = ensure_signing_request(layout, config.device_id)
    body, headers = renewal_request(config.device_id, csr, key)
    url = server_url + certificate_path(config.device_id)
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    opener = https_opener(server_ssl_context(config))
    try:
        with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
            raw = response.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        detail = exc.read(1024).decode("utf-8", "replace").strip()
        raise TlsIdentityError(f"the fleet server answered {exc.code}: {detail}") from exc
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        raise TlsIdentityError(describe_unreachable(url, exc)) from exc
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise TlsIdentityError("the fleet server's answer is not JSON") from exc
    if not isinstance(answer, dict) or not store_certificate(layout, answer):
        raise TlsIdentityError("the fleet server's answer holds no certificate")


class CertificateRenewer:
    """An `edgefleet.worker.Worker` step: renews the certificate when `renewal_due`, or asks
    for one when `wanted` says so (an enrolled device without one, whose link waits).

    Looks at start and every `RENEW_CHECK_SECONDS`; a failure waits `RENEW_BACKOFF`.
    `on_renewed` runs after a new certificate was stored.
    """

    def __init__(
        self,
        config: AgentConfig,
        layout: StateLayout,
        server_url: str,
        key: DeviceKey,
        *,
        on_renewed: Callable[[], None],
        wanted: Callable[[], bool] = lambda: False,
        backoff: Backoff = RENEW_BACKOFF,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.layout = layout
        self.server_url = server_url
        self.key = key
        self.on_renewed = on_renewed
        self.wanted = wanted
        self.backoff = backoff
        self.failures = 0
        self._rng = rng or random.Random()
        self._clock = clock
        self._next_check = 0.0

    def step(self) -> None:
        if self._clock() < self._next_check:
            return
        if not (renewal_due(self.layout) or self.wanted()):
            self._next_check = self._clock() + RENEW_CHECK_SECONDS
            return
        try:
            renew_certificate(self.config, self.layout, self.server_url, self.key)
        except (TlsIdentityError, ConfigError, OSError) as exc:
            delay = self.backoff.delay(self.failures, self._rng)
            self.failures += 1
            self._next_check = self._clock() + delay
            log.warning("certificate not renewed: %s; next try in %.0f s", exc, delay)
            return
        self.failures = 0
        self._next_check = self._clock() + RENEW_CHECK_SECONDS
        self.on_renewed()
