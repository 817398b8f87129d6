"""Which samples a conversion uses: a fixed-seed random draw, never the first ones of a file
(which may be sorted by label), the same file for calibration and validation counted once,
and labels in the wrong file format refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.converter import ConvertOptions, convert
from edgefleet.converter.data import (
    CALIBRATION_SAMPLES,
    VALIDATION_SAMPLES,
    drawn,
    load_conversion_data,
)
from edgefleet.converter.errors import DataError
from edgefleet.converter.modelinfo import load_onnx
from edgefleet.drift import DriftReference
from tests.converter.conftest import Case
from tests.fixtures import datasets


@pytest.fixture(scope="module")
def sorted_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """All 1797 digits as one .npz, sorted by label, and their labels."""
    directory = tmp_path_factory.mktemp("sorted")
    features, labels = datasets.digits_tabular()
    order = np.argsort(labels, kind="stable")
    np.savez(directory / "digits.npz", features=features[order])
    np.save(directory / "labels.npy", labels[order])
    return directory / "digits.npz", directory / "labels.npy"


def test_samples_are_drawn_at_random_with_a_fixed_seed(
    mlp: Case, sorted_digits: tuple[Path, Path]
) -> None:
    data_path, labels_path = sorted_digits
    features, labels = np.load(data_path)["features"], np.load(labels_path)
    inputs = load_onnx(mlp.model)[1].inputs
    data = load_conversion_data(inputs, data_path, data_path, labels_path)
    assert data.calibration.size == CALIBRATION_SAMPLES
    assert data.validation.size == VALIDATION_SAMPLES
    assert data.labels is not None
    # Every class is there, not just the first ones of a file sorted by label.
    assert set(data.labels) == set(range(10))
    calibration_labels = {
        int(labels[np.flatnonzero((features == row).all(1))[0]])
        for row in data.calibration.arrays["features"]
    }
    assert calibration_labels == set(range(10))
    # The labels are drawn with the same indices as the samples.
    indices = drawn(len(features), VALIDATION_SAMPLES)
    assert indices is not None and len(set(indices)) == VALIDATION_SAMPLES
    assert np.array_equal(data.validation.arrays["features"], features[indices])
    assert np.array_equal(data.labels, labels[indices])
    # The same samples on every run.
    again = load_conversion_data(inputs, data_path, data_path, labels_path)
    assert again.labels is not None and np.array_equal(again.labels, data.labels)
    assert np.array_equal(again.calibration.arrays["features"], data.calibration.arrays["features"])
    assert "validation: 500 of 1797 samples used, drawn at random with a fixed seed" in data.notes
    assert "calibration: 200 of 1797 samples used, drawn at random with a fixed seed" in data.notes


def test_report_says_how_many_samples_were_drawn_and_accuracy_is_theirs(
    mlp: Case, sorted_digits: tuple[Path, Path], tmp_path: Path
) -> None:
    data_path, labels_path = sorted_digits
    out = tmp_path / "out"
    options = ConvertOptions(
        target="x86_64-vnni",
        calibration=data_path,
        validation=data_path,
        labels=labels_path,
        candidate="float",
    )
    convert(mlp.model, out, options)
    report = json.loads((out / "report.json").read_text())
    assert (
        "validation: 500 of 1797 samples used, drawn at random with a fixed seed" in report["notes"]
    )
    assert report["measured_on"]["validation_samples"] == VALIDATION_SAMPLES
    indices = drawn(1797, VALIDATION_SAMPLES)
    session = ort.InferenceSession(str(mlp.model), providers=["CPUExecutionProvider"])
    features, labels = np.load(data_path)["features"], np.load(labels_path)
    (predicted, _) = session.run(None, {"features": features[indices]})
    expected = float((predicted == labels[indices]).mean() * 100)
    assert report["candidates"][0]["metrics"]["accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("copy", [False, True])
def test_same_data_for_calibration_and_validation_is_counted_once(
    mlp: Case, tmp_path: Path, copy: bool
) -> None:
    features = np.load(mlp.validation)["features"][:142]
    data = tmp_path / "data.npz"
    np.savez(data, features=features)
    validation = data
    if copy:  # another file with the same contents
        validation = tmp_path / "same.npz"
        np.savez(validation, features=features)
    out = tmp_path / "out"
    options = ConvertOptions(
        target="x86_64-vnni", calibration=data, validation=validation, candidate="float"
    )
    convert(mlp.model, out, options)
    reference = DriftReference.model_validate_json((out / "drift-reference.json").read_text())
    assert reference.samples == 142
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("the same samples: counted once" in note for note in notes)
    # 142 samples are too few: the warning is not hidden by counting them twice.
    assert any(note.startswith("drift reference from 142 samples") for note in notes)


def test_labels_in_an_npz_are_refused(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.npz"
    np.savez(labels, labels=np.load(mlp.labels))
    out = tmp_path / "out"
    options = ConvertOptions(
        target="x86_64-vnni", calibration=mlp.calibration, validation=mlp.validation, labels=labels
    )
    with pytest.raises(DataError, match=r"is an \.npz archive"):
        convert(mlp.model, out, options)
    capsys.readouterr()
    status = run_with_error_handling(
        cli,
        [
            "convert", str(mlp.model), "--target", "x86_64-vnni",
            "--calibration", str(mlp.calibration), "--validation", str(mlp.validation),
            "--labels", str(labels), "-o", str(out),
        ],
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error [data]: ") and "numpy.save" in err and "Traceback" not in err
    assert not out.exists()
