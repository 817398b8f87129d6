"""Installed versions as the predictor holds them: schema, drift reference, lazy runners.

A `LoadedVersion` is read once per version directory (on `Predictor.reload`)
and never changes afterwards, except for its steps' runners and breakers. Only
the served model of `current` is opened eagerly; the float fallback and the
previous version open on first use, so a device that never falls back never
pays their memory, and the time to the first prediction is one model load.

The default answer is an .npz with one array per output, for one sample (with
or without the batch axis of 1); a request of N samples gets it N times.
"""

from __future__ import annotations

import filecmp
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from edgefleet.agent.errors import ConfigError, InferenceError
from edgefleet.agent.inference.breaker import CircuitBreaker, Clock
from edgefleet.agent.inference.runtimes import ModelRunner, Which, model_path, open_runner
from edgefleet.agent.inference.schema import InputValidator
from edgefleet.bundle import MANIFEST_NAME
from edgefleet.bundle.manifest import NAME_PATTERN, parse_manifest_envelope
from edgefleet.bundlefiles import SCHEMA_FILE, ModelSchema, TensorSchema
from edgefleet.driftfeatures import AnyReference, load_reference
from edgefleet.errors import EdgefleetError
from edgefleet.semver import SEMVER_PATTERN

log = logging.getLogger(__name__)

UNKNOWN_VERSION = "0.0.0"


@dataclass(frozen=True)
class RuntimeSettings:
    """What opening a runner needs from the hardware profile and the configuration."""

    threads: int
    providers: tuple[str, ...]
    breaker_failures: int
    breaker_reset_seconds: float
    clock: Clock


class Step:
    """One model file of the chain: opened on first use, behind its own circuit breaker."""

    def __init__(self, directory: Path, which: Which, settings: RuntimeSettings) -> None:
        self.directory = directory
        self.which = which
        self._settings = settings
        self.breaker = CircuitBreaker(
            settings.breaker_failures, settings.breaker_reset_seconds, settings.clock
        )
        self.loaded: ModelRunner | None = None  # set once, by `runner()`
        self.load_error: str | None = None  # why the last attempt to load it failed
        self._lock = threading.Lock()

    def runner(self) -> ModelRunner:
        """The loaded model (loading it now if needed).

        Raises: InferenceError when it does not load (tried again on the next call).
        """
        runner = self.loaded
        if runner is None:
            with self._lock:
                runner = self.loaded
                if runner is None:
                    try:
                        runner = open_runner(
                            self.directory,
                            self.which,
                            threads=self._settings.threads,
                            providers=self._settings.providers,
                        )
                    except InferenceError as exc:
                        self.load_error = str(exc)
                        raise
                    self.load_error = None
                    self.loaded = runner
        return runner

    @property
    def is_loaded(self) -> bool:
        return self.loaded is not None


def _label(directory: Path) -> tuple[str, str]:
    """Bundle name and version: from manifest.json, else the directory's `<name>@<version>-<id>`."""
    try:
        _, manifest = parse_manifest_envelope((directory / MANIFEST_NAME).read_bytes())
        return manifest.name, manifest.version
    except (OSError, EdgefleetError):
        pass
    name, _, rest = directory.name.partition("@")
    version = rest.rpartition("-")[0] or rest
    if not re.match(NAME_PATTERN, name):
        name = "unknown"
    if not re.match(SEMVER_PATTERN, version):
        version = UNKNOWN_VERSION
    return name, version


def _read_schema(path: Path) -> ModelSchema:
    try:
        return ModelSchema.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise InferenceError(f"cannot read {path}: {exc}") from exc


@dataclass
class LoadedVersion:
    directory: Path
    name: str
    version: str
    schema: ModelSchema
    validator: InputValidator
    reference: AnyReference | None
    served: Step
    fallback: Step | None  # None: no float model, or the served model is the float model
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def load_version(directory: Path, settings: RuntimeSettings) -> LoadedVersion:
    """Read a version directory's schema and drift reference; set up its steps.

    Raises:
        InferenceError: schema.json is missing or invalid (the installer's smoke
            test makes sure an installed version has one).
    """
    directory = Path(directory)
    schema = _read_schema(directory / SCHEMA_FILE)
    reference, notes = load_reference(directory)  # telemetry without bins beats no model
    for note in notes:
        log.warning("drift reference: %s", note)
    served_path = model_path(directory, "served")
    fallback_path = model_path(directory, "fallback")
    fallback: Step | None = None
    if fallback_path is not None:
        if served_path is not None and filecmp.cmp(served_path, fallback_path, shallow=False):
            notes.append("the served model is the float model: no separate float fallback")
        else:
            fallback = Step(directory, "fallback", settings)
    name, version = _label(directory)
    return LoadedVersion(
        directory=directory,
        name=name,
        version=version,
        schema=schema,
        validator=InputValidator(schema),
        reference=reference,
        served=Step(directory, "served", settings),
        fallback=fallback,
        notes=notes,
    )


def load_default_answer(path: Path) -> dict[str, np.ndarray]:
    """Read the configured default answer (.npz, one array per output).

    Raises:
        ConfigError: unreadable, not an .npz, or empty.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"default answer {path} is not a readable .npz file: {exc}") from exc
    if not arrays:
        raise ConfigError(f"default answer {path} holds no arrays (one per output expected)")
    return arrays


def default_outputs(
    default: Mapping[str, np.ndarray], samples: int, outputs: Sequence[TensorSchema] | None
) -> dict[str, np.ndarray]:
    """The default answer repeated for `samples` samples (batch axis first)."""
    ranks = {spec.name: len(spec.shape) for spec in outputs or ()}
    answer = {}
    for name, array in default.items():
        rank = ranks.get(name)
        batched = array.ndim == rank if rank is not None else array.ndim > 0 and array.shape[0] == 1
        one = array if batched else array[np.newaxis]
        answer[name] = np.repeat(one[:1], samples, axis=0)
    return answer
