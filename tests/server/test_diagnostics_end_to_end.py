"""Diagnostics on request, as operators use it: `edgefleet server run`, a real agent, mosquitto.

The operator asks with `edgefleet devices diagnose`: the server records the
request (audited), sends a signed directive, the agent answers on its own
topic with its log lines and status, the server stores the answer and the CLI
prints it. A directive signed with a key the trust root does not know, and a
replay of a genuine one, are refused by the agent. An answer above the size
bound, though signed by the device, is refused and counted, and nothing of it
is stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.agent.layout import StateLayout
from edgefleet.keys import SigningKey
from edgefleet.mqtt import (
    MAX_DIAGNOSTICS_BYTES,
    DeviceKey,
    DeviceTopics,
    DiagnosticsReport,
    Directive,
    encode_message,
    sign_device_payload,
    sign_directive,
)
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import (
    MosquittoBroker,
    Observer,
    mosquitto_or_skip,
    publish_once,
    unique_device_id,
)
from tests.conftest import KeySet
from tests.server.serverproc import (
    ServerProcess,
    agent_log,
    json_of,
    start_agent,
    wait_until,
    write_server_keys,
)

WAIT = 90.0
REFUSED = "edgefleet_mqtt_messages_refused_total"


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


def cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def make_token(data: Path, role: str) -> str:
    result = cli("server", "token", "create", "--role", role, "--name", role, "--data", data,
                 env={})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def requests_of(api: httpx.Client, device: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json_of(api.get(f"/devices/{device}/diagnostics"), 200)["items"]
    return items


def started_agent(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess, api: httpx.Client
) -> tuple[str, subprocess.Popen[bytes]]:
    """A real agent, enrolled and reporting (online on the server)."""
    device = unique_device_id("diag")
    agent = start_agent(tmp_path, device, broker.url, server.url, tmp_path / "keys/trust.json")

    def online() -> bool:
        response = api.get(f"/devices/{device}")
        return response.status_code == 200 and bool(response.json()["online"])

    assert wait_until(online, WAIT), agent_log(tmp_path, device)
    return device, agent


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is None:
        agent.terminate()
        agent.wait(30)


def test_the_cli_asks_a_real_agent_and_prints_its_log_and_status(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    operator = make_token(tmp_path / "data", "operator")
    admin = make_token(tmp_path / "data", "admin")
    env = {"EDGEFLEET_SERVER": server.url, "EDGEFLEET_TOKEN": operator}
    with server.api(operator) as api:
        device, agent = started_agent(tmp_path, broker, server, api)
        try:
            shown = cli("devices", "diagnose", device, "--wait", "60", env=env)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert "answered at" in shown.stdout, shown.stdout
            assert f"agent {device} serving on" in shown.stdout  # a log line of the agent
            assert "install state:" in shown.stdout and "link:" in shown.stdout

            [request] = requests_of(api, device)
            assert request["state"] == "answered" and request["requested_by"] == "operator"
            answer = request["answer"]
            status = answer["status"]
            assert status["device_id"] == device and status["running"] is True
            assert status["link"]["connects"] >= 1 and status["trust_root_version"] >= 1
            assert status["system"]["memory_total_bytes"] > 0
            assert 0 < len(answer["log_lines"]) <= 200
            levels = {line["level"] for line in answer["log_lines"]}
            assert levels <= {"INFO", "WARNING", "ERROR", "CRITICAL"}
            seed = StateLayout(tmp_path / device).device_key.read_bytes()
            assert seed.hex() not in json.dumps(answer)  # the device's key never leaves it

            as_json = cli("devices", "diagnose", device, "--last", "--json", env=env)
            assert json.loads(as_json.stdout)["id"] == request["id"]
        finally:
            stop_agent(agent)
    with server.api(admin) as audit_api:
        entries = json_of(audit_api.get("/audit"), 200)
    [entry] = [e for e in entries if e["action"] == "device.diagnose"]
    assert entry["target"] == device and entry["actor"] == "operator"
    assert entry["details"]["request_id"] == request["id"]


def test_the_agent_refuses_a_forged_and_a_replayed_diagnostics_directive(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    operator = make_token(tmp_path / "data", "operator")
    with server.api(operator) as api:
        device, agent = started_agent(tmp_path, broker, server, api)
        topic = DeviceTopics(device).directive
        observer = Observer(broker.url, [topic])
        try:
            # Signed by a key the trust root does not know, with a sequence far ahead: had the
            # agent accepted it, every genuine directive after it would be refused as a replay.
            now = utcnow()
            forged = Directive.model_validate(
                {
                    "issued": format_time(now),
                    "expires": format_time(now.replace(year=now.year + 1)),
                    "device_id": device,
                    "sequence": 10**12,
                    "action": "diagnostics",
                    "request_id": 1,
                }
            )
            publish_once(broker.url, topic, sign_directive(forged, [SigningKey.generate()]))
            assert wait_until(lambda: "unknown-key" in agent_log(tmp_path, device), WAIT), (
                agent_log(tmp_path, device)
            )

            first = json_of(api.post(f"/devices/{device}/diagnostics"), 202)
            assert wait_until(lambda: requests_of(api, device)[0]["state"] == "answered", WAIT)
            assert wait_until(lambda: len(observer.on(topic)) == 2, WAIT)
            genuine = observer.on(topic)[1]  # the server's directive, signed and accepted

            publish_once(broker.url, topic, genuine)  # replayed by someone on the path
            assert wait_until(lambda: "replayed" in agent_log(tmp_path, device), WAIT), agent_log(
                tmp_path, device
            )
            second = json_of(api.post(f"/devices/{device}/diagnostics"), 202)
            assert wait_until(lambda: requests_of(api, device)[0]["state"] == "answered", WAIT)
            states = {r["id"]: r["state"] for r in requests_of(api, device)}
            assert states == {first["id"]: "answered", second["id"]: "answered"}
        finally:
            observer.close()
            stop_agent(agent)


def test_an_answer_above_the_bound_is_refused_and_nothing_of_it_is_stored(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    operator = make_token(tmp_path / "data", "operator")
    with server.api(operator) as api:
        device, agent = started_agent(tmp_path, broker, server, api)
        stop_agent(agent)  # offline: the request waits, and the test answers with its key
        assert wait_until(lambda: not api.get(f"/devices/{device}").json()["online"], WAIT)
        env = {"EDGEFLEET_SERVER": server.url, "EDGEFLEET_TOKEN": operator}
        offline = cli("devices", "diagnose", device, "--wait", "0", env=env)
        assert offline.returncode == 0, offline.stderr
        assert f"{device} is offline: the request waits in its broker session" in offline.stderr
        assert "no answer yet" in offline.stdout

        key = DeviceKey.load(StateLayout(tmp_path / device).device_key)
        request = json_of(api.post(f"/devices/{device}/diagnostics"), 202)
        assert request["state"] == "pending"
        topic = DeviceTopics(device).diagnostics

        def answer(status: dict[str, Any]) -> bytes:
            report = DiagnosticsReport(
                device_id=device,
                sent_at=format_time(utcnow()),
                request_id=request["id"],
                directive_sequence=request["directive_sequence"],
                log_lines=[],
                status=status,
            )
            return encode_message(report)

        too_large = answer({"filler": "x" * MAX_DIAGNOSTICS_BYTES})
        assert len(too_large) > MAX_DIAGNOSTICS_BYTES
        publish_once(broker.url, topic, sign_device_payload(topic, too_large, key))
        assert wait_until(
            lambda: server.metric(REFUSED, reason="diagnostics-too-large") == 1, WAIT
        ), server.log
        kept = requests_of(api, device)[0]
        assert kept["id"] == request["id"]
        assert kept["state"] == "pending" and kept["answer"] is None

        # The same answer within the bound is stored: the size alone was refused.
        publish_once(
            broker.url, topic, sign_device_payload(topic, answer({"filler": "x" * 100}), key)
        )
        assert wait_until(lambda: requests_of(api, device)[0]["state"] == "answered", WAIT)
        assert requests_of(api, device)[0]["answer"]["status"] == {"filler": "x" * 100}
