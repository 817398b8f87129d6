"""What a bundle carries besides the model: its schema, smoke test and drift reference.

- `schema.json`: every input and output with name, dtype, shape (dynamic
  dimensions by name) and the range observed on the reference data; the
  agent checks inputs against it before the model sees them.
- `smoke.npz` + `smoke.json`: sample inputs and the shipped model's outputs
  for them, with the tolerance the on-device smoke test allows (`smoke_samples`
  says how the samples are laid out, `smoke_tolerance` how large it is).
- `drift-reference.json`: see `edgefleet.drift` (the first format, for agents
  that know no other).
- `drift-features.json`: see `edgefleet.driftfeatures`; per-sample features,
  each with thresholds calibrated by `edgefleet.converter.driftcal` at
  WINDOW_SIZES samples per window, at the false-alarm rate FALSE_ALARM (the
  smaller rates that many features judged at once need come from the
  calibrated tail).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgefleet.bundlefiles import (
    SCHEMA_FILE,
    SERVED_ONNX,
    SERVED_TFLITE,
    SMOKE_EXPECTED_PREFIX,
    SMOKE_FILE,
    SMOKE_INPUT_PREFIX,
    SMOKE_SPEC_FILE,
    ModelSchema,
    SmokeSpec,
    TensorSchema,
)
from edgefleet.converter.data import Dataset, samples_word
from edgefleet.converter.driftcal import calibrate
from edgefleet.converter.modelinfo import ModelInfo, TensorSpec
from edgefleet.drift import (
    REFERENCE_FILE,
    DriftReference,
    FeatureReference,
    count_into,
    feature_axis,
    feature_values,
    reference_edges,
)
from edgefleet.driftfeatures import (
    CLASS_SUMMARIES,
    FEATURES_FILE,
    DriftFeature,
    DriftFeatures,
    LenientThresholds,
    TensorPlan,
    class_edges,
    feature_name,
    plan_tensor,
    sample_values,
)
from edgefleet.litert import interpreter_class

SMOKE_SAMPLES = 8
WINDOW_SIZES = (50, 100, 200, 500, 1000, 2000, 5000)
FALSE_ALARM = 0.01
CALIBRATION_SEED = 0  # the same data gives the same thresholds
# Below it a report notes that one reference can keep raising drift alarms (docs/drift.md).
MIN_REFERENCE_SAMPLES = 200
# Below it a report notes that a change of spread is found less readily
# (bench/drift_reference_size.py, docs/drift.md).
SPREAD_REFERENCE_SAMPLES = 500
# Operators that only move values, between a quantized tensor and an output: the
# output's values are then those of the quantized tensor, step for step.
ONNX_LAYOUT_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
TFLITE_LAYOUT_OPS = frozenset({"DEQUANTIZE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE"})
Outputs = dict[str, np.ndarray]


def _observed_range(array: np.ndarray) -> list[float] | None:
    if array.dtype.kind not in "iuf" or array.size == 0:
        return None
    return [float(array.min()), float(array.max())]


def _tensor_entry(spec: TensorSpec, values: np.ndarray) -> TensorSchema:
    return TensorSchema(
        name=spec.name,
        dtype=spec.dtype,
        shape=list(spec.shape),
        observed_range=_observed_range(values),
    )


def write_schema(
    directory: Path, info: ModelInfo, inputs: dict[str, np.ndarray], outputs: Outputs
) -> None:
    schema = ModelSchema(
        format=info.format,
        inputs=[_tensor_entry(spec, inputs[spec.name]) for spec in info.inputs],
        outputs=[_tensor_entry(spec, outputs[spec.name]) for spec in info.outputs],
    )
    (directory / SCHEMA_FILE).write_text(schema.model_dump_json(indent=2) + "\n")


def _features(
    tensors: dict[str, np.ndarray], channels_first: bool, axes: dict[str, int | None]
) -> list[FeatureReference]:
    features = []
    for name, values in tensors.items():
        if values.dtype.kind not in "iuf":
            continue
        axis = feature_axis(values.shape[1:], channels_first)
        axes[name] = axis
        for index, feature in enumerate(feature_values(values, axis)):
            label = name if axis is None else f"{name}[{index}]"
            features.append(
                FeatureReference(
                    name=label,
                    tensor=name,
                    index=None if axis is None else index,
                    histogram=count_into(feature, reference_edges(feature)),
                )
            )
    return features


def small_reference_note(samples: int) -> str | None:
    """A note for the report when the drift reference has fewer than SPREAD_REFERENCE_SAMPLES.

    Below MIN_REFERENCE_SAMPLES it also warns of false alarms.
    """
    if samples >= SPREAD_REFERENCE_SAMPLES:
        return None
    head = f"drift reference from {samples_word(samples)} (calibration and validation together): "
    spread = (
        f"drift checks find a change of spread less readily than with "
        f"{SPREAD_REFERENCE_SAMPLES} samples or more"
    )
    if samples >= MIN_REFERENCE_SAMPLES:
        return (
            f"{head}{spread}. Give at least {SPREAD_REFERENCE_SAMPLES} samples to find one as "
            f"readily"
        )
    return (
        f"{head}a window of more samples than that is judged mostly against the reference's own "
        f"chance difference from the data it was drawn from; the thresholds allow for it on "
        f"average, but one reference so small can keep raising drift alarms where nothing "
        f"changed, and {spread}. Give at least {MIN_REFERENCE_SAMPLES} samples "
        f"({SPREAD_REFERENCE_SAMPLES} for a change of spread)"
    )


def write_drift_reference(
    directory: Path, info: ModelInfo, inputs: dict[str, np.ndarray], outputs: Outputs, samples: int
) -> DriftReference:
    channels_first = info.format == "onnx"
    axes: dict[str, int | None] = {}
    reference = DriftReference(
        samples=samples,
        feature_axes=axes,
        inputs=_features(inputs, channels_first, axes),
        outputs=_features(outputs, channels_first, axes),
    )
    (directory / REFERENCE_FILE).write_text(reference.model_dump_json(indent=1) + "\n")
    return reference


def _calibrated_features(
    plan: TensorPlan, rows: np.ndarray, rng: np.random.Generator
) -> list[DriftFeature]:
    """The plan's features of these stacked reference samples, each with its thresholds."""
    layout = plan.layout
    features = []
    for summary in plan.summaries:
        values = sample_values(rows, layout, summary)
        assert values is not None  # plan_tensor chose summaries that apply to these samples
        for column_index, column in enumerate(values.T):
            whole = layout.axis is None or summary in CLASS_SUMMARIES
            index = None if whole else column_index
            edges = class_edges(layout.width or 1) if summary == "top1" else reference_edges(column)
            thresholds = calibrate(
                list(column.reshape(-1, 1)), edges, WINDOW_SIZES, [FALSE_ALARM], rng
            )
            features.append(
                DriftFeature(
                    name=feature_name(layout, summary, index),
                    tensor=layout.tensor,
                    index=index,
                    histogram=count_into(column, edges),
                    summary=summary,
                    thresholds=LenientThresholds.model_validate(thresholds.model_dump()),
                )
            )
    return features


def drift_feature_plans(
    info: ModelInfo, inputs: Dataset, outputs: Outputs
) -> tuple[list[tuple[TensorPlan, np.ndarray]], list[tuple[TensorPlan, np.ndarray]]]:
    """Per input and per output tensor: its features and its reference samples, stacked.

    An input given as whole entries (no batch axis) is one sample per entry;
    outputs are per sample when any input is batched, else per entry too.
    """
    channels_first = info.format == "onnx"
    outputs_batched = not all(inputs.whole_entries.values())

    def plans(
        arrays: dict[str, np.ndarray], batched: dict[str, bool], output: bool
    ) -> list[tuple[TensorPlan, np.ndarray]]:
        found = []
        for name, array in arrays.items():
            plan = plan_tensor(
                name, array.shape[1:], array.dtype.kind, batched[name], channels_first, output
            )
            if plan is not None:
                found.append((plan, array))
        return found

    input_batched = {name: not whole for name, whole in inputs.whole_entries.items()}
    return (
        plans(inputs.arrays, input_batched, output=False),
        plans(outputs, dict.fromkeys(outputs, outputs_batched), output=True),
    )


def write_drift_features(
    directory: Path, info: ModelInfo, inputs: Dataset, outputs: Outputs
) -> tuple[DriftFeatures, list[tuple[TensorPlan, list[str]]]]:
    """Write drift-features.json; returns it, and per tensor its plan and feature names."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    input_plans, output_plans = drift_feature_plans(info, inputs, outputs)
    described: list[tuple[TensorPlan, list[str]]] = []

    def features(found: list[tuple[TensorPlan, np.ndarray]]) -> list[DriftFeature]:
        result = []
        for plan, rows in found:
            tensor_features = _calibrated_features(plan, rows, rng)
            described.append((plan, [f.name for f in tensor_features]))
            result.extend(tensor_features)
        return result

    reference = DriftFeatures(
        samples=inputs.size,
        tensors=[plan.layout for plan, _ in [*input_plans, *output_plans]],
        inputs=features(input_plans),
        outputs=features(output_plans),
    )
    (directory / FEATURES_FILE).write_text(reference.model_dump_json(indent=1) + "\n")
    return reference, described


def _largest_scale(scales: np.ndarray) -> float | None:
    return float(np.max(scales)) if np.size(scales) and float(np.max(scales)) > 0 else None


def _onnx_output_steps(path: Path) -> dict[str, float]:
    """Outputs that a DequantizeLinear gives (through layout operators only), with its scale."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    constants = {initializer.name: initializer for initializer in graph.initializer}
    steps = {}
    for output in graph.output:
        node = producers.get(output.name)
        while node is not None and node.op_type in ONNX_LAYOUT_OPS:
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in constants:
            step = _largest_scale(numpy_helper.to_array(constants[node.input[1]]))
            if step is not None:
                steps[output.name] = step
    return steps


def _tflite_output_steps(path: Path) -> dict[str, float]:
    """Float outputs whose values are the last quantized tensor before them (through
    DEQUANTIZE and layout operators only), with that tensor's scale; by signature name."""
    interpreter = interpreter_class()[0](model_path=str(path))
    interpreter.allocate_tensors()
    if interpreter.get_signature_list():
        outputs = interpreter.get_signature_runner().get_output_details()
    else:
        outputs = {d["name"]: d for d in interpreter.get_output_details()}
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    producers = {
        tensor: op
        for op in interpreter._get_ops_details()  # LiteRT's only view of the operators
        if op["op_name"] != "DELEGATE"  # a delegate's node repeats the operators it runs
        for tensor in op["outputs"]
    }
    steps = {}
    for name, detail in outputs.items():
        if np.dtype(detail["dtype"]).kind != "f":
            continue
        index = detail["index"]
        while (op := producers.get(index)) is not None and op["op_name"] in TFLITE_LAYOUT_OPS:
            index = op["inputs"][0]
            tensor = tensors[index]
            if np.dtype(tensor["dtype"]).kind in "iu":
                step = _largest_scale(tensor["quantization_parameters"]["scales"])
                if step is not None:
                    steps[name] = step
                break
    return steps


def output_steps(model: Path) -> dict[str, float]:
    """Per float output of a quantized model, its quantization step: the scale of the
    int8 tensor whose values it carries (ONNX: the DequantizeLinear before it; TFLite:
    the last quantized tensor before it). Outputs computed in float have none."""
    return _tflite_output_steps(model) if model.suffix == ".tflite" else _onnx_output_steps(model)


def smoke_tolerance(
    expected: Outputs, float_outputs: Outputs | None, steps: dict[str, float]
) -> dict[str, float]:
    """Per output, the absolute difference the device may show against `expected`.

    Other CPUs run other int8 kernels (32-bit ARM's fixed-point requantization
    rounds otherwise than x86's), so a device may round a value the other way
    where the exact result lies near the middle between two steps:
    - in the output's own quantized tensor, that moves the output by exactly one
      quantization step (`steps`, from the model);
    - in an earlier tensor, by one of that tensor's steps, which the layers
      after it carry forward. Such a rounding moves a value by one step where
      the quantization itself moved it by up to half a step, and only values
      lying near a midpoint round otherwise: what these carry is a small part
      of what all of the quantization's roundings carry, the quantization
      error measured here (chosen vs float on these samples); an estimate,
      which tests/converter/test_arm_emulated.py checks on real ARM kernels.
    So the tolerance is that error plus one output step, and never less than a
    small floor relative to the output's scale; a float output has no step. A
    wrong model (other weights, another input's answer) differs by far more than
    the quantization error, and still fails. Integer outputs are compared exactly.
    """
    tolerance = {}
    for name, values in expected.items():
        if values.dtype.kind not in "f":
            tolerance[name] = 0.0
            continue
        scale = float(np.abs(values).max()) if values.size else 0.0
        floor = max(1e-4, 1e-3 * scale)
        error = 0.0
        if float_outputs is not None:
            error = float(np.abs(float_outputs[name].astype(np.float64) - values).max())
        tolerance[name] = max(floor, error) + steps.get(name, 0.0)
    return tolerance


def smoke_samples(validation: Dataset) -> Dataset:
    """The first SMOKE_SAMPLES validation samples, as the smoke test stores them.

    In batches of one along the first axis when every input is fed so; otherwise
    (an input without a batch axis: a state, a scalar) every input as one whole
    entry per sample, so that entry i of each array is exactly sample i's feed.
    """
    samples = validation.subset(SMOKE_SAMPLES)
    return samples.as_whole_entries() if any(samples.whole_entries.values()) else samples


def write_smoke_test(
    directory: Path,
    dataset: Dataset,
    expected: Outputs,
    float_outputs: Outputs | None,
    output_names: Sequence[str],
) -> None:
    """smoke.npz and smoke.json, for the model already served in `directory`."""
    count = min(SMOKE_SAMPLES, dataset.size)
    arrays = {
        f"{SMOKE_INPUT_PREFIX}{name}": array[:count] for name, array in dataset.arrays.items()
    }
    arrays.update(
        {f"{SMOKE_EXPECTED_PREFIX}{name}": expected[name][:count] for name in output_names}
    )
    np.savez(directory / SMOKE_FILE, **arrays)  # type: ignore[arg-type]
    head = {name: expected[name][:count] for name in output_names}
    float_head = (
        {name: float_outputs[name][:count] for name in output_names} if float_outputs else None
    )
    spec = SmokeSpec(
        samples=count,
        batched=not all(dataset.whole_entries.values()),
        atol=smoke_tolerance(head, float_head, output_steps(_served_model(directory))),
    )
    (directory / SMOKE_SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")


def _served_model(directory: Path) -> Path:
    onnx_model = directory / SERVED_ONNX
    return onnx_model if onnx_model.is_file() else directory / SERVED_TFLITE
