"""Recovery that needs both: the tensors' own calibrations and layers kept float.

The fixture is a spot detector with a mask head's difficulty, built here:
frames of four channels, 16x16, of background texture in [0, 0.5]; a
full-brightness cross on channel 0 is a spot, rare in the calibration frames
(2 of 200) and in a third of the validation frames. One calibration frame has
a dead pixel reading -40. Five convolutions, each but the last followed by a
Relu: `detect` (3x3: one channel that fires on a spot only, 15 texture
channels), `features` (3x3: half of its channels are context channels twenty
times larger than the fine channels beside them; the spot channel weighs five
times the texture channels), `mix` (1x1, needs both kinds of channel),
`refine` (3x3) and `score` (1x1), a per-pixel score.

Every calibration method fails somewhere: MinMax spends the input's 8 bits on
the dead pixel, and those of `features`' output on its context channels, so
the fine channels are lost; Percentile cuts the spot responses of `detect` and
the context channels.
Taking the input's range from Percentile fixes the input, but no range helps
the tensor between `features` and `mix`: those two layers must stay float, and
with them float, the input still needs its own range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.converter.candidates import Candidate
from edgefleet.converter.data import load_dataset
from edgefleet.converter.evaluate import cosine_similarity
from edgefleet.converter.modelinfo import load_onnx
from edgefleet.converter.quantize import quantize
from tests.converter.conftest import size_report
from tests.converter.spot_frames import CROSS, calibration_and_validation

SIZE = 16
CHANNELS = 4
DETECTORS = 16  # the spot channel and 15 texture channels
WIDTH = 32  # channels of `features`, `mix` and `refine`
SPOT_RESPONSE = 3.0
SPOT_WEIGHT = 5.0  # how much more `features` weighs the spot channel than a texture channel
CONTEXT_SCALE = 20.0
DEAD_PIXEL = -40.0
MIN_COSINE = 0.99  # the default budget, without labels
# The two convolutions on either side of the activation no calibration quantizes well.
SENSITIVE = ("features", "mix")

Weights = dict[str, npt.NDArray[np.float64]]


class CombinedCase(NamedTuple):
    model: Path
    calibration: Path
    validation: Path


def _weights(rng: np.random.Generator) -> Weights:
    detect = np.zeros((DETECTORS, CHANNELS, 3, 3))
    detect_bias = np.zeros(DETECTORS)
    # Five pixels at 1.0 sum to 5, a background cross to 2.5 at most: 3 on a spot, else 0.
    detect[0, 0] = CROSS * SPOT_RESPONSE
    detect_bias[0] = -4.0 * SPOT_RESPONSE
    shape = (DETECTORS - 1, CHANNELS - 1, 3, 3)
    taps = rng.uniform(0, 1, shape) * (rng.uniform(size=shape) < 0.15)
    detect[1:, 1:] = taps
    detect_bias[1:] = -0.25 * taps.sum(axis=(1, 2, 3))
    half = WIDTH // 2
    features = rng.normal(0, 0.3, (WIDTH, DETECTORS, 3, 3))
    features[:, 0] *= SPOT_WEIGHT
    features[:half] = CONTEXT_SCALE * np.abs(features[:half])  # context: large and positive
    mix = rng.normal(0, 0.5, (WIDTH, WIDTH, 1, 1))
    mix[:, :half] /= CONTEXT_SCALE  # the context channels count, at their own scale
    return {
        "detect.w": detect,
        "detect.b": detect_bias,
        "features.w": features,
        "features.b": rng.normal(0, 0.1, WIDTH),
        "mix.w": mix,
        "mix.b": rng.normal(0, 0.1, WIDTH),
        "refine.w": rng.normal(0, 0.3, (WIDTH, WIDTH, 3, 3)),
        "refine.b": rng.normal(0, 0.1, WIDTH),
        "score.w": rng.normal(0, 0.5, (1, WIDTH, 1, 1)),
    }


def _build(weights: Weights, score_bias: float) -> onnx.ModelProto:
    nodes = []
    tensor = "frame"
    for name, kernel in (("detect", 3), ("features", 3), ("mix", 1), ("refine", 3)):
        pads = [kernel // 2] * 4
        inputs = [tensor, f"{name}.w", f"{name}.b"]
        nodes.append(helper.make_node("Conv", inputs, [f"{name}.conv"], name=name, pads=pads))
        nodes.append(
            helper.make_node("Relu", [f"{name}.conv"], [f"{name}.out"], name=f"{name}.relu")
        )
        tensor = f"{name}.out"
    nodes.append(helper.make_node("Conv", [tensor, "score.w", "score.b"], ["score"], name="score"))
    initializers = {**weights, "score.b": np.array([score_bias])}
    frame = helper.make_tensor_value_info(
        "frame", TensorProto.FLOAT, ("batch", CHANNELS, SIZE, SIZE)
    )
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ("batch", 1, SIZE, SIZE))
    graph = helper.make_graph(
        nodes,
        "spot-mask-head",
        [frame],
        [score],
        [
            numpy_helper.from_array(value.astype(np.float32), name)
            for name, value in initializers.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_case(directory: Path) -> CombinedCase:
    rng = np.random.default_rng(0)
    calibration, validation = calibration_and_validation(rng, CHANNELS, SIZE, DEAD_PIXEL)
    weights = _weights(rng)
    unbiased = ort.InferenceSession(_build(weights, 0.0).SerializeToString())
    scores = unbiased.run(["score"], {"frame": validation})[0]
    model = _build(weights, -float(np.mean(scores)))  # scores centred on zero
    onnx.checker.check_model(model, full_check=True)
    case = CombinedCase(
        directory / "spot_mask_head.onnx",
        directory / "calibration.npz",
        directory / "validation.npz",
    )
    onnx.save(model, str(case.model))
    np.savez(case.calibration, frame=calibration)
    np.savez(case.validation, frame=validation)
    return case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> CombinedCase:
    return write_case(tmp_path_factory.mktemp("spot-mask-head"))


@pytest.fixture(scope="module")
def report(case: CombinedCase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("spot-mask-head-out") / "out"
    return size_report(case.model, case.calibration, case.validation, out)


def _cosine(row: dict[str, Any]) -> float:
    return float(row["per_output"]["score"]["cosine"])


def _measured_cosine(case: CombinedCase, settings: dict[str, Any], workdir: Path) -> float:
    """The validation cosine of a candidate with `settings`, quantized and scored as converted."""
    candidate = Candidate(
        "static",
        settings["format"],
        settings["types"],
        settings["per_channel"],
        settings["reduce_range"],
        settings["calibration"],
        tuple(settings["nodes_excluded"]),
        tuple(settings["tensor_calibration"].items()),
    )
    _, info = load_onnx(case.model)
    quantized = workdir / f"{candidate.name}.onnx"
    quantize(candidate, case.model, quantized, load_dataset(case.calibration, info.inputs), workdir)
    with np.load(case.validation) as data:
        frames = dict(data)
    reference = ort.InferenceSession(str(case.model)).run(["score"], frames)[0]
    outputs = ort.InferenceSession(str(quantized)).run(["score"], frames)[0]
    return cosine_similarity(reference, outputs)


def test_no_single_calibration_method_meets_the_budget(report: dict[str, Any]) -> None:
    single = [
        row
        for row in report["candidates"]
        if row["settings"]["method"] == "static"
        and not row["settings"]["tensor_calibration"]
        and not row["settings"]["nodes_excluded"]
    ]
    assert {row["settings"]["calibration"] for row in single} >= {"MinMax", "Percentile"}
    assert all(row["error"] is None and _cosine(row) < MIN_COSINE for row in single)


def test_the_tensors_own_calibrations_alone_miss_the_budget(report: dict[str, Any]) -> None:
    tuned = [
        row
        for row in report["candidates"]
        if row["settings"]["tensor_calibration"] and not row["settings"]["nodes_excluded"]
    ]
    assert len(tuned) == 1
    # The dead pixel is cut from the input's range, as Percentile does.
    assert tuned[0]["settings"]["tensor_calibration"]["frame"] == "Percentile"
    assert _cosine(tuned[0]) < MIN_COSINE
    assert tuned[0]["budget_failures"]


def test_recovery_keeps_the_tuned_tensors_with_the_two_sensitive_layers_float(
    report: dict[str, Any],
) -> None:
    retries = [row for row in report["candidates"] if row["settings"]["nodes_excluded"]]
    assert retries, "no layer was kept float"
    recovered = retries[-1]
    assert report["chosen"] == recovered["name"]
    assert recovered["settings"]["tensor_calibration"]["frame"] == "Percentile"
    excluded = set(recovered["settings"]["nodes_excluded"])
    assert excluded == {node for name in SENSITIVE for node in (name, f"{name}.relu")}
    assert _cosine(recovered) >= MIN_COSINE
    assert not recovered["budget_failures"]
    assert recovered["size_ratio"] < 1
    # Every retry kept the same tensors' calibrations; those before it missed the budget.
    assert all(
        row["settings"]["tensor_calibration"] == recovered["settings"]["tensor_calibration"]
        for row in retries
    )
    assert all(_cosine(row) < MIN_COSINE for row in retries[:-1])


def test_the_same_layers_float_without_the_tuned_tensors_miss_the_budget(
    case: CombinedCase, report: dict[str, Any], tmp_path: Path
) -> None:
    chosen = next(row for row in report["candidates"] if row["name"] == report["chosen"])
    settings = chosen["settings"]
    assert settings["tensor_calibration"] and settings["nodes_excluded"]
    # Measured here as the converter measures: the shipped candidate's figure comes back.
    assert _measured_cosine(case, settings, tmp_path) == pytest.approx(_cosine(chosen), abs=1e-6)
    untuned = _measured_cosine(case, {**settings, "tensor_calibration": {}}, tmp_path)
    assert untuned < MIN_COSINE <= _cosine(chosen), (untuned, _cosine(chosen))
