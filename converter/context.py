"""The state one conversion carries from step to step, and what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefleet.converter.choose import Evaluation, Optimize
from edgefleet.converter.data import Dataset
from edgefleet.converter.evaluate import Budget, Outputs, Task
from edgefleet.converter.modelinfo import ModelInfo
from edgefleet.converter.progress import Progress
from edgefleet.keys import SigningKey
from edgefleet.profiles import Profile


@dataclass(frozen=True)
class MeasureOn:
    """Where and how to measure: `target` is a device id or `tag=KEY=VALUE`."""

    target: str
    server: str
    token: str | None
    keys: Sequence[SigningKey]
    timeout_s: float = 1800.0
    max_memory_mib: int = 2048
    max_seconds: int = 300

    def query(self) -> dict[str, str]:
        if self.target.startswith("tag="):
            return {"tag": self.target.removeprefix("tag=")}
        return {"device": self.target}


@dataclass(frozen=True)
class ConvertOptions:
    target: str
    calibration: Path
    validation: Path | None = None
    labels: Path | None = None
    budget: Budget = field(default_factory=Budget)
    optimize: Optimize = "latency"
    # Ship this candidate (its name in the report, e.g. "float") instead of choosing one;
    # it is still measured and held to the budget.
    candidate: str | None = None
    # Time the candidates on devices of the target through the fleet server (converter/remote.py).
    measure_on: MeasureOn | None = None
    # Also try the TFLite candidates (onnx2tf) on a profile that runs onnxruntime too; on a
    # profile that runs TFLite only, they are the only candidates and always tried.
    tflite: bool = False


FLOAT_ONNX = "float.onnx"  # the float model in the working directory, weights inside


@dataclass
class ConversionContext:
    model: Path  # the source model, unchanged (its float copy: workdir / FLOAT_ONNX)
    options: ConvertOptions
    profile: Profile
    info: ModelInfo
    calibration: Dataset
    validation: Dataset
    labels: np.ndarray | None
    workdir: Path
    float_outputs: Outputs
    float_session: object  # for timing candidates against the float model, head to head
    float_ms: float
    float_metrics: dict[str, float]
    progress: Progress
    notes: list[str]
    # What the labels measure (None without labels), decided once before the search.
    task: Task | None = None
    # The calibration samples lie within the validation samples (the same data).
    same_samples: bool = False


@dataclass
class ConversionResult:
    out_dir: Path
    profile: Profile
    info: ModelInfo
    chosen: Evaluation
    evaluations: list[Evaluation]
    notes: list[str]
    report: dict[str, object]
