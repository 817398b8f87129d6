"""drift-features.json: which per-sample features each kind of tensor gives, and lenient reading."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import AliasChoices, ConfigDict, Field

from edgefleet import driftfeatures
from edgefleet.drift import (
    REFERENCE_FILE,
    DriftReference,
    FeatureReference,
    count_into,
    quantile_edges,
)
from edgefleet.driftfeatures import (
    FEATURES_FILE,
    MAX_CLASSES,
    MAX_SUMMARY_VALUES,
    DriftFeature,
    DriftFeatures,
    LenientThresholds,
    TensorLayout,
    as_samples,
    load_reference,
    plan_tensor,
    sample_values,
    summary_stride,
)


def summaries(
    shape: tuple[int, ...], kind: str = "f", *, output: bool = False, batched: bool = True
) -> tuple[str, ...]:
    plan = plan_tensor("t", shape, kind, batched, channels_first=True, output=output)
    assert plan is not None
    return plan.summaries


@pytest.mark.parametrize(
    ("shape", "output", "expected"),
    [
        ((64,), False, ("value",)),  # tabular: one value per column
        ((), False, ("value",)),  # a scalar
        ((1, 32, 32), False, ("mean", "std")),  # an image: per channel
        ((3, 224, 224), False, ("mean", "std")),
        ((100, 3), False, ("mean", "std")),  # a sequence: per channel over time
        ((1,), True, ("value",)),  # a regression output
        ((10,), True, ("top1", "confidence")),  # class scores
        ((1, 10), True, ("top1", "confidence")),  # class scores with an inner axis of 1
        ((MAX_CLASSES + 1,), True, ("confidence",)),
        ((4, 8), True, ("mean", "std")),  # neither scores nor one value: summarized
    ],
)
def test_each_kind_of_tensor_gets_per_sample_features(
    shape: tuple[int, ...], output: bool, expected: tuple[str, ...]
) -> None:
    assert summaries(shape, output=output) == expected


def test_integer_outputs_are_values_not_class_scores() -> None:
    assert summaries((10,), "i", output=True) == ("value",)


def test_image_summaries_are_each_samples_channel_mean_and_spread() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 3, 4, 4))
    plan = plan_tensor("image", (3, 4, 4), "f", True, channels_first=True, output=False)
    assert plan is not None
    layout = plan.layout
    means = sample_values(images, layout, "mean")
    spreads = sample_values(images, layout, "std")
    assert means is not None and spreads is not None
    np.testing.assert_allclose(means, images.mean(axis=(2, 3)))
    np.testing.assert_allclose(spreads, images.std(axis=(2, 3)))
    assert sample_values(images, layout, "value") is None  # 16 values per channel: no single value


def test_large_images_are_summarized_from_a_strided_subsample() -> None:
    stride = summary_stride(32 * 32, 32)
    assert stride == 5  # 205 of 1024 pixels: ceil(1024 / 256) = 4 shares a factor with 32
    assert math.gcd(stride, 32) == 1 and len(range(0, 1024, stride)) <= MAX_SUMMARY_VALUES
    assert summary_stride(100, 10) == 1  # small enough: every value
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 2, 32, 32))
    layout = TensorLayout(tensor="image", batched=True, rank=3, axis=0, width=2)
    means = sample_values(images, layout, "mean")
    assert means is not None
    picked = images.reshape(3, 2, -1)[:, :, ::stride]
    np.testing.assert_allclose(means, picked.mean(axis=2))


def test_a_tensor_without_batch_axis_is_one_sample() -> None:
    layout = TensorLayout(tensor="rate", batched=False, rank=0, axis=None, width=None)
    rows = as_samples(np.array(8000.0), layout)
    assert rows is not None
    values = sample_values(rows, layout, "value")
    assert values is not None and values.tolist() == [[8000.0]]
    state = TensorLayout(tensor="state", batched=False, rank=2, axis=1, width=4)
    assert as_samples(np.zeros((2, 4)), state) is not None
    assert as_samples(np.zeros((2, 5)), state) is None  # another feature count: not counted


def test_class_scores_give_top1_and_confidence() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    layout = TensorLayout(tensor="p", batched=True, rank=1, axis=0, width=3)
    top1 = sample_values(scores, layout, "top1")
    confidence = sample_values(scores, layout, "confidence")
    assert top1 is not None and top1.ravel().tolist() == [1.0, 0.0]
    assert confidence is not None and confidence.ravel().tolist() == [0.7, 0.5]


def _features_document(values: np.ndarray) -> dict[str, object]:
    edges = quantile_edges(values)
    return {
        "schema_version": 2,
        "samples": len(values),
        "bins": 10,
        "tensors": [{"tensor": "x", "batched": True, "rank": 1, "axis": 0, "width": 1}],
        "inputs": [
            {
                "name": "x[0]",
                "tensor": "x",
                "index": 0,
                "summary": "value",
                "histogram": count_into(values, edges).model_dump(),
                "thresholds": {"false_alarm": 0.01, "by_window": {"50": 30.0}},
            }
        ],
        "outputs": [],
    }


def _v1_document(values: np.ndarray) -> dict[str, object]:
    edges = quantile_edges(values)
    return {
        "schema_version": 1,
        "samples": len(values),
        "bins": 10,
        "feature_axes": {"x": 0},
        "inputs": [
            {
                "name": "x[0]",
                "tensor": "x",
                "index": 0,
                "histogram": count_into(values, edges).model_dump(),
            }
        ],
        "outputs": [],
    }


def test_features_file_is_preferred_over_the_first_format(tmp_path: Path) -> None:
    values = np.arange(100.0)
    (tmp_path / FEATURES_FILE).write_text(json.dumps(_features_document(values)))
    (tmp_path / REFERENCE_FILE).write_text(json.dumps(_v1_document(values)))
    reference, notes = load_reference(tmp_path)
    assert isinstance(reference, DriftFeatures) and notes == []
    assert reference.inputs[0].thresholds is not None


def test_a_bundle_with_the_first_format_only_still_gives_its_reference(tmp_path: Path) -> None:
    (tmp_path / REFERENCE_FILE).write_text(json.dumps(_v1_document(np.arange(100.0))))
    reference, notes = load_reference(tmp_path)
    assert isinstance(reference, DriftReference) and notes == []
    assert load_reference(tmp_path / "missing") == (None, [])


def test_an_unusable_features_file_falls_back_to_the_first_format(tmp_path: Path) -> None:
    (tmp_path / FEATURES_FILE).write_text("{not json")
    (tmp_path / REFERENCE_FILE).write_text(json.dumps(_v1_document(np.arange(100.0))))
    reference, notes = load_reference(tmp_path)
    assert isinstance(reference, DriftReference)
    assert len(notes) == 1 and FEATURES_FILE in notes[0]


def test_a_newer_features_file_is_read_as_far_as_it_is_understood(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driftfeatures, "_reported_versions", set())
    document = _features_document(np.arange(100.0))
    document["schema_version"] = 3
    document["released_with"] = "a field this agent does not know"
    inputs = document["inputs"]
    assert isinstance(inputs, list)
    known = inputs[0]
    newer = {**known, "name": "x[0].skew", "summary": "skew", "extra": 1}
    newer["histogram"] = {**known["histogram"], "weights": [1.0]}
    newer["thresholds"] = {**known["thresholds"], "method": "newer"}
    document["inputs"] = [known, newer]
    (tmp_path / FEATURES_FILE).write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="edgefleet.driftfeatures"):
        first, _ = load_reference(tmp_path)
        second, _ = load_reference(tmp_path)
    assert isinstance(first, DriftFeatures) and first == second
    assert [f.name for f in first.inputs] == ["x[0]"]  # the unknown summary is left out
    assert first.inputs[0].thresholds is not None  # unknown threshold fields ignored
    warnings = [r for r in caplog.records if "schema_version 3" in r.getMessage()]
    assert len(warnings) == 1  # logged once


def test_thresholds_written_before_they_named_a_statistic_are_read_as_the_plain_sum(
    tmp_path: Path,
) -> None:
    (tmp_path / FEATURES_FILE).write_text(json.dumps(_features_document(np.arange(100.0))))
    reference, _ = load_reference(tmp_path)
    assert isinstance(reference, DriftFeatures)
    thresholds = reference.inputs[0].thresholds
    assert thresholds is not None and thresholds.statistic == "sum"


def test_thresholds_of_a_statistic_this_version_does_not_know_leave_the_feature_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driftfeatures, "_reported_statistics", set())
    document = _features_document(np.arange(100.0))
    inputs = document["inputs"]
    assert isinstance(inputs, list)
    known = inputs[0]
    newer = {**known, "name": "x[1]", "index": 1}
    del known["thresholds"], newer["thresholds"]
    known["statistic_thresholds"] = {"false_alarm": 0.01, "by_window": {"50": 30.0}}
    newer["drift_thresholds"] = {"false_alarm": 0.01, "by_window": {"50": 3.0}, "statistic": "new"}
    document["inputs"] = [known, newer, {**newer, "name": "x[2]", "index": 2}]
    (tmp_path / FEATURES_FILE).write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="edgefleet.driftfeatures"):
        reference, notes = load_reference(tmp_path)
    assert isinstance(reference, DriftFeatures) and notes == []
    assert [f.name for f in reference.inputs] == ["x[0]", "x[1]", "x[2]"]  # all still counted
    first, *newer_ones = reference.inputs
    assert first.thresholds is not None and first.thresholds.by_window == {50: 30.0}
    assert all(f.thresholds is None for f in newer_ones)  # not judged with another statistic
    warnings = [r for r in caplog.records if "'new'" in r.getMessage()]
    assert len(warnings) == 1  # logged once per statistic


class ReaderBeforeNamedThresholds(FeatureReference):
    """DriftFeature as readers that predate the statistic's name read it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    summary: str
    thresholds: LenientThresholds | None = None


def test_thresholds_are_hidden_from_readers_that_predate_their_statistic() -> None:
    values = np.arange(100.0)
    named = LenientThresholds(
        false_alarm=0.01,
        by_window={50: -0.5},
        tail={50: 1.0},
        statistic="tail-max",
        part_scales=(3.0, 2.0),
        part_levels=(9.0, 5.0),
    )
    feature = DriftFeature(
        name="x[0]",
        tensor="x",
        index=0,
        summary="value",
        histogram=count_into(values, quantile_edges(values)),
        thresholds=named,
    )
    written = feature.model_dump_json()
    assert DriftFeature.model_validate_json(written).thresholds == named
    before = ReaderBeforeNamedThresholds.model_validate_json(written)
    assert before.histogram == feature.histogram and before.thresholds is None
    before_any_statistic = ReaderBeforeAnyStatistic.model_validate_json(written)
    assert before_any_statistic.histogram == feature.histogram
    assert before_any_statistic.thresholds is None


class ReaderBeforeAnyStatistic(FeatureReference):
    """DriftFeature as readers before `drift_thresholds` read it: the earlier keys only."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    summary: str
    thresholds: LenientThresholds | None = Field(
        default=None, validation_alias=AliasChoices("statistic_thresholds", "thresholds")
    )
