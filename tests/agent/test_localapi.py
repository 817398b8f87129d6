"""The local HTTP API as an application on the device uses it: answers, and clear refusals."""

from __future__ import annotations

import http.client
import io
import json
import logging
import shutil
import socket
import stat
import struct
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format
import pytest

from edgefleet.agent.inference import Predictor
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.localapi import BUNDLE, MAX_NPZ_ARRAY_BYTES, NPZ, LocalApi
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agentconfig import InferenceSettings
from edgefleet.errors import TamperedFileError
from tests.agent.conftest import Bundles, install_version
from tests.fixtures import datasets

PROFILE = "x86_64-vnni"
TOKEN = "the-token-of-this-start"
MAX_BUNDLE_BYTES = 1024 * 1024


class Client:
    def __init__(self, port: int, token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def request(
        self, method: str, path: str, body: bytes | None = None, kind: str = "application/json"
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", kind)
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = self.request(method, path, body)
        return status, json.loads(data)


def _serve(predictor: Predictor, uploads: Path, **overrides: Any) -> LocalApi:
    def refuse_install(path: Path) -> dict[str, Any]:
        raise TamperedFileError(f"{path.name} does not match its SHA-256")

    uploads.mkdir(exist_ok=True)
    handlers: dict[str, Any] = {
        "install": refuse_install,
        "rollback": lambda: {"state": "committed"},
        "install_state": lambda: "idle",
        "token": TOKEN,
        "uploads": uploads,
        "max_bundle_bytes": MAX_BUNDLE_BYTES,
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
    api = _serve(predictor, tmp_path / "uploads")
    yield Client(api.address[1], TOKEN), predictor
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
    api = _serve(predictor, tmp_path / "uploads")
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
        "detail": None,
        "model": "digits@1.0.0",
        "install_state": "idle",
        "drift": None,  # no drift check given to this API
        "link": None,  # nor a link
    }
    status, model = client.json("GET", "/v1/model")
    assert status == 200 and model["current"]["name"] == "digits"


def test_an_install_takes_the_bundle_bytes_into_a_private_file(
    tmp_path: Path, bundles: Bundles
) -> None:
    """The body lands in a 0600 file in downloads/, is installed from there, and is gone
    after; a refused bundle is 422 with the reason."""
    layout = StateLayout(tmp_path / "state")
    install_version(layout, bundles.mlp, "digits@1.0.0-aaaaaaaaaaaa")
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    seen: list[tuple[Path, int, bytes]] = []

    def install(path: Path) -> dict[str, Any]:
        seen.append((path, stat.S_IMODE(path.stat().st_mode), path.read_bytes()))
        raise TamperedFileError(f"{path.name} does not match its SHA-256")

    api = _serve(predictor, tmp_path / "uploads", install=install)
    try:
        client = Client(api.address[1], TOKEN)
        status, data = client.request("POST", "/v1/install", b"bundle bytes", BUNDLE)
        answer = json.loads(data)
        assert status == 422 and answer["code"] == "tampered-file", answer
        [(path, mode, received)] = seen
        assert path.parent == tmp_path / "uploads" and mode == 0o600
        assert received == b"bundle bytes"
        assert list((tmp_path / "uploads").iterdir()) == []
    finally:
        api.stop()
        predictor.close()


@pytest.mark.parametrize(
    ("head", "body", "status", "code"),
    [
        ({"Content-Length": str(MAX_BUNDLE_BYTES + 1), "Content-Type": BUNDLE}, b"x", 413,
         "too-large"),
        ({"Content-Length": "1000", "Content-Type": BUNDLE}, b"x" * 10, 400, "bad-length"),
        ({"Content-Length": "0", "Content-Type": BUNDLE}, b"", 400, "bad-request"),
        ({"Content-Length": "-1", "Content-Type": BUNDLE}, b"", 400, "bad-length"),
        ({"Content-Length": "2", "Content-Type": "application/json"}, b"{}", 415,
         "bad-content-type"),
    ],
    ids=["above-max-bundle-bytes", "shorter-than-announced", "empty", "negative", "json-path"],
)  # fmt: skip
def test_bad_install_bodies_are_refused_and_leave_nothing(
    tmp_path: Path,
    served: tuple[Client, Predictor],
    head: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    client, _ = served
    port = int(client.base.rsplit(":", 1)[1])
    answer_status, answer = _raw_post(
        port, "/v1/install", {**head, "Authorization": f"Bearer {TOKEN}"}, body
    )
    assert (answer_status, answer["code"]) == (status, code), answer
    assert list((tmp_path / "uploads").iterdir()) == []


def test_nothing_installed_is_503(tmp_path: Path) -> None:
    predictor = Predictor.open(StateLayout(tmp_path / "empty"), InferenceSettings(), PROFILE)
    api = _serve(predictor, tmp_path / "uploads")
    try:
        client = Client(api.address[1])
        status, answer = client.json("POST", "/v1/predict", {"inputs": {"features": [[0.0] * 64]}})
        assert status == 503 and answer["code"] == "no-model"
        assert client.json("GET", "/v1/health")[1]["status"] == "no-model"
    finally:
        api.stop()
        predictor.close()


# --- attacks: bad lengths, deep JSON, garbage and bombs get 4xx, never 500 -------------------


def _raw_post(port: int, path: str, head: dict[str, str], body: bytes) -> tuple[int, Any]:
    """Send a request exactly as given (lengths that urllib would correct), then stop
    sending: the server sees the end of the body where the client stopped."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in head.items()]
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        connection.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, json.loads(response.read())


@pytest.mark.parametrize(
    ("length", "body", "status"),
    [
        ("-1", b"{}", 400),
        ("abc", b"{}", 400),
        ("+2", b"{}", 400),
        ("1000", b'{"inputs": {}}', 400),
        (str(64 * 1024 * 1024 + 1), b"{}", 413),
    ],
    ids=["negative", "not-a-number", "signed", "shorter-than-announced", "above-the-cap"],
)
def test_bad_content_lengths_are_refused(
    served: tuple[Client, Predictor], length: str, body: bytes, status: int
) -> None:
    client, predictor = served
    port = int(client.base.rsplit(":", 1)[1])
    answer_status, answer = _raw_post(
        port, "/v1/predict", {"Content-Length": length, "Content-Type": "application/json"}, body
    )
    assert answer_status == status, answer
    assert answer["code"] in ("bad-length", "too-large") and answer["error"]
    assert client.json("GET", "/v1/health")[0] == 200  # the agent serves on
    assert predictor.model_info().steps[0].answered == 0


def test_deeply_nested_json_is_400(served: tuple[Client, Predictor]) -> None:
    client, _ = served
    status, data = client.request("POST", "/v1/predict", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and json.loads(data)["code"] == "bad-request"


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


GARBAGE_BATCHES = {
    "empty-body": b"",
    "garbage": bytes(range(256)) * 4,
    "no-arrays": _npz(),
    "an-npy-not-an-npz": _npy(np.zeros((2, 64))),
    "pickled-member": _zip("features.npy", _npy(np.array([{"a": 1}], dtype=object))),
    "member-not-npy": _zip("features.npy", b"not an array"),
    "truncated-zip": _npz(features=np.zeros((2, 64)))[:-30],
}


@pytest.mark.parametrize("body", GARBAGE_BATCHES.values(), ids=list(GARBAGE_BATCHES))
def test_bad_batches_are_400(served: tuple[Client, Predictor], body: bytes) -> None:
    client, _ = served
    status, data = client.request("POST", "/v1/predict/batch", body, "application/x-npz")
    answer = json.loads(data)
    assert status == 400, answer
    assert answer["code"] == "bad-request" and "npz" in answer["error"]


def test_an_npy_header_declaring_more_than_it_holds_is_400(
    served: tuple[Client, Predictor],
) -> None:
    """A member that declares 10**12 float64 values and holds one: nothing is allocated."""
    client, _ = served
    member = io.BytesIO()
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    npy_format.write_array_header_1_0(member, header)
    member.write(np.zeros(1).tobytes())
    body = _zip("features.npy", member.getvalue())
    status, data = client.request("POST", "/v1/predict/batch", body, NPZ)
    answer = json.loads(data)
    assert status == 400 and "declares" in answer["error"], answer


def test_an_npz_that_decompresses_beyond_the_cap_is_413(
    served: tuple[Client, Predictor],
) -> None:
    client, predictor = served
    bomb = io.BytesIO()
    np.savez_compressed(bomb, features=np.zeros((MAX_NPZ_ARRAY_BYTES // 512 + 1, 64)))
    assert len(bomb.getvalue()) < 1024 * 1024  # a small body
    status, data = client.request("POST", "/v1/predict/batch", bomb.getvalue(), NPZ)
    answer = json.loads(data)
    assert status == 413 and answer["code"] == "too-large", answer
    assert "declare" in answer["error"]
    assert predictor.model_info().steps[0].answered == 0


def test_an_npz_whose_header_understates_its_size_is_refused(
    served: tuple[Client, Predictor],
) -> None:
    """The declared size says 1 KiB; the member inflates to 1 MiB: never read past it."""
    client, _ = served
    body = bytearray(_zip("features.npy", _npy(np.zeros((2048, 64)))))
    with zipfile.ZipFile(io.BytesIO(bytes(body))) as archive:
        info = archive.infolist()[0]
    real = info.file_size.to_bytes(4, "little")
    assert body.count(real) == 2  # local header and central directory
    body = bytearray(bytes(body).replace(real, (1024).to_bytes(4, "little")))
    status, data = client.request("POST", "/v1/predict/batch", bytes(body), NPZ)
    assert status == 400, json.loads(data)


# --- web pages in a browser on the device are refused ------------------------------------------


def _raw(port: int, method: str, path: str, head: dict[str, str], body: bytes = b"") -> Any:
    """A request with exactly these headers (the Host header among them, as a browser sets it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        lines = [f"{method} {path} HTTP/1.1", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in head.items()]
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, json.loads(response.read())


@pytest.mark.parametrize(
    ("method", "path", "head", "status", "code"),
    [
        ("POST", "/v1/rollback", {"Host": "127.0.0.1", "Origin": "https://evil.example"},
         403, "cross-origin"),
        ("POST", "/v1/rollback", {"Host": "127.0.0.1", "Origin": "null"}, 403, "cross-origin"),
        ("GET", "/v1/model", {"Host": "127.0.0.1", "Origin": "https://evil.example"},
         403, "cross-origin"),
        ("GET", "/v1/model", {"Host": "rebound.evil.example:8765"}, 403, "bad-host"),
        ("POST", "/v1/rollback", {"Host": "rebound.evil.example"}, 403, "bad-host"),
        ("POST", "/v1/rollback", {"Host": "localhost", "Content-Type": "text/plain"},
         415, "form-content-type"),
        ("POST", "/v1/rollback",
         {"Host": "127.0.0.1", "Content-Type": "application/x-www-form-urlencoded"},
         415, "form-content-type"),
        ("POST", "/v1/rollback",
         {"Host": "127.0.0.1", "Content-Type": "multipart/form-data; boundary=x"},
         415, "form-content-type"),
    ],
    ids=["origin", "null-origin", "origin-get", "rebound-host-get", "rebound-host", "text-plain",
         "urlencoded", "multipart"],
)  # fmt: skip
def test_what_a_web_page_could_send_is_refused(
    tmp_path: Path,
    bundles: Bundles,
    method: str,
    path: str,
    head: dict[str, str],
    status: int,
    code: str,
) -> None:
    layout = StateLayout(tmp_path / "state")
    install_version(layout, bundles.mlp, "digits@1.0.0-aaaaaaaaaaaa")
    rollbacks: list[int] = []
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE, None)

    def rollback() -> dict[str, Any]:
        rollbacks.append(1)
        return {"state": "rolled_back"}

    api = _serve(predictor, tmp_path / "uploads", rollback=rollback)
    try:
        answer_status, answer = _raw(api.address[1], method, path, head, b"{}")
        assert (answer_status, answer["code"]) == (status, code), answer
        assert rollbacks == []
        # The same call from a program on the device is served.
        plain = {
            "Host": f"127.0.0.1:{api.address[1]}",
            "Content-Type": "application/json",
            "Authorization": f"Bearer {TOKEN}",
        }
        assert _raw(api.address[1], method, path, plain, b"{}")[0] == 200
        assert _raw(api.address[1], method, path, {**plain, "Host": "[::1]"}, b"{}")[0] == 200
        assert rollbacks == ([1, 1] if path == "/v1/rollback" else [])
    finally:
        api.stop()
        predictor.close()


def test_health_says_degraded_while_the_current_model_does_not_load(
    tmp_path: Path, bundles: Bundles
) -> None:
    layout = StateLayout(tmp_path / "state")
    install_version(layout, bundles.mlp, "digits@1.0.0-aaaaaaaaaaaa", link="previous")
    broken = tmp_path / "broken"
    shutil.copytree(bundles.mlp, broken)
    for model in broken.glob("*.onnx"):
        model.write_bytes(b"not an onnx model")
    install_version(layout, broken, "digits@2.0.0-bbbbbbbbbbbb")
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    api = _serve(predictor, tmp_path / "uploads")
    try:
        client = Client(api.address[1])
        _, health = client.json("GET", "/v1/health")
        assert health["status"] == "degraded", health
        assert health["detail"].startswith("serving previous (digits@1.0.0), current does not load")
        _, model = client.json("GET", "/v1/model")
        assert model["steps"][0]["step"] == "primary" and model["steps"][0]["load_error"]
        features, _ = datasets.digits_tabular()
        for _ in range(6):  # the breaker opens; still degraded, still the previous answers
            status, answer = client.json(
                "POST", "/v1/predict", {"inputs": {"features": features[:1].tolist()}}
            )
            assert status == 200 and answer["answered_by"] == "previous"
        _, health = client.json("GET", "/v1/health")
        assert health["status"] == "degraded" and "does not load" in health["detail"]
    finally:
        api.stop()
        predictor.close()


def test_a_client_hanging_up_mid_body_is_one_readable_line(
    served: tuple[Client, Predictor],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    client, _ = served
    port = int(client.base.rsplit(":", 1)[1])
    caplog.set_level(logging.INFO, logger="edgefleet.agent.localapi")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"inputs":'
        )
        # Hang up hard (a reset), in the middle of the body.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
        "hung up" in r.getMessage() for r in caplog.records
    ):
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgefleet.agent.localapi"]
    assert [line for line in lines if "hung up" in line], lines
    assert "Traceback" not in capfd.readouterr().err
    status, _ = client.json("GET", "/v1/health")  # it serves on
    assert status == 200
