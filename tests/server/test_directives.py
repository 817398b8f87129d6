"""DirectiveIssuer: signed, per-device increasing sequences, published only when told."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from edgefleet.errors import ReplayedDirectiveError, UsageError, WrongDeviceError
from edgefleet.mqtt import HttpSource, MqttBlocksSource, verify_directive
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device
from edgefleet.server.directives import DirectiveIssuer, OutgoingDirective, publish_directive
from edgefleet.server.errors import NotFoundError
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.server.rolloutsim import START, RecordingPublisher, add_bundle, add_device, make_settings


@pytest.fixture
def issuer(tmp_path: Path, keyset: KeySet) -> DirectiveIssuer:
    settings = make_settings(tmp_path, directive_ttl=dt.timedelta(hours=2))
    return DirectiveIssuer([keyset.server], settings, clock=lambda: START)


def _install(
    db: Database, issuer: DirectiveIssuer, device_id: str, *, shadow: bool = False
) -> OutgoingDirective:
    with db.session() as session:
        device = session.get(Device, device_id)
        bundle = session.query(BundleRow).one()
        assert device is not None
        return issuer.prepare_install(session, device, bundle, shadow=shadow)


def test_install_directive_verifies_on_the_device(
    database: Database, issuer: DirectiveIssuer, trust: TrustRoot
) -> None:
    add_device(database, "dev-1")
    add_bundle(database)
    out = _install(database, issuer, "dev-1")
    assert out.topic == "edgefleet/v1/devices/dev-1/directive"
    assert (out.sequence, out.action, out.shadow) == (1, "install", False)
    directive = verify_directive(out.payload, trust, device_id="dev-1", last_sequence=0, now=START)
    assert directive.action == "install" and directive.sequence == 1 and not directive.shadow
    assert directive.bundle is not None
    assert (directive.bundle.name, directive.bundle.version) == ("demo", "2.0.0")
    assert directive.bundle.length == 123_456
    http, blocks = directive.sources
    assert isinstance(http, HttpSource) and isinstance(blocks, MqttBlocksSource)
    assert http.url == f"https://fleet.example.org/api/v1/blobs/{directive.bundle.sha256}"
    assert blocks.block_size == 32 * 1024
    assert directive.issued_at == START
    assert directive.expires_at == START + dt.timedelta(hours=2) == out.expires_at


def test_shadow_flag_is_signed(
    database: Database, issuer: DirectiveIssuer, trust: TrustRoot
) -> None:
    add_device(database, "dev-1")
    add_bundle(database)
    out = _install(database, issuer, "dev-1", shadow=True)
    directive = verify_directive(out.payload, trust, device_id="dev-1", last_sequence=0, now=START)
    assert directive.shadow and out.shadow


def test_sequences_increase_per_device_and_are_stored(
    database: Database, issuer: DirectiveIssuer, trust: TrustRoot
) -> None:
    add_device(database, "dev-1")
    add_device(database, "dev-2")
    add_bundle(database)
    seqs = [_install(database, issuer, "dev-1").sequence for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert _install(database, issuer, "dev-2").sequence == 1
    with database.session() as session:
        device = session.get(Device, "dev-1")
        bundle = session.query(BundleRow).one()
        assert device is not None
        rollback = issuer.prepare_rollback(session, device, bundle)
        assert device.directive_sequence == 4  # the in-session object follows the UPDATE
    assert rollback.sequence == 4 and rollback.action == "rollback"
    directive = verify_directive(
        rollback.payload, trust, device_id="dev-1", last_sequence=3, now=START
    )
    assert directive.action == "rollback" and directive.sources == []
    # It names the bundle it undoes, so a device that never installed it keeps what it serves.
    assert directive.bundle is not None and directive.bundle.version == "2.0.0"
    # The device refuses the older ones now, and another device refuses this one.
    first = _install(database, issuer, "dev-1")
    with pytest.raises(ReplayedDirectiveError):
        verify_directive(rollback.payload, trust, device_id="dev-1", last_sequence=5, now=START)
    with pytest.raises(WrongDeviceError):
        verify_directive(first.payload, trust, device_id="dev-2", last_sequence=0, now=START)
    with database.session() as session:
        stored = session.get(Device, "dev-1")
        assert stored is not None and stored.directive_sequence == 5


def test_rolled_back_unit_of_work_gives_the_sequence_back(
    database: Database, issuer: DirectiveIssuer
) -> None:
    add_device(database, "dev-1")
    add_bundle(database)
    with pytest.raises(RuntimeError), database.session() as session:
        device = session.get(Device, "dev-1")
        bundle = session.query(BundleRow).one()
        assert device is not None
        issuer.prepare_install(session, device, bundle, shadow=False)
        raise RuntimeError("the caller failed after preparing")
    assert _install(database, issuer, "dev-1").sequence == 1


def test_concurrent_allocations_never_repeat(database: Database, issuer: DirectiveIssuer) -> None:
    add_device(database, "dev-1")
    add_bundle(database)
    got: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(5):
                seq = _install(database, issuer, "dev-1").sequence
                with lock:
                    got.append(seq)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(got) == list(range(1, 21))


def test_unknown_device_is_not_found(database: Database, issuer: DirectiveIssuer) -> None:
    add_bundle(database)
    ghost = Device(id="ghost", public_key="00" * 32)
    with pytest.raises(NotFoundError), database.session() as session:
        issuer.prepare_rollback(session, ghost, session.query(BundleRow).one())


def test_issuer_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        DirectiveIssuer([], make_settings(tmp_path))


def test_directives_are_published_at_qos1_not_retained(
    database: Database, issuer: DirectiveIssuer
) -> None:
    add_device(database, "dev-1")
    add_device(database, "dev-2")
    add_bundle(database)
    outs = [_install(database, issuer, "dev-1"), _install(database, issuer, "dev-2")]
    publisher = RecordingPublisher()
    for out in outs:
        publish_directive(publisher, out)
    assert [(c.topic, c.payload, c.qos, c.retain) for c in publisher.calls] == [
        (o.topic, o.payload, 1, False) for o in outs
    ]
