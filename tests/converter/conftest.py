"""Real trained models (tests/fixtures/models) and the data sets they were trained on."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.converter import ConvertOptions, convert
from tests.fixtures import datasets

MODELS = Path(__file__).parent.parent / "fixtures" / "models"


@dataclass(frozen=True)
class Case:
    model: Path
    calibration: Path
    validation: Path
    labels: Path


def convert_args(case: Case, target: str, out: Path, *extra: str) -> list[str]:
    """`edgefleet convert` arguments for `case` and `target`, writing `out`."""
    return [
        "convert",
        str(case.model),
        "--target",
        target,
        "--calibration",
        str(case.calibration),
        "--validation",
        str(case.validation),
        "--labels",
        str(case.labels),
        "-o",
        str(out),
        *extra,
    ]


def size_report(model: Path, calibration: Path, validation: Path, out: Path) -> dict[str, Any]:
    """Convert for x86_64-vnni optimizing size, without labels; the report.

    Optimizing size makes the choice a function of sizes and fidelity alone, never of
    timings, so the recovery fixtures' choices do not depend on the machine's load.
    """
    options = ConvertOptions(
        target="x86_64-vnni", calibration=calibration, validation=validation, optimize="size"
    )
    convert(model, out, options)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _write_case(
    directory: Path, model: str, input_name: str, data: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> Case:
    directory.mkdir(parents=True, exist_ok=True)
    features, targets = data()
    split = datasets.split(len(features))
    case = Case(
        model=MODELS / model,
        calibration=directory / "calibration.npz",
        validation=directory / "validation.npz",
        labels=directory / "labels.npy",
    )
    calibration: dict[str, Any] = {input_name: features[split.calibration]}
    validation: dict[str, Any] = {input_name: features[split.validation]}
    np.savez(case.calibration, **calibration)
    np.savez(case.validation, **validation)
    np.save(case.labels, targets[split.validation])
    return case


@pytest.fixture(scope="session")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _write_case(
        tmp_path_factory.mktemp("mlp"), "digits_mlp.onnx", "features", datasets.digits_tabular
    )


@pytest.fixture(scope="session")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _write_case(
        tmp_path_factory.mktemp("cnn"), "digits_cnn.onnx", "image", datasets.digits_images
    )


@pytest.fixture(scope="session")
def gru(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _write_case(
        tmp_path_factory.mktemp("gru"), "digits_gru.onnx", "rows", datasets.digits_sequences
    )


@pytest.fixture(scope="session")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _write_case(
        tmp_path_factory.mktemp("regressor"),
        "diabetes_regressor.onnx",
        "features",
        datasets.diabetes,
    )


@pytest.fixture(scope="session")
def tflite_mlp(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _write_case(
        tmp_path_factory.mktemp("tflite"), "digits_mlp.tflite", "features", datasets.digits_tabular
    )
