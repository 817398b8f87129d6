"""A model with a rank-0 int64 input, from conversion to the device: bundle, smoke test, predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.agent.inference import Predictor
from edgefleet.agent.install.smoke import run_smoke_test
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import Versions
from edgefleet.agentconfig import InferenceSettings
from edgefleet.bundle import build_bundle
from edgefleet.converter import ConvertOptions, convert
from edgefleet.converter.data import load_dataset
from edgefleet.converter.modelinfo import load_onnx
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.fixtures.scalar_input import LEVELS, ScalarInputCase, write_case

PROFILE = "x86_64-vnni"
STATIC_QDQ = "static-qdq-u8s8-per-tensor-minmax"


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> ScalarInputCase:
    return write_case(tmp_path_factory.mktemp("scalar-input"))


def test_a_scalar_entry_is_fed_as_an_array_of_rank_0(case: ScalarInputCase) -> None:
    _, info = load_onnx(case.model)
    feed = load_dataset(case.calibration, info.inputs).sample(3)
    assert type(feed["levels"]) is np.ndarray and feed["levels"].shape == ()
    assert feed["pixels"].shape == (1, 64)


def test_scalar_input_converts_and_is_served_on_the_device(
    case: ScalarInputCase, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    out = tmp_path / "out"
    result = convert(
        case.model,
        out,
        ConvertOptions(
            target=PROFILE,
            calibration=case.calibration,
            validation=case.validation,
            labels=case.labels,
            candidate=STATIC_QDQ,
        ),
    )
    assert result.chosen.candidate.name == STATIC_QDQ
    assert result.chosen.metrics["accuracy"] > 90
    schema = json.loads((out / "schema.json").read_text())
    assert {i["name"]: i["shape"] for i in schema["inputs"]} == {
        "pixels": ["batch", 64],
        "levels": [],
    }

    bundle = tmp_path / "scaled-digits.efb"
    build_bundle(out, bundle, name="scaled-digits", version="1.0.0", keys=[keyset.release])
    layout = StateLayout(tmp_path / "state")
    layout.create()
    versions = Versions(layout, keep=3)
    staged = versions.stage(bundle, trust)
    run_smoke_test(staged.directory)  # raises SmokeTestError when a sample does not reproduce
    versions.activate(staged)

    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    with np.load(case.validation) as data:
        pixels = data["pixels"][:20]
    reference = ort.InferenceSession(str(case.model), providers=["CPUExecutionProvider"])
    (float_labels,) = reference.run(["label"], {"pixels": pixels, "levels": np.array(LEVELS)})
    for levels in (LEVELS, np.int64(LEVELS), np.array(LEVELS, dtype=np.int32)):
        prediction = predictor.predict({"pixels": pixels, "levels": levels})
        assert prediction.step == "primary"
        assert (prediction.outputs["label"] == float_labels).mean() >= 0.9
    # The scalar is really used: other levels give other probabilities.
    right = predictor.predict({"pixels": pixels, "levels": LEVELS}).outputs["probabilities"]
    wrong = predictor.predict({"pixels": pixels, "levels": 4}).outputs["probabilities"]
    assert np.abs(right - wrong).max() > 0.1
