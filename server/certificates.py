"""Devices' X.509 client certificates: issued by the fleet CA, recorded, revoked.

A server run with `--ca DIR` (`edgefleet ca init DIR`) signs a device's
certificate request at enrollment and at renewal: the certificate's common
name is the device id, whatever the request asked for (the broker takes it as
the user name and the client id). Each issued certificate is a
`DeviceCertificate` row; a renewal adds one and leaves the older one valid
until it expires. Removing a device marks all of its certificates revoked in
the same unit of work. A repeated enrollment (same id and key: the key is
no secret) gets a certificate within REPEAT_ENROLLMENT_WINDOW of the first
only; later the device renews (signed with its key).

The certificate revocation list names every revoked certificate that has not
expired yet. With `--crl FILE` the server writes it (atomically) at start and
after each removal through this replica, then runs `--broker-reload-command`
(mosquitto rereads a CRL only when it restarts). The command's failure is
logged, never fails the removal.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from edgefleet.errors import MalformedDocumentError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.fleetca import FleetCa, IssuedCertificate
from edgefleet.server.audit import record_audit
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device, DeviceCertificate
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.principals import Principal, Role
from edgefleet.timefmt import utcnow

log = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 30.0
# An enrollment repeated (same id, same key: no secret) is answered with a certificate
# this long after the device enrolled only: an agent retrying after a lost answer. Later,
# a device renews through its signed request, so that knowing its public key is not enough.
REPEAT_ENROLLMENT_WINDOW = dt.timedelta(hours=1)


def may_certify(device: Device, created: bool, now: dt.datetime) -> bool:
    """Whether an enrollment answer (new: `created`, or repeated) may carry a certificate."""
    return created or now - device.enrolled_at <= REPEAT_ENROLLMENT_WINDOW


def issue_device_certificate(
    session: Session, ca: FleetCa, device_id: str, csr_pem: str, now: dt.datetime
) -> IssuedCertificate:
    """A client certificate named `device_id` for the key of `csr_pem`, recorded in the
    caller's unit of work. Audited as "device.certificate".

    Raises:
        InvalidRequestError: the request is not a PEM signing request whose signature
            verifies over an ECDSA P-256 key (the message says which).
    """
    try:
        issued = ca.issue_for_csr(csr_pem.encode("utf-8"), device_id, now=now)
    except MalformedDocumentError as exc:
        raise InvalidRequestError(f"csr: {exc}") from exc
    session.add(
        DeviceCertificate(
            serial=issued.serial,
            device_id=device_id,
            issued_at=now,
            not_after=issued.not_after,
            revoked_at=None,
        )
    )
    details = {"serial": issued.serial, "not_after": issued.not_after.isoformat()}
    actor = Principal(f"device:{device_id}", Role.VIEWER)
    record_audit(session, actor, "device.certificate", f"device {device_id}", details, now)
    return issued


def revoke_device_certificates(session: Session, device_id: str, now: dt.datetime) -> list[str]:
    """Mark `device_id`'s certificates revoked from `now` (in the caller's unit of work);
    their serials (those revoked earlier keep their time)."""
    revoked = session.execute(
        update(DeviceCertificate)
        .where(DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(DeviceCertificate.serial)
        .execution_options(synchronize_session=False)
    )
    return sorted(revoked.scalars())


def revocation_list(session: Session, ca: FleetCa, now: dt.datetime) -> bytes:
    """The CRL (PEM) naming every revoked certificate that has not expired."""
    revoked = session.execute(
        select(DeviceCertificate.serial, DeviceCertificate.revoked_at)
        .where(DeviceCertificate.revoked_at.is_not(None), DeviceCertificate.not_after > now)
        .order_by(DeviceCertificate.serial)
    ).all()
    return ca.revocation_list(
        [(serial, revoked_at) for serial, revoked_at in revoked if revoked_at is not None], now=now
    )


class CrlFile:
    """Keeps the CRL file current and tells the broker (`--crl`, `--broker-reload-command`)."""

    def __init__(
        self,
        db: Database,
        ca: FleetCa,
        path: Path,
        reload_command: Sequence[str] = (),
        *,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.ca = ca
        self.path = path
        self.reload_command = tuple(reload_command)
        self.clock = clock

    def refresh(self) -> None:
        """Write the current CRL atomically, then run the reload command (if any).

        Raises:
            OSError: the file cannot be written (the command is not run).
        """
        with self.db.session() as session:
            pem = revocation_list(session, self.ca, self.clock())
        atomic_write_bytes(self.path, pem, mode=0o644)
        if self.reload_command:
            self._reload()

    def after_removal(self) -> None:
        """`refresh`, logging a failure in one line: the removal itself stands."""
        try:
            self.refresh()
        except OSError as exc:
            log.error("cannot write the revocation list %s: %s", self.path, exc)

    def _reload(self) -> None:
        command = shlex.join(self.reload_command)
        try:
            result = subprocess.run(
                self.reload_command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=RELOAD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("broker reload command %s failed: %s", command, exc)
            return
        if result.returncode != 0:
            last = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            log.error(
                "broker reload command %s exited with %d: %s", command, result.returncode, last[0]
            )


__all__ = [
    "CrlFile",
    "issue_device_certificate",
    "may_certify",
    "revocation_list",
    "revoke_device_certificates",
]
