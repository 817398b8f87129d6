"""DeviceTrust: root rotations one version at a time, replays refused, snapshots round-trip."""

from __future__ import annotations

import datetime as dt

import pytest

from edgefleet import errors
from edgefleet.devicetrust import DeviceTrust, TrustSnapshot
from edgefleet.keys import SigningKey
from edgefleet.mqtt.directives import (
    Directive,
    FleetTimestamp,
    sign_directive,
    sign_fleet_timestamp,
)
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot, rotate_trust_root
from tests.conftest import KeySet, make_trust_root

NOW = utcnow()
LATER = NOW + dt.timedelta(days=30)
DEVICE = "pi-7"


def _directive(sequence: int, keys: list[SigningKey]) -> bytes:
    directive = Directive(
        device_id=DEVICE,
        sequence=sequence,
        issued=format_time(NOW - dt.timedelta(minutes=1)),
        expires=format_time(NOW + dt.timedelta(days=1)),
        action="diagnostics",
        request_id=1,
    )
    return sign_directive(directive, keys)


def _timestamp(sequence: int, keys: list[SigningKey]) -> bytes:
    stamp = FleetTimestamp(
        sequence=sequence,
        issued=format_time(NOW - dt.timedelta(minutes=1)),
        expires=format_time(NOW + dt.timedelta(hours=1)),
        trust_root_version=1,
    )
    return sign_fleet_timestamp(stamp, keys)


def _chain(keyset: KeySet) -> tuple[TrustRoot, TrustRoot, TrustRoot, SigningKey, SigningKey]:
    """v1; v2 with a new root key and a new server key; v3 with another server key."""
    v1 = make_trust_root(keyset)
    root2, server2, server3 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    v2 = rotate_trust_root(
        v1,
        signers=[keyset.root, root2],
        expires=LATER,
        root=[root2.public],
        server=[server2.public],
    )
    v3 = rotate_trust_root(v2, signers=[root2], expires=LATER, server=[server3.public])
    return v1, v2, v3, root2, server3


def test_two_rotations_walk_one_version_at_a_time(keyset: KeySet) -> None:
    v1, v2, v3, _, server3 = _chain(keyset)
    trust = DeviceTrust(v1)
    with pytest.raises(errors.TrustRootVersionError):
        trust.accept_root(v3.raw)  # N+2 before N+1
    trust = trust.accept_root(v2.raw).accept_root(v3.raw)
    assert trust.root.version == 3
    directive, _ = trust.accept_directive(_directive(1, [server3]), device_id=DEVICE, now=NOW)
    assert directive.sequence == 1
    with pytest.raises(errors.UnknownKeyError):  # the v1 server key, which v2 dropped
        trust.accept_directive(_directive(1, [keyset.server]), device_id=DEVICE, now=NOW)


def test_root_signed_only_by_the_new_keys_refused(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    new_root = SigningKey.generate()
    # A v2 signed by its own root key only: what someone without the v1 root key can make.
    forged = rotate_trust_root(
        make_trust_root(KeySet(new_root, keyset.release, keyset.server)),
        signers=[new_root],
        expires=LATER,
    )
    trust = DeviceTrust(v1, directive_sequence=4)
    with pytest.raises(errors.TrustRootSignatureError):
        trust.accept_root(forged.raw)
    assert trust.root.version == 1 and trust.snapshot().root == v1.raw


def test_directive_and_timestamp_sequences_advance_and_refuse_replays(keyset: KeySet) -> None:
    trust = DeviceTrust(make_trust_root(keyset))
    _, trust = trust.accept_directive(_directive(3, [keyset.server]), device_id=DEVICE, now=NOW)
    with pytest.raises(errors.DirectiveError):
        trust.accept_directive(_directive(3, [keyset.server]), device_id=DEVICE, now=NOW)
    stamp, trust = trust.accept_fleet_timestamp(_timestamp(7, [keyset.server]), now=NOW)
    assert (stamp.sequence, trust.timestamp_sequence) == (7, 7)
    # The retained timestamp comes again on every connect: accepted, nothing advances.
    _, again = trust.accept_fleet_timestamp(_timestamp(7, [keyset.server]), now=NOW)
    assert again.timestamp_sequence == 7
    with pytest.raises(errors.FleetTimestampError):
        trust.accept_fleet_timestamp(_timestamp(6, [keyset.server]), now=NOW)


def test_snapshot_round_trip_keeps_root_and_counters(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    v2 = rotate_trust_root(v1, signers=[keyset.root], expires=LATER)
    trust = DeviceTrust(v1, 5, 9, {"demo": 3}).accept_root(v2.raw)
    restored = DeviceTrust.from_snapshot(trust.snapshot())
    assert restored.root.version == 2
    assert restored.snapshot() == trust.snapshot()
    with pytest.raises(errors.FleetTimestampError):  # a restart keeps refusing older ones
        restored.accept_fleet_timestamp(_timestamp(8, [keyset.server]), now=NOW)
    assert restored.bundle_policy("cpu-small", None).security_floors == {"demo": 3}


def test_snapshot_with_a_tampered_root_refused(keyset: KeySet) -> None:
    raw = make_trust_root(keyset).raw.replace(b'"version":1', b'"version":2')
    with pytest.raises((errors.TrustRootSignatureError, errors.MalformedDocumentError)):
        DeviceTrust.from_snapshot(TrustSnapshot(root=raw))
