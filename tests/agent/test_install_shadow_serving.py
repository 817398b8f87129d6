"""A shadow install feeding a real Predictor: the challenger is compared, never answers.

The challenger here is a signed bundle whose model always says "3" (its smoke
outputs are that model's own, so it passes its smoke test), installed in
shadow beside the digits MLP. Real onnxruntime sessions throughout; the
installer's `on_shadow` is the predictor's `set_challenger`, as the agent
wires it (agent/runner.py), and the last test runs that wiring in an Agent.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.inference import Predictor
from edgefleet.agent.runner import Agent
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agent.versions import InstalledVersion
from edgefleet.agentconfig import AgentConfig, InferenceSettings, LocalApiSettings
from edgefleet.bundle import build_bundle
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import (
    PROFILE,
    Bundles,
    Device,
    device_config,
    make_directive,
    prepare_bundles,
)
from tests.conftest import KeySet
from tests.fixtures import datasets

ALWAYS = 3  # the class the challenger always answers
REQUESTS = 30


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


def write_constant_mlp(path: Path) -> None:
    """features [batch, 64] -> probabilities [batch, 10] favouring ALWAYS, label [batch]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bias = np.zeros(10, dtype=np.float32)
    bias[ALWAYS] = 10.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "zeros"], ["xz"]),
            helper.make_node("Add", ["xz", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "always-three",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
        ],
        [
            numpy_helper.from_array(np.zeros((64, 10), dtype=np.float32), "zeros"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def always_three(
    bundles: Bundles, keyset: KeySet, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """demo 1.4.0: the MLP bundle with a model that always answers ALWAYS, signed."""
    import onnxruntime as ort

    root = tmp_path_factory.mktemp("always-three")
    model_dir = root / "model"
    shutil.copytree(bundles.model_dir, model_dir)
    for name in ("model.onnx", "model.float.onnx"):
        write_constant_mlp(model_dir / name)
    with np.load(model_dir / "smoke.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    label, probabilities = session.run(
        ["label", "probabilities"], {"features": arrays["input/features"]}
    )
    arrays["expected/label"], arrays["expected/probabilities"] = label, probabilities
    np.savez(model_dir / "smoke.npz", **arrays)
    bundle = root / "demo-1.4.0-always-three.efb"
    build_bundle(model_dir, bundle, name="demo", version="1.4.0", keys=[keyset.release])
    return bundle


def serving_two(config: AgentConfig, server: Path, bundles: Bundles) -> Device:
    device = Device.boot(config, server=server)
    device.installer.install_file(bundles.releases[0])
    device.installer.install_file(bundles.releases[1])
    return device


def inputs() -> list[np.ndarray]:
    features, _ = datasets.digits_tabular()
    return [features[i : i + 1] for i in range(REQUESTS)]


def test_shadow_installed_challenger_is_compared_in_telemetry_and_never_answers(
    tmp_path: Path, trust: TrustRoot, keyset: KeySet, bundles: Bundles, always_three: Path
) -> None:
    config = device_config(tmp_path / "device", trust.raw)
    device = serving_two(config, tmp_path / "server", bundles)
    telemetry = TelemetryRecorder(config.device_id, None, 60)
    settings = InferenceSettings(shadow_sample_rate=1.0)
    predictor = Predictor.open(config.state_dir, settings, PROFILE, telemetry, shadow_seed=1)
    champion = [predictor.predict({"features": x}).outputs for x in inputs()]
    telemetry.close_window()  # the champion alone

    def set_challenger(version: InstalledVersion | None) -> None:
        predictor.set_challenger(version.directory if version else None)

    device.installer.on_shadow = set_challenger
    shadow = make_directive(keyset.server, device.publish(always_three), sequence=1, shadow=True)
    status = device.installer.install_directive(shadow)
    assert status.challenger is not None and status.challenger.startswith("demo@1.4.0-")
    assert predictor.model_info().challenger == "demo@1.4.0"
    for x, expected in zip(inputs(), champion, strict=True):
        prediction = predictor.predict({"features": x})
        assert (prediction.step, prediction.model) == ("primary", "demo@1.1.0")
        for name, value in expected.items():  # the champion's answer, never the challenger's
            np.testing.assert_array_equal(prediction.outputs[name], value)
        assert predictor.wait_shadow(10)  # one at a time: none skipped
    agreements = sum(int(answer["label"][0] == ALWAYS) for answer in champion)
    assert 0 < agreements < REQUESTS  # the disagreements are what shadow mode is for
    window = telemetry.close_window()
    assert window is not None and window.shadow is not None
    assert (window.bundle_version, window.requests) == ("1.1.0", REQUESTS)
    assert (window.shadow.requests, window.shadow.agreements) == (REQUESTS, agreements)
    predictor.close()


@pytest.fixture
def running_agent(
    tmp_path: Path, trust: TrustRoot, keyset: KeySet, bundles: Bundles
) -> Iterator[tuple[Agent, Device]]:
    """An Agent started on a device that has demo 1.2.0 in shadow from before it started."""
    config = device_config(tmp_path / "device", trust.raw, local_api=LocalApiSettings(port=0))
    device = serving_two(config, tmp_path / "server", bundles)
    ref = device.publish(bundles.releases[2])
    device.installer.install_directive(make_directive(keyset.server, ref, sequence=1, shadow=True))
    agent = Agent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        yield agent, device
    finally:
        agent.stopping.set()
        thread.join(timeout=30)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_agent_hands_the_recorded_challenger_to_its_predictor_and_follows_new_ones(
    running_agent: tuple[Agent, Device], bundles: Bundles, keyset: KeySet
) -> None:
    agent, device = running_agent
    assert wait_for(lambda: agent.predictor is not None and agent.predictor.model_info().challenger)
    assert agent.predictor is not None
    info = agent.predictor.model_info()
    assert info.challenger == "demo@1.2.0"
    assert info.current is not None and info.current.version == "1.1.0"
    # The running agent's installer hands a new challenger to the open predictor...
    agent.installer.fetcher = device.server  # the simulated fleet server instead of HTTP
    ref = device.publish(bundles.releases[3])
    agent.installer.install_directive(make_directive(keyset.server, ref, sequence=2, shadow=True))
    assert agent.predictor.model_info().challenger == "demo@1.3.0"
    # ...and a rollback stops it.
    agent.installer.install_directive(
        make_directive(keyset.server, None, sequence=3, action="rollback")
    )
    info = agent.predictor.model_info()
    assert info.challenger is None and info.shadow == {}
    assert info.current is not None and info.current.version == "1.0.0"
