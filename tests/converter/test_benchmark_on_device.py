"""`edgefleet convert --measure-on`: candidates timed on a device of the target, end to end.

A real `edgefleet server run`, real mosquitto, and a real `edgefleet agent run`
enrolled with this machine's profile (x86_64-vnni, as the agent tests run it).
The converter packs its candidates as a benchmark request signed with the
release key, the server sends it to the device, the agent measures each
candidate in a bounded child process and uploads its signed figures, and the
converter chooses on them: the report names the device for every figure, and
the agent serves what it served before (nothing, here: it installed nothing).
Without --measure-on, the report says the figures are the build machine's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from edgefleet.agent.layout import StateLayout
from edgefleet.converter import ConvertOptions, convert
from edgefleet.keys import save_private_key
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, mosquitto_or_skip, unique_device_id
from tests.agent.power_loss_driver import PROFILE
from tests.conftest import KeySet
from tests.converter.conftest import Case
from tests.server.serverproc import (
    ServerProcess,
    agent_log,
    json_of,
    start_agent,
    wait_until,
    write_server_keys,
)

WAIT = 90.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def server(
    tmp_path: Path, broker: MosquittoBroker, trust: TrustRoot, keyset: KeySet
) -> Iterator[ServerProcess]:
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    process = ServerProcess.start(
        tmp_path / "server.log", trust_path, key_path,
        "--data", tmp_path / "data", "--mqtt", broker.url, "--open-enrollment",
    )  # fmt: skip
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def edgefleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
        env=os.environ.copy(),
    )


def operator_token(data: Path) -> str:
    made = edgefleet("server", "token", "create", "--role", "operator", "--name", "ops",
                     "--data", data)  # fmt: skip
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def convert_args(case: Case, out: Path) -> list[str | Path]:
    return [
        "convert", case.model, "--target", PROFILE, "--calibration", case.calibration,
        "--validation", case.validation, "--labels", case.labels, "-o", out,
    ]  # fmt: skip


def test_the_choice_is_made_on_figures_from_the_device(
    tmp_path: Path, server: ServerProcess, broker: MosquittoBroker, keyset: KeySet, mlp: Case
) -> None:
    token = operator_token(tmp_path / "data")
    release_key = tmp_path / "keys" / "release.key"
    save_private_key(release_key, keyset.release)
    device = unique_device_id("lab")
    agent = start_agent(tmp_path, device, broker.url, server.url, tmp_path / "keys/trust.json")
    try:
        with server.api(token) as api:

            def online() -> bool:
                response = api.get(f"/devices/{device}")
                return response.status_code == 200 and bool(response.json()["online"])

            assert wait_until(online, WAIT), agent_log(tmp_path, device)
            before: dict[str, Any] = json_of(api.get(f"/devices/{device}"), 200)

            out = tmp_path / "out"
            converted = edgefleet(
                *convert_args(mlp, out),
                "--measure-on", device, "--server", server.url, "--token", token,
                "--measure-key", release_key, "--measure-timeout", "600",
            )  # fmt: skip
            assert converted.returncode == 0, converted.stderr + agent_log(tmp_path, device)
            assert f"candidates on device {device}" in converted.stderr  # the progress line

            report = json.loads((out / "report.json").read_text())
            on_device = f"device {device} (profile {PROFILE})"
            sent = [row for row in report["candidates"] if row["device_figures"] is not None]
            assert sent[0]["name"] == "float" and len(sent) >= 2
            for row in sent:
                assert row["latency_measured_on"] == on_device, row
                figures = row["device_figures"]
                assert figures["outcome"] == "measured"
                assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"]
                assert figures["peak_rss_bytes"] > 0
                assert row["latency_ms"] == figures["p50_ms"]
            chosen = next(row for row in report["candidates"] if row["name"] == report["chosen"])
            assert chosen["latency_measured_on"] == on_device
            if report["chosen"] != "float":
                assert f"measured on {on_device}" in report["decision"]
            assert any(f"measured on {on_device}" in note for note in report["notes"])
            assert f"latency measured on: {on_device}" in (out / "report.txt").read_text()

            benchmark = json_of(api.get("/benchmarks/1"), 200)
            assert benchmark["profile"] == PROFILE and benchmark["complete"] is True
            [part] = benchmark["devices"]
            assert part["device_id"] == device and part["state"] == "answered"

            # Measured apart from serving: nothing installed, the same model served as before.
            after = json_of(api.get(f"/devices/{device}"), 200)
            assert after["model_name"] == before["model_name"]
            assert after["model_version"] == before["model_version"]
            layout = StateLayout(tmp_path / device)
            assert layout.resolve_link(layout.current) is None
            assert list(layout.versions.iterdir()) == []
            assert not list((layout.root / "benchmarks").glob("*"))  # its files are gone
            assert "benchmark request 1 answered" in agent_log(tmp_path, device)

            refused = edgefleet(
                *convert_args(mlp, tmp_path / "refused"),
                "--measure-on", "tag=site=mars", "--server", server.url, "--token", token,
                "--measure-key", release_key,
            )  # fmt: skip
            assert refused.returncode == 2, refused.stderr
            last_line = refused.stderr.strip().splitlines()[-1]
            expected = "error [device-measurement]: the fleet server refused the benchmark (404)"
            assert last_line.startswith(expected), refused.stderr
            assert not (tmp_path / "refused").exists()
    finally:
        if agent.poll() is None:
            agent.terminate()
            agent.wait(30)


def test_without_measure_on_the_report_says_the_figures_are_the_build_machines(
    tmp_path: Path, mlp: Case
) -> None:
    options = ConvertOptions(
        target=PROFILE, calibration=mlp.calibration, validation=mlp.validation, labels=mlp.labels
    )
    result = convert(mlp.model, tmp_path / "out", options)

    here = f"build machine ({platform.machine()}, not the target)"
    rows = cast(list[dict[str, Any]], result.report["candidates"])
    assert {row["latency_measured_on"] for row in rows} == {here}
    assert all(row["device_figures"] is None for row in rows)
    table = (tmp_path / "out" / "report.txt").read_text()
    assert f"latency measured on: {here}" in table
