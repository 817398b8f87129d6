"""Labels: what they measure is decided once from the float model's outputs, and a mismatch
is refused before the candidate search, never turned into a report without metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.converter import ConvertOptions, convert
from edgefleet.converter.errors import LabelMismatchError
from edgefleet.converter.evaluate import decide_task
from tests.converter.conftest import Case
from tests.fixtures import datasets


@dataclass(frozen=True)
class Binary:
    """A logistic regression on scikit-learn's breast cancer data, as two ONNX models."""

    sigmoid: Path  # probability of class 1, shape [N, 1]
    logit: Path  # its logit, shape [N]
    calibration: Path
    validation: Path
    labels: Path
    expected_accuracy: float  # scikit-learn's own, on the validation samples


def _linear_model(path: Path, weights: np.ndarray, bias: float, sigmoid: bool) -> None:
    nodes = [
        helper.make_node("MatMul", ["features", "w"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logit2d"]),
    ]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logit2d"], ["probability"]))
        output = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])
    else:
        nodes.append(helper.make_node("Reshape", ["logit2d", "flat"], ["logit"]))
        output = helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch"])
    graph = helper.make_graph(
        nodes,
        "logistic",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", len(weights)])],
        [output],
        [
            numpy_helper.from_array(weights.reshape(-1, 1).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([bias], np.float32), "b"),
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Binary:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    directory = tmp_path_factory.mktemp("binary")
    features, targets = load_breast_cancer(return_X_y=True)
    features = ((features - features.mean(0)) / features.std(0)).astype(np.float32)
    split = datasets.split(len(features))
    model = LogisticRegression(max_iter=1000).fit(features[split.train], targets[split.train])
    validation = features[split.validation]
    labels = targets[split.validation].astype(np.int64)
    case = Binary(
        sigmoid=directory / "sigmoid.onnx",
        logit=directory / "logit.onnx",
        calibration=directory / "calibration.npz",
        validation=directory / "validation.npz",
        labels=directory / "labels.npy",
        expected_accuracy=float((model.predict(validation) == labels).mean() * 100),
    )
    for path, sigmoid in ((case.sigmoid, True), (case.logit, False)):
        _linear_model(path, model.coef_[0], float(model.intercept_[0]), sigmoid)
    np.savez(case.calibration, features=features[split.calibration])
    np.savez(case.validation, features=validation)
    np.save(case.labels, labels)
    return case


def _report(out: Path) -> Any:
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize(
    ("which", "threshold", "scores"), [("sigmoid", 0.5, "probabilities"), ("logit", 0.0, "logits")]
)
def test_binary_classifier_with_one_score_is_judged_by_accuracy(
    binary: Binary, tmp_path: Path, which: str, threshold: float, scores: str
) -> None:
    out = tmp_path / "out"
    model = binary.sigmoid if which == "sigmoid" else binary.logit
    options = ConvertOptions(
        target="x86_64-vnni",
        calibration=binary.calibration,
        validation=binary.validation,
        labels=binary.labels,
        candidate="float",
    )
    convert(model, out, options)
    report = _report(out)
    (row,) = report["candidates"]
    assert row["metrics"]["accuracy"] == pytest.approx(binary.expected_accuracy)
    assert report["task"]["kind"] == "binary" and report["task"]["threshold"] == threshold
    assert any(f"> {threshold:g}" in note and scores in note for note in report["notes"])


def test_every_candidate_of_a_binary_classifier_gets_accuracy(
    binary: Binary, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    options = ConvertOptions(
        target="x86_64-vnni",
        calibration=binary.calibration,
        validation=binary.validation,
        labels=binary.labels,
        optimize="size",
    )
    convert(binary.sigmoid, out, options)
    rows = [row for row in _report(out)["candidates"] if row["error"] is None]
    assert len(rows) > 1
    assert all("accuracy" in row["metrics"] for row in rows)


def _refused(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    model: Path,
    validation: Path,
    labels: Path,
    match: str,
) -> str:
    out = tmp_path / "out"
    options = ConvertOptions(
        target="x86_64-vnni", calibration=validation, validation=validation, labels=labels
    )
    with pytest.raises(LabelMismatchError, match=match):
        convert(model, out, options)
    capsys.readouterr()
    status = run_with_error_handling(
        cli,
        [
            "convert",
            str(model),
            "--target",
            "x86_64-vnni",
            "--calibration",
            str(validation),
            "--validation",
            str(validation),
            "--labels",
            str(labels),
            "-o",
            str(out),
        ],
    )
    err = capsys.readouterr().err
    *progress, last = err.splitlines()
    assert status == 2, err
    assert last.startswith("error [label-mismatch]: ") and "Traceback" not in err
    # Refused before the search: no candidate was quantized.
    assert not [line for line in progress if "candidates" in line]
    assert not out.exists()
    return last


def test_integer_targets_on_a_regressor_are_refused(
    regressor: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "int-targets.npy"
    np.save(labels, np.load(regressor.labels).astype(np.int64))
    last = _refused(
        capsys, tmp_path, regressor.model, regressor.validation, labels, "other than 0 and 1"
    )
    assert "as floats" in last and "at index 0" in last


def test_float_labels_on_class_scores_are_refused(
    cnn: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "float-labels.npy"
    np.save(labels, np.load(cnn.labels).astype(np.float32))
    last = _refused(capsys, tmp_path, cnn.model, cnn.validation, labels, "regression targets")
    assert "integer class labels" in last


@pytest.mark.parametrize("bad", [10, -1])
@pytest.mark.parametrize("case_name", ["mlp", "cnn"])
def test_labels_outside_the_models_classes_are_refused(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case_name: str,
    bad: int,
) -> None:
    case: Case = request.getfixturevalue(case_name)
    values = np.load(case.labels)
    values[5] = bad
    labels = tmp_path / "labels.npy"
    np.save(labels, values)
    last = _refused(
        capsys, tmp_path, case.model, case.validation, labels, f"label {bad} at index 5"
    )
    assert "10 classes (0 to 9" in last


def test_integer_labels_on_a_model_without_classes_are_refused() -> None:
    masks = {"mask": np.zeros((4, 8, 8), np.float32)}
    with pytest.raises(LabelMismatchError, match="gives no classes"):
        decide_task(masks, np.zeros(4, np.int64), "labels.npy")
