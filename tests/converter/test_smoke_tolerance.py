"""The smoke test's tolerance for a quantized model: one output step beyond the quantization error.

Another CPU's int8 kernels may round a value the other way (32-bit ARM's
tflite-runtime puts the CNN's logits one int8 step from x86's on one sample):
the device must still pass, and a wrong answer must still fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgefleet.agent.errors import SmokeTestError
from edgefleet.agent.install.smoke import run_smoke_test
from edgefleet.bundlefiles import (
    SMOKE_EXPECTED_PREFIX,
    SMOKE_FILE,
    SMOKE_INPUT_PREFIX,
    SMOKE_SPEC_FILE,
    SmokeSpec,
)
from edgefleet.converter import ConvertOptions, convert
from edgefleet.converter.reference import output_steps
from tests.converter.conftest import Case

INT8 = "static-qdq-s8s8-per-channel-minmax"
OUTPUT = "logits"


@pytest.fixture(scope="module")
def int8_cnn(cnn: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tolerance") / "out"
    options = ConvertOptions(
        target="aarch64",
        calibration=cnn.calibration,
        validation=cnn.validation,
        labels=cnn.labels,
        candidate=INT8,
    )
    convert(cnn.model, out, options)
    return out


def _logits_scale(model: Path) -> float:
    """The scale of the DequantizeLinear that gives the output, read from the graph."""
    graph = onnx.load(str(model)).graph
    [node] = [n for n in graph.node if OUTPUT in n.output]
    assert node.op_type == "DequantizeLinear"
    [scale] = [numpy_helper.to_array(i) for i in graph.initializer if i.name == node.input[1]]
    return float(scale)


def _smoke_arrays(directory: Path) -> dict[str, np.ndarray]:
    with np.load(directory / SMOKE_FILE) as archive:
        return {name: archive[name] for name in archive.files}


def _with_expected(source: Path, target: Path, expected: np.ndarray) -> Path:
    shutil.copytree(source, target)
    arrays = _smoke_arrays(source)
    arrays[SMOKE_EXPECTED_PREFIX + OUTPUT] = expected
    np.savez(target / SMOKE_FILE, **arrays)  # type: ignore[arg-type]
    return target


def test_tolerance_is_the_quantization_error_plus_one_output_step(int8_cnn: Path) -> None:
    step = _logits_scale(int8_cnn / "model.onnx")
    assert output_steps(int8_cnn / "model.onnx") == {OUTPUT: pytest.approx(step)}
    assert output_steps(int8_cnn / "model.float.onnx") == {}  # float: no step
    arrays = _smoke_arrays(int8_cnn)
    spec = SmokeSpec.model_validate_json((int8_cnn / SMOKE_SPEC_FILE).read_bytes())
    float_session = ort.InferenceSession(str(int8_cnn / "model.float.onnx"))
    inputs = arrays[SMOKE_INPUT_PREFIX + "image"][: spec.samples]
    [float_logits] = float_session.run([OUTPUT], {"image": inputs})
    expected = arrays[SMOKE_EXPECTED_PREFIX + OUTPUT]
    error = float(np.abs(float_logits.astype(np.float64) - expected).max())
    assert error < step  # so the error alone would refuse a one-step rounding
    assert spec.atol[OUTPUT] == pytest.approx(error + step)


def test_device_rounding_an_output_one_step_away_passes(int8_cnn: Path, tmp_path: Path) -> None:
    step = _logits_scale(int8_cnn / "model.onnx")
    expected = _smoke_arrays(int8_cnn)[SMOKE_EXPECTED_PREFIX + OUTPUT].copy()
    winner = int(np.argmax(expected[7]))
    expected[7, winner] += step  # as the armhf device's kernels rounded sample 7
    rounded = _with_expected(int8_cnn, tmp_path / "rounded", expected)
    assert "8 smoke samples match their expected outputs" in run_smoke_test(rounded).summary


def test_another_samples_answer_still_fails(int8_cnn: Path, tmp_path: Path) -> None:
    expected = _smoke_arrays(int8_cnn)[SMOKE_EXPECTED_PREFIX + OUTPUT]
    shifted = _with_expected(int8_cnn, tmp_path / "shifted", np.roll(expected, 1, axis=0))
    with pytest.raises(SmokeTestError, match=rf"^sample 0: output '{OUTPUT}' differs by "):
        run_smoke_test(shifted)
