"""`server run`'s telemetry and drift timings: durations in, bad ones refused."""

from __future__ import annotations

import datetime as dt
import sys
import types
from pathlib import Path

import pytest

from edgefleet.server.settings import ServerSettings
from tests.clirun import Cli


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def settings_of_run(monkeypatch: pytest.MonkeyPatch) -> list[ServerSettings]:
    """What `server run` hands the runner (its interface, run_server(settings))."""
    received: list[ServerSettings] = []
    runner = types.ModuleType("edgefleet.server.runner")
    runner.run_server = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edgefleet.server.runner", runner)
    return received


@pytest.fixture
def base(tmp_path: Path) -> list[str | Path]:
    for path in (tmp_path / "trust.json", tmp_path / "key"):
        path.write_text("")
    return ["server", "run", "--trust", tmp_path / "trust.json", "--server-key", tmp_path / "key"]


def test_server_run_takes_short_drift_timings(
    base: list[str | Path], run: Cli, settings_of_run: list[ServerSettings]
) -> None:
    run(*base, "--telemetry-bucket", "2s", "--drift-interval", "1",
        "--drift-window", "6s", "--drift-window-max", "1m")  # fmt: skip
    (settings,) = settings_of_run
    assert settings.telemetry_bucket == dt.timedelta(seconds=2)
    assert settings.drift_interval_s == 1.0
    assert settings.drift_window == dt.timedelta(seconds=6)
    assert settings.drift_window_max == dt.timedelta(minutes=1)


def test_without_the_options_the_fleet_defaults_hold(
    base: list[str | Path], run: Cli, settings_of_run: list[ServerSettings]
) -> None:
    run(*base, "--drift-window", "30m")
    (settings,) = settings_of_run
    default = ServerSettings(Path(), Path(), Path())
    assert settings.drift_window == dt.timedelta(minutes=30)
    assert (settings.telemetry_bucket, settings.drift_interval_s, settings.drift_window_max) == (
        default.telemetry_bucket, default.drift_interval_s, default.drift_window_max
    )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--drift-window", "0"], "--drift-window '0': expected a positive number with s, m, h"),
        (["--drift-interval", "soon"], "--drift-interval 'soon': expected a positive number"),
        (["--telemetry-bucket", "-5s"], "--telemetry-bucket '-5s': expected a positive number"),
        (["--telemetry-bucket", "20m"],
         "--telemetry-bucket (1200 s) is wider than --drift-window (900 s)"),
        (["--drift-window", "2h"],
         "--drift-window (7200 s) is wider than --drift-window-max (3600 s): widen"),
        (["--telemetry-bucket", "10s", "--drift-window", "5s"],
         "--telemetry-bucket (10 s) is wider than --drift-window (5 s)"),
    ],
)  # fmt: skip
def test_bad_timings_are_refused_in_one_line(
    base: list[str | Path],
    run: Cli,
    settings_of_run: list[ServerSettings],
    options: list[str],
    message: str,
) -> None:
    _, err = run(*base, *options, status=2)
    assert err.startswith("error [usage]: ") and message in err, err
    assert err.count("\n") == 1, err
    assert settings_of_run == []
