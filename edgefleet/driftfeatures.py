"""The per-sample drift features: drift-features.json, and how drift references evolve.

Two files, and how they evolve (docs/adr/0008-drift-reference-evolution.md):

- `drift-reference.json` (edgefleet.drift.DriftReference, schema_version 1):
  pooled values per feature, no thresholds; its format is frozen. Bundles keep
  carrying it, so agents that know nothing else still count their windows; no
  field is ever added to it.
- `drift-features.json` (DriftFeatures, schema_version 2 and later): features
  defined per sample, with calibrated thresholds. Agents that know it read it
  in preference (`load_reference`). It is read leniently: unknown fields are
  ignored, a newer schema_version is logged once and read as far as it is
  understood, and a feature of an unknown `summary` is left out while the
  others are still counted. A later change adds fields or summaries to this
  file, never a third file. Thresholds name the statistic they were
  calibrated for (`FeatureThresholds.statistic`; absent in files written
  before it existed: "sum"), and every reader judges a feature with the
  statistic its thresholds name; thresholds of a statistic the reader does
  not know are left out, so the feature is counted without being judged. They
  are written under the key THRESHOLDS_KEY, which readers that predate this
  rule do not know: they too count such a feature without judging it, rather
  than compare another statistic with its thresholds or refuse the file. The
  keys of files written before (`statistic_thresholds`, `thresholds`) are
  still read.

Which features drift-features.json defines, per tensor (`plan_tensor`):

- one value per sample and feature (a tabular column, a scalar, a regression
  output): the value itself (`value`);
- many values per sample and feature (the pixels of an image channel, the
  time steps of a sequence): each sample's mean and standard deviation
  (`mean`, `std`), estimated from at most MAX_SUMMARY_VALUES of its values
  picked at a fixed stride (`summary_stride`; 205 of the 1024 pixels of a
  32x32 image), so that a device pays little for large images. Pooled values
  of one sample are not independent draws, so counting them would overstate
  the evidence; one summary per sample keeps every count a sample;
- class scores (a float output of one axis with several classes): the top-1
  class (`top1`, one bin per class, up to MAX_CLASSES) and the confidence,
  the highest score (`confidence`).
Inputs without a batch axis (a scalar, a state) are one sample per request.
The summaries are computed by the same function (`sample_values`) in the
converter, on the reference data, and on the device, per request: numpy,
imported inside the functions that need it, as edgefleet.drift does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.drift import (
    QUANTILE_BINS,
    REFERENCE_FILE,
    DriftReference,
    FeatureReference,
    feature_axis,
)
from edgefleet.driftstats import FeatureThresholds, StatisticName

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MAX_CLASSES = 64  # top-1 class bins up to this many classes; beyond, the confidence only
MAX_SUMMARY_VALUES = 256  # at most this many values of a sample give a feature's mean and spread
FEATURES_FILE = "drift-features.json"
FEATURES_SCHEMA_VERSION = 2
THRESHOLDS_KEY = "drift_thresholds"  # thresholds of any statistic, as written (module text)
EARLIER_THRESHOLDS_KEYS = ("statistic_thresholds", "thresholds")  # still read
CLASS_SUMMARIES = ("top1", "confidence")  # one per sample, over the class axis
SUMMARIES = ("value", "mean", "std", *CLASS_SUMMARIES)


class TensorLayout(BaseModel):
    """How the agent cuts one tensor of a request into samples and features."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    tensor: str
    batched: bool  # the first axis indexes samples; False: the whole tensor is one sample
    rank: int = Field(ge=0)  # of one sample
    axis: int | None  # the feature (or class) axis of one sample; None: the sample as a whole
    width: int | None  # the size along `axis`


class LenientThresholds(FeatureThresholds):
    """FeatureThresholds as a reference file carries them: fields of a newer converter ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class DriftFeature(FeatureReference):
    """One feature of drift-features.json: which per-sample summary, its bins and thresholds."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    summary: str  # one of SUMMARIES; others come from a newer converter and are left out
    # None: too few reference samples to calibrate, or a statistic this version does not know.
    # Written under THRESHOLDS_KEY (module text).
    thresholds: LenientThresholds | None = Field(
        default=None,
        validation_alias=AliasChoices(THRESHOLDS_KEY, *EARLIER_THRESHOLDS_KEYS),
        serialization_alias=THRESHOLDS_KEY,
    )

    @field_validator("thresholds", mode="before")
    @classmethod
    def _known_statistic(cls, thresholds: object) -> object:
        """Thresholds of a statistic this version does not know: left out, the feature counted."""
        if isinstance(thresholds, dict):
            statistic = thresholds.get("statistic", "sum")
            if statistic not in get_args(StatisticName):
                if statistic not in _reported_statistics:
                    _reported_statistics.add(statistic)
                    log.warning(
                        "drift thresholds for the statistic %r, which this version does not "
                        "know: its features are counted, not judged",
                        statistic,
                    )
                return None
        return thresholds


class DriftFeatures(BaseModel):
    """drift-features.json: per-sample features with calibrated thresholds (read leniently)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = Field(default=FEATURES_SCHEMA_VERSION, ge=FEATURES_SCHEMA_VERSION)
    samples: int = Field(ge=1)
    bins: int = QUANTILE_BINS
    tensors: list[TensorLayout]
    inputs: list[DriftFeature]
    outputs: list[DriftFeature]

    def known(self) -> DriftFeatures:
        """The same reference without features of summaries this version does not compute."""
        return self.model_copy(
            update={
                "inputs": [f for f in self.inputs if f.summary in SUMMARIES],
                "outputs": [f for f in self.outputs if f.summary in SUMMARIES],
            }
        )


AnyReference = DriftReference | DriftFeatures
_reported_versions: set[int] = set()
_reported_statistics: set[object] = set()  # statistic names this version does not know


def load_reference(directory: Path) -> tuple[AnyReference | None, list[str]]:
    """The drift reference of an unpacked bundle: drift-features.json if usable, else the v1 file.

    Returns the reference (None: neither file is there or usable) and notes on
    what was not usable. A newer schema_version is logged once per process.
    """
    notes: list[str] = []
    features_path = directory / FEATURES_FILE
    if features_path.is_file():
        try:
            features = DriftFeatures.model_validate_json(features_path.read_bytes())
        except (OSError, ValidationError) as exc:
            notes.append(f"{FEATURES_FILE} unusable, counting {REFERENCE_FILE} instead: {exc}")
        else:
            version = features.schema_version
            if version > FEATURES_SCHEMA_VERSION and version not in _reported_versions:
                _reported_versions.add(version)
                log.warning(
                    "%s has schema_version %d, newer than this agent's %d: counting the "
                    "features it knows",
                    features_path,
                    version,
                    FEATURES_SCHEMA_VERSION,
                )
            return features.known(), notes
    v1_path = directory / REFERENCE_FILE
    if not v1_path.is_file():
        return None, notes
    try:
        return DriftReference.model_validate_json(v1_path.read_bytes()), notes
    except (OSError, ValidationError) as exc:
        notes.append(f"{REFERENCE_FILE} unusable: {exc}")
        return None, notes


class TensorPlan(NamedTuple):
    """The features one tensor gives, and why (for the converter's report)."""

    layout: TensorLayout
    summaries: tuple[str, ...]
    why: str


def plan_tensor(
    tensor: str,
    per_sample_shape: tuple[int, ...],
    kind: str,
    batched: bool,
    channels_first: bool,
    output: bool,
) -> TensorPlan | None:
    """Which per-sample features a tensor gives (None: not numeric, or empty)."""
    rank = len(per_sample_shape)
    size = math.prod(per_sample_shape)
    if kind not in "biuf" or size == 0:
        return None
    if output and kind == "f" and rank >= 1 and size == per_sample_shape[-1] > 1:
        classes = per_sample_shape[-1]
        layout = TensorLayout(
            tensor=tensor, batched=batched, rank=rank, axis=rank - 1, width=classes
        )
        why = f"class scores over {classes} classes: the top-1 class and the confidence"
        if classes > MAX_CLASSES:
            why = f"{why} (top-1 class bins up to {MAX_CLASSES} classes: the confidence only)"
            return TensorPlan(layout, ("confidence",), why)
        return TensorPlan(layout, CLASS_SUMMARIES, why)
    axis = feature_axis(per_sample_shape, channels_first)
    width = None if axis is None else per_sample_shape[axis]
    layout = TensorLayout(tensor=tensor, batched=batched, rank=rank, axis=axis, width=width)
    pooled = size // (width or 1)
    per = "per channel" if axis is not None else "as a whole"
    if pooled == 1:
        one = "one value per column" if axis is not None else "one value"
        return TensorPlan(layout, ("value",), f"{one} per sample: the value")
    used = len(range(0, pooled, summary_stride(pooled, inner_width(per_sample_shape, axis))))
    why = (
        f"{pooled} values per sample {per} (pixels, time steps): each sample's mean and "
        f"standard deviation (of {used} of them), since the values of one sample are "
        "not independent"
    )
    return TensorPlan(layout, ("mean", "std"), why)


def feature_name(layout: TensorLayout, summary: str, index: int | None) -> str:
    base = layout.tensor if index is None else f"{layout.tensor}[{index}]"
    return base if summary == "value" else f"{base}.{summary}"


def class_edges(classes: int) -> list[float]:
    """One bin per class: class i in [i - 0.5, i + 0.5)."""
    return [index - 0.5 for index in range(classes + 1)]


def as_samples(array: np.ndarray, layout: TensorLayout) -> np.ndarray | None:
    """A request's tensor as stacked samples, or None when its shape does not fit the layout."""
    rows = array if layout.batched else array[None, ...]
    if rows.ndim != layout.rank + 1 or rows.dtype.kind not in "biuf" or len(rows) == 0:
        return None
    if layout.axis is not None and rows.shape[layout.axis + 1] != layout.width:
        return None
    return rows


def sample_values(rows: np.ndarray, layout: TensorLayout, summary: str) -> np.ndarray | None:
    """Per sample, this summary for every index along the feature axis: (samples, features).

    `rows` are stacked samples (`as_samples`). None when the summary does not
    apply to them (`value` of a sample with several values per feature).
    """
    import numpy as np

    count = len(rows)
    if summary in CLASS_SUMMARIES:
        scores = rows.reshape(count, -1)
        best = scores.argmax(axis=1) if summary == "top1" else scores.max(axis=1)
        return np.asarray(best, dtype=np.float64).reshape(count, 1)
    moved = rows if layout.axis is None else np.moveaxis(rows, layout.axis + 1, 1)
    grouped = moved.reshape(count, 1 if layout.axis is None else moved.shape[1], -1)
    if summary == "value":
        return np.asarray(grouped[:, :, 0], dtype=np.float64) if grouped.shape[2] == 1 else None
    stride = summary_stride(grouped.shape[2], inner_width(rows.shape[1:], layout.axis))
    picked = grouped[:, :, ::stride]
    # Float tensors are reduced in their own precision (float32 halves the cost), others in float64.
    precision = picked.dtype if picked.dtype.kind == "f" else np.float64
    if summary == "mean":
        return np.asarray(picked.mean(axis=2, dtype=precision), dtype=np.float64)
    if summary == "std":
        return np.asarray(picked.std(axis=2, dtype=precision), dtype=np.float64)
    return None


def inner_width(per_sample_shape: tuple[int, ...], axis: int | None) -> int:
    """The innermost dimension of a sample other than the feature axis (1 when none)."""
    rest = [size for index, size in enumerate(per_sample_shape) if index != axis]
    return rest[-1] if rest else 1


def summary_stride(values: int, width: int) -> int:
    """The stride that picks at most MAX_SUMMARY_VALUES of a sample's `values` for one feature.

    Coprime with the innermost dimension `width`, so that the picks walk across
    the columns of an image rather than stay in a few.
    """
    stride = max(1, -(-values // MAX_SUMMARY_VALUES))
    while stride > 1 and math.gcd(stride, width) != 1:
        stride += 1
    return stride
