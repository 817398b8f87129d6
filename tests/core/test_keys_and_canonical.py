"""Key files, canonical JSON and semantic versions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edgefleet import errors
from edgefleet.canonical import canonical_json, parse_json
from edgefleet.keys import SigningKey, load_private_key, load_public_key, save_private_key
from edgefleet.semver import Version


def test_private_key_file_is_owner_only(tmp_path: Path) -> None:
    key = SigningKey.generate()
    save_private_key(tmp_path / "k.key", key)
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert load_private_key(tmp_path / "k.key").keyid == key.keyid
    assert load_public_key(tmp_path / "k.key").keyid == key.keyid


def test_encrypted_key_needs_its_passphrase(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "k.key"
    save_private_key(path, key, b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert load_private_key(path, b"correct horse").keyid == key.keyid
    with pytest.raises(errors.KeyFileError, match="wrong passphrase"):
        load_private_key(path, b"battery staple")
    with pytest.raises(errors.KeyFileError, match="passphrase-env"):
        load_private_key(path)


def test_garbage_key_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(errors.KeyFileError):
        load_private_key(path)
    with pytest.raises(errors.KeyFileError):
        load_private_key(tmp_path / "missing.key")


def test_canonical_json_is_sorted_and_compact() -> None:
    assert (
        canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()
    )


def test_canonical_json_refuses_floats() -> None:
    with pytest.raises(errors.UsageError, match="floats"):
        canonical_json({"threshold": 0.5})


@pytest.mark.parametrize(
    "data", [b'{"a": 1, "a": 2}', b'{"a": NaN}', b"\xff\xfe", b"{", b"[" * 100_000]
)
def test_parse_json_refuses_ambiguous_or_malformed(data: bytes) -> None:
    with pytest.raises(errors.MalformedDocumentError):
        parse_json(data, "document")


def test_parse_json_names_the_first_duplicate_key_at_any_depth() -> None:
    with pytest.raises(errors.MalformedDocumentError, match="duplicate key 'b'"):
        parse_json(b'{"a": {"x": 1, "b": 2, "y": 3, "b": 4, "x": 5}}', "document")
    assert parse_json(b'{"a": {"b": 1}, "b": {"a": 2}}', "document") == {
        "a": {"b": 1},
        "b": {"a": 2},
    }


def test_parse_json_refuses_a_byte_order_mark_as_json_loads_does() -> None:
    with pytest.raises(errors.MalformedDocumentError, match="BOM"):
        parse_json(b"\xef\xbb\xbf{}", "document")


def test_semver_order() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0", "1.2.0"]
    versions = [Version.parse(v) for v in ordered]
    assert versions == sorted(reversed(versions))
    assert (
        Version.parse("1.2.3").derived_release_counter()
        < Version.parse("1.10.0").derived_release_counter()
    )
    with pytest.raises(ValueError):
        Version.parse("1.2")


def test_cryptography_signatures_verify_with_libsodium() -> None:
    # Signing uses `cryptography`, verification PyNaCl: both must agree on RFC 8032.
    key, other = SigningKey.generate(), SigningKey.generate()
    signature = key.sign(b"directive")
    assert key.public.is_valid_signature(signature, b"directive")
    assert not key.public.is_valid_signature(signature, b"directivf")
    assert not other.public.is_valid_signature(signature, b"directive")
    assert not key.public.is_valid_signature(bytes(64), b"directive")


def test_small_order_public_key_never_verifies() -> None:
    # The identity point: libsodium refuses it outright, whatever the signature.
    from edgefleet.keys import PublicKey

    identity = PublicKey(public="01" + "00" * 31)
    assert not identity.is_valid_signature(bytes(64), b"anything")
