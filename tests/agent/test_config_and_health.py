"""agent.toml, the heartbeat's readings, and systemd's notify socket."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.config import load_config, write_config
from edgefleet.agent.errors import ConfigError
from edgefleet.agent.heartbeat import (
    AgentReport,
    HeartbeatSource,
    cpu_times,
    link_report,
    memory,
    temperature_celsius,
)
from edgefleet.agent.install import HealthSnapshot, judge_health
from edgefleet.agent.link import LinkCounters
from edgefleet.agent.sdnotify import notify
from edgefleet.agentconfig import AgentConfig, HealthSettings
from edgefleet.mqtt.messages import Heartbeat, encode_message, parse_message


def _config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        device_id="cam-01",
        profile="x86_64-vnni",
        state_dir=tmp_path / "state",
        trust_root=tmp_path / "trust.json",
    )


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = _config(tmp_path).model_copy(update={"server_url": 'http://fleet "quoted"'})
    path = tmp_path / "agent.toml"
    write_config(path, config)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_config(path) == config


def test_environment_overrides_paths_only(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, _config(tmp_path))
    loaded = load_config(path, {"EDGEFLEET_STATE_DIR": "/srv/state", "EDGEFLEET_DEVICE_ID": "x"})
    assert loaded.state_dir == Path("/srv/state")
    assert loaded.device_id == "cam-01"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("device_id = 'a/b'\nprofile='p'\nstate_dir='/s'\ntrust_root='/t'\n", "device_id"),
        ("device_id = 'a'\nprofile='p'\nstate_dir='/s'\n", "trust_root"),
        ("device_id = 'a\n", "not valid TOML"),
        (
            "device_id='a'\nprofile='p'\nstate_dir='/s'\ntrust_root='/t'\n[mqtt]\nurl='http://x'\n",
            "mqtt.url",
        ),
        (
            "device_id='a'\nprofile='p'\nstate_dir='/s'\ntrust_root='/t'\n[limits]\nkeep_version=3\n",
            "keep_version",
        ),
    ],
    ids=["bad-device-id", "missing-field", "not-toml", "bad-broker-url", "unknown-key"],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid TOML: it is not UTF-8 text"):
        load_config(path)
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "agent", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error [config]: {path} is not valid TOML"), result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="agent init"):
        load_config(tmp_path / "nope.toml")


def test_heartbeat_reads_this_machine(tmp_path: Path) -> None:
    busy, total = cpu_times()
    assert 0 < busy < total
    used, total_memory = memory()
    assert 0 < used < total_memory
    source = HeartbeatSource("cam-01", tmp_path)
    source.beat("idle", None, None)
    beat = source.beat("idle", "digits", "1.0.0")
    assert 0 <= beat.cpu_percent <= 100
    assert 0 < beat.disk_free_bytes <= beat.disk_total_bytes
    assert beat.model_name == "digits" and beat.uptime_s > 0


def test_heartbeat_carries_what_the_agent_reports_of_itself(tmp_path: Path) -> None:
    counters = LinkCounters(connects=3, connection_losses=2, heartbeats_skipped=4, rejected=1)
    counters.last_problem = "x" * 2000  # a long problem is cut to what the wire takes
    report = AgentReport(
        link=link_report(counters, outbox_depth=7),
        trust_root_version=2,
        frozen_reason="the newest fleet timestamp expired",
    )
    beat = HeartbeatSource("cam-01", tmp_path).beat("idle", None, None, report=report)
    parsed = parse_message(Heartbeat, encode_message(beat))  # what a server receives
    assert parsed.link is not None
    assert (parsed.link.connects, parsed.link.disconnects) == (3, 2)
    assert (parsed.link.publish_failures, parsed.link.outbox_depth) == (5, 7)
    assert parsed.link.last_problem == "x" * 512
    assert parsed.trust_root_version == 2 and parsed.frozen_out
    assert parsed.frozen_reason == "the newest fleet timestamp expired"
    calm = HeartbeatSource("cam-01", tmp_path).beat("idle", None, None)
    assert calm.frozen_out is False and calm.link is None and calm.breakers is None


def test_temperature_from_thermal_zones(tmp_path: Path) -> None:
    for index, millidegrees in enumerate(("41500", "55250", "garbage")):
        zone = tmp_path / f"thermal_zone{index}"
        zone.mkdir()
        (zone / "temp").write_text(millidegrees + "\n")
    assert temperature_celsius(tmp_path) == 55.25
    assert temperature_celsius(tmp_path / "none") is None


def test_systemd_notify_sends_a_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1")
        assert server.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")  # not run by systemd: a no-op


HEALTH = HealthSettings(min_requests=20, max_error_rate=0.05, max_fallback_rate=0.05)


@pytest.mark.parametrize(
    ("requests", "errors", "fallbacks", "failure"),
    [
        (500, 1, 0, None),  # one failure among many: healthy
        (1, 1, 0, None),  # one failed batch in a quiet check: 1 of at least 20 requests
        (3, 1, 0, None),
        (2, 2, 0, "error rate 10.0% (2 of 2 requests, counted over the 20 the check needs"),
        (3, 0, 3, "fallback rate 15.0% (3 of 3 requests, counted over the 20 the check needs"),
        (500, 60, 0, "error rate 12.0% (60 of 500 requests) is above the limit 5.0%"),
    ],
)
def test_health_is_a_rate_over_at_least_min_requests(
    requests: int, errors: int, fallbacks: int, failure: str | None
) -> None:
    snapshot = HealthSnapshot(requests, errors, fallbacks, latency_p95_ms=1.0)
    verdict = judge_health(snapshot, None, HEALTH)
    if failure is None:
        assert verdict is None
    else:
        assert verdict is not None and failure in verdict
