"""Which layers quantization hurts most, measured on the model's outputs, to keep them in float.

The unit is a layer: a node that bears weights (Conv, ConvTranspose, Gemm, or
MatMul with a constant operand) with the nodes without weights that follow it
(its activation, an Add, a pooling), up to the next such node. A node without
weights is never a unit of its own: it is quantized or kept float with the
layer it follows. A weightless node joins the layer that produces its first
input; nodes before the first layer belong to none.

Each layer is quantized alone, every other node kept float, with the settings
and calibration ranges of the candidate being recovered, and the model's
outputs on the first SENSITIVITY_SAMPLES calibration samples are compared
with the float model's (`output_error`). Quantizing one layer at a time,
rather than keeping one float at a time, because in QDQ a tensor between two
layers is quantized when either of them is: keeping one of the two float
leaves the tensor quantized and hides the damage from both, while quantizing
each alone charges the damage to both.

Before keeping layers float, the activation tensors of the TUNED_LAYERS most
sensitive layers get a calibration of their own (`tune_tensor_calibration`):
each tensor's range is taken, in turn, from every calibration method the
profile allows, the whole candidate quantized, and the range that lowers the
output error most is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgefleet.converter.candidates import Candidate
from edgefleet.converter.data import Dataset
from edgefleet.converter.errors import summarize
from edgefleet.converter.evaluate import (
    Outputs,
    fidelity,
    has_non_finite,
    open_session,
    run_outputs,
)
from edgefleet.converter.progress import Progress
from edgefleet.converter.quantize import activation_ranges, quantize
from edgefleet.profiles import Profile

SENSITIVITY_SAMPLES = 32
TUNED_LAYERS = 4  # the most sensitive layers whose tensors get a calibration of their own
WEIGHTED_OPERATORS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class Layer:
    name: str  # the node that bears the weights
    nodes: tuple[str, ...]  # that node, then the nodes without weights that follow it


@dataclass(frozen=True)
class Sensitivity:
    layer: Layer
    error: float  # output_error with only this layer quantized; inf when that failed
    failure: str | None = None


def model_layers(model: onnx.ModelProto) -> list[Layer]:
    """The model's named layers in graph order (unnamed nodes cannot be excluded by name)."""
    constants = {tensor.name for tensor in model.graph.initializer}
    owner: dict[str, int] = {}  # tensor name -> index of the layer that produced it
    members: list[list[str]] = []
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPERATORS and any(i in constants for i in node.input[1:]):
            layer = len(members)
            members.append([node.name])
        elif node.input and node.input[0] in owner:
            layer = owner[node.input[0]]
            members[layer].append(node.name)
        else:
            continue
        owner.update(dict.fromkeys(node.output, layer))
    return [Layer(nodes[0], tuple(nodes)) for nodes in members if all(nodes)]


def output_error(reference: Outputs, outputs: Outputs) -> float:
    """How far outputs are from the float model's, by the measures the budget judges.

    The worst output's 1 - cosine similarity, 1 - top-1 agreement, 1 - match rate
    (integer outputs) or 99th-percentile deviation (one value per sample): 0 is
    identical to float, larger is worse.
    """
    errors = [0.0]
    for values in fidelity(reference, outputs).values():
        errors += [
            1 - values[key] for key in ("cosine", "top1_agreement", "match_rate") if key in values
        ]
        errors.append(values.get("deviation_p99", 0.0))
    return max(errors)


def rank_layers(
    base: Candidate,
    float_model: Path,
    layers: list[Layer],
    calibration: Dataset,
    profile: Profile,
    workdir: Path,
    progress: Progress,
) -> list[Sensitivity]:
    """Every layer's output error when quantized alone, the most sensitive first.

    Ties keep graph order; a layer that cannot be quantized alone ranks first.
    The candidate's calibration ranges are reused from `workdir`'s cache, so
    each layer costs one quantization and one run of SENSITIVITY_SAMPLES samples.
    """
    samples = calibration.subset(SENSITIVITY_SAMPLES)
    names = [
        output.name for output in onnx.load(str(float_model), load_external_data=False).graph.output
    ]
    reference = run_outputs(open_session(float_model, profile), samples, names)
    measured: list[Sensitivity] = []
    progress.start("measuring each layer's sensitivity to quantization", len(layers))
    for index, layer in enumerate(layers):
        path = workdir / f"sensitivity-{index}.onnx"
        try:
            quantize(base, float_model, path, calibration, workdir, nodes_to_quantize=layer.nodes)
            outputs = run_outputs(open_session(path, profile), samples, names)
            error = math.inf if has_non_finite(outputs) else output_error(reference, outputs)
            measured.append(Sensitivity(layer, error))
        except Exception as exc:
            measured.append(Sensitivity(layer, math.inf, summarize(exc)))
        finally:
            path.unlink(missing_ok=True)
            progress.advance()
    progress.finish()
    return sorted(measured, key=lambda s: -s.error)


@dataclass(frozen=True)
class Tuning:
    candidate: Candidate  # the base with the tensors' calibrations that lowered the error
    error_before: float  # the base's output error, every tensor calibrated by its method
    error_after: float


def layer_tensors(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """The activation tensors the layers' nodes read and write, each once, in the layers' order."""
    constants = {tensor.name for tensor in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    tensors = [
        name
        for layer in layers
        for node in layer.nodes
        for name in (*nodes[node].input, *nodes[node].output)
        if name and name not in constants
    ]
    return list(dict.fromkeys(tensors))


def tune_tensor_calibration(
    base: Candidate,
    float_model: Path,
    ranked: list[Sensitivity],
    calibration: Dataset,
    profile: Profile,
    workdir: Path,
    progress: Progress,
) -> Tuning:
    """The base candidate with the range of each tensor of its most sensitive layers chosen.

    Tensor by tensor (the most sensitive layer's first), every other calibration
    method's range is tried with the choices so far, the whole model quantized,
    and the one that lowers the output error on SENSITIVITY_SAMPLES calibration
    samples most is kept. A method whose range for the tensor equals the one in
    use is not tried; a trial that fails to quantize or run is not kept.
    """
    model = onnx.load(str(float_model), load_external_data=False)
    tensors = layer_tensors(model, [s.layer for s in ranked[:TUNED_LAYERS]])
    methods = profile.quantization.calibration
    ranges: dict[str, dict[str, tuple[float, float]]] = {
        m: activation_ranges(m, float_model, calibration, workdir) for m in methods
    }
    samples = calibration.subset(SENSITIVITY_SAMPLES)
    names = [output.name for output in model.graph.output]
    reference = run_outputs(open_session(float_model, profile), samples, names)

    def error_of(candidate: Candidate) -> float:
        path = workdir / "tuning.onnx"
        try:
            quantize(candidate, float_model, path, calibration, workdir)
            outputs = run_outputs(open_session(path, profile), samples, names)
        except Exception:
            return math.inf
        finally:
            path.unlink(missing_ok=True)
        return math.inf if has_non_finite(outputs) else output_error(reference, outputs)

    assert base.calibration is not None
    chosen: dict[str, str] = {}
    best = before = error_of(base)
    progress.start("choosing the calibration of the most sensitive tensors", len(tensors))
    for tensor in tensors:
        for method in methods:
            in_use = ranges[chosen.get(tensor, base.calibration)].get(tensor)
            if in_use is None or ranges[method].get(tensor) in (None, in_use):
                continue
            trial = {**chosen, tensor: method}
            error = error_of(base.recalibrating(tuple(trial.items())))
            if error < best:
                best, chosen = error, trial
        progress.advance()
    progress.finish()
    return Tuning(base.recalibrating(tuple(chosen.items())), before, best)
