"""Verifying and extracting bundles: the checks every device runs before installing.

Verification streams the bundle once in constant memory. The manifest comes
first and its release signatures, size, profile, floor and agent version are
checked before any file is read (`verify_manifest` stops there); then each
member must be a regular file at a safe path, listed once, with the listed
length and SHA-256. Extraction is that same pass, writing each file into a
temporary directory beside the destination, renamed into place only when
every check has passed; on any failure the temporary directory is removed, so
nothing of a refused bundle is left on disk. An installer therefore reads a
bundle once: `verify_manifest` to decide before it takes any disk, then
`extract_bundle`, which checks every file as it writes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from edgefleet.bundle.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_bundle_path,
    check_version_text,
    parse_manifest_envelope,
)
from edgefleet.bundle.tarstream import Member, TarStream
from edgefleet.bundlefiles import SERVED_MODELS, SERVED_RUNTIMES
from edgefleet.errors import (
    AgentTooOldError,
    BelowSecurityFloorError,
    BundleTooLargeError,
    DuplicateFileError,
    FileLengthError,
    LinkInBundleError,
    LocalError,
    ManifestTooLargeError,
    MissingFileError,
    NotABundleError,
    NothingToServeError,
    ProfileMismatchError,
    RuntimeNotOnProfileError,
    TamperedFileError,
    UnlistedFileError,
    UsageError,
)
from edgefleet.fileio import fsync_directory
from edgefleet.profiles import load_profile
from edgefleet.semver import Version
from edgefleet.signing import Envelope
from edgefleet.trust import TrustRoot


@dataclass(frozen=True)
class BundleLimits:
    max_bundle_bytes: int = 4 * 1024**3
    max_manifest_bytes: int = 1024**2
    max_files: int = 4096


@dataclass(frozen=True)
class BundlePolicy:
    """What this device requires of a bundle beyond its signatures.

    `security_floors`: the lowest release counter accepted, per model name (a
    name not listed has no floor).
    """

    profile: str | None = None
    security_floors: Mapping[str, int] = field(default_factory=dict)
    agent_version: str | None = None

    def __post_init__(self) -> None:
        """Raises: UsageError when `agent_version` is not a semantic version."""
        if self.agent_version is not None:
            check_version_text(self.agent_version, "agent version")


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    envelope: Envelope
    size: int


# Called with each listed file before its data is read; returns where to write it, or None.
_SinkFactory = Callable[[FileEntry], "contextlib.AbstractContextManager[IO[bytes] | None]"]


def served_model(manifest: Manifest) -> str:
    """The file the bundle serves: the first of SERVED_MODELS it lists.

    Raises: NothingToServeError when it lists none.
    """
    listed = manifest.files_by_path()
    served = next((name for name in SERVED_MODELS if name in listed), None)
    if served is None:
        raise NothingToServeError(
            f"bundle {manifest.name}@{manifest.version} holds none of "
            f"{', '.join(SERVED_MODELS)}: nothing to serve"
        )
    return served


def check_profile_runs(served: str, profile_name: str) -> None:
    """A profile this machine does not ship is trusted to run what the bundle claims.

    Raises: RuntimeNotOnProfileError when profile `profile_name` does not list the
        runtime `served` (model.onnx or model.tflite) needs.
    """
    runtime = SERVED_RUNTIMES[served]
    try:
        runtimes = load_profile(profile_name).runtimes
    except LocalError:
        return
    if runtime not in runtimes:
        raise RuntimeNotOnProfileError(
            f"{served} needs {runtime}, which profile {profile_name} does not run "
            f"(it runs {', '.join(runtimes)})"
        )


def check_served_model(manifest: Manifest, profiles: Iterable[str]) -> str:
    """What an agent of each of `profiles` checks before it installs: the bundle serves a
    model, and the profile runs its runtime. Returns the served file's name.

    Not part of `verify_*`: a benchmark request is a signed bundle of candidates that
    serves nothing. The agent's install, `bundle build` and `bundle verify` call it.

    Raises: NothingToServeError, RuntimeNotOnProfileError.
    """
    served = served_model(manifest)
    for profile in profiles:
        check_profile_runs(served, profile)
    return served


def _check_policy(manifest: Manifest, policy: BundlePolicy) -> None:
    if policy.profile is not None and policy.profile not in manifest.profiles:
        raise ProfileMismatchError(
            f"bundle {manifest.name}@{manifest.version} is for {', '.join(manifest.profiles)}, "
            f"not for profile {policy.profile}"
        )
    floor = policy.security_floors.get(manifest.name, 0)
    if manifest.release_counter < floor:
        raise BelowSecurityFloorError(
            f"bundle {manifest.name}@{manifest.version} has release counter "
            f"{manifest.release_counter}, below the security floor {floor} of {manifest.name}: "
            "only a release at or above the floor installs"
        )
    if policy.agent_version is not None and Version.parse(policy.agent_version) < Version.parse(
        manifest.min_agent_version
    ):
        raise AgentTooOldError(
            f"bundle {manifest.name}@{manifest.version} needs agent "
            f"{manifest.min_agent_version} or newer; this agent is {policy.agent_version}"
        )


def _read_manifest(stream: TarStream, members: Iterator[Member], limits: BundleLimits) -> bytes:
    member = next(members, None)
    if member is None:
        raise NotABundleError("the archive is empty: a bundle starts with its manifest")
    if member.path != MANIFEST_NAME or not member.is_regular:
        raise NotABundleError(
            f"the first member is {member.path!r}, not {MANIFEST_NAME!r}: not an edgefleet bundle"
        )
    if member.size > limits.max_manifest_bytes:
        raise ManifestTooLargeError(
            f"the manifest is {member.size} bytes, over the limit of {limits.max_manifest_bytes}"
        )
    return b"".join(stream.read_chunks())


@contextlib.contextmanager
def _no_sink(_entry: FileEntry) -> Iterator[None]:
    yield None


def _verified_manifest(
    stream: TarStream,
    members: Iterator[Member],
    trust: TrustRoot,
    policy: BundlePolicy,
    limits: BundleLimits,
    now: dt.datetime | None,
) -> tuple[Envelope, Manifest]:
    """Read the first member and check its signatures, limits and policy (steps 1-5)."""
    trust.verify_not_expired(now)
    envelope, manifest = parse_manifest_envelope(_read_manifest(stream, members, limits))
    trust.verify_signed_by(envelope, "release")
    if len(manifest.files) > limits.max_files:
        raise BundleTooLargeError(
            f"the manifest lists {len(manifest.files)} files, over the limit of {limits.max_files}"
        )
    if manifest.total_length > limits.max_bundle_bytes:
        raise BundleTooLargeError(
            f"the manifest lists {manifest.total_length} bytes of files, over the limit of "
            f"{limits.max_bundle_bytes}"
        )
    _check_policy(manifest, policy)
    return envelope, manifest


def _walk(
    source: BinaryIO,
    trust: TrustRoot,
    policy: BundlePolicy,
    limits: BundleLimits,
    sink: _SinkFactory,
    now: dt.datetime | None,
    progress: Callable[[int], None] | None,
) -> VerifiedBundle:
    stream = TarStream(source)
    members = stream.members()
    envelope, manifest = _verified_manifest(stream, members, trust, policy, limits, now)
    listed = manifest.files_by_path()
    seen: set[str] = set()
    for member in members:
        if not member.is_regular:
            raise LinkInBundleError(
                f"{member.path!r} is a {member.kind}: bundles hold regular files only"
            )
        check_bundle_path(member.path)
        entry = listed.get(member.path)
        if entry is None:
            raise UnlistedFileError(f"{member.path!r} is in the bundle but not in its manifest")
        if member.path in seen:
            raise DuplicateFileError(f"{member.path!r} appears twice in the bundle")
        seen.add(member.path)
        if member.size != entry.length:
            raise FileLengthError(
                f"{member.path!r} is {member.size} bytes, the manifest says {entry.length}"
            )
        digest = hashlib.sha256()
        with sink(entry) as out:
            for chunk in stream.read_chunks():
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        if digest.hexdigest() != entry.sha256:
            raise TamperedFileError(
                f"{member.path!r} does not match its SHA-256 in the manifest: "
                "the file was changed after signing"
            )
        if stream.bytes_read > limits.max_bundle_bytes:
            raise BundleTooLargeError(f"the bundle exceeds {limits.max_bundle_bytes} bytes")
    missing = sorted(set(listed) - seen)
    if missing:
        raise MissingFileError(f"the manifest lists {missing[0]!r}, but the bundle lacks it")
    return VerifiedBundle(manifest=manifest, envelope=envelope, size=stream.bytes_read)


@contextlib.contextmanager
def _open_bundle(path: Path, limits: BundleLimits) -> Iterator[BinaryIO]:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limits.max_bundle_bytes:
            raise BundleTooLargeError(
                f"{path} is {size} bytes, over the bundle size limit of {limits.max_bundle_bytes}"
            )
        yield handle


def verify_manifest(
    path: Path,
    trust: TrustRoot,
    policy: BundlePolicy = BundlePolicy(),
    limits: BundleLimits = BundleLimits(),
    now: dt.datetime | None = None,
) -> tuple[Envelope, Manifest]:
    """Check the bundle's manifest (signatures, limits, policy) reading the first member only.

    The files are NOT checked: `extract_bundle` checks each as it writes it.
    Use this to decide on a bundle before extracting it, never to trust its files.

    Raises:
        TrustRootExpiredError: `trust` has expired.
        BundleError: the file or its manifest is refused (see edgefleet.errors).
        SignatureError: the release role did not sign the manifest.
        MalformedDocumentError: the manifest is not a manifest.
        OSError: the file cannot be read.
    """
    with _open_bundle(path, limits) as source:
        stream = TarStream(source)
        return _verified_manifest(stream, stream.members(), trust, policy, limits, now)


def verify_bundle(
    path: Path,
    trust: TrustRoot,
    policy: BundlePolicy = BundlePolicy(),
    limits: BundleLimits = BundleLimits(),
    now: dt.datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifiedBundle:
    """Check every signature, file and policy of the bundle at `path`; write nothing.

    `progress`, when given, is called with the size of each chunk of file data read.

    Raises:
        TrustRootExpiredError: `trust` has expired.
        BundleError: the most specific reason (see edgefleet.errors).
        SignatureError: the release role did not sign the manifest.
        MalformedDocumentError: the manifest is not a manifest.
        OSError: the file cannot be read.
    """
    with _open_bundle(path, limits) as source:
        return _walk(source, trust, policy, limits, _no_sink, now, progress)


def extract_bundle(
    path: Path,
    destination: Path,
    trust: TrustRoot,
    policy: BundlePolicy = BundlePolicy(),
    limits: BundleLimits = BundleLimits(),
    now: dt.datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifiedBundle:
    """Verify the bundle and, only if every check passes, place its files at `destination`.

    `destination` must not exist; its parent must. The files are written into a
    temporary sibling directory, fsynced, and renamed into place at the end.

    Raises:
        UsageError: `destination` exists.
        Everything `verify_bundle` raises; then nothing is left on disk.
    """
    destination = Path(destination)
    if destination.exists():
        raise UsageError(f"{destination} exists: extract into a new directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        staging.chmod(0o755)

        @contextlib.contextmanager
        def write_file(entry: FileEntry) -> Iterator[IO[bytes]]:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: a path can be written once; O_NOFOLLOW: never through a link.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())

        with _open_bundle(path, limits) as source:
            verified = _walk(source, trust, policy, limits, write_file, now, progress)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(destination.parent)
    return verified


def read_manifest(path: Path, limits: BundleLimits = BundleLimits()) -> tuple[Envelope, Manifest]:
    """Read a bundle's manifest WITHOUT checking signatures or files (for display only).

    Raises:
        BundleError, MalformedDocumentError: not a readable bundle.
    """
    with _open_bundle(path, limits) as source:
        stream = TarStream(source)
        return parse_manifest_envelope(_read_manifest(stream, stream.members(), limits))
