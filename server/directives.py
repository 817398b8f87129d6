"""Signed directives to devices: allocated inside a unit of work, published after it commits.

Invariants:
- a directive's sequence is allocated by `UPDATE devices SET directive_sequence =
  directive_sequence + 1` in the caller's transaction, so two replicas (or two
  threads) never hand the same number to one device, and a transaction that
  rolls back gives its numbers back with everything else it did;
- nothing is published before the transaction that recorded the directive has
  committed (`publish_directive` is called after the `with db.session()` block):
  a device never acts on a directive the database does not know about. The
  opposite gaps are closed by the rollout driver: a directive the broker did
  not take (`PublishError`) is undone in the database and sent again at the
  next tick; one lost because the process died before publishing is re-sent by
  the timeout and retry path;
- a directive is fully determined by what the rollout stored (device, sequence,
  action, bundle, shadow, and its issued time, `RolloutDevice.notified_at`), and
  Ed25519 signatures are deterministic: `resign` rebuilds the very bytes first
  published, so an unanswered directive can be sent again (rollouts/resend.py)
  and a device that already accepted it ignores it by its sequence;
- the payload is signed with the server key(s) over canonical JSON
  (`edgefleet.mqtt.sign_directive`); devices verify it against their trust root.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from edgefleet.errors import UsageError
from edgefleet.keys import SigningKey
from edgefleet.mqtt import (
    BundleRef,
    DeviceTopics,
    Directive,
    HttpSource,
    MqttBlocksSource,
    Source,
    TopicKind,
    sign_directive,
)
from edgefleet.server.db.models import BundleRow, Device
from edgefleet.server.errors import NotFoundError
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import format_time, utcnow
from edgefleet.wire import API_PREFIX

DIRECTIVE_QOS = TopicKind.DIRECTIVE.qos  # 1: the persistent session holds it for offline devices


@dataclass(frozen=True)
class OutgoingDirective:
    """A signed directive waiting for its transaction to commit before it is published."""

    device_id: str
    topic: str
    payload: bytes
    sequence: int
    action: str  # install | rollback | diagnostics | benchmark
    issued_at: dt.datetime
    shadow: bool = False
    expires_at: dt.datetime | None = None


class DirectiveIssuer:
    """Builds and signs install, rollback, diagnostics and benchmark directives for devices.

    The issuer holds no state of its own: sequences live in the database, so
    every replica may hold an issuer.
    """

    def __init__(
        self,
        server_keys: Sequence[SigningKey],
        settings: ServerSettings,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        """Raises: UsageError when no server key is given."""
        if not server_keys:
            raise UsageError("a directive issuer needs at least one server key")
        self.server_keys = list(server_keys)
        self.settings = settings
        self.clock = clock

    def sources(self, bundle: BundleRow) -> list[Source]:
        """Where a device fetches `bundle`: HTTP by digest first, MQTT blocks as the fallback."""
        url = f"{self.settings.base_url}{API_PREFIX}/blobs/{bundle.sha256}"
        return [HttpSource(url=url), MqttBlocksSource(block_size=self.settings.block_size)]

    def prepare_install(
        self, session: Session, device: Device, bundle: BundleRow, *, shadow: bool
    ) -> OutgoingDirective:
        """Allocate a sequence for `device` and sign an install (or shadow install) of `bundle`.

        Raises:
            NotFoundError: the device row is gone.
            StorageError: (from the session) the database failed.
        """
        return self._prepare(
            session,
            device,
            action="install",
            bundle=_ref(bundle),
            sources=self.sources(bundle),
            shadow=shadow,
        )

    def prepare_rollback(
        self, session: Session, device: Device, bundle: BundleRow
    ) -> OutgoingDirective:
        """Allocate a sequence for `device` and sign a rollback away from `bundle`.

        The directive names the bundle being rolled back: a device that does not
        serve it (its install never happened) keeps what it serves, and one that
        runs it only in shadow stops the shadow copy.

        Raises:
            NotFoundError: the device row is gone.
            StorageError: (from the session) the database failed.
        """
        return self._prepare(
            session, device, action="rollback", bundle=_ref(bundle), sources=[], shadow=False
        )

    def prepare_diagnostics(
        self, session: Session, device: Device, request_id: int
    ) -> OutgoingDirective:
        """Allocate a sequence for `device` and sign a request for its log lines and status,
        expiring `settings.diagnostics_ttl` after it is issued.

        Raises:
            NotFoundError: the device row is gone.
            StorageError: (from the session) the database failed.
        """
        return self._prepare(
            session,
            device,
            action="diagnostics",
            bundle=None,
            sources=[],
            shadow=False,
            request_id=request_id,
            ttl=self.settings.diagnostics_ttl,
        )

    def prepare_benchmark(
        self, session: Session, device: Device, request_id: int, request: BundleRef, url: str
    ) -> OutgoingDirective:
        """Allocate a sequence for `device` and sign a request to measure the candidates of the
        benchmark request `request` (fetched from `url`), expiring `settings.benchmark_ttl`
        after it is issued.

        Raises:
            NotFoundError: the device row is gone.
            StorageError: (from the session) the database failed.
        """
        return self._prepare(
            session,
            device,
            action="benchmark",
            bundle=request,
            sources=[HttpSource(url=url)],
            shadow=False,
            request_id=request_id,
            ttl=self.settings.benchmark_ttl,
        )

    def resign(
        self,
        device_id: str,
        bundle: BundleRow,
        *,
        action: str,
        sequence: int,
        shadow: bool,
        issued: dt.datetime,
    ) -> OutgoingDirective:
        """The install or rollback directive `sequence` issued at `issued`, signed again.

        The same fields and keys give the same bytes as when it was first prepared
        (Ed25519 signs deterministically), so sending it again cannot make a device
        act twice: one that accepted it refuses the repeated sequence.
        """
        sources = self.sources(bundle) if action == "install" else []
        return self._signed(
            device_id,
            sequence,
            issued,
            action=action,
            bundle=_ref(bundle),
            sources=sources,
            shadow=shadow,
        )

    def _prepare(
        self,
        session: Session,
        device: Device,
        *,
        action: str,
        bundle: BundleRef | None,
        sources: list[Source],
        shadow: bool,
        request_id: int | None = None,
        ttl: dt.timedelta | None = None,
    ) -> OutgoingDirective:
        sequence = allocate_directive_sequence(session, device)
        return self._signed(
            device.id,
            sequence,
            self.clock(),
            action=action,
            bundle=bundle,
            sources=sources,
            shadow=shadow,
            request_id=request_id,
            ttl=ttl,
        )

    def _signed(
        self,
        device_id: str,
        sequence: int,
        issued: dt.datetime,
        *,
        action: str,
        bundle: BundleRef | None,
        sources: list[Source],
        shadow: bool,
        request_id: int | None = None,
        ttl: dt.timedelta | None = None,
    ) -> OutgoingDirective:
        expires = issued + (ttl or self.settings.directive_ttl)
        directive = Directive.model_validate(
            {
                "issued": format_time(issued),
                "expires": format_time(expires),
                "device_id": device_id,
                "sequence": sequence,
                "action": action,
                "bundle": bundle,
                "sources": sources,
                "shadow": shadow,
                "request_id": request_id,
            }
        )
        payload = sign_directive(directive, self.server_keys)
        return OutgoingDirective(
            device_id=device_id,
            topic=DeviceTopics(device_id).directive,
            payload=payload,
            sequence=sequence,
            action=action,
            issued_at=issued,
            shadow=shadow,
            expires_at=directive.expires_at,
        )


def allocate_directive_sequence(session: Session, device: Device) -> int:
    """The next directive sequence of `device`, taken by an atomic UPDATE in `session`.

    On PostgreSQL the UPDATE locks the row until commit, so a concurrent
    allocation waits and then sees the incremented value; SQLite serialises
    writers. The in-session `device` object is updated to the new value.

    Raises:
        NotFoundError: no device row with that id.
    """
    table = cast(Table, Device.__table__)
    statement = (
        update(table)
        .where(table.c.id == device.id)
        .values(directive_sequence=table.c.directive_sequence + 1)
        .returning(table.c.directive_sequence)
    )
    # On the session's connection, past the ORM: no autoflush of the caller's pending
    # changes for every directive (a large stage signs hundreds per unit of work).
    value = session.connection().execute(statement).scalar_one_or_none()
    if value is None:
        raise NotFoundError(f"device {device.id!r} is not enrolled")
    set_committed_value(device, "directive_sequence", int(value))
    return int(value)


def publish_directive(publisher: Publisher, directive: OutgoingDirective) -> None:
    """Publish a committed directive at QoS 1, not retained (a retained directive would be
    replayed to the device on every reconnect, which its sequence check refuses anyway).

    Call only after the transaction that prepared it has committed.

    Raises:
        PublishError: the broker did not take it.
    """
    publisher.publish(directive.topic, directive.payload, qos=DIRECTIVE_QOS, retain=False)


def _ref(bundle: BundleRow) -> BundleRef:
    return BundleRef(
        name=bundle.name, version=bundle.version, sha256=bundle.sha256, length=bundle.length
    )


__all__ = [
    "DIRECTIVE_QOS",
    "DirectiveIssuer",
    "OutgoingDirective",
    "allocate_directive_sequence",
    "publish_directive",
]
