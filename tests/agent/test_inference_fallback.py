"""The fallback chain: primary -> float -> previous -> default answer, each step counted.

Failing models are real ONNX models dropped into a copy of the converted CNN
bundle (tests/agent/conftest.py `write_onnx_model`): one that divides by the
sum of its input (NaN for an all-zero image), one whose Reshape fails at run
time, one that takes seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.errors import InferenceError
from edgefleet.agent.inference import Predictor
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agentconfig import InferenceSettings
from tests.agent.conftest import Bundles, install_version, make_broken_cnn

PROFILE = "x86_64-vnni"
ZERO = {"image": np.zeros((1, 1, 32, 32), np.float32)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def an_image(bundles: Bundles) -> dict[str, np.ndarray]:
    with np.load(bundles.cnn / "smoke.npz") as data:
        return {"image": data["input/image"][:1]}


@pytest.fixture
def layout(tmp_path: Path) -> StateLayout:
    return StateLayout(tmp_path / "state")


def failures(predictor: Predictor, step: str) -> dict[str, int]:
    return next(s.failures for s in predictor.model_info().steps if s.step == step)


def answered(predictor: Predictor) -> dict[str, int]:
    info = predictor.model_info()
    return {**{s.step: s.answered for s in info.steps}, "default": info.default_answers}


def test_nan_from_primary_falls_back_to_float_and_is_counted(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    broken = make_broken_cnn(tmp_path, bundles, "nan_on_zero", None)
    install_version(layout, broken, "digits-cnn@2.0.0-bbbbbbbbbbbb")
    telemetry = TelemetryRecorder("cam-01", None, 60)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE, telemetry)
    prediction = predictor.predict(ZERO)
    assert prediction.step == "float"
    assert prediction.model == "digits-cnn@2.0.0"
    assert np.isfinite(prediction.outputs["logits"]).all()
    assert predictor.predict(an_image(bundles)).step == "primary"
    assert failures(predictor, "primary") == {"nan": 1}
    assert answered(predictor) == {"primary": 1, "float": 1, "default": 0}
    window = telemetry.close_window()
    assert window is not None
    assert (window.requests, window.fallbacks, window.errors) == (2, 1, 0)


def test_primary_that_raises_falls_back_to_float(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    install_version(layout, make_broken_cnn(tmp_path, bundles, "raise", None), "cnn@2.0.0-b")
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    image = an_image(bundles)
    assert predictor.predict(image).step == "float"
    assert failures(predictor, "primary") == {"error": 1}


def test_primary_that_does_not_load_falls_back_to_float(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    broken = tmp_path / "cnn-corrupt"
    broken.mkdir()
    for source in bundles.cnn.iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "model.onnx").write_bytes(b"\x08\x07 not a model" * 50)
    install_version(layout, broken, "digits-cnn@2.0.0-bbbbbbbbbbbb")
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)  # does not raise
    assert predictor.predict(an_image(bundles)).step == "float"
    assert failures(predictor, "primary") == {"error": 1}


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_reset(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    broken = make_broken_cnn(tmp_path, bundles, "nan_on_zero", None)
    install_version(layout, broken, "digits-cnn@2.0.0-bbbbbbbbbbbb")
    clock = FakeClock()
    settings = InferenceSettings(breaker_failures=2, breaker_reset_seconds=30)
    predictor = Predictor.open(layout, settings, PROFILE, clock=clock)
    image = an_image(bundles)

    def primary() -> tuple[str, int, int]:
        step = predictor.model_info().steps[0]
        return step.breaker, step.failures.get("nan", 0), step.breaker_opened

    assert predictor.predict(ZERO).step == "float"
    assert primary() == ("closed", 1, 0)
    assert predictor.predict(ZERO).step == "float"
    assert primary() == ("open", 2, 1)
    # Open: the primary is not tried, not even for an input it would answer.
    assert predictor.predict(image).step == "float"
    assert predictor.predict(ZERO).step == "float"
    assert primary() == ("open", 2, 1)
    clock.now += 29.9
    assert predictor.predict(image).step == "float"
    # After the reset time, one trial call; it succeeds and closes the breaker.
    clock.now += 0.2
    assert predictor.predict(image).step == "primary"
    assert primary() == ("closed", 2, 1)
    # Open again; a failing trial opens it for another reset period.
    predictor.predict(ZERO)
    predictor.predict(ZERO)
    assert primary() == ("open", 4, 2)
    clock.now += 31
    assert predictor.predict(ZERO).step == "float"  # the trial, failing
    assert primary() == ("open", 5, 3)
    assert predictor.predict(image).step == "float"  # skipped again
    clock.now += 31
    assert predictor.predict(image).step == "primary"


def test_timeout_falls_back_and_is_counted_as_a_timeout(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    slow = make_broken_cnn(tmp_path, bundles, "slow", None)
    install_version(layout, slow, "digits-cnn@2.0.0-bbbbbbbbbbbb")
    predictor = Predictor.open(layout, InferenceSettings(timeout_ms=100), PROFILE)
    started = time.monotonic()
    prediction = predictor.predict(an_image(bundles))
    elapsed = time.monotonic() - started
    assert prediction.step == "float"
    assert failures(predictor, "primary") == {"timeout": 1}
    assert elapsed < 0.8  # the slow model takes seconds; it was stopped, not waited for


def test_previous_version_answers_when_both_current_models_fail(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    install_version(layout, bundles.cnn, "digits-cnn@1.0.0-aaaaaaaaaaaa", link="previous")
    broken = make_broken_cnn(tmp_path, bundles, "raise", "nan_on_zero")
    install_version(layout, broken, "digits-cnn@2.0.0-bbbbbbbbbbbb")
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    prediction = predictor.predict(ZERO)
    assert (prediction.step, prediction.model) == ("previous", "digits-cnn@1.0.0")
    assert failures(predictor, "primary") == {"error": 1}
    assert failures(predictor, "float") == {"nan": 1}
    assert answered(predictor) == {"primary": 0, "float": 0, "previous": 1, "default": 0}


def test_default_answer_is_the_last_step(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    install_version(layout, make_broken_cnn(tmp_path, bundles, "raise", "raise"), "cnn@2.0.0-b")
    default = tmp_path / "default.npz"
    np.savez(default, logits=np.full((1, 10), 0.5, np.float32))
    telemetry = TelemetryRecorder("cam-01", None, 60)
    settings = InferenceSettings(default_answer=default)
    predictor = Predictor.open(layout, settings, PROFILE, telemetry)
    prediction = predictor.predict({"image": np.zeros((3, 1, 32, 32), np.float32)})
    assert (prediction.step, prediction.model) == ("default", "default")
    np.testing.assert_array_equal(prediction.outputs["logits"], np.full((3, 10), 0.5))
    assert answered(predictor)["default"] == 1
    window = telemetry.close_window()
    assert window is not None
    assert (window.requests, window.fallbacks, window.errors) == (1, 1, 0)


def test_every_step_failing_without_a_default_is_an_inference_error(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    install_version(layout, make_broken_cnn(tmp_path, bundles, "raise", "nan_on_zero"), "c@2.0.0-b")
    telemetry = TelemetryRecorder("cam-01", None, 60)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE, telemetry)
    mark = telemetry.mark()
    with pytest.raises(InferenceError, match="every step of the fallback chain failed") as caught:
        predictor.predict(ZERO)
    assert "primary: error" in str(caught.value)
    assert "float: nan" in str(caught.value)
    snapshot = telemetry.snapshot_since(mark)
    assert (snapshot.requests, snapshot.errors, snapshot.fallbacks) == (1, 1, 0)


def test_previous_version_with_another_schema_checks_inputs_itself(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    install_version(layout, bundles.mlp, "digits-mlp@1.0.0-aaaaaaaaaaaa", link="previous")
    install_version(layout, make_broken_cnn(tmp_path, bundles, "raise", "raise"), "c@2.0.0-b")
    default = tmp_path / "default.npz"
    np.savez(default, logits=np.zeros(10, np.float32))
    predictor = Predictor.open(layout, InferenceSettings(default_answer=default), PROFILE)
    assert predictor.predict(ZERO).step == "default"
    assert failures(predictor, "previous") == {"schema": 1}


def test_version_without_a_schema_is_left_out_of_the_chain(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    install_version(layout, bundles.cnn, "digits-cnn@1.0.0-aaaaaaaaaaaa", link="previous")
    current = install_version(layout, bundles.cnn, "digits-cnn@2.0.0-bbbbbbbbbbbb")
    (current / "schema.json").unlink()
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    prediction = predictor.predict(an_image(bundles))
    assert (prediction.step, prediction.model) == ("previous", "digits-cnn@1.0.0")
