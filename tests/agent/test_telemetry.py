"""Telemetry windows: counts in exactly the bundle's reference bins, and live health counters."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.agent.inference import Prediction
from edgefleet.agent.inference.loaded import RuntimeSettings, load_version
from edgefleet.agent.install.interfaces import HealthProbe
from edgefleet.agent.telemetry import (
    DEFAULT_LATENCY_BOUNDS_MS,
    FLUSH_REQUESTS,
    LATENCY_RING,
    TelemetryRecorder,
)
from edgefleet.converter import ConvertOptions, convert
from edgefleet.drift import REFERENCE_FILE, DriftReference, count_into
from edgefleet.driftfeatures import (
    FEATURES_FILE,
    AnyReference,
    DriftFeature,
    DriftFeatures,
    load_reference,
    sample_values,
)
from edgefleet.mqtt.messages import BinCounts, TelemetryWindow, encode_message, parse_message
from tests.agent.conftest import Bundles
from tests.fixtures.scalar_input import LEVELS, write_case

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def reference(bundle: Path) -> DriftReference:
    return DriftReference.model_validate_json((bundle / REFERENCE_FILE).read_bytes())


def recorder(
    ref: AnyReference | None, latency_bounds_ms: tuple[float, ...] = DEFAULT_LATENCY_BOUNDS_MS
) -> TelemetryRecorder:
    return TelemetryRecorder(
        "cam-01",
        ref,
        60,
        latency_bounds_ms,
        bundle_name="digits",
        bundle_version="1.0.0",
        now=T0,
    )


def answer(outputs: dict[str, np.ndarray], step: str = "primary", ms: float = 1.0) -> Prediction:
    return Prediction(outputs, step, "digits@1.0.0", ms)  # type: ignore[arg-type]


def close(rec: TelemetryRecorder, seconds: int = 60) -> TelemetryWindow:
    window = rec.close_window(T0 + dt.timedelta(seconds=seconds))
    assert window is not None
    return window


def awkward_features(ref: DriftReference, rng: np.random.Generator, rows: int) -> np.ndarray:
    """MLP inputs around and on the reference edges, with NaN and infinities."""
    features = rng.uniform(-0.3, 1.3, size=(rows, 64))
    for feature in ref.inputs:
        assert feature.index is not None
        edges = feature.histogram.edges
        features[: len(edges), feature.index] = edges  # every edge exactly, the last included
    features[-1, 5] = np.nan
    features[-2, 6] = np.inf
    features[-3, 7] = -np.inf
    return features


def test_counts_match_the_converters_binning_exactly(bundles: Bundles) -> None:
    ref = reference(bundles.mlp)
    rec = recorder(ref)
    rng = np.random.default_rng(3)
    batches = (1, 3, 1, 7) * 100  # more than FLUSH_REQUESTS requests: several flushes
    every = awkward_features(ref, rng, sum(batches)).astype(np.float32)
    cuts = np.cumsum(batches)[:-1]
    sent_inputs, sent_probabilities, sent_labels = [], [], []
    for batch, features in zip(batches, np.split(every, cuts), strict=True):
        probabilities = rng.dirichlet(np.ones(10), size=batch).astype(np.float32)
        labels = probabilities.argmax(1).astype(np.int64)
        rec.record(
            answer({"label": labels, "probabilities": probabilities}),
            {"features": features},
            {"label": labels, "probabilities": probabilities},
        )
        sent_inputs.append(features)
        sent_probabilities.append(probabilities)
        sent_labels.append(labels)
    window = close(rec)
    inputs = np.concatenate(sent_inputs)
    outputs = {
        "probabilities": np.concatenate(sent_probabilities),
        "label": np.concatenate(sent_labels),
    }
    for feature in ref.inputs:
        expected = count_into(inputs[:, feature.index], feature.histogram.edges)
        got = window.inputs[feature.name]
        assert (got.counts, got.below, got.above, got.nan) == (
            expected.counts,
            expected.below,
            expected.above,
            expected.nan,
        ), feature.name
    for feature in ref.outputs:
        values = outputs[feature.tensor]
        values = values if feature.index is None else values[:, feature.index]
        expected = count_into(values, feature.histogram.edges)
        got = window.outputs[feature.name]
        assert (got.counts, got.below, got.above, got.nan) == (
            expected.counts,
            expected.below,
            expected.above,
            expected.nan,
        ), feature.name
    assert window.requests == 400
    assert window.inputs["features[5]"].nan > 0


def test_image_values_are_a_fixed_strided_subsample(bundles: Bundles) -> None:
    ref = reference(bundles.cnn)
    rec = recorder(ref)
    rng = np.random.default_rng(0)
    batches = [1, 2, 1, 5] * 80
    for batch in batches:
        image = rng.uniform(-0.5, 1.5, size=(batch, 1, 32, 32)).astype(np.float32)
        image[0, 0, 0, 0] = np.nan
        logits = rng.normal(size=(batch, 10)).astype(np.float32)
        rec.record(answer({"logits": logits}), {"image": image}, {"logits": logits})
    window = close(rec)
    image_counts = window.inputs["image[0]"]
    total = sum(image_counts.counts) + image_counts.nan + image_counts.below + image_counts.above
    # 32 of each image's 1024 pixels (stride 33, coprime with the row width 32).
    assert total == sum(len(range(0, 1024 * b, 33)) for b in batches)
    assert image_counts.nan == len(batches)  # flat index 0 is always picked
    assert image_counts.below > 0 and image_counts.above > 0
    for name, counts in window.outputs.items():
        assert sum(counts.counts) + counts.nan + counts.below + counts.above == sum(batches), name


def test_inputs_reused_by_the_caller_after_the_call_are_counted_as_they_were(
    bundles: Bundles,
) -> None:
    ref = reference(bundles.cnn)
    rec = recorder(ref)
    buffer = np.zeros((1, 1, 32, 32), np.float32)  # a camera loop writes into one buffer
    logits = np.zeros((1, 10), np.float32)
    for _ in range(10):
        buffer[:] = 0.5  # the frame
        logits[:] = 0.0
        rec.record(answer({"logits": logits}), {"image": buffer}, {"logits": logits})
        buffer[:] = 7.0  # the camera writes the next frame before telemetry bins the last
        logits[:] = 99.0
    window = close(rec)
    assert window.inputs["image[0]"].above == 0  # 7.0 was never an input when recorded
    assert window.outputs["logits[0]"].above == 0


def test_window_counts_requests_errors_fallbacks_and_violations() -> None:
    rec = recorder(None)
    out = {"y": np.ones((1, 1), np.float32)}
    rec.record(answer(out, "primary"), {}, out)
    rec.record(answer(out, "float"), {}, out)
    rec.record(answer(out, "previous"), {}, out)
    rec.record(answer(out, "default"), {}, out)
    rec.record_error()
    rec.record_schema_violation()
    rec.record_schema_violation()
    window = close(rec)
    assert (window.requests, window.errors, window.fallbacks, window.schema_violations) == (
        7,
        1,
        3,
        2,
    )
    assert sum(window.latency.counts) == 4  # answered requests only
    assert window.inputs == {} and window.outputs == {}  # no reference: no bins
    assert window.shadow is None and window.labelled is None


def test_latency_histogram_buckets() -> None:
    rec = recorder(None, latency_bounds_ms=(1.0, 10.0))
    out: dict[str, np.ndarray] = {}
    for ms in (0.2, 1.0, 1.01, 10.0, 11.0, 5000.0):
        rec.record(answer(out, ms=ms), {}, out)
    window = close(rec)
    assert window.latency.bounds_ms == [1.0, 10.0]
    assert window.latency.counts == [2, 2, 2]  # at or below each bound, then above all


def test_default_answers_are_not_counted_into_output_bins(bundles: Bundles) -> None:
    rec = recorder(reference(bundles.cnn))
    image = np.full((1, 1, 32, 32), 0.5, np.float32)
    logits = np.zeros((1, 10), np.float32)
    rec.record(answer({"logits": logits}, "default"), {"image": image}, {"logits": logits})
    window = close(rec)
    assert sum(window.inputs["image[0]"].counts) == 32
    assert all(sum(c.counts) + c.below + c.above == 0 for c in window.outputs.values())


def test_shadow_and_labels() -> None:
    rec = recorder(None)
    for agreed in (True, True, False):
        rec.record_shadow(agreed)
    rec.record_label(correct=True)
    rec.record_label(correct=False)
    rec.record_label(error=-0.5)
    rec.record_label(error=1.5)
    window = close(rec)
    assert window.shadow is not None and window.labelled is not None
    assert (window.shadow.requests, window.shadow.agreements) == (3, 2)
    # Regression feedback counts as labelled and travels as error sums.
    assert (window.labelled.count, window.labelled.correct) == (4, 1)
    assert (window.labelled.abs_error, window.labelled.squared_error) == (2.0, 2.5)
    assert rec.counters()["mean_abs_error"] == 1.0


def test_windows_follow_each_other_and_parse_as_messages(bundles: Bundles) -> None:
    rec = recorder(reference(bundles.mlp))
    features = np.full((1, 64), 0.5, np.float32)
    out = {"label": np.array([1]), "probabilities": np.full((1, 10), 0.1, np.float32)}
    rec.record(answer(out), {"features": features}, out)
    assert not rec.is_due(T0 + dt.timedelta(seconds=59))
    assert rec.is_due(T0 + dt.timedelta(seconds=60))
    first = close(rec, 60)
    second = close(rec, 120)
    assert (first.window_start, first.window_end) == (
        "2026-03-01T12:00:00Z",
        "2026-03-01T12:01:00Z",
    )
    assert (second.window_start, second.window_end) == (
        "2026-03-01T12:01:00Z",
        "2026-03-01T12:02:00Z",
    )
    assert second.requests == 0 and sum(second.inputs["features[0]"].counts) == 0
    assert parse_message(TelemetryWindow, encode_message(first)) == first
    # A window closed within the second it opened still lasts one second.
    third = rec.close_window(T0 + dt.timedelta(seconds=120, milliseconds=300))
    assert third is not None and third.window_end == "2026-03-01T12:02:01Z"


def test_no_window_before_a_model_is_set() -> None:
    rec = TelemetryRecorder("cam-01", None, 60)
    assert rec.close_window(T0) is None
    rec.set_model("digits", "1.0.0", None, now=T0)
    window = rec.close_window(T0 + dt.timedelta(seconds=5))
    assert window is not None and window.bundle_version == "1.0.0"


def test_a_model_switch_ends_the_window_early_and_loses_nothing(bundles: Bundles) -> None:
    rec = recorder(reference(bundles.cnn))
    logits = np.zeros((1, 10), np.float32)
    image = np.full((1, 1, 32, 32), 0.5, np.float32)
    rec.record(answer({"logits": logits}), {"image": image}, {"logits": logits})
    rec.set_model("digits", "2.0.0", reference(bundles.cnn), now=T0 + dt.timedelta(seconds=20))
    rec.record(answer({"logits": logits}), {"image": image}, {"logits": logits})
    rec.record(answer({"logits": logits}), {"image": image}, {"logits": logits})
    old = close(rec, 60)
    new = close(rec, 60)
    assert (old.bundle_version, old.requests, old.window_end) == (
        "1.0.0",
        1,
        "2026-03-01T12:00:20Z",
    )
    assert (new.bundle_version, new.requests, new.window_start) == (
        "2.0.0",
        2,
        "2026-03-01T12:00:20Z",
    )
    assert sum(new.inputs["image[0]"].counts) == 64


def test_out_of_range_inputs_are_a_warning_counter(bundles: Bundles) -> None:
    rec = recorder(reference(bundles.cnn))
    logits = np.zeros((1, 10), np.float32)
    inside = np.full((1, 1, 32, 32), 1.05, np.float32)  # above 1.0, within the 10% margin
    outside = np.full((1, 1, 32, 32), 5.0, np.float32)
    rec.record(answer({"logits": logits}), {"image": inside}, {"logits": logits})
    rec.record(answer({"logits": logits}), {"image": outside}, {"logits": logits})
    window = close(rec)
    assert window.inputs["image[0]"].above == 64
    assert rec.counters()["out_of_range"] == 32


def test_health_snapshot_since_a_mark() -> None:
    rec = recorder(None)
    out: dict[str, np.ndarray] = {}
    rec.record(answer(out, ms=500.0), {}, out)  # before the mark: not in the snapshot
    probe: HealthProbe = rec
    mark = probe.mark()
    for ms in range(1, 101):
        rec.record(answer(out, "float" if ms % 10 == 0 else "primary", float(ms)), {}, out)
    rec.record_error()
    rec.record_schema_violation()
    snapshot = probe.since(mark)
    assert (snapshot.requests, snapshot.errors, snapshot.fallbacks) == (102, 2, 10)
    assert snapshot.latency_p95_ms == pytest.approx(95.05)
    empty = rec.snapshot_since(rec.mark())
    assert (empty.requests, empty.latency_p95_ms) == (0, None)
    # The counters run across windows.
    close(rec)
    assert rec.snapshot_since(mark).requests == 102


def test_health_snapshot_has_the_median_latency_per_sample() -> None:
    """The health check's measurement of the model: each call's latency over its samples."""
    rec = recorder(None)
    out: dict[str, np.ndarray] = {}
    mark = rec.mark()
    assert rec.snapshot_since(mark).sample_ms is None
    for samples, ms in ((360, 720.0), (1, 3.0), (16, 32.0), (4, 8.0), (1, 50.0)):
        batch = {"features": np.zeros((samples, 64), np.float32)}
        rec.record(answer(out, ms=ms), batch, out)
    rec.record(answer(out, ms=9.0), {"threshold": np.float32(0.5)}, out)  # rank 0: one sample
    # per sample: 2, 3, 2, 2, 50, 9 -> median 2.5
    assert rec.snapshot_since(mark).sample_ms == pytest.approx(2.5)


def test_latency_p95_uses_the_most_recent_calls() -> None:
    rec = recorder(None)
    out: dict[str, np.ndarray] = {}
    mark = rec.mark()
    for _ in range(LATENCY_RING):
        rec.record(answer(out, ms=1000.0), {}, out)
    for _ in range(LATENCY_RING):
        rec.record(answer(out, ms=1.0), {}, out)
    snapshot = rec.snapshot_since(mark)
    assert snapshot.requests == 2 * LATENCY_RING
    assert snapshot.latency_p95_ms == 1.0


def test_recording_from_many_threads_loses_nothing(bundles: Bundles) -> None:
    rec = recorder(reference(bundles.cnn))
    image = np.full((1, 1, 32, 32), 0.5, np.float32)
    logits = np.zeros((1, 10), np.float32)

    def work() -> None:
        for _ in range(FLUSH_REQUESTS):
            rec.record(answer({"logits": logits}), {"image": image}, {"logits": logits})
            rec.record_shadow(True)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window = close(rec)
    assert window.requests == 4 * FLUSH_REQUESTS
    assert window.shadow is not None and window.shadow.requests == 4 * FLUSH_REQUESTS
    assert sum(window.inputs["image[0]"].counts) == 4 * FLUSH_REQUESTS * 32


# --- drift-features.json: per-sample features, preferred when the bundle carries them ------------


def features_reference(bundle: Path) -> DriftFeatures:
    reference, notes = load_reference(bundle)
    assert isinstance(reference, DriftFeatures) and notes == []
    return reference


def expected_counts(feature: DriftFeature, values: np.ndarray) -> tuple[list[int], int, int, int]:
    histogram = count_into(values, feature.histogram.edges)
    return histogram.counts, histogram.below, histogram.above, histogram.nan


def got_counts(counts: BinCounts) -> tuple[list[int], int, int, int]:
    return counts.counts, counts.below, counts.above, counts.nan


def cnn_images(bundles: Bundles) -> np.ndarray:
    with np.load(bundles.cnn / "smoke.npz") as smoke:
        head = smoke["input/image"]
    rng = np.random.default_rng(5)
    # The smoke images and noisy variants of them: real digits the model answers.
    noisy = head[rng.integers(0, len(head), 300)] + rng.normal(0, 0.05, (300, *head.shape[1:]))
    return np.concatenate([head, noisy]).astype(np.float32)


def test_image_windows_count_the_converters_per_sample_summaries(bundles: Bundles) -> None:
    ref = features_reference(bundles.cnn)
    session = ort.InferenceSession(
        str(bundles.cnn / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    images = cnn_images(bundles)
    rec = recorder(ref)
    batches = np.split(images, np.cumsum([1, 3, 1, 7] * 20))  # several flushes, varied batches
    logits = []
    for batch in batches:
        (out,) = session.run(["logits"], {"image": batch})
        rec.record(answer({"logits": out}), {"image": batch}, {"logits": out})
        logits.append(out)
    window = close(rec)
    assert set(window.inputs) == {"image[0].mean", "image[0].std"}
    assert set(window.outputs) == {"logits.top1", "logits.confidence"}
    layouts = {layout.tensor: layout for layout in ref.tensors}
    stacked = {"image": images, "logits": np.concatenate(logits)}
    for feature in [*ref.inputs, *ref.outputs]:
        values = sample_values(stacked[feature.tensor], layouts[feature.tensor], feature.summary)
        assert values is not None
        column = values[:, feature.index or 0]
        got = (window.inputs | window.outputs)[feature.name]
        assert got_counts(got) == expected_counts(feature, column), feature.name
        assert sum(got.counts) + got.below + got.above + got.nan == len(images)  # one per sample


def test_brighter_images_move_the_mean_feature(bundles: Bundles) -> None:
    ref = features_reference(bundles.cnn)
    images = cnn_images(bundles)
    windows = []
    for shift in (0.0, 0.5):
        rec = recorder(ref)
        for batch in np.array_split(images + shift, 20):
            logits = np.zeros((len(batch), 10), np.float32)
            rec.record(answer({"logits": logits}), {"image": batch}, {"logits": logits})
        windows.append(close(rec).inputs["image[0].mean"])
    plain, brighter = windows
    top_bins = plain.counts[-1] + plain.above, brighter.counts[-1] + brighter.above
    assert top_bins[1] > 2 * top_bins[0]
    assert brighter.above > plain.above


@pytest.fixture(scope="module")
def scalar_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scalar")
    case = write_case(root / "case")
    out = root / "out"
    options = ConvertOptions(
        target="x86_64-vnni",
        calibration=case.calibration,
        validation=case.validation,
        candidate="float",
    )
    convert(case.model, out, options)
    return out


def record_levels(ref: AnyReference, levels: int, requests: int) -> TelemetryWindow:
    rec = recorder(ref)
    pixels = np.full((3, 64), 8.0, np.float32)
    probabilities = np.full((3, 10), 0.1, np.float32)
    outputs: dict[str, np.ndarray] = {
        "label": np.zeros(3, np.int64),
        "probabilities": probabilities,
    }
    for _ in range(requests):
        rec.record(answer(outputs), {"pixels": pixels, "levels": np.array(levels)}, outputs)
    return close(rec)


def test_a_scalar_input_is_counted_once_per_request(scalar_bundle: Path) -> None:
    ref = features_reference(scalar_bundle)
    assert record_levels(ref, LEVELS, 5).inputs["levels"].counts == [5]
    halved = record_levels(ref, LEVELS // 2, 5).inputs["levels"]  # fed 8 against 16
    assert (halved.counts, halved.below) == ([0], 5)
    pixel = record_levels(ref, LEVELS, 5).inputs["pixels[0]"]
    assert sum(pixel.counts) + pixel.below + pixel.above == 15  # per sample: 3 per request


def test_a_scalar_input_is_counted_with_the_first_format_too(scalar_bundle: Path) -> None:
    v1 = DriftReference.model_validate_json((scalar_bundle / REFERENCE_FILE).read_bytes())
    halved = record_levels(v1, LEVELS // 2, 5).inputs["levels"]
    assert (halved.counts, halved.below) == ([0], 5)


def test_a_bundle_with_the_first_format_only_is_still_counted(
    bundles: Bundles, tmp_path: Path
) -> None:
    old = tmp_path / "old-bundle"
    shutil.copytree(bundles.mlp, old)
    (old / FEATURES_FILE).unlink()
    settings = RuntimeSettings(
        threads=1,
        providers=("CPUExecutionProvider",),
        breaker_failures=3,
        breaker_reset_seconds=30,
        clock=time.monotonic,
    )
    loaded = load_version(old, settings)
    assert isinstance(loaded.reference, DriftReference)
    assert loaded.notes == []
    rec = recorder(loaded.reference)
    features = np.full((4, 64), 0.5, np.float32)
    probabilities = np.full((4, 10), 0.1, np.float32)
    outputs: dict[str, np.ndarray] = {
        "label": np.zeros(4, np.int64),
        "probabilities": probabilities,
    }
    rec.record(answer(outputs), {"features": features}, outputs)
    counts = close(rec).inputs["features[3]"]
    assert sum(counts.counts) + counts.below + counts.above == 4
    # The same bundle with drift-features.json: the per-sample features are preferred.
    assert isinstance(load_version(bundles.mlp, settings).reference, DriftFeatures)


def test_per_sample_features_count_inputs_as_they_were_when_recorded(bundles: Bundles) -> None:
    ref = features_reference(bundles.cnn)
    rec = recorder(ref)
    buffer = np.zeros((1, 1, 32, 32), np.float32)  # a camera loop writes into one buffer
    logits = np.zeros((1, 10), np.float32)
    for _ in range(10):
        buffer[:] = 0.0  # the frame
        logits[:] = 0.0
        rec.record(answer({"logits": logits}), {"image": buffer}, {"logits": logits})
        buffer[:] = 7.0  # the camera writes the next frame before telemetry summarizes the last
        logits[:] = 99.0
    window = close(rec)
    assert window.inputs["image[0].mean"].above == 0  # a mean of 7.0 was never an input
    assert window.outputs["logits.confidence"].above == 0


def test_images_of_mixed_dtypes_byte_orders_and_layouts_count_as_one_stack(
    bundles: Bundles,
) -> None:
    ref = features_reference(bundles.cnn)
    images = cnn_images(bundles)[:48]
    parts = [
        images[:8],  # float32, contiguous
        images[8:16].astype(np.float64),  # another dtype, the same per-sample shape
        images[16:24].astype(">f4"),  # another byte order
        np.asfortranarray(images[24:32]),  # not C-contiguous
        images[32:48][::2],  # a strided view
        images[:1],  # a batch of another size
    ]
    rec = recorder(ref)
    for part in parts:
        rec.record(answer({}), {"image": part}, {})
    rec.record(answer({}), {"image": images[:2, 0]}, {})  # no channel axis: skipped
    window = close(rec)
    layout = next(layout for layout in ref.tensors if layout.tensor == "image")
    stacked = np.concatenate(parts)  # as numpy promotes the dtypes: float64
    for feature in ref.inputs:
        values = sample_values(stacked, layout, feature.summary)
        assert values is not None
        got = window.inputs[feature.name]
        assert got_counts(got) == expected_counts(feature, values[:, feature.index or 0])
        assert sum(got.counts) + got.below + got.above + got.nan == len(stacked)


def test_latencies_are_bucketed_exactly_across_flushes_and_a_model_switch() -> None:
    bounds = (1.0, 10.0)
    rec = recorder(None, latency_bounds_ms=bounds)
    out: dict[str, np.ndarray] = {}
    first = [0.5, 1.0, 1.5, 10.0, 12.0] * (FLUSH_REQUESTS // 2)  # more than one flush
    second = [9.0, 10.0, 10.5] * 3
    for ms in first:
        rec.record(answer(out, ms=ms), {}, out)
    rec.set_model("digits", "2.0.0", None, now=T0 + dt.timedelta(seconds=5))
    for ms in second:
        rec.record(answer(out, ms=ms), {}, out)
    switched, running = close(rec), close(rec, seconds=70)

    def buckets(latencies: list[float]) -> list[int]:  # at or below each bound, then above
        return [
            sum(1 for ms in latencies if low < ms <= high)
            for low, high in zip((-np.inf, *bounds), (*bounds, np.inf), strict=True)
        ]

    assert switched.bundle_version == "1.0.0" and switched.latency.counts == buckets(first)
    assert running.bundle_version == "2.0.0" and running.latency.counts == buckets(second)
