"""The call limit: scaled with the batch from the time per sample this device measured.

Real onnxruntime sessions and the converted CNN; the margins are wide (an order
of magnitude) so that a loaded machine does not change an outcome.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.errors import BatchTooLargeError, InferenceError
from edgefleet.agent.inference import Predictor
from edgefleet.agent.inference.timing import (
    VersionTiming,
    call_limit,
    read_timing,
    record_timing,
)
from edgefleet.agent.install import HealthSnapshot, State
from edgefleet.agent.install.smoke import run_smoke_test
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agentconfig import InferenceSettings
from edgefleet.trust import TrustRoot
from tests.agent.conftest import Bundles, install_version
from tests.agent.power_loss_driver import Bundles as SignedBundles
from tests.agent.power_loss_driver import (
    Device,
    ScriptedProbe,
    device_config,
    prepare_bundles,
)
from tests.conftest import KeySet
from tests.fixtures import datasets

PROFILE = "x86_64-vnni"
CNN = "digits-cnn@1.0.0-aaaaaaaaaaaa"


@pytest.fixture
def layout(tmp_path: Path) -> StateLayout:
    layout = StateLayout(tmp_path / "state")
    layout.create()
    return layout


def images(count: int) -> dict[str, np.ndarray]:
    pictures, _ = datasets.digits_images()
    return {"image": np.resize(pictures, (count, *pictures.shape[1:]))}


@pytest.mark.parametrize(
    ("settings", "measured_ms", "samples", "seconds"),
    [
        # Never measured on this device: timeout_ms alone, whatever the batch.
        (InferenceSettings(), None, 360, 1.0),
        # The demo: 360 digits at 0.7 ms each -> 1 s + 360 x 10 x 0.7 ms.
        (InferenceSettings(), 0.7, 360, 3.52),
        (InferenceSettings(), 0.7, 1, 1.007),
        # A detector at 38 ms an image, 16 images of 320x480.
        (InferenceSettings(), 38.0, 16, 7.08),
        (InferenceSettings(timeout_factor=3), 38.0, 16, 2.824),
        # An explicit allowance per sample replaces the measurement.
        (InferenceSettings(timeout_per_sample_ms=2.0), 38.0, 16, 1.032),
        (InferenceSettings(timeout_ms=50, timeout_per_sample_ms=2.0), None, 100, 0.25),
    ],
)
def test_the_limit_grows_with_the_batch_from_the_time_measured_here(
    settings: InferenceSettings, measured_ms: float | None, samples: int, seconds: float
) -> None:
    assert call_limit(settings, measured_ms).seconds(samples) == pytest.approx(seconds)


def test_timings_persist_per_version_keep_both_measurements_and_follow_pruning(
    layout: StateLayout,
) -> None:
    for version in ("m@1.0.0-a", "m@2.0.0-b"):
        (layout.versions / version).mkdir()
    assert read_timing(layout, "m@1.0.0-a").sample_ms is None
    record_timing(layout, "m@1.0.0-a", smoke_sample_ms=0.5)
    record_timing(layout, "m@2.0.0-b", smoke_sample_ms=3.0)
    timing = record_timing(layout, "m@1.0.0-a", live_sample_ms=0.8)
    assert timing == VersionTiming(smoke_sample_ms=0.5, live_sample_ms=0.8)
    assert read_timing(layout, "m@1.0.0-a") == timing  # from disk: survives a restart
    assert timing.sample_ms == 0.8  # the slower of the two
    # A version pruned away loses its timing at the next measurement.
    (layout.versions / "m@2.0.0-b").rmdir()
    record_timing(layout, "m@1.0.0-a", smoke_sample_ms=0.6)
    assert sorted(p.name for p in layout.timings.iterdir()) == ["m@1.0.0-a.json"]
    # A damaged file counts as never measured (the floor applies), not as a failure.
    (layout.timings / "m@1.0.0-a.json").write_text("{not json")
    assert read_timing(layout, "m@1.0.0-a").sample_ms is None


def test_smoke_test_measures_the_time_per_sample(bundles: Bundles) -> None:
    result = run_smoke_test(bundles.cnn)
    assert 0 < result.sample_ms < 10_000
    assert f"({result.sample_ms:.3g} ms each)" in result.summary


def test_a_large_batch_stopped_by_the_floor_is_served_once_the_device_measured_the_model(
    bundles: Bundles, layout: StateLayout
) -> None:
    """1000 images take hundreds of ms: a 1 ms floor alone stops them; with the time per
    sample measured here (x 50: a margin no load on this machine eats) they are served."""
    directory = install_version(layout, bundles.cnn, CNN)
    settings = InferenceSettings(timeout_ms=1, timeout_factor=50)
    batch = images(1000)

    unmeasured = Predictor.open(layout, settings, PROFILE)
    with pytest.raises(InferenceError, match="primary: timeout"):
        unmeasured.predict(batch)

    smoke = run_smoke_test(directory)  # as the installer does, on this device
    record_timing(layout, directory.name, smoke_sample_ms=smoke.sample_ms)
    telemetry = TelemetryRecorder("cam-01", None, 60)
    measured = Predictor.open(layout, settings, PROFILE, telemetry)
    prediction = measured.predict(batch)
    assert prediction.step == "primary"
    assert prediction.outputs["logits"].shape == (1000, 10)
    primary = measured.model_info().steps[0]
    assert primary.timeout_per_sample_ms == pytest.approx(50 * smoke.sample_ms, abs=1e-3)
    assert primary.failures == {}
    window = telemetry.close_window()
    assert window is not None and (window.requests, window.errors) == (1, 0)


def test_reload_takes_a_new_measurement(bundles: Bundles, layout: StateLayout) -> None:
    directory = install_version(layout, bundles.cnn, CNN)
    predictor = Predictor.open(layout, InferenceSettings(), PROFILE)
    assert predictor.model_info().steps[0].timeout_per_sample_ms == 0
    record_timing(layout, directory.name, smoke_sample_ms=0.5)
    assert {s.timeout_per_sample_ms for s in predictor.reload().steps} == {5.0}


def test_a_batch_above_the_limit_is_refused_before_any_model_runs(
    bundles: Bundles, layout: StateLayout
) -> None:
    install_version(layout, bundles.cnn, CNN)
    telemetry = TelemetryRecorder("cam-01", None, 60)
    settings = InferenceSettings(max_batch_samples=8)
    predictor = Predictor.open(layout, settings, PROFILE, telemetry)
    assert predictor.predict(images(8)).step == "primary"
    with pytest.raises(BatchTooLargeError, match=r"9 samples, more than the 8 .*max_batch_samples"):
        predictor.predict(images(9))
    with pytest.raises(BatchTooLargeError, match="12 samples"):
        predictor.predict_batch([images(4)] * 3)
    info = predictor.model_info()
    assert (info.steps[0].answered, info.fallbacks) == (1, 0)  # the refused ones never ran
    window = telemetry.close_window()
    assert window is not None and (window.requests, window.schema_violations) == (3, 2)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> SignedBundles:
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


def test_an_install_records_the_smoke_test_and_the_health_check_measurements(
    tmp_path: Path, trust: TrustRoot, signed: SignedBundles
) -> None:
    config = device_config(tmp_path / "device", trust.raw)
    live = HealthSnapshot(requests=50, errors=0, fallbacks=0, latency_p95_ms=9.0, sample_ms=4.0)
    device = Device.boot(config, server=tmp_path / "server", probe=ScriptedProbe(live))
    assert device.installer.install_file(signed.releases[0]).state is State.COMMITTED
    layout = StateLayout(config.state_dir)
    version = device.versions.current_id()
    assert version is not None
    timing = read_timing(layout, version)
    assert timing.smoke_sample_ms is not None and timing.smoke_sample_ms > 0
    assert timing.live_sample_ms == 4.0
    # What the predictor allows after a restart: 10 x the slower measurement per sample.
    predictor = Predictor.open(layout, config.inference, PROFILE)
    step = predictor.model_info().steps[0]
    assert step.timeout_per_sample_ms == pytest.approx(
        10 * max(4.0, timing.smoke_sample_ms), abs=1e-3
    )
