"""Raw inputs kept while the device's own check flags drift, for retraining (off by default).

With `[drift] capture_inputs = true`, `DeviceDrift` opens an episode when its
check (`edgefleet.agent.driftcheck`) flags drift, and from then on offers the
inputs of every request served to an `InputReservoir`: a uniform sample
(reservoir sampling, Algorithm R) of the samples seen in the episode, at most
`capture_samples` of them and `capture_max_bytes` in all. Per request that
costs one random draw per sample and a copy of the samples drawn, nothing
more; the check itself runs once per telemetry window.

The episode's file, `samples/<start>-<bundle>-<version>.npz` in the state
directory, is written at every telemetry window while the episode runs and
once more when it ends (drift calm again, or another model): an .npz of one
array per input tensor, samples first (tensors without a batch axis repeat
per sample: the converter's calibration data format), written atomically
(temp file, fsync, rename), mode 0600. Beside it, `<same>.json` says what the
file holds (`SampleMeta`). At most KEEP_FILES episodes are kept (oldest
deleted). A file leaves the device only with `upload_inputs = true`
(`edgefleet.agent.upload`).

Only tensors the bundle's drift-features.json lays out (numeric ones) are
kept; a request whose shapes or types differ from the first kept sample's is skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.agent.driftcheck import DeviceDriftCheck, DriftStatus
from edgefleet.agent.layout import PRIVATE_DIR, PRIVATE_FILE
from edgefleet.driftfeatures import AnyReference, DriftFeatures, TensorLayout
from edgefleet.fileio import atomic_write_bytes, atomic_writer
from edgefleet.timefmt import format_time

if TYPE_CHECKING:
    from edgefleet.agentconfig import DriftSettings
    from edgefleet.mqtt.messages import TelemetryWindow

KEEP_FILES = 4  # episode files kept on the device (oldest deleted)
SAMPLE_SUFFIX = ".npz"
META_SUFFIX = ".json"


class InputReservoir:
    """A uniform sample of at most `capacity` samples and `max_bytes` of the samples offered."""

    def __init__(
        self,
        layouts: Mapping[str, TensorLayout],
        capacity: int,
        max_bytes: int,
        rng: random.Random,
    ) -> None:
        self.layouts = dict(layouts)
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.seen = 0  # samples offered (of a fitting shape)
        self.size_bytes = 0
        self.kept: list[dict[str, np.ndarray]] = []
        self._rng = rng
        self._shapes: dict[str, tuple[tuple[int, ...], str]] | None = None

    def offer(self, inputs: Mapping[str, np.ndarray]) -> None:
        """The samples of one request (its tensors as the predictor took them)."""
        rows: dict[str, np.ndarray] = {}
        count: int | None = None
        for name, layout in self.layouts.items():
            array = inputs.get(name)
            if array is None:
                return
            if layout.batched:
                if array.ndim == 0 or (count is not None and len(array) != count):
                    return
                count = len(array)
            rows[name] = array
        if count == 0:
            return
        shapes = {
            name: (array.shape[1:] if self.layouts[name].batched else array.shape, array.dtype.str)
            for name, array in rows.items()
        }
        if self._shapes is not None and shapes != self._shapes:
            return
        size = sum(
            array[0].nbytes if self.layouts[name].batched else array.nbytes
            for name, array in rows.items()
        )
        for index in range(1 if count is None else count):
            self.seen += 1
            slot = self._slot(size)
            if slot is None:
                continue
            sample = {
                name: np.array(array[index] if self.layouts[name].batched else array, copy=True)
                for name, array in rows.items()
            }
            self._shapes = shapes
            if slot == len(self.kept):
                self.kept.append(sample)  # its size was counted by _slot
            else:
                self.kept[slot] = sample  # of the same shapes and types: the same size

    def _slot(self, size: int) -> int | None:
        """Algorithm R: where the newest sample goes, or None when it is not kept."""
        if len(self.kept) < self.capacity and self.size_bytes + size <= self.max_bytes:
            self.size_bytes += size
            return len(self.kept)
        self.capacity = len(self.kept)  # full, by count or by bytes
        slot = self._rng.randrange(self.seen)
        return slot if slot < len(self.kept) else None

    def arrays(self) -> dict[str, np.ndarray]:
        """The kept samples, one array per tensor, samples first."""
        return {name: np.stack([sample[name] for sample in self.kept]) for name in self.layouts}


@dataclass(frozen=True)
class SampleMeta:
    """What an episode's file holds (the .json beside it, and the upload's metadata)."""

    bundle_name: str
    bundle_version: str
    reason: str  # the check's verdict when the episode began
    samples: int
    captured_at: str  # when the episode began


@dataclass
class _Episode:
    stem: str
    model: tuple[str, str]
    since: dt.datetime
    reason: str
    reservoir: InputReservoir
    saved_seen: int = -1


def episode_files(directory: Path) -> list[Path]:
    """The episode files in `directory` that have their .json, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.glob(f"*{SAMPLE_SUFFIX}")
        if path.with_suffix(META_SUFFIX).is_file()
    )


def read_meta(path: Path) -> SampleMeta:
    """The .json beside an episode file.

    Raises:
        OSError, ValueError, TypeError: missing or not a SampleMeta.
    """
    return SampleMeta(**json.loads(path.with_suffix(META_SUFFIX).read_text()))


def delete_episode(path: Path) -> None:
    path.with_suffix(META_SUFFIX).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


class DeviceDrift:
    """The device's drift check and, when configured, its reservoir of raw inputs.

    `observe` once per telemetry window (the main loop), `offer` per request
    (any thread), `status` any time.
    """

    def __init__(
        self, settings: DriftSettings, directory: Path, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.check = DeviceDriftCheck()
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._episode: _Episode | None = None

    @property
    def status(self) -> DriftStatus:
        return self.check.status

    @property
    def current_file(self) -> Path | None:
        """The file of the running episode (still being written), if one runs."""
        episode = self._episode
        return None if episode is None else self.directory / f"{episode.stem}{SAMPLE_SUFFIX}"

    def offer(self, inputs: Mapping[str, np.ndarray], model: tuple[str | None, str | None]) -> None:
        """A served request's inputs (of `model`, name and version): kept or not while an
        episode of that model runs; else nothing."""
        episode = self._episode
        if episode is None or episode.model != model:
            return
        with self._lock:
            episode.reservoir.offer(inputs)

    def observe(self, window: TelemetryWindow, reference: AnyReference | None) -> DriftStatus:
        """Judge one telemetry window; start, save or end the episode accordingly."""
        status = self.check.observe(window, reference)
        if not self.settings.capture_inputs:
            return status
        model = (window.bundle_name, window.bundle_version)
        episode = self._episode
        if episode is not None:
            if status.state != "drift" or episode.model != model:
                self._episode = None
            self._save(episode)
        if status.state == "drift" and self._episode is None:
            self._start(status, model, reference)
        return status

    def _start(
        self, status: DriftStatus, model: tuple[str, str], reference: AnyReference | None
    ) -> None:
        if not isinstance(reference, DriftFeatures) or status.since is None:
            return
        inputs = {feature.tensor for feature in reference.inputs}
        layouts = {layout.tensor: layout for layout in reference.tensors if layout.tensor in inputs}
        if not layouts:
            return
        reservoir = InputReservoir(
            layouts, self.settings.capture_samples, self.settings.capture_max_bytes, self._rng
        )
        stem = f"{status.since:%Y%m%dT%H%M%SZ}-{model[0]}-{model[1]}"
        self._episode = _Episode(stem, model, status.since, status.describe(), reservoir)

    def _save(self, episode: _Episode) -> None:
        with self._lock:
            reservoir = episode.reservoir
            if not reservoir.kept or reservoir.seen == episode.saved_seen:
                return
            episode.saved_seen = reservoir.seen
            arrays = reservoir.arrays()
        meta = SampleMeta(
            bundle_name=episode.model[0],
            bundle_version=episode.model[1],
            reason=episode.reason,
            samples=len(next(iter(arrays.values()))),
            captured_at=format_time(episode.since),
        )
        self.directory.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)
        path = self.directory / f"{episode.stem}{SAMPLE_SUFFIX}"
        with atomic_writer(path, mode=PRIVATE_FILE) as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        atomic_write_bytes(
            path.with_suffix(META_SUFFIX), json.dumps(asdict(meta)).encode(), mode=PRIVATE_FILE
        )
        for old in episode_files(self.directory)[:-KEEP_FILES]:
            if old != path:
                delete_episode(old)
