"""Trust roots: creation, rotation, and every way a device must refuse a new one."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from edgefleet import errors
from edgefleet.keys import SigningKey
from edgefleet.signing import sign_document
from edgefleet.timefmt import utcnow
from edgefleet.trust import (
    build_trust_root_signed,
    load_trust_chain,
    load_trust_root,
    rotate_trust_root,
    update_trust_root,
)
from tests.conftest import KeySet, make_trust_root

LATER = utcnow() + dt.timedelta(days=30)


def _signed(keyset: KeySet, version: int, root: list[SigningKey]) -> dict[str, object]:
    return build_trust_root_signed(
        version=version,
        expires=LATER,
        root=[key.public for key in root],
        release=[keyset.release.public],
        server=[keyset.server.public],
    )


def test_rotation_to_new_root_key_accepted(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    new_root = SigningKey.generate()
    v2 = rotate_trust_root(
        v1, signers=[keyset.root, new_root], expires=LATER, root=[new_root.public]
    )
    accepted = update_trust_root(v1, v2.raw)
    assert accepted.version == 2
    assert accepted.signed.roles["root"].keyids == [new_root.keyid]
    # And version 3 now needs the new root key, not the old one.
    v3 = rotate_trust_root(v2, signers=[new_root], expires=LATER)
    assert update_trust_root(accepted, v3.raw).version == 3


def test_trust_root_skipping_version_refused(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    v3 = sign_document(_signed(keyset, 3, [keyset.root]), [keyset.root])
    with pytest.raises(errors.TrustRootVersionError):
        update_trust_root(v1, v3.to_bytes())


def test_trust_root_rollback_refused(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    v2 = rotate_trust_root(v1, signers=[keyset.root], expires=LATER)
    with pytest.raises(errors.TrustRootVersionError):
        update_trust_root(v2, v1.raw)
    with pytest.raises(errors.TrustRootVersionError):
        update_trust_root(v2, v2.raw)


def test_trust_root_not_signed_by_old_root_refused(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    attacker = SigningKey.generate()
    v2 = sign_document(_signed(keyset, 2, [attacker]), [attacker])
    with pytest.raises(errors.TrustRootSignatureError) as raised:
        update_trust_root(v1, v2.to_bytes())
    assert "trusted version 1" in str(raised.value)


def test_trust_root_not_signed_by_new_root_refused(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    new_root = SigningKey.generate()
    # Signed by the old root only: the new root key never agreed to its role.
    v2 = sign_document(_signed(keyset, 2, [new_root]), [keyset.root])
    with pytest.raises(errors.TrustRootSignatureError) as raised:
        update_trust_root(v1, v2.to_bytes())
    assert "its own root keys" in str(raised.value)


def test_trust_root_signed_by_release_key_refused(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    v2 = sign_document(_signed(keyset, 2, [keyset.root]), [keyset.release])
    with pytest.raises(errors.TrustRootSignatureError):
        update_trust_root(v1, v2.to_bytes())


def test_tampered_trust_root_refused(tmp_path: Path, keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    document = json.loads(v1.raw)
    document["signed"]["roles"]["release"]["keyids"].append(SigningKey.generate().keyid)
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(document))
    with pytest.raises(errors.MalformedDocumentError):
        load_trust_root(path)  # lists a key id without its key


def test_trust_root_with_new_key_unsigned_refused(tmp_path: Path, keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    document = json.loads(v1.raw)
    extra = SigningKey.generate().public
    document["signed"]["keys"][extra.keyid] = extra.model_dump()
    document["signed"]["roles"]["release"]["keyids"].append(extra.keyid)
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(document))
    with pytest.raises(errors.TrustRootSignatureError):
        load_trust_root(path)


def test_expired_trust_root_refused_at_end_of_chain(tmp_path: Path, keyset: KeySet) -> None:
    expired = make_trust_root(keyset, expires=utcnow() - dt.timedelta(days=1))
    anchor = tmp_path / "trust.json"
    anchor.write_bytes(expired.raw)
    with pytest.raises(errors.TrustRootExpiredError):
        load_trust_chain(anchor)
    # An expired anchor is fine when a newer, valid version follows it.
    renewed = rotate_trust_root(expired, signers=[keyset.root], expires=LATER)
    newer = tmp_path / "trust.v2.json"
    newer.write_bytes(renewed.raw)
    assert load_trust_chain(anchor, [newer]).version == 2


def test_chain_applies_versions_in_order(tmp_path: Path, keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    v2 = rotate_trust_root(v1, signers=[keyset.root], expires=LATER)
    v3 = rotate_trust_root(v2, signers=[keyset.root], expires=LATER)
    paths = []
    for root in (v1, v2, v3):
        path = tmp_path / f"v{root.version}.json"
        path.write_bytes(root.raw)
        paths.append(path)
    assert load_trust_chain(paths[0], paths[1:]).version == 3
    with pytest.raises(errors.TrustRootVersionError):
        load_trust_chain(paths[0], [paths[2]])


def test_rotation_that_devices_would_refuse_is_not_written(keyset: KeySet) -> None:
    v1 = make_trust_root(keyset)
    new_root = SigningKey.generate()
    with pytest.raises(errors.UsageError):
        rotate_trust_root(v1, signers=[new_root], expires=LATER, root=[new_root.public])


def test_threshold_above_key_count_refused(keyset: KeySet) -> None:
    with pytest.raises(errors.UsageError):
        make_trust_root(keyset, thresholds={"release": 2})


def test_not_a_trust_root_refused(tmp_path: Path) -> None:
    for content in (
        b"",
        b"{}",
        b"not json",
        b'{"signed": {"_type": "directive"}, "signatures": []}',
    ):
        path = tmp_path / "trust.json"
        path.write_bytes(content)
        with pytest.raises(errors.MalformedDocumentError):
            load_trust_root(path)
