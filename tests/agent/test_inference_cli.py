"""`agent predict` and `agent status` as a field engineer runs them: in this process, and
through a running agent (its local API served here, named in localapi.json)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.cli import agent as agent_group
from edgefleet.agent.config import write_config
from edgefleet.agent.inference import Predictor
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.localapi import LocalApi
from edgefleet.agentconfig import AgentConfig, InferenceSettings
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.trust import TrustRoot
from tests.agent.conftest import Bundles, install_version
from tests.fixtures import datasets

PROFILE = "x86_64-vnni"


@pytest.fixture
def config(tmp_path: Path, trust: TrustRoot, bundles: Bundles) -> Path:
    """agent.toml of a device serving the digits MLP (input `features`, [batch, 64])."""
    (tmp_path / "trust.json").write_bytes(trust.raw)
    settings = AgentConfig(
        device_id="cam-01",
        profile=PROFILE,
        state_dir=tmp_path / "state",
        trust_root=tmp_path / "trust.json",
        inference=InferenceSettings(max_batch_samples=100),
    )
    install_version(StateLayout(settings.state_dir), bundles.mlp, "digits@1.0.0-aaaaaaaaaaaa")
    path = tmp_path / "agent.toml"
    write_config(path, settings)
    return path


@pytest.fixture
def running(config: Path, tmp_path: Path) -> Iterator[Predictor]:
    """The device's agent, as `agent run` leaves it: serving, its address in localapi.json."""
    layout = StateLayout(tmp_path / "state")
    predictor = Predictor.open(layout, InferenceSettings(max_batch_samples=100), PROFILE)
    api = LocalApi(
        predictor,
        "127.0.0.1",
        0,
        install=lambda path: {},
        rollback=lambda: {},
        install_state=lambda: "committed",
        token="unused-here",
        uploads=layout.downloads,
        max_bundle_bytes=1,
    )
    api.start()
    host, port = api.address
    layout.local_api_file.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
    yield predictor
    layout.local_api_file.unlink()
    api.stop()
    predictor.close()


def features(rows: int) -> np.ndarray:
    return datasets.digits_tabular()[0][:rows]


def predict(config: Path, input_path: Path, output: Path) -> int:
    args = ["predict", "--input", str(input_path), "-o", str(output), "--config", str(config)]
    return run_with_error_handling(agent_group, args)


@pytest.mark.parametrize("through", ["in-process", "agent"])
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_predict_takes_an_npy_for_a_one_input_model_and_an_npz(
    request: pytest.FixtureRequest,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    through: str,
    suffix: str,
) -> None:
    if through == "agent":
        request.getfixturevalue("running")
    input_path = tmp_path / f"batch{suffix}"
    if suffix == ".npy":
        np.save(input_path, features(40))
    else:
        np.savez(input_path, features=features(40))
    assert predict(config, input_path, tmp_path / "out.npz") == 0
    out = capsys.readouterr().out
    assert "probabilities: shape [40, 10] float32" in out
    assert ("running agent" in out) == (through == "agent")
    with np.load(tmp_path / "out.npz") as answer:
        assert answer["probabilities"].shape == (40, 10)


def test_predict_refuses_unreadable_files_and_oversized_batches_in_one_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not numpy at all")
    assert predict(config, junk, tmp_path / "out.npz") == 2
    error = capsys.readouterr().err
    assert error.startswith("error [usage]: ") and "is not a readable .npz or .npy" in error
    assert error.count("\n") == 1

    big = tmp_path / "big.npy"
    np.save(big, features(101))
    assert predict(config, big, tmp_path / "out.npz") == 2
    error = capsys.readouterr().err
    assert error.startswith("error [batch-too-large]: the batch holds 101 samples, more than")
    assert error.count("\n") == 1
    assert not (tmp_path / "out.npz").exists()


def test_predict_through_the_agent_relays_an_oversized_batch_in_one_line(
    running: Predictor, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.npz"
    np.savez(big, features=features(101))
    assert predict(config, big, tmp_path / "out.npz") == 2
    error = capsys.readouterr().err
    assert error.startswith("error [batch-too-large]: the batch holds 101 samples")
    assert error.count("\n") == 1


def test_status_names_each_step_of_the_fallback_chain(
    running: Predictor, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running.predict({"features": features(3)})
    assert run_with_error_handling(agent_group, ["status", "--config", str(config)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "fallback step" in line]
    assert [line.split(":")[0].strip() for line in lines] == [
        f"fallback step {step.step}" for step in running.model_info().steps
    ]
    assert lines[0] == (
        "  fallback step primary: digits@1.0.0, breaker closed, 1 answered, 0 failed, "
        "time limit 1000 ms"
    )


def test_predict_to_a_missing_directory_names_the_path_before_predicting(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "in.npy", features(2))
    output = tmp_path / "nonexistent" / "dir" / "out.npz"
    assert predict(config, tmp_path / "in.npy", output) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any result is printed
    assert captured.err == (
        f"error [usage]: -o {output}: the directory {output.parent} does not exist; "
        "create it first, or write the outputs elsewhere\n"
    )
