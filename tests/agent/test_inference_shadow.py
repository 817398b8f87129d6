"""Shadow mode: the challenger runs beside the champion; its answer is never returned."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.errors import InferenceError
from edgefleet.agent.inference import Predictor, outputs_agree
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agentconfig import InferenceSettings
from tests.agent.conftest import Bundles, install_version, make_broken_cnn

PROFILE = "x86_64-vnni"


def images(bundles: Bundles) -> np.ndarray:
    with np.load(bundles.cnn / "smoke.npz") as data:
        return np.asarray(data["input/image"])


@pytest.fixture
def champion(bundles: Bundles, tmp_path: Path) -> tuple[Predictor, TelemetryRecorder]:
    layout = StateLayout(tmp_path / "state")
    install_version(layout, bundles.cnn, "digits-cnn@1.0.0-aaaaaaaaaaaa")
    telemetry = TelemetryRecorder("cam-01", None, 60)
    settings = InferenceSettings(shadow_sample_rate=1.0)
    return Predictor.open(layout, settings, PROFILE, telemetry, shadow_seed=1), telemetry


def test_identical_challenger_agrees_on_every_sampled_request(
    bundles: Bundles, champion: tuple[Predictor, TelemetryRecorder]
) -> None:
    predictor, telemetry = champion
    predictor.set_challenger(bundles.cnn)
    for index in range(8):
        predictor.predict({"image": images(bundles)[index : index + 1]})
        assert predictor.wait_shadow(10)  # one at a time: none skipped
    info = predictor.model_info()
    assert info.challenger == "cnn@0.0.0"  # a converter's directory: no manifest, no version
    assert info.shadow == {"sampled": 8, "agreements": 8, "failures": 0, "skipped": 0}
    window = telemetry.close_window()
    assert window is not None and window.shadow is not None
    assert (window.shadow.requests, window.shadow.agreements) == (8, 8)


def test_challenger_answer_is_never_returned(
    bundles: Bundles, champion: tuple[Predictor, TelemetryRecorder], tmp_path: Path
) -> None:
    predictor, _ = champion
    constant = make_broken_cnn(tmp_path, bundles, "constant", None)  # always class 3
    baseline = [predictor.predict({"image": x[None]}).outputs["logits"] for x in images(bundles)]
    predictor.set_challenger(constant)
    for x, expected in zip(images(bundles), baseline, strict=True):
        prediction = predictor.predict({"image": x[None]})
        assert prediction.step == "primary"
        assert prediction.model == "digits-cnn@1.0.0"
        np.testing.assert_array_equal(prediction.outputs["logits"], expected)
        assert predictor.wait_shadow(10)  # one at a time: none skipped
    agreements = sum(int(b.argmax() == 3) for b in baseline)
    assert predictor.model_info().shadow == {
        "sampled": len(baseline),
        "agreements": agreements,
        "failures": 0,
        "skipped": 0,
    }


@pytest.mark.parametrize("kind", ["raise", "nan_on_zero"])
def test_failing_challenger_never_affects_the_response(
    bundles: Bundles, champion: tuple[Predictor, TelemetryRecorder], tmp_path: Path, kind: str
) -> None:
    predictor, telemetry = champion
    predictor.set_challenger(make_broken_cnn(tmp_path, bundles, kind, None))
    zero = {"image": np.zeros((1, 1, 32, 32), np.float32)}
    for _ in range(3):
        prediction = predictor.predict(zero)
        assert prediction.step == "primary"
        assert np.isfinite(prediction.outputs["logits"]).all()
        assert predictor.wait_shadow(10)
    assert predictor.model_info().shadow == {
        "sampled": 3,
        "agreements": 0,
        "failures": 3,
        "skipped": 0,
    }
    window = telemetry.close_window()
    assert window is not None and window.shadow is not None
    assert (window.requests, window.errors, window.fallbacks) == (3, 0, 0)
    assert (window.shadow.requests, window.shadow.agreements) == (3, 0)


def test_sampling_follows_the_seeded_generator(bundles: Bundles, tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    install_version(layout, bundles.cnn, "digits-cnn@1.0.0-aaaaaaaaaaaa")
    settings = InferenceSettings(shadow_sample_rate=0.3)
    predictor = Predictor.open(layout, settings, PROFILE, shadow_seed=7)
    predictor.set_challenger(bundles.cnn)
    x = {"image": images(bundles)[:1]}
    for _ in range(40):
        predictor.predict(x)
        assert predictor.wait_shadow(10)
    draws = random.Random(7)
    expected = sum(draws.random() < 0.3 for _ in range(40))
    assert predictor.model_info().shadow["sampled"] == expected
    assert 0 < expected < 40


def test_busy_challenger_skips_samples_instead_of_queueing(
    bundles: Bundles, champion: tuple[Predictor, TelemetryRecorder], tmp_path: Path
) -> None:
    predictor, _ = champion
    predictor.set_challenger(make_broken_cnn(tmp_path, bundles, "slow", None))
    started = time.monotonic()
    for _ in range(6):
        assert predictor.predict({"image": images(bundles)[:1]}).step == "primary"
    assert time.monotonic() - started < 1.0  # the slow challenger never held a request up
    assert predictor.wait_shadow(60)
    shadow = predictor.model_info().shadow
    assert shadow["sampled"] + shadow["skipped"] == 6
    assert shadow["skipped"] >= 3  # at most one running and two queued


def test_stopping_the_challenger(
    bundles: Bundles, champion: tuple[Predictor, TelemetryRecorder]
) -> None:
    predictor, _ = champion
    predictor.set_challenger(bundles.cnn)
    predictor.set_challenger(None)
    predictor.predict({"image": images(bundles)[:1]})
    info = predictor.model_info()
    assert info.challenger is None and info.shadow == {}
    predictor.close()


def test_challenger_that_does_not_load_is_refused(
    champion: tuple[Predictor, TelemetryRecorder], tmp_path: Path
) -> None:
    predictor, _ = champion
    with pytest.raises(InferenceError):
        predictor.set_challenger(tmp_path)


def test_agreement_rules() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    assert outputs_agree({"p": scores}, {"p": scores + 0.05})  # same top-1
    assert not outputs_agree({"p": scores}, {"p": scores[::-1]})
    labels = np.array([1, 0])
    assert outputs_agree({"label": labels}, {"label": labels.copy()})
    assert not outputs_agree({"label": labels}, {"label": labels[::-1]})
    value = np.array([[1.0], [2.0]])
    assert outputs_agree({"y": value}, {"y": value * 1.001})
    assert not outputs_agree({"y": value}, {"y": value * 1.1})
    assert not outputs_agree({"y": value}, {"z": value})
    assert not outputs_agree({"y": value}, {"y": value[:1]})
