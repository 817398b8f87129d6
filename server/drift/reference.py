"""The drift reference of each bundle, read from the bundle at push and stored.

What is stored (`drift_references`, one row per bundle) is what the evaluator
needs: per input and output feature, the reference counts and the calibrated
thresholds, from drift-features.json and drift-reference.json
(`edgefleet.driftfeatures` says how the two evolve). A bundle without either
is fine: its devices are simply not judged. A reference file this server
cannot read does not refuse the bundle either, as the agent keeps serving a
model whose reference it cannot use: the push is stored without it, logged,
and the audit entry says why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.bundle import Manifest
from edgefleet.bundle.tarstream import TarStream
from edgefleet.drift import REFERENCE_FILE, DriftReference, Histogram
from edgefleet.driftfeatures import FEATURES_FILE, DriftFeatures
from edgefleet.driftstats import FeatureThresholds
from edgefleet.errors import BundleError
from edgefleet.server.db.models import BundleRow, DriftReferenceRow

log = logging.getLogger(__name__)

MAX_REFERENCE_BYTES = 16 * 1024**2


class UnusableReferenceError(Exception):
    """The bundle's drift reference cannot be used (the message says why)."""


SIDES = ("inputs", "outputs")
Side = dict[str, tuple[Histogram, FeatureThresholds | None]]


@dataclass(frozen=True)
class JudgedFeatures:
    """What the evaluator needs of a reference: per feature name, the reference counts and
    the calibrated thresholds (None: the feature is shown, never judged)."""

    inputs: Side
    outputs: Side

    def to_json(self) -> dict[str, Any]:
        return {side: _side_json(getattr(self, side)) for side in SIDES}

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> JudgedFeatures:
        """Raises: ValidationError when `stored` is not what `to_json` wrote."""
        return cls(**{side: _side_from_json(stored.get(side, {})) for side in SIDES})


def read_reference(bundle: Path, manifest: Manifest) -> tuple[JudgedFeatures | None, list[str]]:
    """The drift features of the verified bundle at `bundle` (None: it has no usable
    reference), and notes on what was unusable.

    Both reference files are read, each by reading the archive up to that one
    member and checking its SHA-256 against the manifest again. The features of
    drift-features.json come with their thresholds; those of drift-reference.json
    that it does not name (what older agents count) are kept without: shown,
    never judged.

    Raises:
        OSError: the file cannot be read.
    """
    notes: list[str] = []
    sides: dict[str, Side] = {side: {} for side in SIDES}
    found = False
    try:
        data = _member(bundle, manifest, FEATURES_FILE)
        if data is not None:
            features = _parse(DriftFeatures, FEATURES_FILE, data).known()
            for side in SIDES:
                for feature in getattr(features, side):
                    sides[side][feature.name] = (feature.histogram, feature.thresholds)
            found = True
    except UnusableReferenceError as exc:
        notes.append(str(exc))
    try:
        data = _member(bundle, manifest, REFERENCE_FILE)
        if data is not None:
            reference = _parse(DriftReference, REFERENCE_FILE, data)
            for side in SIDES:
                for pooled in getattr(reference, side):
                    sides[side].setdefault(pooled.name, (pooled.histogram, None))
            found = True
    except UnusableReferenceError as exc:
        notes.append(str(exc))
    return (JudgedFeatures(**sides) if found else None), notes


_Document = TypeVar("_Document", bound=BaseModel)


def _parse(model: type[_Document], path: str, data: bytes) -> _Document:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the document"
        raise UnusableReferenceError(f"{path}: {where}: {first['msg']}") from None


def _member(bundle: Path, manifest: Manifest, path: str) -> bytes | None:
    entry = manifest.files_by_path().get(path)
    if entry is None:
        return None
    if entry.length > MAX_REFERENCE_BYTES:
        raise UnusableReferenceError(f"{path} is {entry.length} bytes, over {MAX_REFERENCE_BYTES}")
    data = member_bytes(bundle, path)
    if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise UnusableReferenceError(f"{path} changed since the bundle was verified")
    return data


def member_bytes(bundle: Path, member_path: str) -> bytes | None:
    """The bytes of the bundle's regular file `member_path`; None when absent or unreadable."""
    try:
        with open(bundle, "rb") as source:
            stream = TarStream(source)
            for member in stream.members():
                if member.path == member_path and member.is_regular:
                    return b"".join(stream.read_chunks())
    except BundleError:
        return None
    return None


def _side_json(side: Side) -> dict[str, Any]:
    return {
        name: {
            "histogram": histogram.model_dump(mode="json"),
            "thresholds": None if thresholds is None else thresholds.model_dump(mode="json"),
        }
        for name, (histogram, thresholds) in side.items()
    }


def _side_from_json(stored: dict[str, Any]) -> Side:
    side: Side = {}
    for name, feature in stored.items():
        thresholds = feature.get("thresholds")
        side[name] = (
            Histogram.model_validate(feature["histogram"]),
            None if thresholds is None else FeatureThresholds.model_validate(thresholds),
        )
    return side


def store_reference(
    session: Session, bundle: BundleRow, features: JudgedFeatures, now: dt.datetime
) -> None:
    """Add the reference of `bundle` (flushed already: it has an id) to the unit of work."""
    session.add(DriftReferenceRow(bundle_id=bundle.id, reference=features.to_json(), stored_at=now))


def load_references(
    session: Session, versions: set[tuple[str, str]]
) -> dict[tuple[str, str], JudgedFeatures]:
    """The stored references of the bundle versions `versions` ((name, version) pairs).

    A stored reference this server no longer reads (after a downgrade) is left
    out, with a warning: its devices are not judged.
    """
    if not versions:
        return {}
    names = {name for name, _ in versions}
    query = (
        select(BundleRow.name, BundleRow.version, DriftReferenceRow.reference)
        .join(DriftReferenceRow, DriftReferenceRow.bundle_id == BundleRow.id)
        .where(BundleRow.name.in_(names))
    )
    found: dict[tuple[str, str], JudgedFeatures] = {}
    for name, version, stored in session.execute(query):
        if (name, version) not in versions:
            continue
        try:
            found[(name, version)] = JudgedFeatures.from_json(stored)
        except (ValidationError, KeyError, TypeError, AttributeError) as exc:
            log.warning("stored drift reference of %s@%s is unusable: %s", name, version, exc)
    return found


__all__ = [
    "JudgedFeatures",
    "UnusableReferenceError",
    "load_references",
    "member_bytes",
    "read_reference",
    "store_reference",
]
