"""Predictor: the in-process API serving the installed version (real sessions, real bundles)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.errors import ConfigError, InputSchemaError, NoModelError
from edgefleet.agent.inference import Predictor, open_runner
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agent.versions import Versions
from edgefleet.agentconfig import InferenceSettings
from edgefleet.bundle import build_bundle
from edgefleet.trust import TrustRoot
from tests.agent.conftest import Bundles, install_version
from tests.conftest import KeySet

PROFILE = "x86_64-vnni"
CNN_V1 = "digits-cnn@1.0.0-aaaaaaaaaaaa"
CNN_V2 = "digits-cnn@2.0.0-bbbbbbbbbbbb"


def smoke_inputs(bundle: Path) -> dict[str, np.ndarray]:
    with np.load(bundle / "smoke.npz") as data:
        return {k.removeprefix("input/"): data[k] for k in data.files if k.startswith("input/")}


@pytest.fixture
def layout(tmp_path: Path) -> StateLayout:
    layout = StateLayout(tmp_path / "state")
    layout.create()
    return layout


def test_predictions_are_the_served_models_outputs(bundles: Bundles, layout: StateLayout) -> None:
    install_version(layout, bundles.cnn, CNN_V1)
    predictor = Predictor.open(layout.root, InferenceSettings(), PROFILE)
    inputs = smoke_inputs(bundles.cnn)
    prediction = predictor.predict(inputs)
    direct = open_runner(bundles.cnn).run(inputs)
    np.testing.assert_array_equal(prediction.outputs["logits"], direct["logits"])
    assert prediction.step == "primary"
    assert prediction.model == "digits-cnn@1.0.0"
    assert prediction.latency_ms > 0


def test_two_outputs_of_two_dtypes(bundles: Bundles, layout: StateLayout) -> None:
    install_version(layout, bundles.mlp, "digits-mlp@0.3.1-cccccccccccc")
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    inputs = smoke_inputs(bundles.mlp)
    outputs = predictor.predict(inputs).outputs
    assert outputs["label"].dtype == np.int64
    np.testing.assert_array_equal(outputs["label"], outputs["probabilities"].argmax(1))


def test_tflite_bundle_is_served_without_a_float_step(
    bundles: Bundles, layout: StateLayout
) -> None:
    install_version(layout, bundles.tflite, "digits-lite@1.0.0-dddddddddddd")
    predictor = Predictor.open(layout, InferenceSettings(), "aarch64")
    inputs = smoke_inputs(bundles.tflite)
    with np.load(bundles.tflite / "smoke.npz") as data:
        expected = data["expected/probabilities"]
    prediction = predictor.predict(inputs)
    np.testing.assert_allclose(prediction.outputs["probabilities"], expected, atol=1e-5)
    assert prediction.step == "primary"
    info = predictor.model_info()
    assert info.current is not None and info.current.format == "tflite"
    assert [s.step for s in info.steps] == ["primary"]


def test_bundle_serving_its_float_model_has_no_float_step(
    bundles: Bundles, layout: StateLayout
) -> None:
    # The MLP's conversion ships the float model (pinned): one copy, no separate fallback.
    report = json.loads((bundles.mlp / "report.json").read_text())
    assert report["chosen"] == "float"
    assert not (bundles.mlp / "model.float.onnx").exists()
    install_version(layout, bundles.mlp, "digits-mlp@0.3.1-cccccccccccc")
    info = Predictor.open(layout, InferenceSettings(), PROFILE).model_info()
    assert [s.step for s in info.steps] == ["primary"]


def test_served_model_that_is_the_float_model_gets_no_float_step(
    bundles: Bundles, layout: StateLayout, tmp_path: Path
) -> None:
    # A bundle carrying the float model twice: a float step would repeat the primary.
    twice = tmp_path / "mlp-twice"
    shutil.copytree(bundles.mlp, twice)
    shutil.copyfile(twice / "model.onnx", twice / "model.float.onnx")
    install_version(layout, twice, "digits-mlp@0.3.1-cccccccccccc")
    info = Predictor.open(layout, InferenceSettings(), PROFILE).model_info()
    assert [s.step for s in info.steps] == ["primary"]
    assert info.current is not None
    assert "the served model is the float model" in " ".join(info.current.notes)


def test_predict_batch_answers_each_request(bundles: Bundles, layout: StateLayout) -> None:
    install_version(layout, bundles.cnn, CNN_V1)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    images = smoke_inputs(bundles.cnn)["image"]
    requests = [{"image": images[0:1]}, {"image": images[1:3]}, {"image": images[3:4]}]
    answers = predictor.predict_batch(requests)
    assert [a.outputs["logits"].shape for a in answers] == [(1, 10), (2, 10), (1, 10)]
    for request, answer in zip(requests, answers, strict=True):
        alone = predictor.predict(request).outputs["logits"]
        np.testing.assert_allclose(answer.outputs["logits"], alone, atol=1e-4)
    assert predictor.predict_batch([]) == []


def test_predict_batch_names_the_request_it_refuses(bundles: Bundles, layout: StateLayout) -> None:
    install_version(layout, bundles.cnn, CNN_V1)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    good = {"image": smoke_inputs(bundles.cnn)["image"][:1]}
    with pytest.raises(InputSchemaError, match=r"^request 1: missing input 'image'"):
        predictor.predict_batch([good, {"picture": good["image"]}])


def test_schema_violation_is_refused_and_counted(bundles: Bundles, layout: StateLayout) -> None:
    install_version(layout, bundles.cnn, CNN_V1)
    telemetry = TelemetryRecorder("cam-01", None, 60)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE, telemetry)
    mark = telemetry.mark()
    with pytest.raises(InputSchemaError, match="input 'image' has shape"):
        predictor.predict({"image": np.zeros((1, 32, 32), np.float32)})
    window = telemetry.close_window()
    assert window is not None
    assert (window.requests, window.schema_violations, window.errors) == (1, 1, 0)
    snapshot = telemetry.snapshot_since(mark)
    assert (snapshot.requests, snapshot.errors) == (1, 1)  # no answer: an error to the installer


def test_nothing_installed_and_no_default_answer(layout: StateLayout) -> None:
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    with pytest.raises(NoModelError, match="no model is installed"):
        predictor.predict({"image": np.zeros((1, 1, 32, 32), np.float32)})
    assert predictor.model_info().current is None


def test_nothing_installed_serves_the_default_answer(layout: StateLayout, tmp_path: Path) -> None:
    default = tmp_path / "default.npz"
    np.savez(default, logits=np.arange(10, dtype=np.float32))
    settings = InferenceSettings(default_answer=default)
    predictor = Predictor.open(layout, settings, PROFILE)
    prediction = predictor.predict({"image": np.zeros((2, 1, 32, 32), np.float32)})
    assert prediction.step == "default"
    assert prediction.model == "default"
    np.testing.assert_array_equal(prediction.outputs["logits"], np.tile(np.arange(10), (2, 1)))


def test_unreadable_default_answer_is_a_config_error(layout: StateLayout, tmp_path: Path) -> None:
    (tmp_path / "default.npz").write_bytes(b"not an npz")
    with pytest.raises(ConfigError, match="default answer"):
        Predictor.open(layout, InferenceSettings(default_answer=tmp_path / "default.npz"), PROFILE)


def test_reload_serves_the_new_current_and_keeps_the_old_one_loaded(
    bundles: Bundles, layout: StateLayout
) -> None:
    v1 = install_version(layout, bundles.cnn, CNN_V1)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    inputs = smoke_inputs(bundles.cnn)
    assert predictor.predict(inputs).model == "digits-cnn@1.0.0"
    install_version(layout, bundles.cnn, CNN_V2)
    layout.point(layout.previous, v1)
    assert predictor.predict(inputs).model == "digits-cnn@1.0.0"  # until reload
    info = predictor.reload()
    assert predictor.predict(inputs).model == "digits-cnn@2.0.0"
    assert info.current is not None and info.current.version == "2.0.0"
    assert info.previous is not None and info.previous.version == "1.0.0"
    previous = [s for s in info.steps if s.step == "previous"]
    assert previous and previous[0].loaded  # the old current, already open: no second load


def test_reload_while_serving_from_many_threads(bundles: Bundles, layout: StateLayout) -> None:
    v1 = install_version(layout, bundles.cnn, CNN_V1)
    v2 = install_version(layout, bundles.cnn, CNN_V2)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    inputs = {"image": smoke_inputs(bundles.cnn)["image"][:1]}
    seen: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        try:
            while not stop.is_set():
                prediction = predictor.predict(inputs)
                assert prediction.step == "primary"
                seen.add(prediction.model)
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for index in range(20):
        layout.point(layout.current, v2 if index % 2 == 0 else v1)
        predictor.reload()
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert seen <= {"digits-cnn@1.0.0", "digits-cnn@2.0.0"}


def test_model_info_is_plain_data(bundles: Bundles, layout: StateLayout) -> None:
    install_version(layout, bundles.cnn, CNN_V1)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    predictor.predict(smoke_inputs(bundles.cnn))
    data = json.loads(json.dumps(predictor.model_info().as_dict()))
    assert data["current"]["name"] == "digits-cnn"
    assert data["current"]["inputs"][0]["shape"] == ["batch", 1, 32, 32]
    assert data["steps"][0] == {
        "step": "primary",
        "model": "digits-cnn@1.0.0",
        "file": "served",
        "loaded": True,
        "breaker": "closed",
        "breaker_opened": 0,
        "answered": 1,
        "failures": {},
        "timeout_ms": 1000.0,
        "timeout_per_sample_ms": 0.0,  # never measured on this device: the floor alone
        "load_error": None,
    }


def test_signed_bundles_staged_and_activated_by_the_installer_are_served(
    bundles: Bundles, layout: StateLayout, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    """The real path: signed bundles, `Versions.stage` / `activate` / `rollback`, then reload."""
    versions = Versions(layout, keep=3)
    staged = []
    for version in ("1.0.0", "1.1.0"):
        bundle_file = tmp_path / f"cnn-{version}.efb"
        build_bundle(
            bundles.cnn,
            bundle_file,
            name="digits-cnn",
            version=version,
            keys=[keyset.release],
            profiles=[PROFILE],
        )
        staged.append(versions.stage(bundle_file, trust))
    versions.activate(staged[0])
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    image = {"image": smoke_inputs(bundles.cnn)["image"][:1]}
    assert predictor.predict(image).model == "digits-cnn@1.0.0"  # named by manifest.json
    versions.activate(staged[1])
    predictor.reload()
    assert predictor.predict(image).model == "digits-cnn@1.1.0"
    assert [s.model for s in predictor.model_info().steps] == [
        "digits-cnn@1.1.0",
        "digits-cnn@1.1.0",
        "digits-cnn@1.0.0",
    ]
    versions.rollback()
    predictor.reload()
    assert predictor.predict(image).model == "digits-cnn@1.0.0"
    assert [s.step for s in predictor.model_info().steps] == ["primary", "float"]
    versions.restore(None, None)
    predictor.reload()
    with pytest.raises(NoModelError):
        predictor.predict(image)
