"""Which quantization settings to try for a model on a target: a pure function of both.

Static quantization (QDQ or QOperator, per-tensor or per-channel, calibrated by
MinMax, Percentile or Entropy) suits convolutional models, whose activations
have stable ranges; dynamic quantization suits recurrent and attention models,
whose activation ranges vary per input; dense models get both. The float model
is always a candidate: it is what every other is measured against and what is
shipped when nothing beats it. Only settings that the target profile declares
valid are tried (see hardware/profiles/ and docs/converter.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Literal

from edgefleet.converter.modelinfo import ModelKind
from edgefleet.errors import UsageError
from edgefleet.profiles import Profile

Method = Literal["float", "static", "dynamic", "tflite"]

STATIC_KINDS: frozenset[ModelKind] = frozenset({"convolutional", "dense"})
DYNAMIC_KINDS: frozenset[ModelKind] = frozenset({"recurrent", "attention", "dense"})


@dataclass(frozen=True)
class Candidate:
    method: Method
    quant_format: str | None = None  # QDQ | QOperator (static only)
    # activation+weight, e.g. U8S8; dynamic: weight type only; tflite: float32 | int8
    types: str | None = None
    per_channel: bool = False
    reduce_range: bool = False
    calibration: str | None = None  # static only
    nodes_to_exclude: tuple[str, ...] = ()
    # (activation tensor, calibration method) where a tensor's range is not `calibration`'s
    tensor_calibration: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        if self.method == "float":
            return "float"
        if self.method == "tflite":
            return f"tflite-{self.types}"
        parts: list[str] = [self.method]
        if self.quant_format:
            parts.append(self.quant_format.lower())
        parts.append((self.types or "").lower())
        parts.append("per-channel" if self.per_channel else "per-tensor")
        if self.reduce_range:
            parts.append("reduce-range")
        if self.calibration:
            parts.append(self.calibration.lower())
        if self.nodes_to_exclude:
            parts.append(f"minus-{len(self.nodes_to_exclude)}-nodes")
        if self.tensor_calibration:
            parts.append(f"{len(self.tensor_calibration)}-tensors-recalibrated")
        return "-".join(parts)

    def settings(self) -> dict[str, object]:
        """The settings as plain values, for reports and lineage."""
        return {
            "method": self.method,
            "format": self.quant_format,
            "types": self.types,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "calibration": self.calibration,
            "nodes_excluded": list(self.nodes_to_exclude),
            "tensor_calibration": dict(self.tensor_calibration),
        }

    def excluding(self, nodes: tuple[str, ...]) -> Candidate:
        return replace(self, nodes_to_exclude=nodes)

    def recalibrating(self, choices: tuple[tuple[str, str], ...]) -> Candidate:
        return replace(self, tensor_calibration=choices)


FLOAT = Candidate("float")
# ONNX converted to TFLite by onnx2tf (converter/onnx_to_tflite.py), where the profile runs it.
TFLITE_FLOAT32 = Candidate("tflite", types="float32")
TFLITE_INT8 = Candidate("tflite", types="int8")
TFLITE_CANDIDATES = (TFLITE_FLOAT32, TFLITE_INT8)


def structural_candidates(profile: Profile, kind: ModelKind) -> list[Candidate]:
    """Every valid combination of format, types, granularity and range, one calibration.

    Calibration changes accuracy, not speed: other calibration methods are tried
    afterwards on the fastest structures (`calibration_variants`).
    """
    settings = profile.quantization
    first_calibration = settings.calibration[0] if settings.calibration else "MinMax"
    found: list[Candidate] = []
    if settings.static and kind in STATIC_KINDS:
        for quant_format, types, per_channel, reduce_range in itertools.product(
            settings.formats, settings.types, settings.per_channel, settings.reduce_range
        ):
            if settings.allows(quant_format, types):
                found.append(
                    Candidate(
                        "static", quant_format, types, per_channel, reduce_range, first_calibration
                    )
                )
    if settings.dynamic and kind in DYNAMIC_KINDS:
        # Dynamic quantization computes activation ranges at run time (always u8);
        # only the weight type is chosen.
        weight_types = sorted({types[2:] for types in settings.types})
        for weight, per_channel, reduce_range in itertools.product(
            weight_types, settings.per_channel, settings.reduce_range
        ):
            found.append(Candidate("dynamic", None, weight, per_channel, reduce_range))
    return found


def calibration_variants(candidate: Candidate, profile: Profile) -> list[Candidate]:
    """The same static structure with the profile's other calibration methods."""
    if candidate.method != "static":
        return []
    return [
        replace(candidate, calibration=method)
        for method in profile.quantization.calibration
        if method != candidate.calibration
    ]


def pinned_candidate(name: str, profile: Profile, kind: ModelKind) -> Candidate:
    """The candidate called `name` (as in the report) among those valid for the model and target.

    Raises:
        UsageError: no valid candidate has that name.
    """
    valid = [FLOAT]
    for structure in structural_candidates(profile, kind):
        valid += [structure, *calibration_variants(structure, profile)]
    if "tflite" in profile.runtimes:  # where only TFLite runs, float is TFLite float32
        valid += TFLITE_CANDIDATES if "onnxruntime" in profile.runtimes else [TFLITE_INT8]
    found = next((c for c in valid if c.name == name), None)
    if found is None:
        raise UsageError(
            f"candidate {name!r} is not valid for a {kind} model on {profile.name}: "
            f"choose one of {', '.join(c.name for c in valid)}"
        )
    return found
