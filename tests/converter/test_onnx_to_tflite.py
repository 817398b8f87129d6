"""ONNX to TFLite: real onnx2tf conversions, in its tool environment, of models trained here.

The conversions need the onnx2tf tool environment (`edgefleet convert --prepare-tools`);
without it they are skipped, or fail under EDGEFLEET_REQUIRE_TFLITE_TOOLS=1 (CI).
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from edgefleet.agent.install.smoke import run_smoke_test
from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.converter.candidates import TFLITE_FLOAT32, TFLITE_INT8, pinned_candidate
from edgefleet.converter.toolenv import PREPARE_COMMAND, onnx2tf_python
from edgefleet.errors import UsageError
from edgefleet.litert import LiteRTModel
from edgefleet.profiles import load_profile
from tests.converter.conftest import Case, convert_args
from tests.fixtures import datasets


@pytest.fixture(scope="module")
def onnx2tf_ready() -> None:
    if onnx2tf_python() is None:
        message = f"the onnx2tf tool environment is not built (`{PREPARE_COMMAND}`)"
        if os.environ.get("EDGEFLEET_REQUIRE_TFLITE_TOOLS") == "1":
            pytest.fail(f"{message} and EDGEFLEET_REQUIRE_TFLITE_TOOLS=1")
        pytest.skip(message)


@pytest.fixture(scope="module")
def plain_mlp(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """An MLP trained here on the digits, as standard ONNX operators only.

    (skl2onnx adds ai.onnx.ml operators for the label, which onnx2tf does not convert.)
    """
    directory = tmp_path_factory.mktemp("plain-mlp")
    features, targets = datasets.digits_tabular()
    split = datasets.split(len(features))
    classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
    with warnings.catch_warnings():  # not fully converged, and accurate enough
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(features[split.train], targets[split.train])
    nodes, weights, tensor = [], [], "features"
    layers = list(zip(classifier.coefs_, classifier.intercepts_, strict=True))
    for index, (matrix, bias) in enumerate(layers):
        weights += [
            numpy_helper.from_array(matrix.astype(np.float32), f"w{index}"),
            numpy_helper.from_array(bias.astype(np.float32), f"b{index}"),
        ]
        nodes += [
            helper.make_node("MatMul", [tensor, f"w{index}"], [f"m{index}"]),
            helper.make_node("Add", [f"m{index}", f"b{index}"], [f"a{index}"]),
        ]
        tensor = f"a{index}"
        if index < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [tensor], [f"r{index}"]))
            tensor = f"r{index}"
    nodes.append(helper.make_node("Softmax", [tensor], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "digits-mlp",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", 10])],
        weights,
    )
    case = Case(
        model=directory / "mlp.onnx",
        calibration=directory / "calibration.npz",
        validation=directory / "validation.npz",
        labels=directory / "labels.npy",
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), case.model)
    np.savez(case.calibration, features=features[split.calibration])
    np.savez(case.validation, features=features[split.validation])
    np.save(case.labels, targets[split.validation])
    return case


def test_tflite_candidates_are_valid_where_the_profile_runs_tflite() -> None:
    armv7, vnni = load_profile("armv7-tflite"), load_profile("x86_64-vnni")
    assert pinned_candidate("tflite-int8", armv7, "dense") == TFLITE_INT8
    assert pinned_candidate("tflite-float32", vnni, "dense") == TFLITE_FLOAT32
    with pytest.raises(UsageError, match=r"choose one of float, tflite-int8$"):
        pinned_candidate("tflite-float32", armv7, "dense")  # float is TFLite float32 there


@pytest.mark.parametrize("model", ["plain_mlp", "cnn"])
def test_onnx_model_converts_to_tflite_for_armv7(
    onnx2tf_ready: None,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
) -> None:
    case: Case = request.getfixturevalue(model)
    out = tmp_path / "out"
    given = case.model.read_bytes(), case.model.stat().st_mtime_ns
    status = run_with_error_handling(cli, convert_args(case, "armv7-tflite", out))
    assert status == 0, capsys.readouterr().err
    # onnx2tf writes over the model it is given: it got a copy, the user's model is untouched.
    assert (case.model.read_bytes(), case.model.stat().st_mtime_ns) == given

    assert sorted(p.name for p in out.glob("model*")) == ["model.tflite"]  # no ONNX on armv7
    inputs, outputs = LiteRTModel(out / "model.tflite", 1).details()
    schema = json.loads((out / "schema.json").read_text())
    assert list(inputs) == [tensor["name"] for tensor in schema["inputs"]]  # named as in ONNX
    assert list(outputs) == [tensor["name"] for tensor in schema["outputs"]]
    assert "match their expected outputs" in run_smoke_test(out).summary

    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["candidates"]}
    assert set(rows) == {"float", "tflite-int8"}
    float_accuracy = rows["float"]["metrics"]["accuracy"]
    int8 = rows["tflite-int8"]
    assert int8["metrics"]["accuracy"] > 80  # converted and calibrated, not ruined
    if report["chosen"] == "tflite-int8":
        assert float_accuracy - int8["metrics"]["accuracy"] <= 1.0
        assert rows["float"]["verdict"] == "not shipped: no fallback where only TFLite runs"
    else:
        assert report["chosen"] == "float"
        assert int8["verdict"].startswith("rejected: ")
    assert any("runs TFLite only" in note for note in report["notes"])
    assert f"measured with LiteRT on this machine ({platform.machine()})" in " ".join(int8["notes"])
    metadata = json.loads((out / "edgefleet-bundle.json").read_text())
    assert metadata["profiles"] == ["armv7-tflite"]
    assert metadata["lineage"]["runtime"].startswith("ai-edge-litert ")


def test_tflite_candidates_compete_on_x86_when_asked(
    onnx2tf_ready: None, plain_mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = convert_args(plain_mlp, "x86_64-vnni", out, "--tflite")
    assert run_with_error_handling(cli, args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["candidates"]}
    assert {"float", "tflite-float32", "tflite-int8"} <= set(rows)
    assert any(name.startswith(("static-", "dynamic-")) for name in rows)  # onnxruntime's too
    float_accuracy = rows["float"]["metrics"]["accuracy"]
    assert abs(rows["tflite-float32"]["metrics"]["accuracy"] - float_accuracy) < 0.5  # the same
    served = "model.tflite" if report["chosen"].startswith("tflite-") else "model.onnx"
    assert (out / served).is_file()
    assert "match their expected outputs" in run_smoke_test(out).summary


def test_missing_tool_environment_that_cannot_be_built_is_refused_with_the_command(
    plain_mlp: Case,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tools = tmp_path / "tools"
    monkeypatch.setenv("EDGEFLEET_TOOLS_DIR", str(tools))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as without network: pip finds no package
    out = tmp_path / "out"
    status = run_with_error_handling(cli, convert_args(plain_mlp, "armv7-tflite", out))
    err = capsys.readouterr().err
    assert status == 2
    [line] = err.strip().splitlines()[-1:]
    assert line.startswith("error [tool-missing]: could not build the onnx2tf tool environment")
    assert f"run `{PREPARE_COMMAND}`" in line
    assert "building the onnx2tf tool environment" in err  # the progress line came first
    assert not out.exists()
    assert list(tools.iterdir()) == []  # no half-built environment left behind


def test_model_with_operators_onnx2tf_does_not_convert_is_refused_for_armv7(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = run_with_error_handling(cli, convert_args(mlp, "armv7-tflite", out))
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert status == 2
    assert line == (
        "error [unsupported-operator]: digits_mlp.onnx uses operators of domain(s) ai.onnx.ml, "
        "which onnx2tf does not convert to TFLite, and target armv7-tflite runs TFLite only: "
        "export the model with standard ONNX operators only"
    )
    assert not out.exists()
