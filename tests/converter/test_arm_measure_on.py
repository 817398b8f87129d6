"""A bundle for aarch64 chosen on figures from an (emulated) aarch64 device, end to end.

A real `edgefleet server run` and mosquitto on this machine, and a real agent
enrolled with profile `aarch64` running on the emulated arm64 userland
(`edgefleet emulate agent`: the root's Python and the ARM wheels under
qemu-aarch64, its benchmark children emulated too). `edgefleet convert --target
aarch64 --measure-on DEVICE` chooses on that device's figures; the report says
for each that the device is emulated (correctness only), and the chosen
bundle passes its smoke test on the emulated root. Skips without qemu-user and
mmdebstrap unless EDGEFLEET_REQUIRE_QEMU=1; the root is cached in
~/.cache/edgefleet-arm.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgefleet.bundle import build_bundle
from edgefleet.emulate.root import ARCHITECTURES, ensure_root
from edgefleet.emulate.smoke import run_emulated_smoke
from edgefleet.keys import save_private_key
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, unique_device_id
from tests.conftest import KeySet
from tests.converter.conftest import Case
from tests.converter.test_arm_emulated import _require_tools
from tests.converter.test_benchmark_on_device import (  # noqa: F401 (fixtures)
    broker,
    edgefleet,
    operator_token,
    server,
)
from tests.server.serverproc import (
    ServerProcess,
    agent_log,
    json_of,
    wait_until,
    write_agent_config,
)

TARGET = "aarch64"
ARCH = ARCHITECTURES["arm64"]
ONLINE_WAIT = 600.0  # enrolling and connecting, every import emulated


@pytest.fixture(scope="module")
def arm64_root() -> None:
    _require_tools(ARCH.qemu, "mmdebstrap")
    ensure_root(ARCH)


def start_emulated_agent(
    tmp_path: Path, device: str, broker_url: str, server_url: str, trust: Path
) -> subprocess.Popen[bytes]:
    """`edgefleet emulate agent --arch arm64 -- run` for `device`; its log in `agent_log`."""
    config_path = write_agent_config(
        tmp_path, device, broker_url, server_url, trust, profile=TARGET
    )
    command = [sys.executable, "-m", "edgefleet", "emulate", "agent", "--arch", ARCH.name,
               "--", "run", "--config", str(config_path)]  # fmt: skip
    with (tmp_path / f"{device}.log").open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.usefixtures("arm64_root")
def test_an_aarch64_bundle_is_chosen_on_figures_from_an_emulated_aarch64_device(
    tmp_path: Path,
    server: ServerProcess,  # noqa: F811
    broker: MosquittoBroker,  # noqa: F811
    keyset: KeySet,
    trust: TrustRoot,
    mlp: Case,
) -> None:
    token = operator_token(tmp_path / "data")
    release_key = tmp_path / "keys" / "release.key"
    save_private_key(release_key, keyset.release)
    device = unique_device_id("arm-lab")
    agent = start_emulated_agent(
        tmp_path, device, broker.url, server.url, tmp_path / "keys/trust.json"
    )
    try:
        with server.api(token) as api:

            def online() -> bool:
                response = api.get(f"/devices/{device}")
                return response.status_code == 200 and bool(response.json()["online"])

            assert wait_until(online, ONLINE_WAIT), agent_log(tmp_path, device)
            shown: dict[str, Any] = json_of(api.get(f"/devices/{device}"), 200)
            assert shown["profile"] == TARGET

            out = tmp_path / "out"
            converted = edgefleet(
                "convert", mlp.model, "--target", TARGET, "--calibration", mlp.calibration,
                "--validation", mlp.validation, "--labels", mlp.labels, "-o", out,
                "--measure-on", device, "--server", server.url, "--token", token,
                "--measure-key", release_key, "--measure-timeout", "1800",
            )  # fmt: skip
            assert converted.returncode == 0, converted.stderr + agent_log(tmp_path, device)

        report = json.loads((out / "report.json").read_text())
        on_device = f"device {device} (profile {TARGET}, emulated: correctness only)"
        sent = [row for row in report["candidates"] if row["device_figures"] is not None]
        assert sent[0]["name"] == "float" and len(sent) >= 2, report["candidates"]
        for row in sent:
            assert row["latency_measured_on"] == on_device, row
            assert row["device_figures"]["outcome"] == "measured", row
            assert row["latency_ms"] == row["device_figures"]["p50_ms"]
        chosen = next(row for row in report["candidates"] if row["name"] == report["chosen"])
        assert chosen["latency_measured_on"] == on_device
        assert any(f"measured on {on_device}, machine aarch64" in n for n in report["notes"])
        assert f"latency measured on: {on_device}" in (out / "report.txt").read_text()

        bundle = tmp_path / "chosen.efb"
        build_bundle(out, bundle, name="digits", version="1.0.0", keys=[keyset.release])
        smoke = run_emulated_smoke(bundle, trust, ARCH)
        assert smoke.bundle == "digits@1.0.0" and smoke.samples > 0
    finally:
        if agent.poll() is None:
            agent.terminate()
            agent.wait(60)
    assert agent.returncode == 0, agent_log(tmp_path, device)  # SIGTERM reached the agent
