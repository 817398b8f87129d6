"""Model runners on real onnxruntime and LiteRT sessions, with real converted bundles."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.errors import InferenceError
from edgefleet.agent.inference import (
    InferenceTimeoutError,
    OnnxRunner,
    TFLiteRunner,
    model_path,
    open_runner,
)
from edgefleet.agent.inference.runtimes import outputs_are_finite
from edgefleet.bundlefiles import SMOKE_SPEC_FILE
from tests.agent.conftest import Bundles, write_onnx_model


def smoke(bundle: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    with np.load(bundle / "smoke.npz") as data:
        inputs = {k.removeprefix("input/"): data[k] for k in data.files if k.startswith("input/")}
        expected = {
            k.removeprefix("expected/"): data[k] for k in data.files if k.startswith("expected/")
        }
    atol = json.loads((bundle / SMOKE_SPEC_FILE).read_text())["atol"]
    return inputs, expected, atol


@pytest.mark.parametrize("which", ["mlp", "cnn", "tflite"])
def test_served_model_gives_the_bundles_expected_outputs(bundles: Bundles, which: str) -> None:
    bundle = getattr(bundles, which)
    runner = open_runner(bundle, "served", threads=2, providers=["CPUExecutionProvider"])
    inputs, expected, atol = smoke(bundle)
    outputs = runner.run(inputs, timeout_s=5.0)
    assert set(outputs) == set(expected) == set(runner.output_names)
    assert tuple(runner.input_names) == tuple(inputs)
    for name, want in expected.items():
        np.testing.assert_allclose(outputs[name], want, atol=atol[name] + 1e-6)


def test_tflite_bundle_gets_a_litert_runner(bundles: Bundles) -> None:
    runner = open_runner(bundles.tflite)
    assert isinstance(runner, TFLiteRunner)
    assert model_path(bundles.tflite, "fallback") is None
    with pytest.raises(InferenceError, match="has no float fallback model"):
        open_runner(bundles.tflite, "fallback")


def test_tflite_runner_serves_one_call_at_a_time_from_many_threads(bundles: Bundles) -> None:
    runner = open_runner(bundles.tflite, threads=1)
    inputs, expected, atol = smoke(bundles.tflite)
    errors: list[BaseException] = []

    def work(timeout: float | None) -> None:
        try:
            for _ in range(20):
                out = runner.run(inputs, timeout)
                np.testing.assert_allclose(
                    out["probabilities"], expected["probabilities"], atol=atol["probabilities"]
                )
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in (None, 5.0, None, 5.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_float_fallback_model_is_the_bundles_float_onnx(bundles: Bundles) -> None:
    assert model_path(bundles.cnn, "fallback") == bundles.cnn / "model.float.onnx"
    runner = open_runner(bundles.cnn, "fallback")
    inputs, expected, _ = smoke(bundles.cnn)
    out = runner.run(inputs)
    # The float model is the quantized model's reference: top-1 agrees on the smoke samples.
    assert (out["logits"].argmax(1) == expected["logits"].argmax(1)).mean() >= 0.75


def test_unknown_execution_provider_falls_back_to_cpu(bundles: Bundles) -> None:
    runner = OnnxRunner(bundles.mlp / "model.onnx", 1, ["NoSuchExecutionProvider"])
    assert runner.providers == ("CPUExecutionProvider",)


def test_missing_model_is_an_inference_error(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="has no model to serve"):
        open_runner(tmp_path)


@pytest.mark.parametrize("name", ["model.onnx", "model.tflite"])
def test_corrupt_model_is_an_inference_error(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x08\x07not a model at all" * 10)
    with pytest.raises(InferenceError, match="cannot load") as caught:
        open_runner(tmp_path)
    assert caught.value.__cause__ is not None  # the runtime's own error, chained


def test_runtime_failure_is_translated(tmp_path: Path) -> None:
    runner = OnnxRunner(write_onnx_model(tmp_path / "model.onnx", "raise"))
    with pytest.raises(InferenceError, match=r"model\.onnx failed: .*Reshape") as caught:
        runner.run({"image": np.zeros((1, 1, 32, 32), np.float32)}, timeout_s=5.0)
    assert not isinstance(caught.value, InferenceTimeoutError)
    assert type(caught.value.__cause__).__module__.startswith("onnxruntime")


def test_call_past_its_deadline_is_stopped(tmp_path: Path) -> None:
    runner = OnnxRunner(write_onnx_model(tmp_path / "model.onnx", "slow"), threads=2)
    x = np.zeros((1, 1, 32, 32), np.float32)
    started = time.monotonic()
    runner.run({"image": x}, timeout_s=None)
    full = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(InferenceTimeoutError, match=r"took longer than 0\.1 s and was stopped"):
        runner.run({"image": x}, timeout_s=0.1)
    stopped = time.monotonic() - started
    assert stopped < full / 2, (stopped, full)
    # The next call on this thread is not cut short by the flag the watchdog set.
    fast = OnnxRunner(write_onnx_model(tmp_path / "fast.onnx", "constant"))
    assert fast.run({"image": x}, timeout_s=0.1)["logits"].argmax() == 3
    assert runner.run({"image": x}, timeout_s=30.0)["logits"].shape == (1, 10)


def test_nan_and_infinite_outputs_are_not_finite() -> None:
    good = {"a": np.ones(10, np.float32), "label": np.array([3])}
    assert outputs_are_finite(good)
    assert outputs_are_finite({"a": np.full(10, 3e37, np.float32)})  # overflowing squares
    for bad in (np.nan, np.inf, -np.inf):
        values = np.ones(10, np.float32)
        values[4] = bad
        assert not outputs_are_finite({**good, "a": values})


def test_tflite_call_past_its_deadline_is_abandoned_and_the_runner_refuses_until_it_ends(
    bundles: Bundles,
) -> None:
    runner = open_runner(bundles.tflite)
    assert isinstance(runner, TFLiteRunner)
    inputs, _, _ = smoke(bundles.tflite)
    release = threading.Event()
    invoke = runner._invoke

    def stuck_once(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # LiteRT cannot be interrupted: stand in for an interpreter call that hangs.
        release.wait(10)
        return invoke(feed)

    runner._invoke = stuck_once  # type: ignore[method-assign]
    with pytest.raises(InferenceTimeoutError, match="its answer will be ignored"):
        runner.run(inputs, timeout_s=0.05)
    with pytest.raises(InferenceError, match="still busy with a call that timed out"):
        runner.run(inputs, timeout_s=1.0)
    runner._invoke = invoke  # type: ignore[method-assign]
    release.set()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert runner.run(inputs, timeout_s=5.0)["probabilities"].shape == (8, 10)
            break
        except InferenceError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
