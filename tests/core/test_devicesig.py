"""Device signatures: a message verifies only under its own device's key, on its own topic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey as NaclSigningKey

from edgefleet import errors
from edgefleet.mqtt import (
    FRAME_OVERHEAD,
    DeviceKey,
    DeviceTopics,
    is_device_frame,
    is_valid_public_key,
    sign_device_payload,
    split_device_frame,
    verify_device_payload,
)

# RFC 8032, section 7.1, test 1: pins the algorithm and the seed file's meaning.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC_SIGNATURE = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46"
    "bd25bf5f0595bbe24655141438e7a100b"
)

CAM1 = DeviceTopics("cam-01")
CAM2 = DeviceTopics("cam-02")
MESSAGE = b'{"device_id":"cam-01","install_state":"idle","schema_version":1}'


@pytest.fixture(scope="module")
def key() -> DeviceKey:
    return DeviceKey.from_seed(RFC_SEED)


@pytest.fixture(scope="module")
def other_key() -> DeviceKey:
    return DeviceKey.generate()


def test_signed_message_verifies_and_comes_back_unchanged(key: DeviceKey) -> None:
    frame = sign_device_payload(CAM1.status, MESSAGE, key)
    assert len(frame) == len(MESSAGE) + FRAME_OVERHEAD and is_device_frame(frame)
    assert verify_device_payload(CAM1.status, frame, key.public_hex) == MESSAGE


def test_key_is_rfc8032_ed25519(key: DeviceKey) -> None:
    assert key.public_hex == RFC_PUBLIC
    assert key.sign(b"").hex() == RFC_SIGNATURE


def test_frame_layout_is_the_documented_one(key: DeviceKey) -> None:
    # Rebuilt from the wire format alone, with libsodium directly.
    signed = b"edgefleet/v1 device-message\n" + CAM1.telemetry.encode() + b"\n" + MESSAGE
    signature = NaclSigningKey(RFC_SEED).sign(signed).signature
    expected = b"EFS1 " + signature.hex().encode() + b"\n" + MESSAGE
    assert sign_device_payload(CAM1.telemetry, MESSAGE, key) == expected
    assert split_device_frame(expected) == (bytes(signature), MESSAGE)


def test_empty_message_is_signed_too(key: DeviceKey) -> None:
    frame = sign_device_payload(CAM1.heartbeat, b"", key)
    assert verify_device_payload(CAM1.heartbeat, frame, key.public_hex) == b""


# --- attacks: each refused with DeviceSignatureError -----------------------------------------


def test_message_signed_by_another_devices_key_is_refused(
    key: DeviceKey, other_key: DeviceKey
) -> None:
    # cam-02 (or anyone with a key of its own) speaks on cam-01's topic.
    forged = sign_device_payload(CAM1.status, MESSAGE, other_key)
    with pytest.raises(errors.DeviceSignatureError, match="does not verify"):
        verify_device_payload(CAM1.status, forged, key.public_hex)


def test_frame_moved_to_another_devices_topic_is_refused(key: DeviceKey) -> None:
    # Even when the server looks up the right key for the message's claimed topic.
    frame = sign_device_payload(CAM1.status, MESSAGE, key)
    with pytest.raises(errors.DeviceSignatureError):
        verify_device_payload(CAM2.status, frame, key.public_hex)


def test_frame_moved_to_another_kind_of_topic_is_refused(key: DeviceKey) -> None:
    frame = sign_device_payload(CAM1.status, MESSAGE, key)
    for topic in (CAM1.telemetry, CAM1.heartbeat, CAM1.blocks_request, CAM1.status + "/"):
        with pytest.raises(errors.DeviceSignatureError):
            verify_device_payload(topic, frame, key.public_hex)


@pytest.mark.parametrize(
    "position",
    [
        pytest.param(-1, id="last-message-byte"),
        pytest.param(FRAME_OVERHEAD, id="first-message-byte"),
        pytest.param(5, id="first-signature-digit"),
        pytest.param(FRAME_OVERHEAD - 2, id="last-signature-digit"),
    ],
)
def test_tampered_frame_is_refused(key: DeviceKey, position: int) -> None:
    frame = bytearray(sign_device_payload(CAM1.status, MESSAGE, key))
    # Swap one hex digit for another (or change a message byte): still a well-formed frame.
    frame[position] = ord("0") if frame[position] != ord("0") else ord("1")
    with pytest.raises(errors.DeviceSignatureError):
        verify_device_payload(CAM1.status, bytes(frame), key.public_hex)


def test_bytes_appended_after_signing_are_refused(key: DeviceKey) -> None:
    frame = sign_device_payload(CAM1.status, MESSAGE, key)
    with pytest.raises(errors.DeviceSignatureError):
        verify_device_payload(CAM1.status, frame + b" ", key.public_hex)


@pytest.mark.parametrize("keep", [0, 4, 5, 70, FRAME_OVERHEAD - 1, FRAME_OVERHEAD, -1])
def test_truncated_frame_is_refused(key: DeviceKey, keep: int) -> None:
    frame = sign_device_payload(CAM1.status, MESSAGE, key)
    with pytest.raises(errors.DeviceSignatureError):
        verify_device_payload(CAM1.status, frame[:keep], key.public_hex)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(MESSAGE, id="plain-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b"EFS2 " + b"0" * 128 + b"\n{}", id="other-version"),
        pytest.param(b"EFS1 " + b"A" * 128 + b"\n{}", id="uppercase-hex"),
        pytest.param(b"EFS1 " + b"g" * 128 + b"\n{}", id="not-hex"),
        pytest.param(b"EFS1 " + b"0" * 128 + b" {}", id="no-newline"),
        pytest.param(b"EFS1 " + b"0" * 127 + b"\n{}", id="short-signature"),
    ],
)
def test_payload_that_is_not_a_frame_is_refused(key: DeviceKey, payload: bytes) -> None:
    with pytest.raises(errors.DeviceSignatureError, match="not signed"):
        verify_device_payload(CAM1.status, payload, key.public_hex)
    with pytest.raises(errors.MessageSchemaError):
        split_device_frame(payload)


def test_all_zero_signature_is_refused(key: DeviceKey) -> None:
    frame = b"EFS1 " + b"0" * 128 + b"\n" + MESSAGE
    with pytest.raises(errors.DeviceSignatureError):
        verify_device_payload(CAM1.status, frame, key.public_hex)


def test_not_bytes_is_refused(key: DeviceKey) -> None:
    with pytest.raises(errors.DeviceSignatureError):
        verify_device_payload(CAM1.status, MESSAGE.decode(), key.public_hex)  # type: ignore[arg-type]


def test_device_signature_error_is_untrusted_input() -> None:
    assert issubclass(errors.DeviceSignatureError, errors.UntrustedInputError)
    assert not issubclass(errors.DeviceSignatureError, errors.MessageSchemaError)


def test_broken_key_store_is_a_usage_error_not_a_refusal(key: DeviceKey) -> None:
    frame = sign_device_payload(CAM1.status, MESSAGE, key)
    for bad in ("", key.public_hex.upper(), key.public_hex[:-2]):
        with pytest.raises(errors.UsageError):
            verify_device_payload(CAM1.status, frame, bad)


def test_a_broken_key_is_refused_every_time_and_good_keys_still_verify(
    key: DeviceKey, other_key: DeviceKey
) -> None:
    # Verify keys are cached by public key: neither a refusal nor a key may stick.
    frame = sign_device_payload(CAM1.status, MESSAGE, key)
    for _ in range(2):
        with pytest.raises(errors.UsageError):
            verify_device_payload(CAM1.status, frame, key.public_hex[:-2])
        assert verify_device_payload(CAM1.status, frame, key.public_hex) == MESSAGE
        with pytest.raises(errors.DeviceSignatureError):
            verify_device_payload(CAM1.status, frame, other_key.public_hex)


def test_topic_with_a_newline_cannot_be_signed(key: DeviceKey) -> None:
    with pytest.raises(errors.UsageError):
        sign_device_payload("a\nb", MESSAGE, key)


# --- keys and key files ----------------------------------------------------------------------


def test_public_key_validity() -> None:
    assert is_valid_public_key(RFC_PUBLIC)
    assert is_valid_public_key(DeviceKey.generate().public_hex)
    assert not is_valid_public_key("00" * 32)  # small order: nothing verifies under it
    assert not is_valid_public_key(RFC_PUBLIC.upper())
    assert not is_valid_public_key(RFC_PUBLIC[:-2])
    assert not is_valid_public_key("zz" * 32)


def test_key_file_round_trip_is_the_raw_seed_with_mode_0600(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    path = tmp_path / "device.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    loaded = DeviceKey.load(path)
    assert loaded.public_hex == key.public_hex
    frame = sign_device_payload(CAM1.status, MESSAGE, loaded)
    assert verify_device_payload(CAM1.status, frame, key.public_hex) == MESSAGE
    assert key.public_hex[:12] in repr(key) and path.read_bytes().hex() not in repr(key)


def test_bad_key_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.KeyFileError, match="cannot read"):
        DeviceKey.load(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    os.chmod(short, 0o600)
    with pytest.raises(errors.KeyFileError, match="31 bytes"):
        DeviceKey.load(short)
    shared = tmp_path / "shared.key"
    DeviceKey.generate().save(shared)
    os.chmod(shared, 0o644)
    with pytest.raises(errors.KeyFileError, match="group or others"):
        DeviceKey.load(shared)
    with pytest.raises(errors.UsageError):
        DeviceKey.from_seed(b"x" * 16)
