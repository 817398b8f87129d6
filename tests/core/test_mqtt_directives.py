"""Directives, fleet timestamps and the server's announcement of the fields it accepts: every
way a device must refuse one, each with its own error."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from edgefleet import errors
from edgefleet.canonical import canonical_json
from edgefleet.keys import SigningKey
from edgefleet.mqtt import (
    MAX_CLOCK_SKEW,
    MAX_DIRECTIVE_BYTES,
    BundleRef,
    Directive,
    FleetAccepts,
    FleetTimestamp,
    HttpSource,
    MqttBlocksSource,
    accepted_fields,
    sign_directive,
    sign_fleet_accepts,
    sign_fleet_timestamp,
    verify_directive,
    verify_fleet_accepts,
    verify_fleet_timestamp,
)
from edgefleet.signing import Signature, sign_document
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet, make_trust_root

NOW = utcnow()  # the session's trust root expires 30 days from now
DEVICE = "cam-01"


def directive(**overrides: Any) -> Directive:
    fields: dict[str, Any] = {
        "device_id": DEVICE,
        "sequence": 5,
        "issued": format_time(NOW - dt.timedelta(minutes=1)),
        "expires": format_time(NOW + dt.timedelta(days=1)),
        "action": "install",
        "bundle": BundleRef(name="demo", version="1.2.3", sha256="ab" * 32, length=90_000),
        "sources": [
            HttpSource(url="https://fleet.example/bundles/demo-1.2.3.efb"),
            MqttBlocksSource(block_size=16_384),
        ],
    }
    fields.update(overrides)
    return Directive(**fields)


def timestamp(**overrides: Any) -> FleetTimestamp:
    fields: dict[str, Any] = {
        "sequence": 10,
        "issued": format_time(NOW - dt.timedelta(minutes=1)),
        "expires": format_time(NOW + dt.timedelta(hours=1)),
        "trust_root_version": 1,
    }
    fields.update(overrides)
    return FleetTimestamp(**fields)


def verify(data: bytes, trust: TrustRoot, last_sequence: int = 4) -> Directive:
    return verify_directive(data, trust, device_id=DEVICE, last_sequence=last_sequence, now=NOW)


def resign(signed: dict[str, Any], key: SigningKey) -> bytes:
    """Sign an arbitrary signed part, as a server key holder could."""
    return sign_document(signed, [key]).to_bytes()


# --- directives: accepted -----------------------------------------------------------------


def test_directive_signed_by_server_key_accepted(keyset: KeySet, trust: TrustRoot) -> None:
    sent = directive()
    assert verify(sign_directive(sent, [keyset.server]), trust) == sent


def test_rollback_directive_accepted(keyset: KeySet, trust: TrustRoot) -> None:
    sent = directive(action="rollback", bundle=None, sources=[])
    assert verify(sign_directive(sent, [keyset.server]), trust).action == "rollback"


def test_signed_directive_holds_its_type(keyset: KeySet) -> None:
    envelope = json.loads(sign_directive(directive(), [keyset.server]))
    assert envelope["signed"]["_type"] == "directive"


# --- directives: signatures ---------------------------------------------------------------


def test_directive_signed_by_release_key_refused(keyset: KeySet, trust: TrustRoot) -> None:
    with pytest.raises(errors.WrongRoleError):
        verify(sign_directive(directive(), [keyset.release]), trust)


def test_directive_signed_by_root_key_refused(keyset: KeySet, trust: TrustRoot) -> None:
    with pytest.raises(errors.WrongRoleError):
        verify(sign_directive(directive(), [keyset.root]), trust)


def test_directive_signed_by_unknown_key_refused(trust: TrustRoot) -> None:
    with pytest.raises(errors.UnknownKeyError):
        verify(sign_directive(directive(), [SigningKey.generate()]), trust)


def test_unsigned_directive_refused(trust: TrustRoot) -> None:
    data = json.dumps({"signed": directive().to_signed(), "signatures": []}).encode()
    with pytest.raises(errors.ThresholdError):
        verify(data, trust)


def test_tampered_directive_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_directive(directive(), [keyset.server])
    tampered = data.replace(b'"sha256":"abab', b'"sha256":"cbab', 1)
    assert tampered != data
    with pytest.raises(errors.BadSignatureError):
        verify(tampered, trust)


def test_directive_retargeted_to_another_device_refused(keyset: KeySet, trust: TrustRoot) -> None:
    # A directive for cam-02, edited to name this device: the signature no longer holds.
    data = sign_directive(directive(device_id="cam-02"), [keyset.server])
    with pytest.raises(errors.BadSignatureError):
        verify(data.replace(b'"cam-02"', b'"cam-01"'), trust)


def test_signature_moved_to_other_directive_refused(keyset: KeySet, trust: TrustRoot) -> None:
    old = json.loads(sign_directive(directive(sequence=3), [keyset.server]))
    new = json.loads(sign_directive(directive(sequence=6), [keyset.server]))
    new["signatures"] = old["signatures"]
    with pytest.raises(errors.BadSignatureError):
        verify(canonical_json(new), trust)


def test_directive_with_float_in_signed_part_refused(keyset: KeySet, trust: TrustRoot) -> None:
    envelope = json.loads(sign_directive(directive(), [keyset.server]))
    envelope["signed"]["shadow"] = 0.5
    with pytest.raises(errors.MalformedDocumentError):
        verify(json.dumps(envelope).encode(), trust)


# --- directives: envelope and schema ------------------------------------------------------


def test_oversized_directive_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_directive(directive(), [keyset.server])
    padded = data[:-1] + b" " * MAX_DIRECTIVE_BYTES + b"}"
    with pytest.raises(errors.MalformedDocumentError, match="limit"):
        verify(padded, trust)


def test_directive_with_huge_integer_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_directive(directive(), [keyset.server])
    with pytest.raises(errors.MalformedDocumentError):
        verify(data.replace(b'"sequence":5', b'"sequence":' + b"9" * 5000), trust)


def test_fleet_timestamp_as_directive_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_fleet_timestamp(timestamp(), [keyset.server])
    with pytest.raises(errors.MalformedDocumentError, match="fleet-timestamp"):
        verify(data, trust)


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b'{"signed": {}}'])
def test_garbage_directive_refused(data: bytes, trust: TrustRoot) -> None:
    with pytest.raises(errors.MalformedDocumentError):
        verify(data, trust)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sequence": "6"}, "sequence"),
        ({"sequence": 0}, "sequence"),
        ({"action": "format-disk"}, "action"),
        ({"bundle": None}, "bundle"),
        ({"sources": []}, "source"),
        ({"sources": [{"transport": "ftp", "url": "ftp://x"}]}, "sources"),
        ({"sources": [{"transport": "http", "url": "file:///etc/passwd"}]}, "url"),
        ({"expires": "tomorrow"}, "expires"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_server_signed_directive_outside_schema_refused(
    change: dict[str, Any], field: str, keyset: KeySet, trust: TrustRoot
) -> None:
    signed = directive().to_signed() | change
    with pytest.raises(errors.MalformedDocumentError, match=field):
        verify(resign(signed, keyset.server), trust)


def test_directive_schema_refuses_install_without_bundle() -> None:
    with pytest.raises(ValueError, match="bundle"):
        directive(bundle=None)


# --- directives: content ------------------------------------------------------------------


def test_directive_for_another_device_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_directive(directive(device_id="cam-02"), [keyset.server])
    with pytest.raises(errors.WrongDeviceError):
        verify(data, trust)


def test_replayed_directive_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_directive(directive(sequence=5), [keyset.server])
    accepted = verify(data, trust, last_sequence=4)
    with pytest.raises(errors.ReplayedDirectiveError, match=r"5 .* 5"):
        verify(data, trust, last_sequence=accepted.sequence)


def test_out_of_order_directive_refused(keyset: KeySet, trust: TrustRoot) -> None:
    older = sign_directive(directive(sequence=3), [keyset.server])
    with pytest.raises(errors.ReplayedDirectiveError, match=r"3 .* 5"):
        verify(older, trust, last_sequence=5)


def test_expired_directive_refused(keyset: KeySet, trust: TrustRoot) -> None:
    sent = directive(issued=format_time(NOW - dt.timedelta(days=2)), expires=format_time(NOW))
    with pytest.raises(errors.DirectiveExpiredError):
        verify(sign_directive(sent, [keyset.server]), trust)


def test_directive_issued_far_in_future_refused(keyset: KeySet, trust: TrustRoot) -> None:
    issued = NOW + MAX_CLOCK_SKEW + dt.timedelta(seconds=1)
    sent = directive(issued=format_time(issued), expires=format_time(issued + dt.timedelta(days=1)))
    with pytest.raises(errors.DirectiveFromFutureError, match="future"):
        verify(sign_directive(sent, [keyset.server]), trust)


def test_directive_under_expired_trust_root_refused(keyset: KeySet) -> None:
    expired = make_trust_root(keyset, expires=NOW - dt.timedelta(seconds=1))
    with pytest.raises(errors.TrustRootExpiredError):
        verify(sign_directive(directive(), [keyset.server]), expired)


def test_signature_checked_before_content(trust: TrustRoot) -> None:
    # A forged directive that is also expired and for another device reports the forgery.
    sent = directive(device_id="cam-02", sequence=1, expires=format_time(NOW))
    with pytest.raises(errors.UnknownKeyError):
        verify(sign_directive(sent, [SigningKey.generate()]), trust, last_sequence=9)


def test_forged_signature_under_server_key_id_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = json.loads(sign_directive(directive(), [keyset.server]))
    data["signatures"] = [Signature(keyid=keyset.server.keyid, sig="00" * 64).model_dump()]
    with pytest.raises(errors.BadSignatureError):
        verify(canonical_json(data), trust)


def test_repeated_server_signature_counts_once(keyset: KeySet, trust: TrustRoot) -> None:
    data = json.loads(sign_directive(directive(), [keyset.server]))
    data["signatures"].append(data["signatures"][0])
    assert verify(canonical_json(data), trust) == directive()


def test_bad_arguments_are_usage_errors(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_directive(directive(), [keyset.server])
    with pytest.raises(errors.UsageError):
        verify_directive(data, trust, device_id=DEVICE, last_sequence=-1, now=NOW)
    with pytest.raises(errors.UsageError):
        verify_directive(
            data, trust, device_id=DEVICE, last_sequence=0, now=NOW.replace(tzinfo=None)
        )
    with pytest.raises(errors.UsageError):
        sign_directive(directive(), [])


# --- fleet timestamp ----------------------------------------------------------------------


def verify_ts(data: bytes, trust: TrustRoot, last_sequence: int = 9) -> FleetTimestamp:
    return verify_fleet_timestamp(data, trust, last_sequence=last_sequence, now=NOW)


def test_fleet_timestamp_accepted(keyset: KeySet, trust: TrustRoot) -> None:
    sent = timestamp()
    accepted = verify_ts(sign_fleet_timestamp(sent, [keyset.server]), trust)
    assert accepted == sent
    assert not accepted.is_expired(NOW)


def test_fleet_timestamp_stale_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_fleet_timestamp(timestamp(sequence=10), [keyset.server])
    with pytest.raises(errors.FleetTimestampError, match="stale"):
        verify_ts(data, trust, last_sequence=10)
    with pytest.raises(errors.FleetTimestampError, match="stale"):
        verify_ts(data, trust, last_sequence=11)


def test_fleet_timestamp_expired_refused(keyset: KeySet, trust: TrustRoot) -> None:
    sent = timestamp(issued=format_time(NOW - dt.timedelta(hours=2)), expires=format_time(NOW))
    with pytest.raises(errors.FleetTimestampError, match="frozen out"):
        verify_ts(sign_fleet_timestamp(sent, [keyset.server]), trust)


def test_fleet_timestamp_issued_far_in_future_refused(keyset: KeySet, trust: TrustRoot) -> None:
    issued = NOW + MAX_CLOCK_SKEW + dt.timedelta(seconds=1)
    sent = timestamp(
        issued=format_time(issued), expires=format_time(issued + dt.timedelta(hours=1))
    )
    with pytest.raises(errors.FleetTimestampError, match="future"):
        verify_ts(sign_fleet_timestamp(sent, [keyset.server]), trust)


def test_fleet_timestamp_signed_by_release_key_refused(keyset: KeySet, trust: TrustRoot) -> None:
    with pytest.raises(errors.WrongRoleError):
        verify_ts(sign_fleet_timestamp(timestamp(), [keyset.release]), trust)


def test_fleet_timestamp_signed_by_unknown_key_refused(trust: TrustRoot) -> None:
    with pytest.raises(errors.UnknownKeyError):
        verify_ts(sign_fleet_timestamp(timestamp(), [SigningKey.generate()]), trust)


def test_tampered_fleet_timestamp_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_fleet_timestamp(timestamp(sequence=10), [keyset.server])
    with pytest.raises(errors.BadSignatureError):
        verify_ts(data.replace(b'"sequence":10', b'"sequence":99'), trust)


def test_directive_as_fleet_timestamp_refused(keyset: KeySet, trust: TrustRoot) -> None:
    with pytest.raises(errors.MalformedDocumentError):
        verify_ts(sign_directive(directive(), [keyset.server]), trust)


def test_oversized_fleet_timestamp_refused(keyset: KeySet, trust: TrustRoot) -> None:
    data = sign_fleet_timestamp(timestamp(), [keyset.server])
    with pytest.raises(errors.MalformedDocumentError, match="limit"):
        verify_ts(data[:-1] + b" " * MAX_DIRECTIVE_BYTES + b"}", trust)


def test_a_diagnostics_directive_names_a_request_and_no_bundle(
    trust: TrustRoot, keyset: KeySet
) -> None:
    asking = directive(action="diagnostics", bundle=None, sources=[], request_id=12)
    signed = sign_directive(asking, [keyset.server])
    accepted = verify_directive(signed, trust, device_id=DEVICE, last_sequence=4, now=NOW)
    assert (accepted.action, accepted.request_id) == ("diagnostics", 12)
    with pytest.raises(ValueError, match="request_id"):
        directive(action="diagnostics", bundle=None, sources=[])
    with pytest.raises(ValueError, match="no bundle"):
        directive(action="diagnostics", sources=[], request_id=12)
    with pytest.raises(ValueError, match="request_id"):
        directive(request_id=12)  # an install


def test_install_directives_sign_no_request_id_so_older_agents_accept_them() -> None:
    assert "request_id" not in directive().to_signed()
    assert "request_id" not in directive(action="rollback", sources=[]).to_signed()


def test_a_benchmark_directive_names_its_request_as_a_bundle_fetched_over_http(
    trust: TrustRoot, keyset: KeySet
) -> None:
    request = BundleRef(name="edgefleet-benchmark", version="0.0.0", sha256="cd" * 32, length=5000)
    over_http = [HttpSource(url="https://fleet.example/api/v1/benchmarks/3/request")]
    asking = directive(action="benchmark", bundle=request, sources=over_http, request_id=3)
    signed = sign_directive(asking, [keyset.server])
    accepted = verify_directive(signed, trust, device_id=DEVICE, last_sequence=4, now=NOW)
    assert (accepted.action, accepted.request_id, accepted.bundle) == ("benchmark", 3, request)
    with pytest.raises(ValueError, match="request_id"):
        directive(action="benchmark", bundle=request, sources=over_http)
    with pytest.raises(ValueError, match="names its request"):
        directive(action="benchmark", bundle=None, sources=over_http, request_id=3)
    with pytest.raises(ValueError, match="no shadow"):
        directive(action="benchmark", bundle=request, sources=over_http, request_id=3, shadow=True)
    with pytest.raises(ValueError, match="http source"):
        directive(
            action="benchmark",
            bundle=request,
            sources=[MqttBlocksSource(block_size=16_384)],
            request_id=3,
        )


# --- the fields the server accepts --------------------------------------------------------


def accepts(**overrides: Any) -> FleetAccepts:
    fields: dict[str, Any] = {
        "sequence": 10,
        "issued": format_time(NOW - dt.timedelta(minutes=1)),
        "expires": format_time(NOW + dt.timedelta(hours=1)),
        "messages": accepted_fields(),
    }
    fields.update(overrides)
    return FleetAccepts(**fields)


def verify_accepts(data: bytes, trust: TrustRoot, last_sequence: int = 9) -> FleetAccepts:
    return verify_fleet_accepts(data, trust, last_sequence=last_sequence, now=NOW)


def test_the_servers_accepted_fields_are_taken_when_signed_fresh_and_newer(
    keyset: KeySet, trust: TrustRoot
) -> None:
    sent = accepts()
    assert verify_accepts(sign_fleet_accepts(sent, [keyset.server]), trust) == sent
    data = sign_fleet_accepts(sent, [keyset.server])
    with pytest.raises(errors.FleetAcceptsError, match="stale"):
        verify_accepts(data, trust, last_sequence=10)  # the same one again, or a replay
    late = accepts(issued=format_time(NOW - dt.timedelta(hours=2)), expires=format_time(NOW))
    with pytest.raises(errors.FleetAcceptsError, match="expired"):
        verify_accepts(sign_fleet_accepts(late, [keyset.server]), trust)
    issued = NOW + MAX_CLOCK_SKEW + dt.timedelta(seconds=1)
    early = accepts(issued=format_time(issued), expires=format_time(issued + dt.timedelta(hours=1)))
    with pytest.raises(errors.FleetAcceptsError, match="future"):
        verify_accepts(sign_fleet_accepts(early, [keyset.server]), trust)


def test_the_accepted_fields_are_refused_unless_the_server_role_signed_them(
    keyset: KeySet, trust: TrustRoot
) -> None:
    with pytest.raises(errors.WrongRoleError):
        verify_accepts(sign_fleet_accepts(accepts(), [keyset.release]), trust)
    with pytest.raises(errors.UnknownKeyError):
        verify_accepts(sign_fleet_accepts(accepts(), [SigningKey.generate()]), trust)
    data = sign_fleet_accepts(accepts(), [keyset.server])
    with pytest.raises(errors.BadSignatureError):
        verify_accepts(data.replace(b'"link.connects",', b""), trust)
    with pytest.raises(errors.MalformedDocumentError):  # another document type
        verify_accepts(sign_fleet_timestamp(timestamp(), [keyset.server]), trust)


@pytest.mark.parametrize(
    "messages",
    [
        {"heartbeat": ["link..connects"]},
        {"heartbeat": ["Link"]},
        {"heartbeat": ["*.counts"]},
        {"heartbeat": "link"},
        {"Heartbeat": ["link"]},
        {f"kind{n}": ["a"] for n in range(17)},
    ],
)
def test_accepted_fields_outside_the_schema_are_refused(
    messages: Any, keyset: KeySet, trust: TrustRoot
) -> None:
    signed = {**accepts().to_signed(), "messages": messages}
    with pytest.raises(errors.MalformedDocumentError, match="not valid"):
        verify_accepts(resign(signed, keyset.server), trust)
