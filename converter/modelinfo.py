"""What a model file is: its format, inputs and outputs, operators and kind.

Loading is where bad model files are caught: a file that is not a model, a
truncated or damaged one, one whose operators the target cannot run, and one
whose runtime the target's profile does not list.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from edgefleet.converter.errors import (
    CorruptModelError,
    ModelTooLargeError,
    NotAModelError,
    RuntimeNotOnTargetError,
)
from edgefleet.profiles import Profile, Runtime, all_profiles

ModelFormat = Literal["onnx", "tflite"]
ModelKind = Literal["recurrent", "attention", "convolutional", "dense", "other"]
Dim = int | str | None  # fixed size, symbolic name, or unknown

# The runtime each model format needs, as profiles name it.
RUNTIME_OF: dict[ModelFormat, Runtime] = {"onnx": "onnxruntime", "tflite": "tflite"}
# Operator domains onnxruntime's CPU build implements.
SUPPORTED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
_RECURRENT_OPS = {"LSTM", "GRU", "RNN", "Scan", "Loop"}
_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
_CONV_OPS = {"Conv", "ConvTranspose"}
_DENSE_OPS = {"MatMul", "Gemm"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """True when a concrete array shape fits this spec's fixed dimensions."""
        return len(shape) == self.rank and all(
            not isinstance(dim, int) or dim == size
            for dim, size in zip(self.shape, shape, strict=True)
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    format: ModelFormat
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_counts: dict[str, int]
    domains: frozenset[str]
    opset: int  # of the default domain; 0 for TFLite
    # MatMuls of two computed tensors (no weight): attention's Q.K^T and scores.V.
    activation_matmuls: int = 0

    @property
    def kind(self) -> ModelKind:
        ops = set(self.op_counts)
        if ops & _RECURRENT_OPS:
            return "recurrent"
        if ops & _ATTENTION_OPS or ("Softmax" in ops and self.activation_matmuls >= 2):
            return "attention"
        if ops & _CONV_OPS:
            return "convolutional"
        if ops & _DENSE_OPS:
            return "dense"
        return "other"

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)


def _dims(value_info: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _read_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the weights `model` (loaded from `path`) keeps in other files into it."""
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise CorruptModelError(
            f"{path} keeps weights in files of their own that cannot be read from "
            f"{path.parent} ({exc}): keep them beside the model, as it was saved"
        ) from exc
    size = model.ByteSize()
    if size > MAX_MODEL_BYTES:
        raise ModelTooLargeError(
            f"{path} with its weights is {size / 2**30:.1f} GiB, more than one ONNX file "
            "holds (2 GiB): the converter takes models up to that size"
        )


def _spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type"):
        raise NotAModelError(
            f"input or output {value_info.name!r} is not a tensor (sequence or map): "
            "export the model with tensor inputs and outputs (skl2onnx: zipmap=False)"
        )
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    return TensorSpec(name=value_info.name, dtype=dtype, shape=_dims(value_info))


def require_runtime(profile: Profile, model_format: ModelFormat) -> None:
    """Raises: RuntimeNotOnTargetError when `profile` does not list the runtime the format needs."""
    runtime = RUNTIME_OF[model_format]
    if runtime in profile.runtimes:
        return
    targets = [p.name for p in all_profiles().values() if runtime in p.runtimes]
    convert_first = "convert the model to TFLite first, or " if model_format == "onnx" else ""
    raise RuntimeNotOnTargetError(
        f"a {'TFLite' if model_format == 'tflite' else 'ONNX'} model needs {runtime}, and "
        f"target {profile.name} runs {', '.join(profile.runtimes)} only: {convert_first}"
        f"choose a target that runs {runtime} ({', '.join(targets) or 'none is shipped'})"
    )


def is_tflite(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8)[4:8] == b"TFL3"


# Protocol buffers serialize at most 2 GiB: the most one ONNX file holds with its weights.
MAX_MODEL_BYTES = 2**31 - 1


def load_onnx(path: Path) -> tuple[onnx.ModelProto, ModelInfo]:
    """Load and check an ONNX model, with the weights it keeps in files beside it (ONNX
    external data, relative to its own directory) read into it: the model returned is
    whole, to be saved as one file.

    Raises:
        NotAModelError: not an ONNX model.
        CorruptModelError: truncated, damaged, failing onnx's checker, or its external
            data missing or unreadable.
        ModelTooLargeError: with its external data, larger than one ONNX file can hold.
    """
    data = Path(path).read_bytes()
    if not data:
        raise NotAModelError(f"{path} is empty")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError) as exc:
        # ONNX files start with field 1 (ir_version) as a varint: tag byte 0x08.
        if data[:1] == b"\x08":
            raise CorruptModelError(f"{path} is a damaged or truncated ONNX model: {exc}") from exc
        raise NotAModelError(f"{path} is not an ONNX or TFLite model") from exc
    if not model.graph.node or not model.graph.output:
        raise NotAModelError(f"{path} holds no ONNX graph")
    _read_external_data(model, Path(path))
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CorruptModelError(f"{path} fails the ONNX checker: {first_line}") from exc
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    constants = initializers | {
        output for node in model.graph.node if node.op_type == "Constant" for output in node.output
    }
    info = ModelInfo(
        path=Path(path),
        format="onnx",
        inputs=inputs,
        outputs=outputs,
        op_counts=dict(Counter(node.op_type for node in model.graph.node)),
        domains=frozenset(node.domain for node in model.graph.node),
        opset=opset,
        activation_matmuls=sum(
            1
            for node in model.graph.node
            if node.op_type == "MatMul" and not set(node.input) & constants
        ),
    )
    return model, info
