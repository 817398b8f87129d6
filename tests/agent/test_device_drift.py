"""The device's own drift check and its reservoir of raw inputs, on real telemetry windows.

The MLP fixture bundle's drift-features.json (calibrated by the converter on
digits) is the reference; the streams are digits rows the reference never saw
(the training rows), as they are (calm) or brighter (shifted). Binning of
scalar and unbatched inputs: test_telemetry.py,
test_a_scalar_input_is_counted_once_per_request.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import stat
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.config import load_config
from edgefleet.agent.driftcheck import DeviceDriftCheck, DriftStatus
from edgefleet.agent.errors import ConfigError
from edgefleet.agent.inference import Prediction
from edgefleet.agent.reservoir import KEEP_FILES, DeviceDrift, InputReservoir, episode_files
from edgefleet.agent.telemetry import TelemetryRecorder
from edgefleet.agentconfig import AgentConfig, DriftSettings, LocalApiSettings
from edgefleet.driftfeatures import DriftFeatures, TensorLayout, load_reference
from edgefleet.trust import TrustRoot
from tests.agent.conftest import Bundles
from tests.conftest import PROFILE
from tests.fixtures import datasets

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
WINDOW_SAMPLES = 200  # per telemetry window: more than the smallest calibrated window (50)
BATCH = 10


def mlp_reference(bundles: Bundles) -> DriftFeatures:
    reference, notes = load_reference(bundles.mlp)
    assert isinstance(reference, DriftFeatures) and notes == []
    return reference


def unseen_rows() -> np.ndarray:
    """Digits rows the reference was not made from (the training split), in a fixed random
    order (the data set's own order groups similar rows)."""
    features, _ = datasets.digits_tabular()
    train = datasets.split(len(features)).train
    rows: np.ndarray = features[np.random.default_rng(0).permutation(train)]
    return rows


class Device:
    """A telemetry recorder with a device drift check, fed windows of requests."""

    def __init__(self, reference: DriftFeatures, drift: DeviceDrift) -> None:
        self.drift = drift
        self.recorder = TelemetryRecorder(
            "cam-01",
            reference,
            60,
            bundle_name="digits",
            bundle_version="1.0.0",
            now=T0,
            drift=drift,
        )
        self.windows = 0
        self.served = 0

    def serve_window(self, rows: np.ndarray) -> DriftStatus:
        """One telemetry window of WINDOW_SAMPLES rows in requests of BATCH; returns the
        check's state after it."""
        start = (self.windows * WINDOW_SAMPLES) % (len(rows) - WINDOW_SAMPLES)
        chunk = rows[start : start + WINDOW_SAMPLES]
        for batch in np.split(chunk, WINDOW_SAMPLES // BATCH):
            probabilities = np.full((len(batch), 10), 0.1, np.float32)
            outputs: dict[str, np.ndarray] = {
                "label": np.zeros(len(batch), np.int64),
                "probabilities": probabilities,
            }
            prediction = Prediction(outputs, "primary", "digits@1.0.0", 1.0)
            self.recorder.record(prediction, {"features": batch}, outputs)
            self.served += len(batch)
        self.windows += 1
        window = self.recorder.close_window(T0 + dt.timedelta(minutes=self.windows))
        assert window is not None
        return self.drift.status


def shifted(rows: np.ndarray) -> np.ndarray:
    return (rows + 0.3).astype(np.float32)  # every pixel brighter (features are in [0, 1])


def device(bundles: Bundles, tmp_path: Path, **settings: object) -> Device:
    drift = DeviceDrift(DriftSettings(**settings), tmp_path / "samples", random.Random(7))  # type: ignore[arg-type]
    return Device(mlp_reference(bundles), drift)


def test_a_shifted_stream_flags_drift_on_the_device_and_a_calm_one_does_not(
    bundles: Bundles, tmp_path: Path
) -> None:
    rows = unseen_rows()
    calm = device(bundles, tmp_path / "calm")
    states = [calm.serve_window(rows).state for _ in range(6)]
    assert states == ["ok"] * 6

    drifting = device(bundles, tmp_path / "drifting")
    first = drifting.serve_window(shifted(rows))
    second = drifting.serve_window(shifted(rows))
    assert first.state == "ok"  # one drifted window: persistence waits for a second
    assert second.state == "drift"
    assert second.since == T0 + dt.timedelta(minutes=2)
    assert second.features and all(name.startswith("features[") for name in second.features)
    assert second.describe().startswith(f"drift on {second.features[0]}")
    assert second.describe().endswith("since 2026-03-01T12:02:00Z")
    # Back to calm inputs: calm after as many calm windows.
    assert [drifting.serve_window(rows).state for _ in range(2)] == ["drift", "ok"]


def test_too_few_samples_are_summed_over_windows_and_never_judged_alone(
    bundles: Bundles,
) -> None:
    reference = mlp_reference(bundles)
    check = DeviceDriftCheck(max_windows=4)
    recorder = TelemetryRecorder(
        "cam-01", reference, 60, bundle_name="digits", bundle_version="1.0.0", now=T0
    )
    rows = shifted(unseen_rows())
    outputs: dict[str, np.ndarray] = {
        "label": np.zeros(20, np.int64),
        "probabilities": np.full((20, 10), 0.1, np.float32),
    }
    states = []
    for minute in range(1, 9):  # 20 samples per window; the smallest calibrated window is 50
        batch = rows[minute * 20 : (minute + 1) * 20]
        recorder.record(
            Prediction(outputs, "primary", "digits@1.0.0", 1.0),
            {"features": batch},
            outputs,
        )
        window = recorder.close_window(T0 + dt.timedelta(minutes=minute))
        assert window is not None
        states.append(check.observe(window, reference).state)
    # Judged after 3 windows (60 samples): drifted, but one verdict does not persist (ok);
    # judged again after 3 more: drift.
    assert states == ["insufficient"] * 2 + ["ok"] * 3 + ["drift"] * 3


def test_a_bundle_without_thresholds_is_insufficient(bundles: Bundles, tmp_path: Path) -> None:
    reference = mlp_reference(bundles)
    bare = reference.model_copy(
        update={"inputs": [f.model_copy(update={"thresholds": None}) for f in reference.inputs]}
    )
    drift = DeviceDrift(DriftSettings(capture_inputs=True), tmp_path / "samples")
    dev = Device(bare, drift)
    assert [dev.serve_window(shifted(unseen_rows())).state for _ in range(3)] == [
        "insufficient"
    ] * 3
    assert episode_files(tmp_path / "samples") == []


def test_nothing_is_kept_by_default(bundles: Bundles, tmp_path: Path) -> None:
    dev = device(bundles, tmp_path)
    for _ in range(4):
        dev.serve_window(shifted(unseen_rows()))
    assert dev.drift.status.state == "drift"
    assert dev.drift.current_file is None
    assert not (tmp_path / "samples").exists()


def test_drift_fills_the_reservoir_up_to_its_count(bundles: Bundles, tmp_path: Path) -> None:
    rows = shifted(unseen_rows())
    dev = device(bundles, tmp_path, capture_inputs=True, capture_samples=30)
    dev.serve_window(rows)
    dev.serve_window(rows)  # drift flagged at its end: the episode starts
    assert dev.drift.current_file is not None and not dev.drift.current_file.exists()
    served_before = dev.served
    dev.serve_window(rows)
    dev.serve_window(rows)
    path = dev.drift.current_file
    assert path is not None and path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with np.load(path) as data:
        assert set(data.files) == {"features"}
        kept = data["features"]
    assert kept.shape == (30, 64) and kept.dtype == np.float32
    offered = np.concatenate(
        [rows[(w * WINDOW_SAMPLES) : (w + 1) * WINDOW_SAMPLES] for w in (2, 3)]
    )
    assert dev.served - served_before == len(offered)
    # Every kept sample is a row served during the episode, none twice.
    assert all((offered == sample).all(axis=1).any() for sample in kept)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["samples"] == 30 and meta["bundle_version"] == "1.0.0"
    assert meta["reason"].startswith("drift on features[")
    assert meta["captured_at"] == "2026-03-01T12:02:00Z"


def test_the_reservoir_is_bounded_by_bytes(bundles: Bundles, tmp_path: Path) -> None:
    rows = shifted(unseen_rows())
    sample_bytes = 64 * 4  # one float32 row of 64 features
    dev = device(
        bundles,
        tmp_path,
        capture_inputs=True,
        capture_samples=200,
        capture_max_bytes=12 * sample_bytes,
    )
    for _ in range(4):
        dev.serve_window(rows)
    path = dev.drift.current_file
    assert path is not None
    with np.load(path) as data:
        assert data["features"].shape == (12, 64)


def test_an_episode_ends_with_its_model_and_its_file_stays(
    bundles: Bundles, tmp_path: Path
) -> None:
    rows = shifted(unseen_rows())
    dev = device(bundles, tmp_path, capture_inputs=True, capture_samples=20)
    for _ in range(3):
        dev.serve_window(rows)
    running = dev.drift.current_file
    assert running is not None and running.exists()
    dev.recorder.set_model("digits", "1.0.1", mlp_reference(bundles), T0 + dt.timedelta(minutes=3))
    # The other model's first window: the check started over, one verdict does not persist.
    assert dev.serve_window(rows).state == "ok"
    assert dev.drift.current_file is None
    assert episode_files(tmp_path / "samples") == [running]


def test_reservoir_sampling_keeps_a_uniform_sample() -> None:
    layout = TensorLayout(tensor="x", batched=True, rank=0, axis=None, width=None)
    seen = 1000
    kept_counts = np.zeros(seen)
    for seed in range(100):
        reservoir = InputReservoir({"x": layout}, 100, 1 << 20, random.Random(seed))
        for start in range(0, seen, 10):  # requests of 10 samples each
            reservoir.offer({"x": np.arange(start, start + 10, dtype=np.int64)})
        values = reservoir.arrays()["x"]
        assert len(values) == 100 and len(set(values.tolist())) == 100
        kept_counts[values] += 1
    # Each sample kept in 10% of the runs, early ones as often as late ones.
    assert abs(kept_counts[:500].sum() - kept_counts[500:].sum()) < 0.1 * kept_counts.sum()
    assert kept_counts[:100].sum() == pytest.approx(1000, rel=0.2)


def test_at_most_a_few_episode_files_are_kept(bundles: Bundles, tmp_path: Path) -> None:
    rows = shifted(unseen_rows())
    dev = device(bundles, tmp_path, capture_inputs=True, capture_samples=5)
    for version in range(KEEP_FILES + 2):
        dev.recorder.set_model(
            "digits", f"1.0.{version + 1}", mlp_reference(bundles), T0 + dt.timedelta(hours=version)
        )
        for _ in range(3):
            dev.serve_window(rows)
    files = episode_files(tmp_path / "samples")
    assert len(files) == KEEP_FILES
    assert files[-1] == dev.drift.current_file


def test_raw_inputs_leave_the_device_only_where_its_configuration_allows_it(
    tmp_path: Path, trust: TrustRoot
) -> None:
    from edgefleet.agent.runner import Agent

    (tmp_path / "trust.json").write_bytes(trust.raw)

    def upload_worker(**drift: bool) -> object:
        config = AgentConfig(
            device_id="cam-01",
            profile=PROFILE,
            state_dir=tmp_path / "state",
            trust_root=tmp_path / "trust.json",
            server_url="http://127.0.0.1:9",
            local_api=LocalApiSettings(enabled=False),
            drift=DriftSettings(**drift),
        )
        return Agent(config).upload_worker

    assert upload_worker() is None
    assert upload_worker(capture_inputs=True) is None
    assert upload_worker(capture_inputs=True, upload_inputs=True) is not None


def test_the_drift_section_is_off_unless_set(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    base = 'device_id = "cam-01"\nprofile = "p"\nstate_dir = "s"\ntrust_root = "t.json"\n'
    path.write_text(base)
    assert load_config(path).drift == DriftSettings(
        capture_inputs=False,
        capture_samples=200,
        capture_max_bytes=8 * 1024**2,
        upload_inputs=False,
    )
    path.write_text(base + "[drift]\ncapture_inputs = true\ncapture_samples = 50\n")
    drift = load_config(path).drift
    assert drift.capture_inputs and drift.capture_samples == 50 and not drift.upload_inputs
    path.write_text(base + "[drift]\ncapture_inputs = true\ncapture_samples = 0\n")
    with pytest.raises(ConfigError, match="capture_samples"):
        load_config(path)
