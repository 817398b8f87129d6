"""The fleet's trust root as the server holds it: every version it accepted, stored.

The newest stored version is what a replica verifies release signatures with and
names in its fleet timestamps, and this replica's server key must be in its
server role (devices would refuse every directive otherwise). Every version is
published retained on `trust_root_topic(version)`, so devices walk N -> N+1.

- `open_trust_roots`, at start, reconciles the `--trust` file with the store:
  nothing stored -> the file's root is stored; the file is the next version ->
  it is checked against the stored newest and stored; the file is older -> the
  stored newest is used; any other gap is refused.
- `TrustRoots.push` accepts exactly what a device accepts: version N+1 of the
  newest stored, signed by the root keys of both, not expired.
- `TrustRoots.refresh` adopts versions another replica stored (one cheap
  max(version) query when nothing is new).

Every newly adopted version is handed to the listeners (`add_listener`), in
order: the runner points the bundle store and the fleet timestamp at it and
publishes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.errors import (
    PublishError,
    ServerKeyNotListedError,
    TrustRootVersionError,
    UsageError,
)
from edgefleet.mqtt.topics import TRUST_ROOT_QOS, trust_root_topic
from edgefleet.server.audit import record_audit
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import TrustRootRow
from edgefleet.server.errors import StorageError
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.principals import Principal
from edgefleet.timefmt import utcnow
from edgefleet.trust import (
    TrustRoot,
    parse_trust_root,
    public_keys,
    update_trust_root,
)

log = logging.getLogger(__name__)

TrustListener = Callable[[TrustRoot], None]


class TrustRoots:
    """Every stored trust root version, verified in order; `current` is the newest."""

    def __init__(self, db: Database, chain: list[TrustRoot], server_keyid: str | None) -> None:
        """`chain`: the stored versions, oldest first, each checked against the one before.
        `server_keyid`: this replica's server key (None: a server that signs nothing)."""
        self.db = db
        self.server_keyid = server_keyid
        self._chain = list(chain)
        self._listeners: list[TrustListener] = []
        self._lock = threading.Lock()

    @property
    def current(self) -> TrustRoot:
        return self._chain[-1]

    @property
    def chain(self) -> list[TrustRoot]:
        """Every stored version, oldest first (a copy)."""
        return list(self._chain)

    def retained_messages(self) -> list[tuple[str, bytes, int]]:
        """(topic, payload, QoS) of every version after 1, to publish retained."""
        return [
            (trust_root_topic(root.version), root.raw, TRUST_ROOT_QOS)
            for root in self._chain
            if root.version >= 2
        ]

    def add_listener(self, listener: TrustListener) -> None:
        """Call `listener` with every version adopted from now on, in order."""
        self._listeners.append(listener)

    def push(self, data: bytes, actor: Principal, now: dt.datetime | None = None) -> TrustRoot:
        """Check `data` as a device would against the newest stored version, store and
        audit it, and adopt it.

        Raises:
            MalformedDocumentError, TrustRootVersionError, TrustRootSignatureError,
            TrustRootExpiredError: a device would refuse it.
            ServerKeyNotListedError: this server's key is not in its server role.
            StorageError: the database failed (nothing was stored).
        """
        now = now or utcnow()
        with self._lock:
            with self.db.session() as session:
                self._catch_up(session)
                root = update_trust_root(self.current, data, "the pushed trust root")
                root.verify_not_expired(now)
                _require_server_key(root, self.server_keyid)
                session.add(_row(root, actor.name, now))
                record_audit(
                    session,
                    actor,
                    "trust-root.push",
                    f"trust-root/{root.version}",
                    {"expires": root.signed.expires},
                    now,
                )
            self._adopt([root])
        log.info("trust root version %d pushed by %s", root.version, actor.name)
        return root

    def refresh(self) -> None:
        """Adopt the versions another replica stored since (a no-op when there are none).

        Raises:
            StorageError: the database failed.
            TrustRootError, MalformedDocumentError: a stored version does not chain.
        """
        with self._lock, self.db.session() as session:
            self._catch_up(session)

    def _catch_up(self, session: Session) -> None:
        newest = session.scalar(select(func.max(TrustRootRow.version)))
        if newest is None or newest <= self.current.version:
            return
        rows = session.scalars(
            select(TrustRootRow)
            .where(TrustRootRow.version > self.current.version)
            .order_by(TrustRootRow.version)
        ).all()
        adopted: list[TrustRoot] = []
        trusted = self.current
        for row in rows:
            trusted = update_trust_root(trusted, row.document.encode(), _stored(row.version))
            adopted.append(trusted)
        _require_server_key(trusted, self.server_keyid)
        self._adopt(adopted)
        log.info("adopted trust root version %d stored by another replica", trusted.version)

    def _adopt(self, roots: list[TrustRoot]) -> None:
        for root in roots:
            self._chain.append(root)
            for listener in self._listeners:
                listener(root)


def open_trust_roots(
    db: Database,
    file_root: TrustRoot,
    server_keyid: str | None,
    *,
    source: str = "the --trust file",
    now: dt.datetime | None = None,
) -> TrustRoots:
    """The stored trust roots, reconciled with `file_root` (read from `source`, as the
    module docstring says); `server_keyid` must be in the newest one's server role
    (None: a server that signs nothing).

    Raises:
        UsageError: the file is more than one version ahead of the store, or differs
            from the stored version of the same number.
        TrustRootError, MalformedDocumentError: the file or the store does not verify;
            the newest version has expired.
        ServerKeyNotListedError: the server key is not in the newest version's server role.
        StorageError: the database failed.
    """
    now = now or utcnow()
    try:
        chain = _reconcile(db, file_root, source, now)
    except StorageError:  # another replica stored the same version at the same moment
        chain = _reconcile(db, file_root, source, now)
    chain[-1].verify_not_expired(now)
    _require_server_key(chain[-1], server_keyid)
    return TrustRoots(db, chain, server_keyid)


def publish_trust_root(publisher: Publisher, root: TrustRoot) -> None:
    """Publish `root` retained on its topic; a broker that is away gets it on reconnect
    (the link republishes every version then), so a failure is only logged."""
    if root.version < 2:
        return
    try:
        publisher.publish(trust_root_topic(root.version), root.raw, qos=TRUST_ROOT_QOS, retain=True)
    except PublishError as exc:
        log.warning("trust root version %d not published now: %s", root.version, exc)


def _require_server_key(root: TrustRoot, server_keyid: str | None) -> None:
    if server_keyid is None:
        return
    if server_keyid not in {key.keyid for key in public_keys(root, "server")}:
        raise ServerKeyNotListedError(
            f"trust root version {root.version} does not list this server's key "
            f"{server_keyid[:12]} in its server role: devices would refuse every directive "
            "it signs; use the server key that trust root lists, or rotate keeping this one"
        )


def _reconcile(
    db: Database, file_root: TrustRoot, source: str, now: dt.datetime
) -> list[TrustRoot]:
    by = "edgefleet server run"
    with db.session() as session:
        chain = _stored_chain(session)
        if not chain:
            session.add(_row(file_root, by, now))
            return [file_root]
        newest = chain[-1]
        if file_root.version > newest.version:
            try:
                root = update_trust_root(newest, file_root.raw, source)
            except TrustRootVersionError:
                raise UsageError(
                    f"{source} is version {file_root.version}, but the newest "
                    f"stored trust root is version {newest.version}: push versions "
                    f"{newest.version + 1} to {file_root.version - 1} first "
                    "(edgefleet trust push), or start with the newest stored version"
                ) from None
            session.add(_row(root, by, now))
            return [*chain, root]
    same = {root.version: root for root in chain}.get(file_root.version)
    if same is not None and same.raw != file_root.raw:
        raise UsageError(
            f"{source} (version {file_root.version}) differs from the stored "
            f"version {file_root.version}: use the trust.json the root key holders published"
        )
    if file_root.version < newest.version:
        log.info(
            "%s is version %d; using the newest stored trust root, version %d",
            source,
            file_root.version,
            newest.version,
        )
    return chain


def _stored_chain(session: Session) -> list[TrustRoot]:
    rows = session.scalars(select(TrustRootRow).order_by(TrustRootRow.version)).all()
    if not rows:
        return []
    chain = [parse_trust_root(rows[0].document.encode(), _stored(rows[0].version))]
    for row in rows[1:]:
        chain.append(update_trust_root(chain[-1], row.document.encode(), _stored(row.version)))
    return chain


def _stored(version: int) -> str:
    return f"the stored trust root version {version}"


def _row(root: TrustRoot, pushed_by: str, now: dt.datetime) -> TrustRootRow:
    return TrustRootRow(
        version=root.version, document=root.raw.decode(), pushed_at=now, pushed_by=pushed_by
    )


__all__ = ["TrustListener", "TrustRoots", "open_trust_roots"]
