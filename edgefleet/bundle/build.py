"""Building a bundle: a directory packed into one signed ustar file.

The manifest is the first member, then every file in path order. Headers carry
no owner, a fixed mode and the manifest's creation time, so the bytes depend
only on the files and the manifest. The output is written to a temporary file
and renamed into place; a file that changes while it is packed is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from edgefleet import __version__
from edgefleet.bundle.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_bundle_name,
    check_manifest_paths,
    check_version_text,
)
from edgefleet.bundle.verify import check_served_model
from edgefleet.bundlefiles import SERVED_MODELS
from edgefleet.canonical import parse_json
from edgefleet.errors import (
    EdgefleetError,
    NothingToServeError,
    RuntimeNotOnProfileError,
    UsageError,
)
from edgefleet.fileio import atomic_writer, check_output_file, file_sha256
from edgefleet.keys import SigningKey
from edgefleet.profiles import load_profile
from edgefleet.semver import MAX_RELEASE_COUNTER, Version
from edgefleet.signing import sign_document
from edgefleet.timefmt import format_time, utcnow
from edgefleet.validation import describe_validation_error

METADATA_NAME = "edgefleet-bundle.json"


@dataclass
class BundleMetadata:
    """What a bundle says about itself beyond its files (from SRC_DIR/edgefleet-bundle.json)."""

    profiles: list[str] = field(default_factory=list)
    min_agent_version: str | None = None
    release_counter: int | None = None
    lineage: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> BundleMetadata:
        """Raises: UsageError when the file is not valid metadata."""
        try:
            raw = parse_json(path.read_bytes(), str(path))
        except EdgefleetError as exc:
            raise UsageError(str(exc)) from exc
        allowed = {"profiles", "min_agent_version", "release_counter", "lineage"}
        if not isinstance(raw, dict) or set(raw) - allowed:
            raise UsageError(f"{path} must be a JSON object with keys among {sorted(allowed)}")
        return cls(
            profiles=list(raw.get("profiles", [])),
            min_agent_version=raw.get("min_agent_version"),
            release_counter=raw.get("release_counter"),
            lineage=dict(raw.get("lineage", {})),
        )


def parse_security_floor(text: str) -> int:
    """A security floor given as a release counter (`1000001000000`) or a version (`1.1.0`).

    A version stands for its derived release counter (ADR 0003), the counter a
    bundle of that version gets unless it sets its own.

    Raises: UsageError when `text` is neither, or above MAX_RELEASE_COUNTER.
    """
    if text.isdigit():
        return check_release_counter(int(text), "security floor")
    try:
        return Version.parse(text).derived_release_counter()
    except ValueError as exc:
        raise UsageError(
            f"security floor {text!r} is neither a release counter nor a version: {exc}"
        ) from None


def check_release_counter(counter: int, what: str = "release counter") -> int:
    """`counter` itself, when a manifest may carry it (0 to MAX_RELEASE_COUNTER).

    Raises: UsageError naming `what` and the bound.
    """
    if not 0 <= counter <= MAX_RELEASE_COUNTER:
        raise UsageError(
            f"{what} {counter} is outside 0 to {MAX_RELEASE_COUNTER} (2**63-1), the range the "
            "server stores and devices accept: give a smaller one"
        )
    return counter


def check_bundle_options(
    name: str,
    version: str,
    *,
    release_counter: int | None = None,
    min_agent_version: str | None = None,
    security_floor: int | None = None,
) -> int:
    """Check what the manifest will state, before any work; returns its release counter.

    `release_counter` None: the one derived from `version` (ADR 0003).

    Raises: UsageError naming the first bad value and the rule it breaks.
    """
    check_bundle_name(name)
    parsed = check_version_text(version)
    if min_agent_version is not None:
        check_version_text(min_agent_version, "minimum agent version")
    if release_counter is None:
        try:
            counter = parsed.derived_release_counter()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif isinstance(release_counter, bool) or not isinstance(release_counter, int):
        raise UsageError(f"release counter {release_counter!r} is not an integer")
    else:
        counter = check_release_counter(release_counter)
    if security_floor is not None:
        check_release_counter(security_floor, "security floor")
        if security_floor > counter:
            raise UsageError(
                f"security floor {security_floor} is above the release counter {counter} of "
                f"{version}: a release cannot refuse itself; give a floor at or below it"
            )
    return counter


def _check_installable(manifest: Manifest, src_dir: Path) -> None:
    """What every agent of the bundle's profiles checks before installing (`check_served_model`).

    Raises: UsageError saying what to change.
    """
    try:
        check_served_model(manifest, manifest.profiles)
    except NothingToServeError:
        raise UsageError(
            f"{src_dir} holds none of {', '.join(SERVED_MODELS)}, so devices would refuse the "
            "bundle: build from a directory `edgefleet convert` wrote"
        ) from None
    except RuntimeNotOnProfileError as exc:
        raise UsageError(
            f"{exc}: build for a profile that runs it, or convert the model for that target "
            "(`edgefleet convert --target PROFILE`)"
        ) from None


def _collect_files(src_dir: Path) -> list[tuple[str, Path]]:
    files = []
    for root, dirs, names in os.walk(src_dir, followlinks=False):
        dirs.sort()
        for name in [*names, *dirs]:
            full = Path(root) / name
            if full.is_symlink():
                raise UsageError(f"{full} is a symbolic link: bundles hold regular files only")
        for name in sorted(names):
            full = Path(root) / name
            relative = full.relative_to(src_dir).as_posix()
            if relative == METADATA_NAME:
                continue
            if not full.is_file():
                raise UsageError(f"{full} is not a regular file")
            files.append((relative, full))
    return sorted(files)


class _HashingReader:
    """Reads a file for tarfile while hashing what it hands over."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        return data


def _tar_info(path: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_bundle(
    src_dir: Path,
    output: Path,
    *,
    name: str,
    version: str,
    keys: Sequence[SigningKey],
    profiles: Iterable[str] = (),
    release_counter: int | None = None,
    min_agent_version: str | None = None,
    lineage: dict[str, Any] | None = None,
    created: dt.datetime | None = None,
    security_floor: int | None = None,
    serves_model: bool = True,
) -> Manifest:
    """Pack `src_dir` into a bundle at `output`, its manifest signed by `keys`.

    `output`'s missing parent directories are created.
    A bundle serves a model: it must hold model.onnx or model.tflite, whose runtime
    every profile it is for runs (what an agent checks before installing).
    `serves_model=False` is for a benchmark request, which holds candidates instead.

    Values given here override those in `src_dir/edgefleet-bundle.json`.
    `security_floor`, when given, is stated in the manifest: once this release
    commits on a device, that device refuses releases of this name below it.
    Each profile is a shipped hardware profile's name, or `host` for this machine's.

    Raises:
        UnknownProfileError: a profile no agent has (`edgefleet targets list`).
        UsageError: bad arguments or metadata, an `output` that is a directory or lies
            under a file, links or special files in `src_dir`,
            a path a bundle cannot hold, no model to serve or one a profile does not
            run, or a file that changed while it was packed.
    """
    src_dir, output = Path(src_dir), Path(output)
    if not src_dir.is_dir():
        raise UsageError(f"{src_dir} is not a directory")
    check_output_file(output, "bundle file")
    if not keys:
        raise UsageError("a bundle needs at least one release key to sign it")
    metadata_path = src_dir / METADATA_NAME
    metadata = BundleMetadata.load(metadata_path) if metadata_path.exists() else BundleMetadata()
    min_agent_version = min_agent_version or metadata.min_agent_version or __version__
    if release_counter is None:
        release_counter = metadata.release_counter
    counter = check_bundle_options(
        name,
        version,
        release_counter=release_counter,
        min_agent_version=min_agent_version,
        security_floor=security_floor,
    )
    chosen_profiles = list(
        dict.fromkeys(load_profile(profile).name for profile in [*profiles] or metadata.profiles)
    )
    if not chosen_profiles:
        raise UsageError(
            f"name the hardware profile(s) this bundle is for: --profile P, or 'profiles' in "
            f"{METADATA_NAME}"
        )
    files = _collect_files(src_dir)
    entries = []
    for relative, full in files:
        length, sha256 = file_sha256(full)
        entries.append(FileEntry(path=relative, length=length, sha256=sha256))
    moment = created or utcnow()
    try:
        manifest = Manifest(
            name=name,
            version=version,
            release_counter=counter,
            created=format_time(moment),
            profiles=chosen_profiles,
            min_agent_version=min_agent_version,
            files=entries,
            lineage={**metadata.lineage, **(lineage or {})},
            security_floor=security_floor,
        )
        check_manifest_paths(manifest)
    except ValidationError as exc:
        raise UsageError(f"cannot build bundle: {describe_validation_error(exc)}") from exc
    except EdgefleetError as exc:
        raise UsageError(f"cannot build bundle: {exc}") from exc
    if serves_model:
        _check_installable(manifest, src_dir)
    envelope = sign_document(manifest.to_signed(), keys)
    manifest_bytes = envelope.to_bytes()
    mtime = int(moment.timestamp())

    output.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_writer(output) as out,
        tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive,
    ):
        archive.addfile(
            _tar_info(MANIFEST_NAME, len(manifest_bytes), mtime), io.BytesIO(manifest_bytes)
        )
        for (relative, full), entry in zip(files, entries, strict=True):
            with open(full, "rb") as handle:
                reader = _HashingReader(handle)
                try:
                    archive.addfile(_tar_info(relative, entry.length, mtime), reader)
                except (OSError, ValueError) as exc:
                    raise UsageError(f"cannot pack {full}: {exc}") from exc
                if reader.digest.hexdigest() != entry.sha256:
                    raise UsageError(f"{full} changed while the bundle was built: build again")
    return manifest
