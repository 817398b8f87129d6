"""Recovery that chooses the calibration per tensor: no layer kept float when that suffices.

The fixture is a spot detector built here: frames of four channels, 32x32, of
background texture in [0, 0.5]; a full-brightness cross on channel 0 is a spot.
`detect` (a 3x3 convolution and a Relu) has one channel that fires on a spot
only (value 3) and 63 texture channels (values up to about 0.75); `score`
(1x1) weighs them into a per-pixel score. One calibration frame has a dead
pixel reading -500, and spots are rare in the calibration frames (2 of 200)
while a third of the validation frames have one.

No single calibration method quantizes it within the budget: MinMax spends the
input's 8 bits on the dead pixel, Percentile cuts the dead pixel but also the
rare spot responses in `detect`'s output. Taking the input's range from
Percentile and every other range from MinMax does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.converter.conftest import size_report
from tests.converter.spot_frames import CROSS, Frames, calibration_and_validation

SIZE = 32
CHANNELS = 4
DETECTORS = 64  # the spot channel and 63 texture channels
SPOT_RESPONSE = 3.0
DEAD_PIXEL = -500.0
MIN_COSINE = 0.99  # the default budget, without labels


class SpotCase(NamedTuple):
    model: Path
    calibration: Path
    validation: Path


def _model(rng: np.random.Generator, validation: Frames) -> onnx.ModelProto:
    detect = np.zeros((DETECTORS, CHANNELS, 3, 3), dtype=np.float32)
    detect_bias = np.zeros(DETECTORS, dtype=np.float32)
    # Five pixels at 1.0 sum to 5, a background cross to 2.5 at most: 3 on a spot, else 0.
    detect[0, 0] = CROSS * SPOT_RESPONSE
    detect_bias[0] = -4.0 * SPOT_RESPONSE
    # Texture: sparse non-negative taps on channels 1..3, thresholded at a quarter of
    # their sum (a negative input, like the dead pixel, never reaches the output).
    shape = (DETECTORS - 1, CHANNELS - 1, 3, 3)
    taps = rng.uniform(0, 1, shape) * (rng.uniform(size=shape) < 0.15)
    detect[1:, 1:] = taps
    detect_bias[1:] = -0.25 * taps.sum(axis=(1, 2, 3))
    score = np.zeros((1, DETECTORS, 1, 1), dtype=np.float32)
    score[0, 0] = 2.0
    score[0, 1:, 0, 0] = rng.normal(0, np.sqrt(7 / (DETECTORS - 1)), DETECTORS - 1)

    def build(bias: float) -> onnx.ModelProto:
        weights = {
            "detect.w": detect,
            "detect.b": detect_bias,
            "score.w": score,
            "score.b": np.array([bias], dtype=np.float32),
        }
        nodes = [
            helper.make_node(
                "Conv",
                ["frame", "detect.w", "detect.b"],
                ["detect.conv"],
                name="detect",
                pads=[1] * 4,
            ),
            helper.make_node("Relu", ["detect.conv"], ["detect.out"], name="detect.relu"),
            helper.make_node("Conv", ["detect.out", "score.w", "score.b"], ["score"], name="score"),
        ]
        graph = helper.make_graph(
            nodes,
            "spot-head",
            [
                helper.make_tensor_value_info(
                    "frame", TensorProto.FLOAT, ["batch", CHANNELS, SIZE, SIZE]
                )
            ],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
            [
                numpy_helper.from_array(value.astype(np.float32), name)
                for name, value in weights.items()
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    import onnxruntime as ort

    unbiased = ort.InferenceSession(build(0.0).SerializeToString())
    scores = unbiased.run(["score"], {"frame": validation})[0]
    model = build(-float(np.mean(scores)))  # scores centred on zero
    onnx.checker.check_model(model, full_check=True)
    return model


def write_case(directory: Path) -> SpotCase:
    rng = np.random.default_rng(0)
    calibration, validation = calibration_and_validation(rng, CHANNELS, SIZE, DEAD_PIXEL)
    case = SpotCase(
        directory / "spot_head.onnx", directory / "calibration.npz", directory / "validation.npz"
    )
    onnx.save(_model(rng, validation), str(case.model))
    np.savez(case.calibration, frame=calibration)
    np.savez(case.validation, frame=validation)
    return case


@pytest.fixture(scope="module")
def spot_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    case = write_case(tmp_path_factory.mktemp("spot-head"))
    out = tmp_path_factory.mktemp("spot-head-out") / "out"
    return size_report(case.model, case.calibration, case.validation, out)


def _cosine(row: dict[str, Any]) -> float:
    return float(row["per_output"]["score"]["cosine"])


def test_no_single_calibration_method_meets_the_budget(spot_report: dict[str, Any]) -> None:
    single = [
        row
        for row in spot_report["candidates"]
        if row["settings"]["method"] == "static" and not row["settings"]["tensor_calibration"]
    ]
    assert {row["settings"]["calibration"] for row in single} >= {"MinMax", "Percentile"}
    assert all(row["error"] is None and _cosine(row) < MIN_COSINE for row in single)


def test_recovery_recalibrates_the_input_and_ships_int8_without_float_layers(
    spot_report: dict[str, Any],
) -> None:
    tuned = [row for row in spot_report["candidates"] if row["settings"]["tensor_calibration"]]
    assert len(tuned) == 1
    recovered = tuned[0]
    # The dead pixel is cut from the input's range; the spot responses keep MinMax's.
    assert recovered["settings"]["calibration"] == "MinMax"
    assert recovered["settings"]["tensor_calibration"] == {"frame": "Percentile"}
    assert not recovered["settings"]["nodes_excluded"]
    best_single = max(
        _cosine(row)
        for row in spot_report["candidates"]
        if row["settings"]["method"] == "static" and row is not recovered
    )
    assert best_single < MIN_COSINE <= _cosine(recovered), (best_single, _cosine(recovered))
    assert not recovered["budget_failures"]
    assert any(note.startswith("calibration per tensor") for note in recovered["notes"])
    # Preferred to keeping layers float: no such retry was needed.
    assert not any(row["settings"]["nodes_excluded"] for row in spot_report["candidates"])
    assert spot_report["chosen"] == recovered["name"]
    assert recovered["size_ratio"] < 1
