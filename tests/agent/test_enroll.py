"""Enrollment and signed messages: the device registers its key, then signs what it sends.

The fleet server here is a small stdlib HTTP server of our own with the API's
shape (`POST /api/v1/devices/enroll`, `{"error", "detail"}` on refusal), which
answers as each test scripts it; the broker is a real mosquitto.
"""

from __future__ import annotations

import json
import random
import stat
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgefleet import __version__
from edgefleet.agent.cli import agent as agent_group
from edgefleet.agent.config import load_config, write_config
from edgefleet.agent.enroll import (
    AutoEnroller,
    enroll,
    installed_runtimes,
    is_cleartext_to_another_host,
    is_enrolled,
    load_enrollment,
)
from edgefleet.agent.enrolltoken import write_enroll_token
from edgefleet.agent.errors import ConfigError, EnrollmentRefusedError, ServerUnreachableError
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.link import AgentLink
from edgefleet.agent.outbox import Outbox
from edgefleet.agentconfig import AgentConfig, LocalApiSettings, MqttSettings, dump_config
from edgefleet.backoff import Backoff
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.mqtt import (
    DeviceKey,
    Heartbeat,
    StatusReport,
    is_device_frame,
    verify_device_payload,
)
from edgefleet.mqtt.topics import TopicKind
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, Observer, free_port, unique_device_id

FAST = Backoff(initial=0.02, maximum=0.1)
SENT = "2030-01-02T03:04:05Z"


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FleetServer:
    """Answers enrollment requests as scripted (then 201 with the device's tags), records them."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.script: list[Answer] = []
        self.tags: dict[str, str] = {}  # what a token would add
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                owner.requests.append(body)
                owner.paths.append(self.path)
                answer = owner.script.pop(0) if owner.script else owner.created(body)
                data = json.dumps(answer.body).encode() if answer.body is not None else b""
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def created(self, body: dict[str, Any]) -> Answer:
        tags = {**body["tags"], **self.tags}
        return Answer(201, {"id": body["device_id"], "tags": tags, "online": False})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server() -> Iterator[FleetServer]:
    running = FleetServer()
    yield running
    running.close()


def make_config(tmp_path: Path, trust: TrustRoot, **overrides: Any) -> AgentConfig:
    trust_file = tmp_path / "trust.json"
    trust_file.write_bytes(trust.raw)
    fields: dict[str, Any] = {
        "device_id": "cam-017",
        "profile": "x86_64-vnni",
        "state_dir": tmp_path / "state",
        "trust_root": trust_file,
    }
    fields.update(overrides)
    return AgentConfig(**fields)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- enroll ------------------------------------------------------------------------------------


def test_enroll_registers_a_new_key_and_records_it(
    tmp_path: Path, trust: TrustRoot, server: FleetServer
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url + "/")
    layout = StateLayout(config.state_dir)
    write_enroll_token(layout, "efe_secret")  # as `agent init --enroll-token` keeps it
    server.tags = {"fleet": "pilot"}
    enrollment = enroll(config, layout, tags={"site": "berlin"})

    key = DeviceKey.load(layout.device_key)
    assert stat.S_IMODE(layout.device_key.stat().st_mode) == 0o600
    assert server.paths == ["/api/v1/devices/enroll"]
    sent = server.requests[0]
    assert sent == {
        "device_id": "cam-017",
        "public_key": key.public_hex,
        "profile": "x86_64-vnni",
        "arch": sent["arch"],
        "runtimes": installed_runtimes(),
        "agent_version": __version__,
        "tags": {"site": "berlin"},
        "enroll_token": "efe_secret",
        "csr": layout.tls_dir.joinpath("device.csr").read_text(),
    }
    assert sent["arch"] and "onnxruntime" in sent["runtimes"]
    assert enrollment.public_key == key.public_hex and enrollment.server_url == server.url
    assert enrollment.tags == {"site": "berlin", "fleet": "pilot"}
    recorded = load_enrollment(layout)
    assert recorded == enrollment and is_enrolled(config, layout, key)
    assert "efe_secret" not in layout.enrollment_file.read_text()  # the token is not kept
    assert not layout.enroll_token_file.exists()

    # Again (say, a new token): the same key, no new one.
    enroll(config, layout, token="efe_other")
    assert server.requests[1]["public_key"] == key.public_hex
    assert server.requests[1]["enroll_token"] == "efe_other"


def test_enrollment_is_for_one_server_and_one_key(
    tmp_path: Path, trust: TrustRoot, server: FleetServer
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url)
    layout = StateLayout(config.state_dir)
    enroll(config, layout)
    key = DeviceKey.load(layout.device_key)
    assert is_enrolled(config, layout, key)
    assert not is_enrolled(config, layout, DeviceKey.generate())
    moved = config.model_copy(update={"server_url": "http://elsewhere:8080"})
    assert not is_enrolled(moved, layout, key)
    layout.enrollment_file.write_text("{not json")
    assert load_enrollment(layout) is None and not is_enrolled(config, layout, key)


def test_refusal_carries_the_servers_reason_and_records_nothing(
    tmp_path: Path, trust: TrustRoot, server: FleetServer
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url)
    layout = StateLayout(config.state_dir)
    detail = "enrollment token 3 was already used"
    server.script = [Answer(403, {"error": "enrollment", "detail": detail})]
    with pytest.raises(EnrollmentRefusedError, match=r"\(403\): enrollment token 3 was already"):
        enroll(config, layout, token="efe_used")
    assert not layout.enrollment_file.exists()
    server.script = [Answer(422, {"error": "invalid-request", "detail": "tags: too many"})]
    with pytest.raises(EnrollmentRefusedError, match="tags: too many"):
        enroll(config, layout)


@pytest.mark.parametrize(
    "answer",
    [Answer(503, {"error": "storage", "detail": "database error"}), Answer(500), Answer(429)],
    ids=["503", "500-no-body", "429"],
)
def test_server_trouble_is_transient(
    tmp_path: Path, trust: TrustRoot, server: FleetServer, answer: Answer
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url)
    server.script = [answer]
    with pytest.raises(ServerUnreachableError, match=str(answer.status)):
        enroll(config, StateLayout(config.state_dir))


def test_no_server_is_transient_and_no_url_is_a_config_error(
    tmp_path: Path, trust: TrustRoot
) -> None:
    config = make_config(tmp_path, trust, server_url=f"http://127.0.0.1:{free_port()}")
    layout = StateLayout(config.state_dir)
    with pytest.raises(ServerUnreachableError, match="cannot reach"):
        enroll(config, layout, timeout=2)
    assert layout.device_key.exists()  # made once; the next attempt enrolls the same key
    with pytest.raises(ConfigError, match="no fleet server"):
        enroll(config.model_copy(update={"server_url": None}), layout)
    with pytest.raises(ConfigError, match="http"):
        enroll(config, layout, server_url="mqtt://broker:1883")


@pytest.mark.parametrize(
    ("url", "cleartext"),
    [
        ("http://fleet.example:8080", True),
        ("http://10.0.0.5", True),
        ("http://[2001:db8::1]:8080", True),
        ("https://fleet.example", False),
        ("http://localhost:8080", False),
        ("http://LOCALHOST.", False),
        ("http://127.0.0.1:8080", False),
        ("http://127.0.0.2", False),
        ("http://[::1]:8080", False),
    ],
)
def test_which_server_urls_send_the_token_in_the_clear(url: str, cleartext: bool) -> None:
    assert is_cleartext_to_another_host(url) is cleartext


def test_a_token_over_plain_http_to_another_host_is_warned_about_once(
    tmp_path: Path, trust: TrustRoot, server: FleetServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url)
    layout = StateLayout(config.state_dir)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "plain http://" in r.getMessage()]

    with caplog.at_level("WARNING", logger="edgefleet.agent.enroll"):
        enroll(config, layout, token="efe_secret")  # this machine: nobody on the way
        assert warnings() == []
        remote = f"http://192.0.2.1:{free_port()}"  # TEST-NET-1: nothing answers there
        for _ in range(2):  # as AutoEnroller retries
            with pytest.raises(ServerUnreachableError):
                enroll(config, layout, server_url=remote, token="efe_secret", timeout=0.3)
        (warning,) = warnings()
        assert remote in warning and "efe_secret" not in warning
        caplog.clear()
        # Without a token there is nothing to read on the way.
        quiet = f"http://192.0.2.1:{free_port()}"
        with pytest.raises(ServerUnreachableError):
            enroll(config, layout, server_url=quiet, timeout=0.3)
        assert warnings() == []


# --- the command ------------------------------------------------------------------------------


def test_agent_enroll_command(tmp_path: Path, trust: TrustRoot, server: FleetServer) -> None:
    config = make_config(tmp_path, trust)
    path = tmp_path / "agent.toml"
    write_config(path, config)
    runner = CliRunner()
    args = ["enroll", "--config", str(path), "--server", server.url, "--token", "efe_t"]
    result = runner.invoke(agent_group, [*args, "--tag", "site=berlin", "--tag", "line=3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"enrolled cam-017 with {server.url} (key ")
    assert "tags: line=3, site=berlin" in result.output
    assert server.requests[0]["tags"] == {"site": "berlin", "line": "3"}
    assert server.requests[0]["enroll_token"] == "efe_t"

    as_json = runner.invoke(agent_group, [*args, "--json"])
    assert json.loads(as_json.output)["public_key"] == server.requests[0]["public_key"]

    status = runner.invoke(agent_group, ["status", "--config", str(path), "--json"])
    assert json.loads(status.output)["enrolled_with"] == server.url


def test_agent_enroll_command_reports_a_refusal_in_one_line(
    tmp_path: Path, trust: TrustRoot, server: FleetServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, make_config(tmp_path, trust, server_url=server.url))
    server.script = [Answer(403, {"error": "enrollment", "detail": "unknown enrollment token"})]
    code = run_with_error_handling(agent_group, ["enroll", "--config", str(path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error [enrollment-refused]: the fleet server refused enrollment (403): "
        "unknown enrollment token [enrollment]"
    )
    code = run_with_error_handling(agent_group, ["enroll", "--config", str(path), "--tag", "x"])
    assert code == 2 and "not key=value" in capsys.readouterr().err


def files_holding(text: str, *places: Path) -> list[Path]:
    """Every file under `places` (files or directories) whose bytes contain `text`."""
    files = [f for place in places for f in ([place] if place.is_file() else place.rglob("*"))]
    return [f for f in files if f.is_file() and text.encode() in f.read_bytes()]


def test_the_enrollment_token_is_on_disk_only_until_the_device_enrolled(
    tmp_path: Path, trust: TrustRoot, server: FleetServer, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "trust.json").write_bytes(trust.raw)
    config_path, state = tmp_path / "etc" / "agent.toml", tmp_path / "state"
    token = "efe_" + "k" * 43
    init = [
        "init", "--device-id", "cam-017", "--trust", str(tmp_path / "trust.json"),
        "--profile", "x86_64-vnni", "--state-dir", str(state), "--server", server.url,
        "--enroll-token", token, "-o", str(config_path),
    ]  # fmt: skip
    assert run_with_error_handling(agent_group, init) == 0, capsys.readouterr().err
    assert files_holding(token, config_path, state) == [state / "enroll-token"]
    assert stat.S_IMODE((state / "enroll-token").stat().st_mode) == 0o600

    # A refusal keeps it (the next attempt may succeed: a server that was not ready yet).
    server.script = [Answer(403, {"error": "enrollment", "detail": "not yet"})]
    assert run_with_error_handling(agent_group, ["enroll", "--config", str(config_path)]) == 2
    assert files_holding(token, config_path, state) == [state / "enroll-token"]

    assert run_with_error_handling(agent_group, ["enroll", "--config", str(config_path)]) == 0
    assert [r["enroll_token"] for r in server.requests] == [token, token]
    assert files_holding(token, config_path, state) == []
    assert (state / "enrolled.json").exists() and (state / "device.key").exists()


def test_an_older_agent_toml_holding_the_token_still_loads_and_enrolls(
    tmp_path: Path, trust: TrustRoot, server: FleetServer
) -> None:
    # Devices configured by an older agent carry enroll_token in agent.toml: after an upgrade
    # they must still start and enroll, and the token is never written back.
    (tmp_path / "trust.json").write_bytes(trust.raw)
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        'device_id = "cam-017"\nprofile = "x86_64-vnni"\n'
        f'state_dir = "{tmp_path / "state"}"\ntrust_root = "{tmp_path / "trust.json"}"\n'
        f'server_url = "{server.url}"\nenroll_token = "efe_older"\n'
    )
    config = load_config(config_path)
    assert config.legacy_enroll_token == "efe_older"
    assert "efe_older" not in dump_config(config)
    enroll(config, StateLayout(config.state_dir))
    assert [r["enroll_token"] for r in server.requests] == ["efe_older"]


# --- automatic enrollment ---------------------------------------------------------------------


def test_auto_enroller_retries_while_the_server_is_away(
    tmp_path: Path, trust: TrustRoot, server: FleetServer
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url)
    server.script = [Answer(503), Answer(429, headers={"Retry-After": "0"}), Answer(502)]
    enrolled: list[str] = []
    enroller = AutoEnroller(
        config,
        StateLayout(config.state_dir),
        threading.Event(),
        backoff=FAST,
        on_enrolled=lambda e: enrolled.append(e.public_key),
        rng=random.Random(1),
    )
    enroller.start()
    assert enroller.done.wait(10)
    assert enroller.attempts == 4 and enroller.last_error is None
    assert enroller.enrollment is not None and enrolled == [enroller.enrollment.public_key]
    assert len({r["public_key"] for r in server.requests}) == 1  # one key throughout


def test_auto_enroller_gives_up_on_a_refusal(
    tmp_path: Path, trust: TrustRoot, server: FleetServer
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url)
    server.script = [Answer(403, {"error": "enrollment", "detail": "token expired"})]
    enroller = AutoEnroller(config, StateLayout(config.state_dir), threading.Event(), backoff=FAST)
    enroller.start()
    assert enroller.done.wait(10)
    assert enroller.enrollment is None and "token expired" in (enroller.last_error or "")
    time.sleep(0.2)
    assert len(server.requests) == 1


def test_status_says_why_the_device_is_not_enrolled_yet(
    tmp_path: Path, trust: TrustRoot, server: FleetServer
) -> None:
    config = make_config(tmp_path, trust, server_url=server.url)
    path = tmp_path / "agent.toml"
    write_config(path, config)
    runner = CliRunner()
    status = runner.invoke(agent_group, ["status", "--config", str(path)])
    assert f"enrolled with:   not enrolled yet with {server.url}: no attempt" in status.output

    server.script = [Answer(403, {"error": "enrollment", "detail": "token used up"})]
    enroller = AutoEnroller(config, StateLayout(config.state_dir), threading.Event(), backoff=FAST)
    enroller.start()
    assert enroller.done.wait(10)
    status = runner.invoke(agent_group, ["status", "--config", str(path)])
    assert status.exit_code == 0, status.output
    line = next(x for x in status.output.splitlines() if x.startswith("enrolled with:"))
    assert line.startswith(f"enrolled with:   not enrolled yet with {server.url}: "), line
    assert "token used up" in line and "no fleet server" not in status.output
    as_json = json.loads(
        runner.invoke(agent_group, ["status", "--json", "--config", str(path)]).output
    )
    assert as_json["enrolled_with"] is None and "token used up" in as_json["enrollment_error"]
    assert stat.S_IMODE((config.state_dir / "enroll-failure.json").stat().st_mode) == 0o600

    # Once enrolled, status says with whom, and the failure is forgotten.
    result = runner.invoke(agent_group, ["enroll", "--config", str(path), "--token", "efe_t"])
    assert result.exit_code == 0, result.output
    status = runner.invoke(agent_group, ["status", "--config", str(path)])
    assert f"enrolled with:   {server.url}\n" in status.output
    assert not (config.state_dir / "enroll-failure.json").exists()


def test_agent_serves_at_once_and_enrolls_when_the_server_comes(
    tmp_path: Path, trust: TrustRoot
) -> None:
    from edgefleet.agent.runner import Agent

    port = free_port()
    config = make_config(
        tmp_path,
        trust,
        server_url=f"http://127.0.0.1:{port}",
        local_api=LocalApiSettings(port=0),
    )
    running = Agent(config)
    assert running.device_key is not None  # made at start: the link signs from the first message
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    server: FleetServer | None = None
    try:
        assert wait_until(lambda: running.enroller is not None), "no enrollment started"
        assert running.enroller is not None and not running.enroller.done.is_set()
        api = json.loads(running.layout.local_api_file.read_text())
        url = f"http://127.0.0.1:{api['port']}/v1/health"
        with urllib.request.urlopen(url, timeout=10) as answer:  # serving meanwhile
            assert json.loads(answer.read())["status"] == "no-model"
        # The server appears on the configured port; the enroller's backoff finds it.
        server = FleetServer(port)
        assert running.enroller.done.wait(30), running.enroller.last_error
        assert is_enrolled(config, running.layout, running.device_key)
        assert server.requests[0]["public_key"] == running.device_key.public_hex
    finally:
        running.stopping.set()
        thread.join(30)
        if server is not None:
            server.close()
    assert not thread.is_alive()

    # The next start knows it is enrolled: no second request.
    again = Agent(config)
    again._start_enrollment()
    assert again.enroller is None


# --- signed messages on the wire --------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path_factory.mktemp("broker")) as running:
        yield running


def _link(url: str, tmp_path: Path, device: str, key: DeviceKey | None) -> AgentLink:
    return AgentLink(
        device,
        MqttSettings(url=url, keepalive_seconds=5),
        Outbox(tmp_path / f"outbox-{device}", 1 << 20),
        on_directive=lambda _: None,
        on_fleet_timestamp=lambda _: None,
        device_key=key,
        backoff=Backoff(initial=0.05, maximum=0.3),
        poll_interval=0.1,
    )


def _heartbeat(device: str) -> Heartbeat:
    return Heartbeat(
        device_id=device,
        sent_at=SENT,
        uptime_s=1,
        cpu_percent=1.0,
        memory_used_bytes=1,
        memory_total_bytes=2,
        disk_free_bytes=1,
        disk_total_bytes=2,
        agent_version="0.1.0",
        install_state="idle",
    )


def test_every_device_message_is_signed_for_its_topic(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    device = unique_device_id()
    key = DeviceKey.generate()
    link = _link(broker.url, tmp_path, device, None)
    status = StatusReport(device_id=device, sent_at=SENT, sequence=1, install_state="idle")
    link.publish(TopicKind.STATUS, status)  # queued before the key existed (enrollment)
    link.set_device_key(key)
    topics = link.topics
    observer = Observer(broker.url, [topics.subtree])
    try:
        link.start()
        assert link.wait_connected(10)
        link.publish(TopicKind.HEARTBEAT, _heartbeat(device))
        assert link.send_block_request(b'{"block":"request"}')
        expected = {topics.status: 1, topics.heartbeat: 1, topics.blocks_request: 1}
        assert observer.wait_for(lambda: all(len(observer.on(t)) >= n for t, n in expected.items()))
        status_frame = observer.on(topics.status)[0]
        assert json.loads(verify_device_payload(topics.status, status_frame, key.public_hex)) == (
            json.loads(status.model_dump_json(exclude_none=True))
        )
        beat = verify_device_payload(
            topics.heartbeat, observer.on(topics.heartbeat)[0], key.public_hex
        )
        assert json.loads(beat)["device_id"] == device
        request = observer.on(topics.blocks_request)[0]
        assert verify_device_payload(topics.blocks_request, request, key.public_hex) == (
            b'{"block":"request"}'
        )
        assert observer.on(topics.presence)[0] == b"online"  # presence stays plain
    finally:
        link.stop()
        observer.close()
    # The outbox keeps the plain message: what was queued is signed when sent.
    assert link.device_key is key


def test_without_a_key_messages_go_out_plain(broker: MosquittoBroker, tmp_path: Path) -> None:
    device = unique_device_id()
    link = _link(broker.url, tmp_path, device, None)
    observer = Observer(broker.url, [link.topics.heartbeat])
    try:
        link.start()
        assert link.wait_connected(10)
        link.publish(TopicKind.HEARTBEAT, _heartbeat(device))
        assert observer.wait_for(lambda: bool(observer.on(link.topics.heartbeat)))
        payload = observer.on(link.topics.heartbeat)[0]
        assert not is_device_frame(payload) and json.loads(payload)["device_id"] == device
    finally:
        link.stop()
        observer.close()
