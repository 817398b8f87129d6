"""The files a model bundle carries besides its manifest: names and schemas.

The converter writes them, the agent reads them, the server shows them; this
module is their one definition.

    model.onnx | model.tflite   the model to serve
    model.float.onnx            the float model: the first fallback (ONNX only; absent
                                when model.onnx is the float model)
    schema.json                 ModelSchema: inputs and outputs, observed ranges
    smoke.npz                   arrays "input/<name>" and "expected/<name>", samples first
    smoke.json                  SmokeSpec: sample count, batching, tolerance per output
    drift-reference.json        edgefleet.drift.DriftReference
    drift-features.json         edgefleet.driftfeatures.DriftFeatures
    report.json, report.txt     the converter's report
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SERVED_ONNX = "model.onnx"
SERVED_TFLITE = "model.tflite"
SERVED_MODELS = (SERVED_ONNX, SERVED_TFLITE)
# The runtime each served file needs, as hardware profiles name it (`runtimes`).
SERVED_RUNTIMES = {SERVED_ONNX: "onnxruntime", SERVED_TFLITE: "tflite"}
FALLBACK_ONNX = "model.float.onnx"
SCHEMA_FILE = "schema.json"
SMOKE_FILE = "smoke.npz"
SMOKE_SPEC_FILE = "smoke.json"
SMOKE_INPUT_PREFIX = "input/"
SMOKE_EXPECTED_PREFIX = "expected/"
REPORT_FILE = "report.json"  # the converter's report (a JSON object)

Dim = int | str | None  # fixed size, symbolic name (dynamic), or unknown


class TensorSchema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str  # numpy dtype name
    shape: list[Dim]
    observed_range: list[float] | None = Field(default=None, min_length=2, max_length=2)


class ModelSchema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    format: Literal["onnx", "tflite"]
    inputs: list[TensorSchema]
    outputs: list[TensorSchema]


class SmokeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    samples: int = Field(ge=1)
    batched: bool  # True: sample i is arrays[i:i+1]; False: arrays[i]
    atol: dict[str, float]  # per output: allowed absolute difference
