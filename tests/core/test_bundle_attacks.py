"""Every way a bundle can be bad, each refused with its own error and nothing left on disk.

Each test checks three doors: the library call the agent uses (`verify_bundle`),
extraction (`extract_bundle`, which must leave nothing behind), and the CLI
(`edgefleet bundle verify`, exit 1 and the reason's code).
"""

from __future__ import annotations

import datetime as dt
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from edgefleet import errors
from edgefleet.bundle import BundleLimits, BundlePolicy, extract_bundle, verify_bundle
from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.keys import SigningKey
from edgefleet.signing import Envelope, sign_document
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from edgefleet.wire import error_code
from tests.conftest import KeySet, make_trust_root
from tests.core.forge import Member, flip_byte, forge, manifest_for, write_bundle

MODEL = os.urandom(5000)
FILES = {"model.onnx": MODEL, "samples/inputs.npz": b"sample inputs"}

Refused = Callable[..., None]


@pytest.fixture
def assert_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], trust: TrustRoot) -> Refused:
    def check(
        bundle: Path,
        error: type[errors.EdgefleetError],
        *,
        trust_root: TrustRoot | None = None,
        policy: BundlePolicy = BundlePolicy(),
        limits: BundleLimits = BundleLimits(),
        cli_args: Sequence[str] = (),
    ) -> None:
        root = trust_root or trust
        with pytest.raises(errors.EdgefleetError) as raised:
            verify_bundle(bundle, root, policy, limits)
        assert type(raised.value) is error, raised.value

        install_dir = tmp_path / "installs"
        install_dir.mkdir(exist_ok=True)
        with pytest.raises(error):
            extract_bundle(bundle, install_dir / "demo", root, policy, limits)
        assert list(install_dir.iterdir()) == [], "a refused bundle left files behind"

        trust_path = tmp_path / "cli-trust.json"
        trust_path.write_bytes(root.raw)
        capsys.readouterr()
        status = run_with_error_handling(
            cli, ["bundle", "verify", str(bundle), "--trust", str(trust_path), *cli_args]
        )
        stderr = capsys.readouterr().err
        assert status == 1, stderr
        assert f"refused [{error_code(raised.value)}]" in stderr
        assert "Traceback" not in stderr

    return check


def test_valid_bundle_verifies_and_extracts(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    bundle = forge(tmp_path / "ok.efb", FILES, [keyset.release])
    verified = verify_bundle(
        bundle, trust, BundlePolicy(profile="x86_64-avx2", security_floors={"demo": 7})
    )
    assert verified.manifest.name == "demo"
    extract_bundle(bundle, tmp_path / "out", trust)
    assert (tmp_path / "out" / "model.onnx").read_bytes() == MODEL
    assert (tmp_path / "out" / "samples" / "inputs.npz").read_bytes() == b"sample inputs"


def test_tampered_file_refused(tmp_path: Path, keyset: KeySet, assert_refused: Refused) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    flip_byte(bundle, bundle.read_bytes().index(MODEL) + 2500)
    assert_refused(bundle, errors.TamperedFileError)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_tampered_file_refused_at_any_byte(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused, where: str
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    start = bundle.read_bytes().index(MODEL)
    offset = {"first": start, "middle": start + len(MODEL) // 2, "last": start + len(MODEL) - 1}
    flip_byte(bundle, offset[where])
    assert_refused(bundle, errors.TamperedFileError)


def test_tampered_manifest_refused(tmp_path: Path, keyset: KeySet, assert_refused: Refused) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    data = bundle.read_bytes()
    # Raise the release counter in the signed manifest: same length, still valid JSON.
    forged = data.replace(b'"release_counter":7', b'"release_counter":9', 1)
    assert forged != data
    bundle.write_bytes(forged)
    assert_refused(bundle, errors.BadSignatureError)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.97])
def test_truncated_bundle_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused, fraction: float
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    data = bundle.read_bytes()
    end_of_files = data.index(b"sample inputs") + len(b"sample inputs")
    bundle.write_bytes(data[: max(1024, int(end_of_files * fraction))])
    assert_refused(bundle, errors.BundleTruncatedError)


def test_bundle_cut_at_member_boundary_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    data = bundle.read_bytes()
    after_model = data.index(MODEL) + len(MODEL)
    bundle.write_bytes(data[: after_model + (-after_model % 512)])
    assert_refused(bundle, errors.BundleTruncatedError)


def test_manifest_signed_by_unknown_key_refused(tmp_path: Path, assert_refused: Refused) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [SigningKey.generate()])
    assert_refused(bundle, errors.UnknownKeyError)


def test_manifest_signed_by_server_key_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.server])
    assert_refused(bundle, errors.WrongRoleError)


def test_manifest_signed_by_root_key_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.root])
    assert_refused(bundle, errors.WrongRoleError)


def test_unsigned_manifest_refused(tmp_path: Path, assert_refused: Refused) -> None:
    bundle = write_bundle(
        tmp_path / "b.efb",
        Envelope(signed=manifest_for(FILES), signatures=[]),
        [Member(n, d) for n, d in FILES.items()],
    )
    assert_refused(bundle, errors.ThresholdError)


def test_repeated_signature_does_not_fake_threshold(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    second = SigningKey.generate()
    two_of_two = make_trust_root(
        keyset, release=[keyset.release, second], thresholds={"release": 2}
    )
    once = sign_document(manifest_for(FILES), [keyset.release])
    twice = Envelope(signed=once.signed, signatures=[once.signatures[0]] * 2)
    bundle = write_bundle(tmp_path / "b.efb", twice, [Member(n, d) for n, d in FILES.items()])
    assert_refused(bundle, errors.ThresholdError, trust_root=two_of_two)
    # Both keys signing meets it.
    good = forge(tmp_path / "good.efb", FILES, [keyset.release, second])
    verify_bundle(good, two_of_two)


def test_unlisted_file_refused(tmp_path: Path, keyset: KeySet, assert_refused: Refused) -> None:
    members = [Member(n, d) for n, d in FILES.items()] + [Member("extra.py", b"import os")]
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=members)
    assert_refused(bundle, errors.UnlistedFileError)


def test_listed_file_missing_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(
        tmp_path / "b.efb", FILES, [keyset.release], members=[Member("model.onnx", MODEL)]
    )
    assert_refused(bundle, errors.MissingFileError)


def test_file_repeated_in_bundle_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    members = [Member(n, d) for n, d in FILES.items()] + [Member("model.onnx", MODEL)]
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=members)
    assert_refused(bundle, errors.DuplicateFileError)


@pytest.mark.parametrize("inner", ["samples/inputs.npz/x", "samples/inputs.npz/deeper/x"])
def test_file_that_is_also_a_directory_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused, inner: str
) -> None:
    # Signed and well-formed, but no file system holds both: staging would fail mid-way.
    files = {**FILES, inner: b"under a file"}
    bundle = forge(tmp_path / "b.efb", files, [keyset.release])
    assert_refused(bundle, errors.PathConflictError)
    with pytest.raises(errors.PathConflictError, match=r"'samples/inputs\.npz' as a file"):
        verify_bundle(bundle, make_trust_root(keyset))


def test_file_of_other_length_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    members = [
        Member("model.onnx", MODEL + b"more"),
        Member("samples/inputs.npz", b"sample inputs"),
    ]
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=members)
    assert_refused(bundle, errors.FileLengthError)


@pytest.mark.parametrize("path", ["../evil.py", "samples/../../evil.py", "./model.onnx"])
def test_parent_path_in_bundle_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused, path: str
) -> None:
    members = [Member(n, d) for n, d in FILES.items()] + [Member(path, b"x")]
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=members)
    assert_refused(bundle, errors.UnsafePathError)


@pytest.mark.parametrize("path", ["../evil.py", "/etc/cron.d/evil", "a//b", "a\\b", ""])
def test_unsafe_path_in_manifest_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused, path: str
) -> None:
    files = {**FILES, path: b"x"}
    bundle = forge(tmp_path / "b.efb", files, [keyset.release], members=[])
    assert_refused(bundle, errors.UnsafePathError)


def test_absolute_path_in_bundle_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    members = [Member(n, d) for n, d in FILES.items()] + [Member("/tmp/evil", b"x")]
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=members)
    assert_refused(bundle, errors.UnsafePathError)


def test_symlink_refused(tmp_path: Path, keyset: KeySet, assert_refused: Refused) -> None:
    link = Member("model.onnx", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=[link])
    assert_refused(bundle, errors.LinkInBundleError)


def test_hard_link_refused(tmp_path: Path, keyset: KeySet, assert_refused: Refused) -> None:
    members = [
        Member("model.onnx", MODEL),
        Member("samples/inputs.npz", type=tarfile.LNKTYPE, linkname="model.onnx"),
    ]
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=members)
    assert_refused(bundle, errors.LinkInBundleError)


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE])
def test_device_fifo_and_directory_members_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused, kind: bytes
) -> None:
    members = [Member("samples", type=kind), *[Member(n, d) for n, d in FILES.items()]]
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], members=members)
    assert_refused(bundle, errors.LinkInBundleError)


def test_manifest_over_size_limit_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    lineage = {f"note{i}": "x" * 100 for i in range(50)}
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], lineage=lineage)
    assert_refused(
        bundle,
        errors.ManifestTooLargeError,
        limits=BundleLimits(max_manifest_bytes=4096),
        cli_args=["--max-manifest-size", "4096"],
    )


def test_bundle_over_size_limit_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    assert_refused(
        bundle,
        errors.BundleTooLargeError,
        limits=BundleLimits(max_bundle_bytes=6000),
        cli_args=["--max-size", "6000"],
    )


def test_files_listed_over_size_limit_refused_before_reading(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    # The manifest claims 8 GiB of files: refused from the manifest alone.
    files = {"model.onnx": MODEL}
    signed = manifest_for(files)
    signed["files"][0]["length"] = 8 * 1024**3
    bundle = write_bundle(
        tmp_path / "b.efb", sign_document(signed, [keyset.release]), [Member("model.onnx", MODEL)]
    )
    with pytest.raises(errors.BundleTooLargeError):
        verify_bundle(bundle, trust)


def test_expired_trust_root_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    expired = make_trust_root(keyset, expires=utcnow() - dt.timedelta(seconds=1))
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    assert_refused(bundle, errors.TrustRootExpiredError, trust_root=expired)


def test_bundle_for_other_profile_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    assert_refused(
        bundle,
        errors.ProfileMismatchError,
        policy=BundlePolicy(profile="armv7-tflite"),
        cli_args=["--profile", "armv7-tflite"],
    )


def test_release_counter_below_floor_refused(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], release_counter=7)
    assert_refused(
        bundle,
        errors.BelowSecurityFloorError,
        policy=BundlePolicy(security_floors={"demo": 8}),
        cli_args=["--floor", "8"],
    )
    # A floor is per model name: another name's floor does not apply.
    verify_bundle(bundle, trust, BundlePolicy(security_floors={"other": 8}))


def test_bundle_for_newer_agent_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], min_agent_version="2.0.0")
    assert_refused(
        bundle,
        errors.AgentTooOldError,
        policy=BundlePolicy(agent_version="1.9.9"),
        cli_args=["--agent-version", "1.9.9"],
    )


@pytest.mark.parametrize(
    "content",
    [
        b"just some text, not a bundle\n" * 40,
        b"PK\x03\x04" + os.urandom(2000),  # a zip file
        os.urandom(4096),
    ],
    ids=["text", "zip", "random"],
)
def test_not_a_bundle_refused(tmp_path: Path, assert_refused: Refused, content: bytes) -> None:
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(content)
    assert_refused(bundle, errors.NotABundleError)


def test_tar_without_manifest_refused(tmp_path: Path, assert_refused: Refused) -> None:
    bundle = tmp_path / "b.efb"
    with tarfile.open(bundle, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(__file__, arcname="model.onnx")
    assert_refused(bundle, errors.NotABundleError)


def test_pax_headers_refused(tmp_path: Path, keyset: KeySet, assert_refused: Refused) -> None:
    bundle = forge(tmp_path / "ok.efb", FILES, [keyset.release])
    pax = tmp_path / "b.efb"
    with tarfile.open(bundle) as source, tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as out:
        for info in source.getmembers():
            info.pax_headers = {"comment": "x" * 100}
            out.addfile(info, source.extractfile(info))
    assert_refused(pax, errors.NotABundleError)


def test_data_after_end_of_archive_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    with open(bundle, "ab") as handle:
        handle.write(b"smuggled payload")
    assert_refused(bundle, errors.NotABundleError)


def test_empty_file_refused(tmp_path: Path, assert_refused: Refused) -> None:
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(b"")
    assert_refused(bundle, errors.NotABundleError)


def test_manifest_of_wrong_type_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release], _type="directive")
    assert_refused(bundle, errors.MalformedDocumentError)


def test_manifest_with_duplicate_json_keys_refused(
    tmp_path: Path, keyset: KeySet, assert_refused: Refused
) -> None:
    envelope = sign_document(manifest_for(FILES), [keyset.release])
    raw = envelope.to_bytes().replace(b'{"_type"', b'{"name":"other","_type"', 1)
    bundle = write_bundle(tmp_path / "b.efb", raw, [Member(n, d) for n, d in FILES.items()])
    assert_refused(bundle, errors.MalformedDocumentError)


def test_extract_refuses_existing_destination(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    bundle = forge(tmp_path / "b.efb", FILES, [keyset.release])
    (tmp_path / "out").mkdir()
    with pytest.raises(errors.UsageError):
        extract_bundle(bundle, tmp_path / "out", trust)


def test_an_altered_keyid_is_shown_whole_when_its_prefix_is_a_listed_keys(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    genuine = sign_document(manifest_for(FILES), [keyset.release])
    keyid = keyset.release.keyid
    altered = keyid[:-1] + ("0" if keyid[-1] != "0" else "1")
    signature = genuine.signatures[0].model_copy(update={"keyid": altered})
    bundle = write_bundle(
        tmp_path / "b.efb",
        Envelope(signed=genuine.signed, signatures=[signature]),
        [Member(n, d) for n, d in FILES.items()],
    )
    with pytest.raises(errors.UnknownKeyError) as refused:
        verify_bundle(bundle, trust)
    assert f"signed by key {altered}, which the trust root does not list" in str(refused.value)
    # A key that shares no prefix with a listed one keeps the short form.
    stranger = SigningKey.generate()
    with pytest.raises(errors.UnknownKeyError) as refused:
        verify_bundle(forge(tmp_path / "s.efb", FILES, [stranger]), trust)
    assert f"signed by key {stranger.keyid[:12]}, which" in str(refused.value)
