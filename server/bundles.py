"""The bundle store: verified bundle files on disk, one database row per name and version.

Layout under the data directory:

    uploads/<random>.part     bodies being received; moved or deleted by `push`
    bundles/<sha256>.efb      verified bundles, named by the SHA-256 of their bytes

Invariants:
- a `BundleRow` exists only for a file that is in place: `push` verifies the
  upload (the release role's signatures, every file's length and digest),
  moves it to its digest's name (fsync, rename, fsync of the directory), and
  only then adds the row to the caller's unit of work;
- a name and version always mean the same bytes: pushing different bytes
  under a stored name and version is refused (`BundleExistsError`), pushing
  the same bytes again changes nothing;
- an upload that is refused is deleted, so nothing of a refused bundle stays
  on disk;
- a new bundle's drift reference, if it carries one, is stored in the same
  unit of work as its row (`edgefleet.server.drift.reference`); pushing a
  stored bundle again stores its reference if it has none yet (it was pushed
  before this server stored references).

If the caller's commit fails after `push` moved the file, the file stays as
an orphan named by its digest. That is harmless: its bytes were verified, no
row points at it (so it is never served: `open_blob`), and pushing the same
bundle again reuses the name.
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.bundle import BundleLimits, Manifest, VerifiedBundle, read_manifest, verify_bundle
from edgefleet.errors import SignatureError, UntrustedInputError, UsageError
from edgefleet.fileio import file_sha256, fsync_directory
from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import BundleRow, DriftReferenceRow
from edgefleet.server.drift.accuracy import read_report
from edgefleet.server.drift.reference import read_reference, store_reference
from edgefleet.server.errors import BundleExistsError, NotFoundError, StorageError
from edgefleet.server.principals import Principal
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
BUNDLE_SUFFIX = ".efb"
UPLOAD_SUFFIX = ".part"


def is_sha256(text: str) -> bool:
    """True when `text` is a lowercase hex SHA-256 (and so safe as a file name)."""
    return isinstance(text, str) and _SHA256.fullmatch(text) is not None


def bundle_labels(session: Session, ids: Iterable[int]) -> dict[int, str]:
    """`name@version` of each bundle id of `ids` that names a stored bundle."""
    wanted = set(ids)
    if not wanted:
        return {}
    query = select(BundleRow.id, BundleRow.name, BundleRow.version).where(BundleRow.id.in_(wanted))
    return {row.id: f"{row.name}@{row.version}" for row in session.execute(query)}


def manifest_summary(verified: VerifiedBundle) -> dict[str, Any]:
    """What `bundles show` displays of a verified manifest (JSON-safe)."""
    manifest: Manifest = verified.manifest
    return {
        "name": manifest.name,
        "version": manifest.version,
        "created": manifest.created,
        "release_counter": manifest.release_counter,
        "security_floor": manifest.security_floor,
        "min_agent_version": manifest.min_agent_version,
        "profiles": list(manifest.profiles),
        "files": [
            {"path": entry.path, "length": entry.length, "sha256": entry.sha256}
            for entry in manifest.files
        ],
        "lineage": dict(manifest.lineage),
        "signed_by": [signature.keyid for signature in verified.envelope.signatures],
    }


class BundleStore:
    """Verified bundles in `data_dir`, indexed by the `bundles` table."""

    def __init__(
        self,
        data_dir: Path,
        trust: TrustRoot,
        clock: Callable[[], dt.datetime] = utcnow,
        *,
        limits: BundleLimits = BundleLimits(),
    ) -> None:
        """Create the uploads and bundles directories if missing.

        Raises:
            StorageError: the directories cannot be created.
        """
        self.trust = trust
        self.clock = clock
        self.limits = limits
        self.uploads_dir = Path(data_dir) / "uploads"
        self.bundles_dir = Path(data_dir) / "bundles"
        try:
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            self.bundles_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the bundle directories in {data_dir}: {exc}"
            ) from exc

    def new_upload_path(self) -> Path:
        """A new, empty file in the uploads directory, reserved for one upload.

        The caller writes the body into it (`open(path, "wb")`), then hands it
        to `push`, or deletes it when the upload fails.

        Raises:
            StorageError: the file cannot be created.
        """
        path = self.uploads_dir / f"{secrets.token_hex(16)}{UPLOAD_SUFFIX}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise StorageError(
                f"cannot create an upload file in {self.uploads_dir}: {exc}"
            ) from exc
        return path

    def remove_stale_uploads(self, max_age: dt.timedelta = dt.timedelta(hours=1)) -> int:
        """Delete uploads older than `max_age` (left by a crash mid-upload); how many."""
        removed = 0
        limit = time.time() - max_age.total_seconds()
        for path in self.uploads_dir.glob(f"*{UPLOAD_SUFFIX}"):
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
                    removed += 1
            except OSError:
                continue  # gone already, or not ours to delete
        return removed

    def push(self, session: Session, upload: Path, actor: Principal) -> tuple[BundleRow, bool]:
        """Verify the bundle at `upload` and store it: (row, True) when new, (row, False)
        when the same bytes are already stored under its name and version.

        `upload` must come from `new_upload_path`; it is moved into the store or
        deleted, whatever the outcome. The row and an audit entry ("bundle.push")
        are added to `session`, the caller's unit of work.

        Raises:
            UsageError: `upload` is not in the uploads directory (nothing is deleted).
            SignatureError: the release role did not sign the manifest.
            BundleError, MalformedDocumentError: the bundle is not valid (the most
                specific reason; see `edgefleet.errors`).
            TrustRootExpiredError: the server's trust root has expired.
            BundleExistsError: other bytes are stored under that name and version
                (the message names both digests), or were pushed at the same moment.
            StorageError: the upload or the data directory cannot be read or written.
        """
        upload = Path(upload)
        if upload.parent.resolve() != self.uploads_dir.resolve():
            raise UsageError(f"{upload} is not an upload: get one from new_upload_path()")
        try:
            return self._push(session, upload, actor)
        finally:
            upload.unlink(missing_ok=True)

    def _push(self, session: Session, upload: Path, actor: Principal) -> tuple[BundleRow, bool]:
        try:
            # The upload is private to the server (0600, random name), so the bytes
            # hashed here are the bytes verified next and moved after.
            length, sha256 = file_sha256(upload)
            verified = verify_bundle(upload, self.trust, limits=self.limits, now=self.clock())
        except OSError as exc:
            raise StorageError(f"cannot read the upload {upload.name}: {exc}") from exc
        manifest = verified.manifest
        existing = self._find(session, manifest.name, manifest.version)
        if existing is not None:
            self._check_same(existing, sha256)
            if not self.path_of(existing).is_file():
                self._place(upload, sha256)  # the data directory lost it: restore
            if session.get(DriftReferenceRow, existing.id) is None:
                # Pushed before this server stored references: store it now.
                self._store_drift_reference(session, existing, manifest, self.clock())
            return existing, False

        self._place(upload, sha256)
        now = self.clock()
        row = BundleRow(
            name=manifest.name,
            version=manifest.version,
            sha256=sha256,
            length=length,
            release_counter=manifest.release_counter,
            profiles=list(manifest.profiles),
            min_agent_version=manifest.min_agent_version,
            manifest=manifest_summary(verified),
            pushed_by=actor.name,
            pushed_at=now,
        )
        session.add(row)
        try:
            session.flush()
        except IntegrityError as exc:
            # Another push of this name and version was stored between our SELECT and
            # INSERT. The unit of work is spoiled (PostgreSQL aborts the transaction),
            # so the caller rolls back; pushing again then gets a definite answer.
            raise BundleExistsError(
                f"bundle {manifest.name}@{manifest.version} was pushed by someone else at "
                "the same moment; push again to compare"
            ) from exc
        details: dict[str, Any] = {
            "sha256": sha256,
            "length": length,
            "release_counter": manifest.release_counter,
        }
        self._store_report(row, manifest)
        drift = self._store_drift_reference(session, row, manifest, now)
        if drift is not None:
            details["drift_reference"] = drift
        record_audit(
            session, actor, "bundle.push", f"{manifest.name}@{manifest.version}", details, now=now
        )
        return row, True

    def _store_report(self, row: BundleRow, manifest: Manifest) -> None:
        """Keep the converter's report.json with the bundle (its reference accuracy); an
        unusable one is logged and left out, the push goes on."""
        try:
            row.report, note = read_report(self.path_of(row), manifest)
        except OSError as exc:
            raise StorageError(f"cannot read bundle {row.sha256}: {exc}") from exc
        if note is not None:
            log.warning("bundle %s@%s: report not stored: %s", row.name, row.version, note)

    def _store_drift_reference(
        self, session: Session, row: BundleRow, manifest: Manifest, now: dt.datetime
    ) -> str | None:
        """Store the bundle's drift reference; what the audit says of it (None: it has none)."""
        try:
            features, notes = read_reference(self.path_of(row), manifest)
        except OSError as exc:
            raise StorageError(f"cannot read bundle {row.sha256}: {exc}") from exc
        for note in notes:
            log.warning("bundle %s@%s: drift reference: %s", row.name, row.version, note)
        if features is not None:
            store_reference(session, row, features, now)
        if not notes:
            return None if features is None else "stored"
        return ("stored; " if features is not None else "") + "unusable: " + "; ".join(notes)

    @staticmethod
    def _check_same(existing: BundleRow, sha256: str) -> None:
        if existing.sha256 != sha256:
            raise BundleExistsError(
                f"bundle {existing.name}@{existing.version} is already stored with SHA-256 "
                f"{existing.sha256}; the pushed bytes have SHA-256 {sha256}. A version is "
                "immutable: build the change as a new version"
            )

    def _place(self, upload: Path, sha256: str) -> None:
        target = self.bundles_dir / f"{sha256}{BUNDLE_SUFFIX}"
        try:
            # The writer may not have synced the body; make the bytes durable before
            # the name that promises them.
            fd = os.open(upload, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(upload, 0o644)
            os.replace(upload, target)
        except OSError as exc:
            raise StorageError(f"cannot store bundle {sha256}: {exc}") from exc
        fsync_directory(self.bundles_dir)

    @staticmethod
    def _find(session: Session, name: str, version: str) -> BundleRow | None:
        query = select(BundleRow).where(BundleRow.name == name, BundleRow.version == version)
        return session.scalars(query).one_or_none()

    def get(self, session: Session, name: str, version: str) -> BundleRow:
        """The bundle `name`@`version`.

        Raises:
            NotFoundError: no such bundle.
        """
        row = self._find(session, name, version)
        if row is None:
            raise NotFoundError(f"no bundle {name}@{version}")
        return row

    def get_by_sha256(self, session: Session, sha256: str) -> BundleRow | None:
        """The bundle whose file has this SHA-256, if any."""
        if not is_sha256(sha256):
            return None
        query = select(BundleRow).where(BundleRow.sha256 == sha256).limit(1)
        return session.scalars(query).first()

    def list(self, session: Session, name: str | None = None) -> builtins.list[BundleRow]:
        """Every bundle (or every version of `name`), newest push first."""
        query = select(BundleRow).order_by(BundleRow.pushed_at.desc(), BundleRow.id.desc())
        if name is not None:
            query = query.where(BundleRow.name == name)
        return list(session.scalars(query))

    def path_of(self, row: BundleRow) -> Path:
        """Where the file of `row` is stored."""
        return self.bundles_dir / f"{row.sha256}{BUNDLE_SUFFIX}"

    def open_blob(self, session: Session, sha256: str) -> Path | None:
        """The file of the stored bundle with this SHA-256, or None.

        None also when no bundle row names the digest (an orphan a failed push
        left is never served, as the MQTT block service serves none either), when
        the file is missing, and for anything not a digest (so a request path can
        never name another file).
        """
        row = self.get_by_sha256(session, sha256)
        if row is None:
            return None
        path = self.path_of(row)
        if not path.is_file():
            self.log_missing(row)
            return None
        return path

    def log_missing(self, row: BundleRow) -> None:
        """Log, as an error, that the database lists `row` but its file is not here."""
        log.error(
            "bundle %s@%s is stored in the database but its file %s is missing: devices "
            "cannot download it from this replica; replicas must share one data directory "
            "(--data), and it must be backed up with the database",
            row.name,
            row.version,
            self.path_of(row),
        )

    def missing_files(self, session: Session) -> tuple[int, builtins.list[BundleRow]]:
        """(how many bundles the database lists, those of them whose file is not here)."""
        rows = list(session.scalars(select(BundleRow).order_by(BundleRow.id)))
        return len(rows), [row for row in rows if not self.path_of(row).is_file()]

    def check_files(self, session: Session) -> int:
        """At start: warn when bundles the database lists have no file in the data
        directory (a replica started with a data directory of its own); returns how many.

        The start goes on: the replica's API, ingestion and rollouts of the bundles it
        has are unaffected, and a rollout of a bundle it lacks is refused
        (`release_refusal`); a refusal here would take all of that down for it.
        """
        stored, missing = self.missing_files(session)
        if missing:
            example = missing[0]
            log.warning(
                "%d of the %d bundle(s) the database lists are missing from the data "
                "directory %s (e.g. %s@%s, %s): devices cannot download them from this "
                "replica. Replicas must share one data directory (--data on shared storage); "
                "%s",
                len(missing),
                stored,
                self.bundles_dir.parent,
                example.name,
                example.version,
                self.path_of(example).name,
                "none of them is here: is --data the directory the other replicas use?"
                if len(missing) == stored
                else "restore the missing files from the backup of the data directory",
            )
        return len(missing)

    def release_refusal(
        self, row: BundleRow, root: TrustRoot | None = None
    ) -> SignatureError | None:
        """What a device holding `root` (default: the newest, `self.trust`) would say of the
        release signatures on `row`'s manifest; None when it accepts them.

        A trust root that drops a release key strands what that key signed: devices
        refuse those bundles (unknown-key) however well they verified when pushed.

        Raises:
            StorageError: the bundle's file is missing or cannot be read.
        """
        path = self.path_of(row)
        try:
            envelope, _ = read_manifest(path, self.limits)
        except (OSError, UntrustedInputError) as exc:
            raise StorageError(
                f"the file of bundle {row.name}@{row.version} ({path}) cannot be read: {exc}; "
                "replicas must share one data directory (docs/server.md, The data directory)"
            ) from exc
        try:
            (root or self.trust).verify_signed_by(envelope, "release")
        except SignatureError as exc:
            return exc
        return None

    def require_trusted(self, row: BundleRow) -> None:
        """Refuse `row` when the newest trust root no longer accepts its release signatures.

        Raises:
            SignatureError (the device's reason, e.g. UnknownKeyError): devices would refuse it.
            StorageError: the bundle's file is missing or cannot be read.
        """
        refusal = self.release_refusal(row)
        if refusal is None:
            return
        raise type(refusal)(
            f"bundle {row.name}@{row.version}: trust root version {self.trust.version} no "
            f"longer accepts its signature ({refusal}), so every device would refuse it; sign "
            "the model again with a release key that trust root lists and push it as a new "
            "version, or push a trust root version that lists the key again "
            "(edgefleet keys rotate --add-release)"
        )

    def untrusted(self, session: Session, root: TrustRoot) -> builtins.list[tuple[BundleRow, str]]:
        """The stored bundles whose release signatures `root` does not accept, with the
        reason, oldest push first; bundles whose file is missing are left out (the start
        warns of those)."""
        stranded = []
        rows = session.scalars(select(BundleRow).order_by(BundleRow.pushed_at, BundleRow.id))
        for row in rows:
            try:
                refusal = self.release_refusal(row, root)
            except StorageError:
                continue
            if refusal is not None:
                stranded.append((row, str(refusal)))
        return stranded


__all__ = ["BUNDLE_SUFFIX", "BundleStore", "bundle_labels", "is_sha256", "manifest_summary"]
