"""How long a model call may take: scaled with its batch, from what this device measured.

A call of `n` samples to one step of the fallback chain is stopped after

    timeout_ms + n x allowance

where the allowance per sample is `timeout_per_sample_ms` when it is
configured, else `timeout_factor` x the time per sample this device measured
for the version, else 0 (a version never measured here: `timeout_ms` alone).
`n` is the length of the first axis of the inputs (1 for rank-0 inputs).

The time per sample is measured on the device itself, twice, and persisted
beside the installed version (`timings/<version id>.json`, see layout.py) so it
holds after a restart:
- the smoke test times the bundle's own samples one at a time (the median,
  the first run left out as warm-up);
- the health check takes the median latency per sample of the live answers.
The larger of the two is used (a device loaded by other work measures slower
under live traffic than on the idle smoke run). A measurement applies from the
predictor's next `reload` (after an install or a rollback) or restart.

A batch above `max_batch_samples` is refused before it runs
(`BatchTooLargeError`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.agent.errors import BatchTooLargeError
from edgefleet.agent.layout import PRIVATE_DIR, StateLayout
from edgefleet.agentconfig import InferenceSettings
from edgefleet.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


class VersionTiming(BaseModel):
    """timings/<version id>.json: the time per sample measured on this device, in ms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    smoke_sample_ms: float | None = Field(default=None, gt=0)
    live_sample_ms: float | None = Field(default=None, gt=0)

    @property
    def sample_ms(self) -> float | None:
        """The larger of the two measurements; None when there is neither."""
        measured = [m for m in (self.smoke_sample_ms, self.live_sample_ms) if m is not None]
        return max(measured, default=None)


def read_timing(layout: StateLayout, version_id: str) -> VersionTiming:
    """What was measured for `version_id`; nothing measured when there is no usable file."""
    path = layout.timings / f"{version_id}.json"
    try:
        return VersionTiming.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return VersionTiming()
    except (OSError, ValidationError) as exc:
        log.warning("ignoring the unreadable timing %s: %s", path, exc)
        return VersionTiming()


def record_timing(
    layout: StateLayout,
    version_id: str,
    *,
    smoke_sample_ms: float | None = None,
    live_sample_ms: float | None = None,
) -> VersionTiming:
    """Persist a measurement of `version_id` (atomically), keeping the other one.

    Also deletes the timings of versions no longer installed.
    """
    update = {"smoke_sample_ms": smoke_sample_ms, "live_sample_ms": live_sample_ms}
    timing = read_timing(layout, version_id).model_copy(
        update={key: value for key, value in update.items() if value is not None}
    )
    layout.timings.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)
    atomic_write_bytes(
        layout.timings / f"{version_id}.json", timing.model_dump_json().encode("utf-8")
    )
    for path in layout.timings.glob("*.json"):
        if not (layout.versions / path.stem).is_dir():
            path.unlink(missing_ok=True)
    return timing


@dataclass(frozen=True)
class CallLimit:
    """The deadline of one step's calls: `floor_ms` + samples x `per_sample_ms`."""

    floor_ms: float
    per_sample_ms: float  # 0: the floor alone

    def seconds(self, samples: int) -> float:
        return (self.floor_ms + self.per_sample_ms * samples) / 1000.0


def call_limit(settings: InferenceSettings, measured_sample_ms: float | None) -> CallLimit:
    """The limit for a version measured at `measured_sample_ms` per sample (None: never)."""
    if settings.timeout_per_sample_ms is not None:
        allowance = settings.timeout_per_sample_ms
    elif measured_sample_ms is not None:
        allowance = settings.timeout_factor * measured_sample_ms
    else:
        allowance = 0.0
    return CallLimit(float(settings.timeout_ms), allowance)


def sample_count(feed: Mapping[str, np.ndarray]) -> int:
    """The samples of a request: the length of its first input with an axis (else 1)."""
    for array in feed.values():
        if array.ndim:
            return len(array)
    return 1


def check_batch_size(samples: int, settings: InferenceSettings) -> None:
    """Raises: BatchTooLargeError above `max_batch_samples`."""
    if samples > settings.max_batch_samples:
        raise BatchTooLargeError(
            f"the batch holds {samples} samples, more than the {settings.max_batch_samples} "
            "one call may take ([inference] max_batch_samples): send it in smaller batches"
        )
