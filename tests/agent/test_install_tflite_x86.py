"""A TFLite bundle on an x86-64 device: installed, smoke-tested and served through LiteRT.

The bundles are the fixture models converted for each x86 profile (the digits
MLP as TFLite and as ONNX, both taking `features` [batch, 64]) and signed by
the test release key; the device runs the real installer and real LiteRT.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.errors import SmokeTestError
from edgefleet.agent.inference import Predictor
from edgefleet.agent.install import State
from edgefleet.agent.layout import StateLayout
from edgefleet.agentconfig import InferenceSettings
from edgefleet.bundle import build_bundle
from edgefleet.trust import TrustRoot
from tests.agent.conftest import install_version
from tests.agent.power_loss_driver import Device, _convert, device_config
from tests.conftest import KeySet

X86_TARGETS = ["x86_64-avx2", "x86_64-vnni"]
TO_SMOKE = ["downloading", "verifying", "checking", "staging", "smoke_testing"]
INSTALL_CHAIN = [*TO_SMOKE, "activating", "health_checking", "committed"]


@dataclass(frozen=True)
class X86Bundles:
    """Converted directories and signed bundles for one x86 profile."""

    target: str
    onnx_dir: Path  # digits_mlp.onnx, float
    lite_dir: Path  # digits_mlp.tflite, packed unchanged
    onnx: Path  # demo 1.0.0
    lite: Path  # demo 1.1.0
    lite_smoke_broken: Path  # demo 1.2.0: the TFLite model, its expected smoke outputs altered


@pytest.fixture(scope="module", params=X86_TARGETS)
def x86(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keyset: KeySet
) -> X86Bundles:
    target: str = request.param
    root = tmp_path_factory.mktemp(target)
    onnx_dir = _convert("digits_mlp.onnx", target, root / "model-onnx")
    lite_dir = _convert("digits_mlp.tflite", target, root / "model-lite")
    broken_dir = root / "model-lite-smoke-broken"
    shutil.copytree(lite_dir, broken_dir)
    with np.load(broken_dir / "smoke.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["expected/probabilities"] = arrays["expected/probabilities"] + 0.5
    np.savez(broken_dir / "smoke.npz", **arrays)
    made = X86Bundles(
        target=target,
        onnx_dir=onnx_dir,
        lite_dir=lite_dir,
        onnx=root / "demo-1.0.0.efb",
        lite=root / "demo-1.1.0.efb",
        lite_smoke_broken=root / "demo-1.2.0.efb",
    )
    for directory, bundle, version in (
        (onnx_dir, made.onnx, "1.0.0"),
        (lite_dir, made.lite, "1.1.0"),
        (broken_dir, made.lite_smoke_broken, "1.2.0"),
    ):
        build_bundle(directory, bundle, name="demo", version=version, keys=[keyset.release])
    return made


def smoke(directory: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(directory / "smoke.npz") as data:
        return {"features": data["input/features"]}, data["expected/probabilities"]


@pytest.fixture
def device(tmp_path: Path, trust: TrustRoot, x86: X86Bundles) -> Device:
    """A device of the x86 profile serving the ONNX demo 1.0.0."""
    config = device_config(tmp_path / "device", trust.raw, profile=x86.target)
    device = Device.boot(config, server=tmp_path / "server")
    assert device.installer.install_file(x86.onnx).state is State.COMMITTED
    device.reporter.reports.clear()
    return device


def test_tflite_bundle_installs_on_x86_and_is_served_by_litert(
    device: Device, x86: X86Bundles
) -> None:
    status = device.installer.install_file(x86.lite)
    assert device.reporter.states == INSTALL_CHAIN
    assert status.state is State.COMMITTED
    current = device.versions.current()
    assert current is not None and current.served_model == current.directory / "model.tflite"
    predictor = Predictor.open(device.config.state_dir, InferenceSettings(), x86.target)
    inputs, expected = smoke(x86.lite_dir)
    prediction = predictor.predict(inputs)
    assert (prediction.step, prediction.model) == ("primary", "demo@1.1.0")
    np.testing.assert_allclose(prediction.outputs["probabilities"], expected, atol=1e-5)
    info = predictor.model_info()
    assert info.current is not None and info.current.format == "tflite"
    assert [s.step for s in info.steps] == ["primary", "previous"]


def test_tflite_bundle_whose_smoke_outputs_differ_fails_on_x86_and_keeps_serving(
    device: Device, x86: X86Bundles
) -> None:
    before = device.versions.current_id()
    with pytest.raises(SmokeTestError, match=r"differs by 0\.5"):
        device.installer.install_file(x86.lite_smoke_broken)
    assert device.reporter.states == [*TO_SMOKE, "failed"]
    assert device.versions.current_id() == before


def test_tflite_model_that_fails_on_x86_falls_back_to_the_previous_version(
    tmp_path: Path, x86: X86Bundles
) -> None:
    layout = StateLayout(tmp_path / "state")
    install_version(layout, x86.onnx_dir, "demo@1.0.0-aaaaaaaaaaaa", link="previous")
    broken = tmp_path / "lite-unloadable"
    shutil.copytree(x86.lite_dir, broken)
    (broken / "model.tflite").write_bytes(b"TFL3 but not a model" * 20)
    install_version(layout, broken, "demo@1.1.0-bbbbbbbbbbbb")
    predictor = Predictor.open(layout, InferenceSettings(), x86.target)
    inputs, expected = smoke(x86.onnx_dir)  # the previous version's own smoke outputs
    prediction = predictor.predict(inputs)
    assert (prediction.step, prediction.model) == ("previous", "demo@1.0.0")
    np.testing.assert_allclose(prediction.outputs["probabilities"], expected, atol=1e-5)
    failures = {s.step: s.failures for s in predictor.model_info().steps}
    assert failures["primary"] == {"error": 1}
