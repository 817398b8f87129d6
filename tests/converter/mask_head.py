"""A segmentation-style head ending in a sigmoid, built where it is used (nothing committed).

The tests build it at SIZE x SIZE with CHANNELS channels; bench/convert_models.py
also builds a larger one (`write_case(directory, size, channels)`), the same
graph and weight recipe at a size where int8 speeds the convolutions up.

Digits upsampled to 16x16 go through five convolutions, each followed by an
activation: `stem` (fixed edge and blur filters), `features`, `mix`, `refine`
and `head`, whose logits a Sigmoid turns into a per-pixel mask `mask`
[batch, 1, 16, 16]. The weights are drawn from a seeded generator; the head is
scaled so that the logits spread over a few units around the mask's edge.

What makes it hard to quantize is `features`: half of its output channels are
context channels two hundred times larger than the fine channels beside them
(as BatchNorm folding leaves some channels of real detectors), and `mix`, the
next convolution, needs both. Activations are quantized per tensor, so with
MinMax ranges the fine channels fall within one or two steps of 8 bits, and
the mask loses them; clipping the range (Percentile, Entropy) cuts the context
channels instead. Per-channel weights do not help: the damage is in the
activation between `features` and `mix`, which is quantized whenever either of
the two is.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from tests.fixtures import datasets

SIZE = 16  # image height and width, the tests' model
CHANNELS = 32  # channels of every convolution after the stem
CONTEXT_SCALE = 200.0
# The two convolutions on either side of the activation that MinMax int8 ruins.
SENSITIVE = ("features", "mix")

Weights = npt.NDArray[np.float32]


class MaskHeadCase(NamedTuple):
    model: Path
    calibration: Path
    validation: Path


def _stem() -> Weights:
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32) / 4
    laplacian = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32) / 4
    identity = np.zeros((3, 3), dtype=np.float32)
    identity[1, 1] = 1
    blur = np.full((3, 3), 1 / 9, dtype=np.float32)
    filters = [identity, blur, sobel, -sobel, sobel.T, -sobel.T, laplacian, -laplacian]
    return np.stack(filters)[:, np.newaxis]


def _graph_weights(rng: np.random.Generator, channels: int) -> dict[str, Weights]:
    half = channels // 2
    stem = _stem()
    features = rng.normal(0, 0.3, (channels, len(stem), 3, 3))
    # Context channels: large, positive responses to the stroke and its blur.
    features[:half] = 0
    features[:half, :2] = CONTEXT_SCALE * np.abs(rng.normal(0, 0.1, (half, 2, 3, 3)))
    mix = rng.normal(0, 0.5, (channels, channels, 1, 1))
    mix[:, :half] /= CONTEXT_SCALE  # the context channels count, at their own scale
    weights = {
        "stem.w": stem,
        "features.w": features,
        "mix.w": mix,
        "refine.w": rng.normal(0, 0.3 * np.sqrt(CHANNELS / channels), (channels, channels, 3, 3)),
        "head.w": rng.normal(0, 0.5, (1, channels, 1, 1)),
    }
    for name in ("features", "mix", "refine"):
        weights[f"{name}.b"] = rng.normal(0, 0.1, channels)
    return {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}


def _build(
    weights: dict[str, Weights],
    size: int,
    head_scale: float,
    head_bias: float,
    output: str = "mask",
) -> object:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    tensor = "image"
    for name, kernel in (("stem", 3), ("features", 3), ("mix", 1), ("refine", 3)):
        inputs = [tensor, f"{name}.w"] + ([f"{name}.b"] if f"{name}.b" in weights else [])
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", inputs, [f"{name}.conv"], name=name, pads=[pad] * 4))
        nodes.append(
            helper.make_node("Relu", [f"{name}.conv"], [f"{name}.out"], name=f"{name}.relu")
        )
        tensor = f"{name}.out"
    initializers = {**weights, "head.w": weights["head.w"] * head_scale}
    initializers["head.b"] = np.array([head_bias], dtype=np.float32)
    nodes.append(helper.make_node("Conv", [tensor, "head.w", "head.b"], ["logits"], name="head"))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["mask"], name="head.sigmoid"))
    graph = helper.make_graph(
        nodes,
        "mask-head",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 1, size, size])],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write_model(path: Path, size: int = SIZE, channels: int = CHANNELS) -> Path:
    """Draw the weights, scale the head on the training images, save the model."""
    import onnx
    import onnxruntime as ort

    images, _ = datasets.digits_images(size)
    train = images[datasets.split(len(images)).train]
    weights = _graph_weights(np.random.default_rng(0), channels)
    unscaled = _build(weights, size, 1.0, 0.0, output="logits")
    session = ort.InferenceSession(unscaled.SerializeToString())  # type: ignore[attr-defined]
    logits = session.run(["logits"], {"image": train})[0]
    # Logits of spread 3 around a centre one spread above the median: a sparse mask
    # whose edges carry the detail.
    scale = 3.0 / float(logits.std())
    bias = -scale * (float(np.median(logits)) + float(logits.std()))
    onnx.save(_build(weights, size, scale, bias), str(path))  # type: ignore[arg-type]
    return path


def write_case(directory: Path, size: int = SIZE, channels: int = CHANNELS) -> MaskHeadCase:
    """The model and its calibration and validation .npz (no labels: judged by fidelity)."""
    directory.mkdir(parents=True, exist_ok=True)
    images, _ = datasets.digits_images(size)
    split = datasets.split(len(images))
    case = MaskHeadCase(
        model=write_model(directory / "mask_head.onnx", size, channels),
        calibration=directory / "calibration.npz",
        validation=directory / "validation.npz",
    )
    np.savez(case.calibration, image=images[split.calibration])
    np.savez(case.validation, image=images[split.validation])
    return case
