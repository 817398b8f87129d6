"""The local HTTP API as an application on the device uses it: answers, and clear refusals."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.config import InferenceSettings
from edgefleet.agent.inference import Predictor
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.localapi import LocalApi
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.errors import TamperedFileError
from tests.agent.conftest import Bundles, install_version
from tests.fixtures import datasets

PROFILE = "x86_64-vnni"


class Client:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def request(
        self, method: str, path: str, body: bytes | None = None, kind: str = "application/json"
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", kind)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = self.request(method, path, body)
        return status, json.loads(data)


def _serve(predictor: Predictor, **overrides: Any) -> LocalApi:
    def refuse_install(path: Path) -> dict[str, Any]:
        raise TamperedFileError(f"{path.name} does not match its SHA-256")

    handlers: dict[str, Any] = {
        "install": refuse_install,
        "rollback": lambda: {"state": "committed"},
        "install_state": lambda: "idle",
    }
    handlers.update(overrides)
    api = LocalApi(predictor, "127.0.0.1", 0, **handlers)
    api.start()
    return api


@pytest.fixture
def served(tmp_path: Path, bundles: Bundles) -> Iterator[tuple[Client, Predictor]]:
    layout = StateLayout(tmp_path / "state")
    install_version(layout, bundles.mlp, "digits@1.0.0-aaaaaaaaaaaa")
    telemetry = TelemetryRecorder("cam-01", None, 60)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE, telemetry)
    api = _serve(predictor)
    yield Client(api.address[1]), predictor
    api.stop()
    predictor.close()


def test_predict_answers_with_the_served_model(served: tuple[Client, Predictor]) -> None:
    client, _ = served
    features, labels = datasets.digits_tabular()
    status, answer = client.json(
        "POST", "/v1/predict", {"inputs": {"features": features[:2].tolist()}}
    )
    assert status == 200
    assert answer["answered_by"] == "primary" and answer["model"] == "digits@1.0.0"
    assert np.argmax(answer["outputs"]["probabilities"], axis=1).tolist() == labels[:2].tolist()


def test_batch_predict_takes_and_returns_npz(served: tuple[Client, Predictor]) -> None:
    client, _ = served
    features, _ = datasets.digits_tabular()
    buffer = io.BytesIO()
    np.savez(buffer, features=features[:32])
    status, data = client.request(
        "POST", "/v1/predict/batch", buffer.getvalue(), "application/x-npz"
    )
    assert status == 200
    with np.load(io.BytesIO(data)) as outputs:
        assert outputs["probabilities"].shape == (32, 10)


def test_a_batch_above_max_batch_samples_is_413_with_the_reason(
    tmp_path: Path, bundles: Bundles
) -> None:
    layout = StateLayout(tmp_path / "state")
    install_version(layout, bundles.mlp, "digits@1.0.0-aaaaaaaaaaaa")
    predictor = Predictor.open(layout, InferenceSettings(max_batch_samples=16), PROFILE)
    api = _serve(predictor)
    try:
        client = Client(api.address[1])
        features, _ = datasets.digits_tabular()
        buffer = io.BytesIO()
        np.savez(buffer, features=features[:17])
        status, data = client.request(
            "POST", "/v1/predict/batch", buffer.getvalue(), "application/x-npz"
        )
        answer = json.loads(data)
        assert status == 413 and answer["code"] == "batch-too-large"
        assert "17 samples, more than the 16" in answer["error"]
        status, _ = client.json("POST", "/v1/predict", {"inputs": {"features": [[0.0] * 64] * 17}})
        assert status == 413
        assert predictor.model_info().steps[0].answered == 0
    finally:
        api.stop()
        predictor.close()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"inputs": {"pixels": [[0.0] * 64]}}, "input-schema"),
        ({"inputs": {"features": [[0.0] * 63]}}, "input-schema"),
        ({"inputs": {"features": [[float("nan")] * 64]}}, "input-schema"),
        ({"inputs": {"features": [["a"] * 64]}}, "input-schema"),
        ({"inputs": []}, "bad-request"),
        ({"features": [[0.0] * 64]}, "bad-request"),
    ],
    ids=["unknown-input", "wrong-shape", "nan", "strings", "inputs-not-object", "no-inputs-key"],
)
def test_bad_predict_requests_get_400_with_reason(
    served: tuple[Client, Predictor], payload: Any, code: str
) -> None:
    client, _ = served
    body = json.dumps(payload, allow_nan=True).encode()
    status, data = client.request("POST", "/v1/predict", body)
    answer = json.loads(data)
    assert status == 400, answer
    assert answer["code"] == code and answer["error"]


def test_malformed_bodies_get_400(served: tuple[Client, Predictor]) -> None:
    client, _ = served
    assert client.request("POST", "/v1/predict", b"{not json")[0] == 400
    assert client.request("POST", "/v1/predict", b"[1, 2]")[0] == 400
    assert client.request("POST", "/v1/predict/batch", b"not an npz", "application/x-npz")[0] == 400
    assert client.json("GET", "/v1/nothing")[0] == 404


def test_feedback_counts_labelled_accuracy(served: tuple[Client, Predictor]) -> None:
    client, predictor = served
    assert client.json("POST", "/v1/feedback", {"predicted": 3, "label": 3}) == (
        200,
        {"recorded": True},
    )
    assert client.json("POST", "/v1/feedback", {"predicted": 3, "label": 5})[0] == 200
    assert client.json("POST", "/v1/feedback", {"predicted": "x", "label": 5})[0] == 400
    assert predictor.telemetry is not None
    window = predictor.telemetry.close_window()
    assert window is not None and window.labelled is not None
    assert (window.labelled.count, window.labelled.correct) == (2, 1)


def test_model_and_health_describe_what_is_served(served: tuple[Client, Predictor]) -> None:
    client, _ = served
    status, health = client.json("GET", "/v1/health")
    assert status == 200 and health == {
        "status": "ok",
        "model": "digits@1.0.0",
        "install_state": "idle",
    }
    status, model = client.json("GET", "/v1/model")
    assert status == 200 and model["current"]["name"] == "digits"


def test_refused_install_is_422_with_the_reason(served: tuple[Client, Predictor]) -> None:
    client, _ = served
    status, answer = client.json("POST", "/v1/install", {"path": "/media/usb/model.efb"})
    assert status == 422 and answer["code"] == "tampered-file"


def test_nothing_installed_is_503(tmp_path: Path) -> None:
    predictor = Predictor.open(StateLayout(tmp_path / "empty"), InferenceSettings(), PROFILE)
    api = _serve(predictor)
    try:
        client = Client(api.address[1])
        status, answer = client.json("POST", "/v1/predict", {"inputs": {"features": [[0.0] * 64]}})
        assert status == 503 and answer["code"] == "no-model"
        assert client.json("GET", "/v1/health")[1]["status"] == "no-model"
    finally:
        api.stop()
        predictor.close()
