"""`verify_manifest`: every refusal the manifest decides, reading the first member only.

An installer decides on a bundle with `verify_manifest` and then extracts it,
which checks every file: so the bundle is read once. Each manifest attack is
refused here with the same error as `verify_bundle`; what only the files can
tell (a tampered or missing file, a cut) is left to extraction.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet import errors
from edgefleet.bundle import BundleLimits, BundlePolicy, verify_bundle, verify_manifest
from edgefleet.keys import SigningKey
from edgefleet.signing import Envelope
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet, make_trust_root
from tests.core.forge import Member, flip_byte, forge, manifest_for, write_bundle

MODEL = os.urandom(5000)
FILES = {"model.onnx": MODEL, "samples/inputs.npz": b"sample inputs"}
BLOCK = 512


def _manifest_end(bundle: Path) -> int:
    """The offset where the member after the manifest begins: its header, its padded data."""
    size = int(bundle.read_bytes()[124:136].rstrip(b"\0 "), 8)  # the ustar size field
    return BLOCK + size + (-size % BLOCK)


def test_a_sound_manifest_passes_and_no_file_is_read(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    bundle.write_bytes(bundle.read_bytes()[: _manifest_end(bundle)])  # only the manifest left
    _, manifest = verify_manifest(bundle, trust, BundlePolicy(profile="x86_64-avx2"))
    assert (manifest.name, [f.path for f in manifest.files]) == (
        "demo",
        ["model.onnx", "samples/inputs.npz"],
    )
    with pytest.raises(errors.BundleTruncatedError):  # the full check reads on, and refuses
        verify_bundle(bundle, trust)


def test_a_tampered_file_is_left_to_extraction(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    flip_byte(bundle, bundle.read_bytes().index(MODEL) + 10)
    verify_manifest(bundle, trust)
    with pytest.raises(errors.TamperedFileError):
        verify_bundle(bundle, trust)


Attack = Callable[[Path, KeySet], Path]


def _changed_after_signing(tmp: Path, keys: KeySet) -> Path:
    bundle = forge(tmp / "b.efb", FILES, [keys.release])
    bundle.write_bytes(
        bundle.read_bytes().replace(b'"release_counter":7', b'"release_counter":9', 1)
    )
    return bundle


def _unsigned(tmp: Path, keys: KeySet) -> Path:
    envelope = Envelope(signed=manifest_for(FILES), signatures=[])
    return write_bundle(tmp / "b.efb", envelope, [Member(n, d) for n, d in FILES.items()])


def _not_a_bundle(tmp: Path, keys: KeySet) -> Path:
    (tmp / "b.efb").write_bytes(os.urandom(4096))
    return tmp / "b.efb"


# attack -> (bundle, error, policy, limits); the default trust root unless expired
ATTACKS: dict[str, tuple[Attack, type[errors.EdgefleetError], BundlePolicy, BundleLimits]] = {
    "unknown key": (
        lambda t, k: forge(t / "b.efb", FILES, [SigningKey.generate()]),
        errors.UnknownKeyError,
        BundlePolicy(),
        BundleLimits(),
    ),
    "server key": (
        lambda t, k: forge(t / "b.efb", FILES, [k.server]),
        errors.WrongRoleError,
        BundlePolicy(),
        BundleLimits(),
    ),
    "unsigned": (_unsigned, errors.ThresholdError, BundlePolicy(), BundleLimits()),
    "changed after signing": (
        _changed_after_signing,
        errors.BadSignatureError,
        BundlePolicy(),
        BundleLimits(),
    ),
    "other profile": (
        lambda t, k: forge(t / "b.efb", FILES, [k.release]),
        errors.ProfileMismatchError,
        BundlePolicy(profile="armv7-tflite"),
        BundleLimits(),
    ),
    "below the floor": (
        lambda t, k: forge(t / "b.efb", FILES, [k.release]),
        errors.BelowSecurityFloorError,
        BundlePolicy(security_floors={"demo": 8}),
        BundleLimits(),
    ),
    "newer agent": (
        lambda t, k: forge(t / "b.efb", FILES, [k.release], min_agent_version="2.0.0"),
        errors.AgentTooOldError,
        BundlePolicy(agent_version="1.9.9"),
        BundleLimits(),
    ),
    "file over the size limit": (
        lambda t, k: forge(t / "b.efb", FILES, [k.release]),
        errors.BundleTooLargeError,
        BundlePolicy(),
        BundleLimits(max_bundle_bytes=6000),
    ),
    "manifest over its limit": (
        lambda t, k: forge(t / "b.efb", FILES, [k.release]),
        errors.ManifestTooLargeError,
        BundlePolicy(),
        BundleLimits(max_manifest_bytes=100),
    ),
    "not a bundle": (_not_a_bundle, errors.NotABundleError, BundlePolicy(), BundleLimits()),
}


@pytest.mark.parametrize("attack", ATTACKS, ids=list(ATTACKS))
def test_manifest_attack_refused_as_the_full_check_refuses_it(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot, attack: str
) -> None:
    make, error, policy, limits = ATTACKS[attack]
    bundle = make(tmp_path, keyset)
    for check in (verify_manifest, verify_bundle):
        with pytest.raises(errors.EdgefleetError) as raised:
            check(bundle, trust, policy, limits)
        assert type(raised.value) is error, (check.__name__, raised.value)


def test_expired_trust_root_refused(tmp_path: Path, keyset: KeySet) -> None:
    expired = make_trust_root(keyset, expires=utcnow() - dt.timedelta(seconds=1))
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    with pytest.raises(errors.TrustRootExpiredError):
        verify_manifest(bundle, expired)
