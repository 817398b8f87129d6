"""Installed versions of the model: staged directories and the `current`/`previous` links.

    versions/<id>/       id = <name>@<version>-<first 12 hex of the bundle file's SHA-256>;
                         the bundle's files plus manifest.json (its signed envelope)
    current -> versions/<id>     the version being served
    previous -> versions/<id>    the version to roll back to

Invariants, each kept at every instant so that a power cut anywhere is harmless:
- `versions/<id>` exists only when complete. Staging extracts (verifying every
  file) into a hidden sibling, adds manifest.json, and renames the directory
  into place. Hidden entries (`.` prefix) are leftovers of a cut; `prune`
  removes them, and so does a `remove` interrupted half way.
- `current` and `previous` each name a complete version or do not exist; they
  change only by `StateLayout.point` (an atomic, fsynced rename of a new link).
- `activate` writes `previous` before `current`. Between the two writes both
  name the old version; after them `current` names the new one and `previous`
  the old. So the version being replaced is named by a link throughout: it is
  never left to be served by nothing, and `prune` (which spares both links)
  can never delete it. The version that was `previous` before is no longer
  linked; an install in flight protects it through `prune(protect=...)`.
- Recency: staging and activating touch the directory's mtime, and `prune`
  keeps the N most recently used versions (current and previous always).

Nothing here checks a signature again: a directory under versions/ was verified
by `extract_bundle` when it was staged, and the state directory is the agent's own.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.errors import InstallError, RollbackError
from edgefleet.agent.layout import PRIVATE_DIR, StateLayout
from edgefleet.bundle import (
    MANIFEST_NAME,
    BundleLimits,
    BundlePolicy,
    Manifest,
    extract_bundle,
    read_manifest,
)
from edgefleet.bundle.manifest import parse_manifest_envelope
from edgefleet.bundlefiles import SERVED_MODELS
from edgefleet.errors import EdgefleetError
from edgefleet.fileio import atomic_write_bytes, file_sha256, fsync_directory
from edgefleet.signing import Envelope
from edgefleet.trust import TrustRoot

_STAGE_PREFIX = ".stage-"
_TRASH_PREFIX = ".trash-"


def version_id(name: str, version: str, bundle_sha256: str) -> str:
    """The directory name of a version: `<name>@<version>-<sha256[:12]>`."""
    return f"{name}@{version}-{bundle_sha256[:12]}"


def name_of(version_id_: str) -> str:
    """The model name inside a version id (`demo@1.2.3-abc...` -> `demo`)."""
    return version_id_.partition("@")[0]


def version_of(version_id_: str) -> str:
    """The semantic version inside a version id (`demo@1.2.3-rc.1-abc...` -> `1.2.3-rc.1`)."""
    return version_id_.partition("@")[2].rpartition("-")[0]


@dataclass(frozen=True)
class InstalledVersion:
    """A staged version: its directory and the manifest it was verified against."""

    id: str
    directory: Path
    manifest: Manifest
    envelope: Envelope

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def release_counter(self) -> int:
        return self.manifest.release_counter

    @property
    def served_model(self) -> Path | None:
        """model.onnx or model.tflite, whichever the bundle serves."""
        listed = self.manifest.files_by_path()
        return next((self.directory / n for n in SERVED_MODELS if n in listed), None)


class Versions:
    """The versions directory and the two links; see the module docstring for the invariants."""

    def __init__(self, layout: StateLayout, keep: int) -> None:
        if keep < 2:
            raise ValueError("keep must be at least 2 (current and previous)")
        self.layout = layout
        self.keep = keep

    # --- reading ---------------------------------------------------------------------------

    def path_of(self, id_: str) -> Path:
        return self.layout.versions / id_

    def load(self, id_: str) -> InstalledVersion:
        """Raises: InstallError when `id_` is not a complete staged version."""
        directory = self.path_of(id_)
        try:
            envelope, manifest = parse_manifest_envelope((directory / MANIFEST_NAME).read_bytes())
        except (OSError, EdgefleetError) as exc:
            raise InstallError(f"version {id_} is not installed or is damaged: {exc}") from exc
        return InstalledVersion(id=id_, directory=directory, manifest=manifest, envelope=envelope)

    def _link_id(self, link: Path) -> str | None:
        target = self.layout.resolve_link(link)
        return None if target is None else target.name

    def current_id(self) -> str | None:
        return self._link_id(self.layout.current)

    def previous_id(self) -> str | None:
        return self._link_id(self.layout.previous)

    def current(self) -> InstalledVersion | None:
        """The version being served, or None when nothing is installed.

        Raises: InstallError when the link names a damaged version (see the invariants).
        """
        id_ = self.current_id()
        return None if id_ is None else self.load(id_)

    def previous(self) -> InstalledVersion | None:
        id_ = self.previous_id()
        return None if id_ is None else self.load(id_)

    def ids(self) -> list[str]:
        """Every complete version, most recently used first."""
        entries = [p for p in self.layout.versions.iterdir() if not p.name.startswith(".")]
        entries.sort(key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
        return [p.name for p in entries if p.is_dir()]

    def is_intact(self, version: InstalledVersion) -> bool:
        """True when the directory holds exactly the manifest's files, each with its digest."""
        listed = version.manifest.files_by_path()
        present = {
            p.relative_to(version.directory).as_posix()
            for p in version.directory.rglob("*")
            if not p.is_dir()
        }
        if present != {*listed, MANIFEST_NAME}:
            return False
        for path, entry in listed.items():
            if file_sha256(version.directory / path) != (entry.length, entry.sha256):
                return False
        return True

    # --- changing --------------------------------------------------------------------------

    def stage(
        self,
        bundle_file: Path,
        trust: TrustRoot,
        policy: BundlePolicy = BundlePolicy(),
        limits: BundleLimits = BundleLimits(),
        *,
        sha256: str | None = None,
        now: dt.datetime | None = None,
    ) -> InstalledVersion:
        """Verify and extract `bundle_file` into versions/<id>; return the staged version.

        Idempotent: when versions/<id> exists it was verified when staged and is
        returned as it is (the id pins the bundle file's digest). `sha256`, when
        the caller has it, saves hashing the file again.

        Raises:
            Everything `extract_bundle` raises; then nothing is left under versions/.
        """
        if sha256 is None:
            sha256 = file_sha256(bundle_file)[1]
        _, unverified = read_manifest(bundle_file, limits)
        id_ = version_id(unverified.name, unverified.version, sha256)
        if self.path_of(id_).is_dir():
            os.utime(self.path_of(id_))
            return self.load(id_)
        staging = self.layout.versions / f"{_STAGE_PREFIX}{sha256[:12]}"
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a power cut
        verified = extract_bundle(bundle_file, staging, trust, policy, limits, now)
        try:
            manifest = verified.manifest
            if version_id(manifest.name, manifest.version, sha256) != id_:
                raise InstallError(f"{bundle_file} changed while it was being staged")
            atomic_write_bytes(staging / MANIFEST_NAME, verified.envelope.to_bytes())
            for directory in (staging, *staging.rglob("*")):  # private, as all of the state
                if directory.is_dir() and not directory.is_symlink():
                    directory.chmod(PRIVATE_DIR)
            os.replace(staging, self.path_of(id_))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(self.layout.versions)
        return self.load(id_)

    def activate(self, version: InstalledVersion) -> None:
        """Serve `version`: previous <- current, then current <- version. Idempotent."""
        os.utime(version.directory)
        if self.current_id() == version.id:
            return
        serving = self.layout.resolve_link(self.layout.current)
        if serving is not None and serving.is_dir():
            self.layout.point(self.layout.previous, serving)
        self.layout.point(self.layout.current, version.directory)

    def rollback(self) -> InstalledVersion:
        """Serve the previous version again: current <- previous, then previous is cleared.

        `previous` is cleared rather than swapped so that the version just rolled
        back from never becomes a fallback; a second rollback needs a new install.

        Raises:
            RollbackError: there is no previous version.
        """
        previous = self.previous()
        if previous is None:
            raise RollbackError("there is no previous version to roll back to")
        self.restore(previous, None)
        return previous

    def restore(self, current: InstalledVersion | None, previous: InstalledVersion | None) -> None:
        """Set both links to exactly these versions (None removes a link): current first.

        Absolute and therefore idempotent: the installer's rollback uses it with the
        versions it recorded before it changed anything.
        """
        if self.current_id() != (current.id if current else None):
            self.layout.point(self.layout.current, current.directory if current else None)
        if self.previous_id() != (previous.id if previous else None):
            self.layout.point(self.layout.previous, previous.directory if previous else None)

    def remove(self, id_: str) -> None:
        """Delete versions/<id> (never current or previous): renamed aside first, then deleted.

        Raises: InstallError when `id_` is linked.
        """
        if id_ in (self.current_id(), self.previous_id()):
            raise InstallError(f"version {id_} is in use and cannot be removed")
        directory = self.path_of(id_)
        if not directory.exists():
            return
        trash = self.layout.versions / f"{_TRASH_PREFIX}{id_}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(directory, trash)
        fsync_directory(self.layout.versions)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, protect: Collection[str | None] = ()) -> list[str]:
        """Keep the `keep` most recently used versions; return the ids removed.

        Never removes current, previous, or a version in `protect` (what an
        install in flight refers to), even when that keeps more than `keep`.
        Also removes hidden leftovers of interrupted staging or removal: call it
        only while no staging runs (the installer holds its lock).
        """
        for entry in self.layout.versions.iterdir():
            if not entry.name.startswith("."):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        spared = {self.current_id(), self.previous_id(), *protect} - {None}
        kept = set(spared)
        removed = []
        for id_ in self.ids():
            if id_ in kept:
                continue
            if len(kept) < self.keep:
                kept.add(id_)
            else:
                self.remove(id_)
                removed.append(id_)
        return removed
