"""drift-features.json from real conversions: per-sample features, thresholds, the report, and
drift-reference.json unchanged for the agents that only read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.converter import ConvertOptions, convert
from edgefleet.converter.reference import (
    FALSE_ALARM,
    MIN_REFERENCE_SAMPLES,
    SPREAD_REFERENCE_SAMPLES,
    WINDOW_SIZES,
    small_reference_note,
)
from edgefleet.drift import REFERENCE_FILE, count_into
from edgefleet.driftfeatures import FEATURES_FILE, DriftFeatures, sample_values
from tests.converter.conftest import Case
from tests.fixtures.scalar_input import LEVELS, write_case

# The keys of drift-reference.json that agents reading only it (extra fields forbidden) accept.
V1_KEYS = {"schema_version", "samples", "bins", "feature_axes", "inputs", "outputs"}
V1_FEATURE_KEYS = {"name", "tensor", "index", "histogram"}
V1_HISTOGRAM_KEYS = {"edges", "counts", "below", "above", "nan"}


def converted(case: Case, out: Path) -> Path:
    options = ConvertOptions(
        target="x86_64-vnni",
        calibration=case.calibration,
        validation=case.validation,
        candidate="float",
    )
    convert(case.model, out, options)
    return out


def features_of(out: Path) -> DriftFeatures:
    return DriftFeatures.model_validate_json((out / FEATURES_FILE).read_bytes())


@pytest.fixture(scope="module")
def cnn_out(cnn: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted(cnn, tmp_path_factory.mktemp("cnn") / "out")


def test_image_inputs_are_summarized_per_sample_and_scores_give_class_and_confidence(
    cnn: Case, cnn_out: Path
) -> None:
    reference = features_of(cnn_out)
    assert [(f.name, f.summary) for f in reference.inputs] == [
        ("image[0].mean", "mean"),
        ("image[0].std", "std"),
    ]
    assert [(f.name, f.summary) for f in reference.outputs] == [
        ("logits.top1", "top1"),
        ("logits.confidence", "confidence"),
    ]
    # One count per sample (not per pixel), from the converter's reference data.
    for feature in [*reference.inputs, *reference.outputs]:
        histogram = feature.histogram
        assert sum(histogram.counts) + histogram.below + histogram.above == reference.samples
    top1 = reference.outputs[0].histogram
    assert len(top1.counts) == 10 and min(top1.counts) > 0  # one bin per digit class
    # The counts are each sample's channel mean, binned.
    with np.load(cnn.calibration) as calibration, np.load(cnn.validation) as validation:
        images = np.concatenate([calibration["image"], validation["image"]])
    layout = reference.tensors[0]
    means = sample_values(images, layout, "mean")
    assert means is not None
    mean_feature = reference.inputs[0]
    assert count_into(means[:, 0], mean_feature.histogram.edges) == mean_feature.histogram


def test_every_feature_carries_thresholds_calibrated_per_window_size(cnn_out: Path) -> None:
    reference = features_of(cnn_out)
    for feature in [*reference.inputs, *reference.outputs]:
        thresholds = feature.thresholds
        assert thresholds is not None, feature.name
        assert thresholds.false_alarm == FALSE_ALARM
        assert sorted(thresholds.by_window) == list(WINDOW_SIZES)
        assert all(value > 0 for value in thresholds.by_window.values())


def test_the_report_says_which_features_exist_and_why(cnn_out: Path) -> None:
    report = json.loads((cnn_out / "report.json").read_text())
    rows = {row["tensor"]: row for row in report["drift_features"]}
    assert rows["image"]["features"] == ["image[0].mean", "image[0].std"]
    assert "not independent" in rows["image"]["why"]
    assert "top-1 class" in rows["logits"]["why"]
    table = (cnn_out / "report.txt").read_text()
    assert "drift features" in table
    assert "image: image[0].mean, image[0].std:" in table


def test_the_first_format_is_still_written_unchanged(cnn_out: Path) -> None:
    document = json.loads((cnn_out / REFERENCE_FILE).read_text())
    assert set(document) == V1_KEYS and document["schema_version"] == 1
    for feature in [*document["inputs"], *document["outputs"]]:
        assert set(feature) == V1_FEATURE_KEYS
        assert set(feature["histogram"]) == V1_HISTOGRAM_KEYS
    assert [f["name"] for f in document["inputs"]] == ["image[0]"]  # pooled pixels, as before


def test_tabular_columns_and_regression_outputs_are_values(regressor: Case, tmp_path: Path) -> None:
    reference = features_of(converted(regressor, tmp_path / "out"))
    assert {f.summary for f in reference.inputs} == {"value"}
    assert [f.name for f in reference.inputs][:2] == ["features[0]", "features[1]"]
    assert [f.summary for f in reference.outputs] == ["value"]


def test_sequence_inputs_are_summarized_per_channel_over_time(gru: Case, tmp_path: Path) -> None:
    reference = features_of(converted(gru, tmp_path / "out"))
    (layout, *_) = reference.tensors
    assert layout.tensor == "rows" and layout.axis == layout.rank - 1
    assert {f.summary for f in reference.inputs} == {"mean", "std"}
    assert len(reference.inputs) == 2 * (layout.width or 0)


def test_a_scalar_input_is_one_value_per_request(tmp_path: Path) -> None:
    case = write_case(tmp_path / "case")
    out = tmp_path / "out"
    options = ConvertOptions(
        target="x86_64-vnni",
        calibration=case.calibration,
        validation=case.validation,
        candidate="float",
    )
    convert(case.model, out, options)
    reference = features_of(out)
    layouts = {layout.tensor: layout for layout in reference.tensors}
    assert not layouts["levels"].batched and layouts["levels"].rank == 0
    assert layouts["pixels"].batched
    (levels,) = [f for f in reference.inputs if f.tensor == "levels"]
    assert levels.summary == "value"
    assert levels.histogram.edges == [LEVELS, LEVELS]
    assert levels.histogram.counts == [reference.samples]


def test_a_reference_too_small_for_drift_checks_is_noted_in_the_report(
    regressor: Case, cnn_out: Path, tmp_path: Path
) -> None:
    small = converted(regressor, tmp_path / "out")  # diabetes: 44 + 89 samples
    [note] = [n for n in json.loads((small / "report.json").read_text())["notes"] if "drift" in n]
    assert note.startswith("drift reference from 133 samples")
    assert f"at least {MIN_REFERENCE_SAMPLES} samples" in note
    assert "change of spread" in note
    large = json.loads((cnn_out / "report.json").read_text())  # digits: 180 + 360 samples
    assert not any(n.startswith("drift reference from") for n in large["notes"])


def test_a_reference_too_small_for_changes_of_spread_is_noted_without_the_false_alarm_warning() -> (
    None
):
    note = small_reference_note(SPREAD_REFERENCE_SAMPLES - 1)
    assert note is not None
    assert note.startswith(f"drift reference from {SPREAD_REFERENCE_SAMPLES - 1} samples")
    assert "change of spread" in note and "false" not in note and "alarms" not in note
    assert f"at least {SPREAD_REFERENCE_SAMPLES} samples" in note
    assert "alarms" in (small_reference_note(MIN_REFERENCE_SAMPLES - 1) or "")
    assert small_reference_note(SPREAD_REFERENCE_SAMPLES) is None
