"""GET /accuracy (viewer): labelled accuracy of a bundle version, per device and in all,
or of one device, or of one cohort (the version's devices with a tag, or of a profile)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.bundle.manifest import NAME_PATTERN
from edgefleet.semver import SEMVER_PATTERN
from edgefleet.server.api.deps import ContextDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.routes.devices import parse_tag_filters
from edgefleet.server.api.schemas.accuracy import AccuracyPublic, LabelledFigures
from edgefleet.server.db.models import Device
from edgefleet.server.drift.accuracy import Labelled, labelled_by_device, reference_accuracy
from edgefleet.server.drift.cohorts import (
    VERSION_COHORT,
    Member,
    profile_cohort,
    tag_cohort,
)
from edgefleet.server.errors import InvalidRequestError
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/accuracy", tags=["accuracy"])


@router.get(
    "",
    response_model=AccuracyPublic,
    summary="Labelled accuracy of a bundle version over the last hours, per device and in all",
    responses=errors(404, 422),
)
def get_accuracy(
    session: SessionDep,
    context: ContextDep,
    _viewer: ViewerDep,
    bundle: Annotated[str, Query(pattern=NAME_PATTERN, description="the bundle's name")],
    version: Annotated[str, Query(pattern=SEMVER_PATTERN, max_length=64)],
    device: Annotated[
        str | None, Query(max_length=128, description="only this device's figures")
    ] = None,
    tag: Annotated[
        str | None,
        Query(max_length=256, description="KEY=VALUE: only the devices with this tag"),
    ] = None,
    profile: Annotated[
        str | None, Query(max_length=128, description="only the devices of this profile")
    ] = None,
    hours: Annotated[int, Query(ge=1, le=24 * 30, description="the time range")] = 24,
) -> AccuracyPublic:
    if sum(value is not None for value in (device, tag, profile)) > 1:
        raise InvalidRequestError("give at most one of device, tag and profile")
    row = context.bundles.get(session, bundle, version)
    end = context.clock()
    start = end - dt.timedelta(hours=hours)
    devices = None if device is None else [device]
    by_device = labelled_by_device(session, bundle, version, start, end, devices)
    cohort = VERSION_COHORT
    if tag is not None:
        ((key, value),) = parse_tag_filters([tag]).items()
        cohort = tag_cohort(key, value)
    elif profile is not None:
        cohort = profile_cohort(profile)
    if cohort != VERSION_COHORT:
        members = _members(session, by_device)
        by_device = {
            name: labelled
            for name, labelled in by_device.items()
            if cohort in members[name].cohorts()
        }
    reference = reference_accuracy(row)
    subjects = [_figures(name, labelled) for name, labelled in sorted(by_device.items())]
    if device is None:
        subjects.insert(0, _figures(None, sum(by_device.values(), Labelled())))
    return AccuracyPublic(
        bundle_name=bundle,
        bundle_version=version,
        cohort=None if device is not None else cohort,
        start=start,
        end=end,
        reference_metric=None if reference is None else reference.metric,
        reference=None if reference is None else reference.value,
        subjects=subjects,
    )


def _members(session: Session, labelled: dict[str, Labelled]) -> dict[str, Member]:
    """The cohort membership of each device in `labelled` (no cohort but the version for
    a device no longer enrolled)."""
    rows = session.execute(
        select(Device.id, Device.profile, Device.tags).where(Device.id.in_(list(labelled)))
    )
    enrolled = {
        device_id: Member(device_id, profile, tags or {}) for device_id, profile, tags in rows
    }
    return {name: enrolled.get(name, Member(name, None, {})) for name in labelled}


def _figures(device_id: str | None, labelled: Labelled) -> LabelledFigures:
    figures = labelled.figures()
    return LabelledFigures(
        device_id=device_id,
        labelled=labelled.count,
        correct=labelled.correct,
        accuracy=figures["accuracy"],
        mae=figures["mae"],
        rmse=figures["rmse"],
    )
