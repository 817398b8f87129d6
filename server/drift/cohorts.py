"""Cohorts: the groups of devices on one bundle version that the drift evaluator (and
its accuracy check) judges as a whole, besides each device.

A cohort is named by a string, stored in `alerts.cohort` and `drift_states.subject`:

- "version": every device on the bundle version;
- "tag:KEY=VALUE": the devices on it whose tag KEY has VALUE;
- "profile:PROFILE": the devices on it of that hardware profile;
- "stage:ROLLOUT_ID/STAGE_INDEX": the devices of that stage of an active (running or
  paused) rollout of the version.

The members are the devices that sent telemetry for the version in the window.
Work is bounded: a cohort of fewer than `drift_min_cohort_devices` devices is not
judged (a cohort of one device duplicates the device), and of the tag cohorts only
the `drift_max_tag_cohorts` largest are (a tag with a value per device would
otherwise make a cohort per device).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.db.models import (
    BundleRow,
    Device,
    DeviceState,
    Rollout,
    RolloutDevice,
    RolloutState,
    TelemetryBucket,
)
from edgefleet.server.settings import ServerSettings

log = logging.getLogger(__name__)

VERSION_COHORT = "version"
TAG_PREFIX = "tag:"
ACTIVE_ROLLOUT_STATES = (RolloutState.RUNNING, RolloutState.PAUSED)


def stage_cohort(rollout_id: int, stage_index: int) -> str:
    """The cohort of a rollout stage's devices."""
    return f"stage:{rollout_id}/{stage_index}"


def tag_cohort(key: str, value: str) -> str:
    """The cohort of the devices whose tag `key` has `value`."""
    return f"{TAG_PREFIX}{key}={value}"


def profile_cohort(profile: str) -> str:
    """The cohort of the devices of one hardware profile."""
    return f"profile:{profile}"


@dataclass(frozen=True)
class Member:
    """A device that sent telemetry for the version, with what puts it in cohorts."""

    device_id: str
    profile: str | None  # None: the device is no longer enrolled
    tags: Mapping[str, str]

    def cohorts(self) -> list[str]:
        """The cohorts the device is in, stages aside: the version, its profile, its tags."""
        profile = [] if self.profile is None else [profile_cohort(self.profile)]
        tags = [tag_cohort(key, value) for key, value in self.tags.items()]
        return [VERSION_COHORT, *profile, *tags]


@dataclass
class Cohorts:
    """One version's cohorts for a tick: those judged (with their devices, sorted) and
    those skipped (with the reason)."""

    judged: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def stage_members(session: Session, bundle_name: str, bundle_version: str) -> dict[str, set[str]]:
    """The devices of each stage of the version's active rollouts, by stage cohort
    (devices left out of a stage, `skipped`, are not its members)."""
    query = (
        select(RolloutDevice.rollout_id, RolloutDevice.stage_index, RolloutDevice.device_id)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .join(BundleRow, BundleRow.id == Rollout.bundle_id)
        .where(
            BundleRow.name == bundle_name,
            BundleRow.version == bundle_version,
            Rollout.state.in_(ACTIVE_ROLLOUT_STATES),
            RolloutDevice.state != DeviceState.SKIPPED,
        )
    )
    stages: dict[str, set[str]] = {}
    for rollout_id, stage_index, device_id in session.execute(query):
        stages.setdefault(stage_cohort(rollout_id, stage_index), set()).add(device_id)
    return stages


def version_members(
    session: Session, bundle_name: str, bundle_version: str, start: dt.datetime, end: dt.datetime
) -> list[Member]:
    """The devices that sent telemetry for the version in buckets starting in [start, end)."""
    sending = (
        select(TelemetryBucket.device_id)
        .where(
            TelemetryBucket.bundle_name == bundle_name,
            TelemetryBucket.bundle_version == bundle_version,
            TelemetryBucket.bucket_start >= start,
            TelemetryBucket.bucket_start < end,
        )
        .distinct()
        .subquery()
    )
    query = select(sending.c.device_id, Device.profile, Device.tags).outerjoin(
        Device, Device.id == sending.c.device_id
    )
    return [
        Member(device_id, profile, tags or {})
        for device_id, profile, tags in session.execute(query)
    ]


def judged_cohorts(
    session: Session,
    settings: ServerSettings,
    bundle_name: str,
    bundle_version: str,
    members: Iterable[Member],
) -> Cohorts:
    """The version's cohorts among `members`, with the settings' minimum size and cap."""
    return version_cohorts(
        members,
        stage_members(session, bundle_name, bundle_version),
        min_devices=settings.drift_min_cohort_devices,
        max_tag_cohorts=settings.drift_max_tag_cohorts,
        label=f"{bundle_name}@{bundle_version}",
    )


def version_cohorts(
    members: Iterable[Member],
    stages: Mapping[str, set[str]],
    *,
    min_devices: int,
    max_tag_cohorts: int,
    label: str,
) -> Cohorts:
    """The cohorts of the devices sending for one version (`label`, for the log):
    "version", one per profile, tag and active rollout stage among them; small ones and
    the tag cohorts over the cap are skipped (the latter logged)."""
    devices: dict[str, set[str]] = {VERSION_COHORT: set()}
    tagged: dict[str, set[str]] = {}
    for member in members:
        for cohort in member.cohorts():
            grouped = tagged if cohort.startswith(TAG_PREFIX) else devices
            grouped.setdefault(cohort, set()).add(member.device_id)
    for cohort, staged in stages.items():
        devices[cohort] = staged & devices[VERSION_COHORT]
    cohorts = Cohorts()
    for cohort, ids in {**devices, **tagged}.items():
        if len(ids) < min_devices:
            cohorts.skipped[cohort] = f"fewer than {min_devices} devices"
    largest_first = sorted(
        (cohort for cohort in tagged if cohort not in cohorts.skipped),
        key=lambda cohort: (-len(tagged[cohort]), cohort),
    )
    for cohort in largest_first[max_tag_cohorts:]:
        cohorts.skipped[cohort] = f"over the cap of {max_tag_cohorts} tag cohorts"
    if len(largest_first) > max_tag_cohorts:
        log.info(
            "drift: %s: %d tag cohort(s) over the cap of %d not judged (the smallest, from %s)",
            label,
            len(largest_first) - max_tag_cohorts,
            max_tag_cohorts,
            largest_first[max_tag_cohorts],
        )
    for cohort, ids in sorted({**devices, **tagged}.items(), key=_version_first):
        if cohort not in cohorts.skipped:
            cohorts.judged[cohort] = sorted(ids)
    return cohorts


def _version_first(item: tuple[str, set[str]]) -> tuple[bool, str]:
    return (item[0] != VERSION_COHORT, item[0])


__all__ = [
    "TAG_PREFIX",
    "VERSION_COHORT",
    "Cohorts",
    "Member",
    "judged_cohorts",
    "profile_cohort",
    "stage_cohort",
    "stage_members",
    "tag_cohort",
    "version_cohorts",
    "version_members",
]
