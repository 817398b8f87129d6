"""Finding the nodes that quantization hurts most, to keep them in float.

For a static QDQ model, onnxruntime's `qdq_loss_debug` runs the float and the
quantized model side by side on a few calibration samples and gives, per
activation tensor, the signal-to-quantization-noise ratio (SQNR, in dB) of the
quantized model's tensor against the float one. The nodes producing the
tensors with the lowest SQNR are the first to exclude from quantization.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx

from edgefleet.converter.data import Dataset
from edgefleet.converter.quantize import CalibrationReader, quiet_onnxruntime_tooling

SQNR_SAMPLES = 16


def worst_nodes(float_model: Path, qdq_model: Path, data: Dataset, workdir: Path) -> list[str]:
    """Node names of the float model, worst SQNR first.

    Raises:
        Exception: whatever onnxruntime's debugging tooling raises.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    sample = data.subset(SQNR_SAMPLES)
    float_augmented = workdir / "sqnr.float.onnx"
    qdq_augmented = workdir / "sqnr.qdq.onnx"
    with quiet_onnxruntime_tooling():
        modify_model_output_intermediate_tensors(str(float_model), str(float_augmented))
        modify_model_output_intermediate_tensors(str(qdq_model), str(qdq_augmented))
        float_activations = collect_activations(str(float_augmented), CalibrationReader(sample))
        qdq_activations = collect_activations(str(qdq_augmented), CalibrationReader(sample))
        matched = create_activation_matching(qdq_activations, float_activations)
        errors = compute_activation_error(matched)
    scored = [
        (values["xmodel_err"], tensor)
        for tensor, values in errors.items()
        if "xmodel_err" in values and not math.isnan(values["xmodel_err"])
    ]
    producers = {
        output: node.name
        for node in onnx.load(str(float_model), load_external_data=False).graph.node
        for output in node.output
    }
    ranked: list[str] = []
    for _, tensor in sorted(scored):
        node = producers.get(tensor)
        if node and node not in ranked:
            ranked.append(node)
    return ranked
