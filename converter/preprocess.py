"""Preprocessing that survives real models, before any quantization.

1. Upgrade the opset to 13 when it is older: per-channel quantization needs it.
2. onnxruntime's `quant_pre_process`: symbolic shape inference, ONNX shape
   inference, and graph optimization (so quantization sees the fused graph and
   does not optimize during quantization). Symbolic inference fails on some
   dynamic dimensions; then ONNX shape inference alone is used, and if even
   that fails, the model is quantized unoptimized, as it came. onnxruntime
   saves the model of a failed symbolic inference into the current directory,
   so the step runs with the work directory as the current directory.

Each step that was skipped is recorded, so the report says what was done.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import version_converter

from edgefleet.converter.errors import summarize
from edgefleet.converter.modelinfo import ModelInfo

MIN_OPSET = 13
log = logging.getLogger(__name__)


@dataclass
class PreprocessResult:
    path: Path
    opset: int
    notes: list[str] = field(default_factory=list)


def _upgrade_opset(model: onnx.ModelProto, info: ModelInfo, notes: list[str]) -> onnx.ModelProto:
    if info.opset >= MIN_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        notes.append(f"opset {info.opset} kept: upgrade to {MIN_OPSET} failed ({exc})")
        return model
    notes.append(f"opset upgraded from {info.opset} to {MIN_OPSET}")
    return upgraded


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def preprocess(model: onnx.ModelProto, info: ModelInfo, workdir: Path) -> PreprocessResult:
    """Write the preprocessed float model into `workdir` and say what was done."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: list[str] = []
    model = _upgrade_opset(model, info, notes)
    source = workdir / "float.upgraded.onnx"
    onnx.save(model, source)
    output = workdir / "float.preprocessed.onnx"
    attempts = [
        ("symbolic shape inference and graph optimization", {}),
        ("ONNX shape inference and graph optimization", {"skip_symbolic_shape": True}),
        ("ONNX shape inference only", {"skip_symbolic_shape": True, "skip_optimization": True}),
    ]
    for description, options in attempts:
        try:
            with _working_directory(workdir):
                quant_pre_process(str(source), str(output), **options)
        except Exception as exc:
            notes.append(f"{description} failed: {summarize(exc, 200)}")
            continue
        notes.append(f"preprocessed with {description}")
        break
    else:
        notes.append("quantizing the model as it came")
        output = source
    processed = onnx.load(output)
    _name_nodes(processed)
    onnx.save(processed, output)
    opset = next(
        (o.version for o in processed.opset_import if o.domain in ("", "ai.onnx")), info.opset
    )
    return PreprocessResult(path=output, opset=opset, notes=notes)


def _name_nodes(model: onnx.ModelProto) -> None:
    # Excluding nodes from quantization goes by node name: every node needs one.
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
