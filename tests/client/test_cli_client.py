"""The client commands (`bundles`, `rollout`, `devices`) over real HTTP.

The server here is `FakeApi`: a small stdlib HTTP server of our own API's shape
(/api/v1, bearer tokens, `{"error": code, "detail": message}` bodies) that
records every request, so a test can assert what the CLI sent (streamed bytes,
query parameters, the parsed plan) and make the server answer any error.
Tests against the real app served by uvicorn are in tests/server/test_cli_server.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from edgefleet.plantext import MAX_PLAN_BYTES
from tests.agent.broker import free_port
from tests.clirun import Cli
from tests.server.test_plan import billion_laughs

TOKEN = "efa_" + "t" * 43


@dataclass
class Recorded:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeApi:
    """Our API's shape, in memory. `canned` answers the next requests instead (status 0:
    the connection closed with no answer, as by a server that stopped)."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    canned: list[tuple[int, bytes, dict[str, str]]] = field(default_factory=list)
    bundles: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollout_states: list[dict[str, Any]] = field(default_factory=list)

    def error(self, status: int, code: str, detail: str, **headers: str) -> None:
        body = json.dumps({"error": code, "detail": detail}).encode()
        self.canned.append((status, body, headers))

    def answer(self, req: Recorded) -> tuple[int, Any]:
        if req.headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, {"error": "auth", "detail": "missing or unknown API token"}
        path = req.path.removeprefix("/api/v1")
        if req.method == "POST" and path == "/bundles":
            sha = f"{len(req.body):064x}"
            row = {
                "name": "demo",
                "version": "1.2.3",
                "sha256": sha,
                "length": len(req.body),
                "profiles": ["x86_64-avx2"],
                "release_counter": 7,
                "pushed_by": "ci",
                "pushed_at": "2026-11-25T10:00:00+00:00",
                "manifest": {
                    "files": [{"path": "model.onnx", "length": 5, "sha256": "ab"}],
                    "lineage": {"source": "cafe"},
                },
            }
            created = "demo@1.2.3" not in self.bundles
            self.bundles["demo@1.2.3"] = row
            return (201 if created else 200), row
        if req.method == "GET" and path == "/bundles":
            return 200, list(self.bundles.values())
        if match := re.fullmatch(r"/bundles/([^/]+)/([^/]+)", path):
            key = f"{match[1]}@{match[2]}"
            if key not in self.bundles:
                return 404, {"error": "not-found", "detail": f"no bundle {key}"}
            return 200, self.bundles[key]
        if path == "/devices":
            items = [
                {
                    "id": f"dev-{i}",
                    "online": i % 2 == 0,
                    "model_name": "demo",
                    "model_version": "1.2.3",
                    "install_state": "committed",
                    "health": "ok",
                    "verdict": {"state": "ok", "reasons": []},
                    "last_seen": "2026-11-25T10:00:00Z",
                    "profile": "x86_64-avx2",
                    "tags": {"site": "berlin"},
                }
                for i in range(2)
            ]
            return 200, {"items": items, "total": 5}
        if path == "/devices/dev-0":
            return 200, {
                "id": "dev-0",
                "online": True,
                "model_name": "demo",
                "telemetry": [
                    {
                        "bundle_name": "demo",
                        "bundle_version": "1.2.3",
                        "requests": 200,
                        "errors": 3,
                        "error_rate": 0.015,
                        "since": "2026-11-24T10:00:00Z",
                    }
                ],
                "status_reports": [
                    {
                        "sequence": 4,
                        "install_state": "committed",
                        "bundle_name": "demo",
                        "bundle_version": "1.2.3",
                    }
                ],
            }
        if path == "/enroll-tokens":
            return 201, {
                "token": "efe_secret",
                "expires_at": "2026-11-26T10:00:00Z",
                "tags": req.json()["tags"],
            }
        if req.method == "POST" and path == "/rollouts":
            return 201, self.rollout(1, "running")
        if match := re.fullmatch(r"/rollouts/(\d+)", path):
            state = self.rollout_states.pop(0) if self.rollout_states else {"state": "completed"}
            return 200, {**self.rollout(int(match[1]), "running"), **state}
        if match := re.fullmatch(r"/rollouts/(\d+)/(pause|resume|abort)", path):
            return 200, {
                **self.rollout(int(match[1]), "paused"),
                "reason": req.json().get("reason"),
            }
        return 404, {"error": "not-found", "detail": f"no route {path}"}

    @staticmethod
    def rollout(rollout_id: int, state: str) -> dict[str, Any]:
        """The shape of edgefleet.server.api.schemas.rollouts.RolloutStatus."""
        canary = {
            "index": 0,
            "name": "canary",
            "shadow": False,
            "assigned": 2,
            "states": {"succeeded": 1, "installing": 1},
            "decision": "wait",
            "reasons": ["waiting: 1 of 2 devices installed"],
            "checks": [{"name": "success", "passed": None, "detail": "1/2"}],
            "telemetry_age_s": 8.2,  # a large stage's reading, kept a few seconds
        }
        rest = {"index": 1, "name": "stage-2", "shadow": False, "assigned": 0, "states": {}}
        return {
            "id": rollout_id,
            "bundle": "demo@1.2.3",
            "state": state,
            "stage_index": 0,
            "stage_count": 2,
            "stage_started_at": "2026-11-25T10:00:00Z",
            "selector": {"site": "berlin"},
            "devices": {"succeeded": 1, "installing": 1},
            "stages": [canary, rest],
            "transitions": [
                {
                    "at": "2026-11-25T10:00:00Z",
                    "from_state": "created",
                    "to_state": "running",
                    "stage_index": 0,
                    "actor": "ci",
                    "reason": "started",
                }
            ],
            "created_by": "ci",
            "created_at": "2026-11-25T10:00:00Z",
            "updated_at": "2026-11-25T10:00:00Z",
            "reason": None,
        }


def _handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            parts = urlsplit(self.path)
            req = Recorded(
                self.command,
                parts.path,
                parse_qsl(parts.query),
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length),
            )
            api.requests.append(req)
            if api.canned:
                status, body, headers = api.canned.pop(0)
                if status == 0:
                    self.close_connection = True
                    return
            else:
                status, value = api.answer(req)
                body, headers = json.dumps(value).encode(), {}
            self.send_response(status)
            self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _serve

    return Handler


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


class Run:
    """`edgefleet ...` in this process, pointed at `url` with the token (via env)."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self._cli, self._monkeypatch = Cli(capsys), monkeypatch

    def __call__(
        self, *args: str | Path, status: int = 0, token: str | None = TOKEN, url: str
    ) -> tuple[str, str]:
        self._monkeypatch.setenv("EDGEFLEET_SERVER", url)
        if token is None:
            self._monkeypatch.delenv("EDGEFLEET_TOKEN", raising=False)
        else:
            self._monkeypatch.setenv("EDGEFLEET_TOKEN", token)
        return self._cli(*args, status=status)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    return Run(capsys, monkeypatch)


def test_push_streams_the_file_with_its_length(api: FakeApi, run: Run, bundle_file: Path) -> None:
    out, _ = run("bundles", "push", bundle_file, url=api.url)
    assert out.startswith("pushed: demo@1.2.3")
    sent = api.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/api/v1/bundles")
    assert sent.body == bundle_file.read_bytes()
    assert sent.headers["content-length"] == str(bundle_file.stat().st_size)
    assert "transfer-encoding" not in sent.headers
    assert sent.headers["content-type"] == "application/octet-stream"
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    out, _ = run("bundles", "push", bundle_file, url=api.url)
    assert out.startswith("already stored (identical file): demo@1.2.3")


def test_push_refused_by_the_server_reads_like_a_local_refusal(
    api: FakeApi, run: Run, bundle_file: Path
) -> None:
    api.error(422, "unknown-key", "manifest signed by key 1a2b, not in the trust root")
    _, err = run("bundles", "push", bundle_file, url=api.url, status=1)
    assert err.strip() == (
        "refused [unknown-key]: manifest signed by key 1a2b, not in the trust root"
    )
    api.error(409, "bundle-exists", "demo@1.2.3 is stored with sha256 aa..., not bb...")
    _, err = run("bundles", "push", bundle_file, url=api.url, status=1)
    assert (
        err.strip() == "refused [bundle-exists]: demo@1.2.3 is stored with sha256 aa..., not bb..."
    )


@pytest.mark.parametrize(
    ("status", "code", "headers", "expected", "exit_status"),
    [
        (401, "auth", {}, "refused [auth]: viewer tokens may not push", 1),
        (403, "forbidden", {}, "refused [forbidden]: viewer tokens may not push", 1),
        (404, "whatever", {}, "refused [not-found]: viewer tokens may not push", 1),
        (409, "rollout-state", {}, "refused [rollout-state]: viewer tokens may not push", 1),
        (422, "invalid-request", {}, "refused [invalid-request]: viewer tokens may not push", 1),
        (
            429,
            "rate-limited",
            {"Retry-After": "7"},
            "error [rate-limited]: viewer tokens may not push (retry after 7 s)",
            2,
        ),
        (503, "storage", {}, "error [storage]: viewer tokens may not push", 2),
        (500, "internal", {}, "error [server-response]: HTTP 500 from ", 2),
    ],
)
def test_error_answers_become_the_servers_errors(
    api: FakeApi,
    run: Run,
    status: int,
    code: str,
    headers: dict[str, str],
    expected: str,
    exit_status: int,
) -> None:
    """A refusal of the request (4xx but a rate limit) exits 1, as a local refusal does;
    a server that is busy or failed exits 2."""
    api.error(status, code, "viewer tokens may not push", **headers)
    _, err = run("rollout", "pause", "3", url=api.url, status=exit_status)
    assert err.startswith(expected)


def test_an_answer_that_is_not_the_apis(api: FakeApi, run: Run) -> None:
    api.canned.append((502, b"<html>Bad Gateway</html>", {"Content-Type": "text/html"}))
    _, err = run("rollout", "list", url=api.url, status=2)
    assert err.startswith("error [server-response]: HTTP 502 from ")
    assert "Bad Gateway" in err


def test_without_a_token_the_error_says_how_to_get_one(api: FakeApi, run: Run) -> None:
    _, err = run("bundles", "list", url=api.url, token=None, status=1)
    assert err.startswith("refused [auth]: missing or unknown API token (no API token given")
    assert "edgefleet server token create" in err
    assert "authorization" not in api.requests[-1].headers


def test_unreachable_server_names_the_url_and_the_fix(run: Run) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    _, err = run("devices", "list", url=url, status=2)
    assert err.startswith(f"error [server-unreachable]: cannot reach the server at {url}: ")
    assert "is `edgefleet server run` running? set --server or EDGEFLEET_SERVER" in err


def test_bad_server_url_is_a_usage_error(run: Run) -> None:
    _, err = run("devices", "list", url="127.0.0.1:8080", status=2)
    assert "must start with http:// or https://" in err


def test_bundles_list_and_show(api: FakeApi, run: Run, bundle_file: Path) -> None:
    out, _ = run("bundles", "list", url=api.url)
    assert out.startswith("no bundles")
    run("bundles", "push", bundle_file, url=api.url)
    out, _ = run("bundles", "list", url=api.url)
    header, row = out.splitlines()
    assert header.split() == ["BUNDLE", "SIZE", "PROFILES", "RELEASE", "PUSHED", "BY", "SHA256"]
    assert row.startswith("demo@1.2.3") and "x86_64-avx2" in row and "2026-11-25 10:00:00" in row
    out, _ = run("bundles", "show", "demo@1.2.3", url=api.url)
    assert "profiles:          x86_64-avx2" in out
    assert "lineage source: cafe" in out and "model.onnx" in out
    out, _ = run("bundles", "show", "demo@1.2.3", "--json", url=api.url)
    assert json.loads(out)["release_counter"] == 7
    _, err = run("bundles", "show", "demo@9.9.9", url=api.url, status=1)
    assert err.strip() == "refused [not-found]: no bundle demo@9.9.9"
    _, err = run("bundles", "show", "demo", url=api.url, status=2)
    assert "expected NAME@VERSION" in err


def test_devices_list_sends_filters_and_pages(api: FakeApi, run: Run) -> None:
    out, _ = run(
        "devices",
        "list",
        "--online",
        "--tag",
        "site=berlin",
        "--tag",
        "line=3",
        "--model",
        "demo",
        "--limit",
        "2",
        url=api.url,
    )
    query = api.requests[-1].query
    assert ("online", "true") in query and ("model", "demo") in query
    assert [v for k, v in query if k == "tag"] == ["site=berlin", "line=3"]
    assert ("limit", "2") in query
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["DEVICE", "ONLINE", "VERDICT", "MODEL"]
    assert "  LAST SEEN (UTC)  " in lines[0]  # the times below say their zone
    assert lines[1].split()[:4] == ["dev-0", "yes", "ok", "demo@1.2.3"]
    assert lines[-1] == "devices 1-2 of 5 (--offset for more)"
    out, _ = run("devices", "list", "--json", url=api.url)
    assert json.loads(out)["total"] == 5
    _, err = run("devices", "list", "--tag", "site", url=api.url, status=2)
    assert "--tag 'site': expected KEY=VALUE" in err
    run("devices", "list", "--offline", url=api.url)
    assert ("online", "false") in api.requests[-1].query
    sent = len(api.requests)
    _, err = run("devices", "list", "--online", "--offline", url=api.url, status=2)
    assert err.startswith("error [usage]: --online and --offline exclude each other")
    for model in ("demo@", "@1.2.3"):
        _, err = run("devices", "list", "--model", model, url=api.url, status=2)
        assert err.startswith(f"error [usage]: --model {model!r}: give NAME or NAME@VERSION")
    assert len(api.requests) == sent  # refused before asking the server


def test_devices_show(api: FakeApi, run: Run) -> None:
    out, _ = run("devices", "show", "dev-0", url=api.url)
    assert "device:           dev-0" in out and "serving:          demo" in out
    assert "committed" in out and "demo@1.2.3" in out


def test_devices_remove_sends_a_delete_and_reports_a_conflict(api: FakeApi, run: Run) -> None:
    api.canned.append((204, b"", {}))
    out, _ = run("devices", "remove", "cam/1", url=api.url)
    assert out == "removed device cam/1\n"
    assert (api.requests[-1].method, api.requests[-1].path) == ("DELETE", "/api/v1/devices/cam%2F1")
    api.error(409, "conflict", "device cam-1 is part of active rollout 3 (running)")
    _, err = run("devices", "remove", "cam-1", url=api.url, status=1)
    assert err.startswith("refused [conflict]: ") and "rollout 3 (running)" in err


def test_enroll_token_prints_only_the_token(api: FakeApi, run: Run) -> None:
    out, err = run("devices", "enroll-token", "--tag", "site=berlin", "--ttl", "2h", url=api.url)
    assert out == "efe_secret\n"
    assert "valid until 2026-11-26 10:00:00 UTC, for one device" in err
    assert api.requests[-1].json() == {"tags": {"site": "berlin"}, "ttl_s": 7200, "max_uses": 1}
    _, err = run("devices", "enroll-token", "--uses", "500", url=api.url)
    assert api.requests[-1].json()["max_uses"] == 500 and "for 500 devices" in err
    _, err = run("devices", "enroll-token", "--uses", "0", url=api.url, status=2)
    assert "--uses" in err
    _, err = run("devices", "enroll-token", "--ttl", "soon", url=api.url, status=2)
    assert "duration 'soon'" in err


def test_rollout_start_sends_the_parsed_plan(api: FakeApi, run: Run, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "stages:\n  - {name: canary, devices: [dev-0]}\n  - percent: 100\n"
        "gates:\n  bake_s: 30\non_gate_failure: pause\n"
    )
    out, err = run(
        "rollout",
        "start",
        "--bundle",
        "demo@1.2.3",
        "--select",
        "site=berlin,line=3",
        "--plan",
        plan,
        url=api.url,
    )
    assert api.requests[-1].json() == {
        "bundle": "demo@1.2.3",
        "select": "site=berlin,line=3",
        "plan": {
            "stages": [{"name": "canary", "devices": ["dev-0"]}, {"percent": 100}],
            "gates": {"bake_s": 30},
            "on_gate_failure": "pause",
        },
    }
    assert out == "1\n"  # the id alone: id=$(edgefleet rollout start ...)
    assert err.startswith("started rollout 1: demo@1.2.3 running, stage 1/2 (canary)")
    assert "edgefleet rollout status 1 --watch" in err


def test_rollout_start_refuses_a_plan_that_is_not_a_mapping(
    api: FakeApi, run: Run, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.yaml"
    for text in ("- percent: 100\n", "stages: [\n"):
        plan.write_text(text)
        _, err = run(
            "rollout", "start", "--bundle", "demo@1", "--plan", plan, url=api.url, status=2
        )
        assert f"plan {plan}" in err
    assert api.requests == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("stages: [{percent: .inf}]\n", "stages.0.percent: inf is not a finite number"),
        ("stages: [{percent: 100}]\ngates: {bake_s: .nan}\n", "gates.bake_s: nan is not a"),
        (billion_laughs(), "aliases (*name) are not allowed (line 3, column "),
        ("stages: " + "[" * 20_000, "nested deeper than 16 levels"),
        ("stages: [{percent: 100}]\n#" + "x" * MAX_PLAN_BYTES, "longer than 65536 bytes"),
        ("stages: [{percent: 100, name: caf\xe9}]\n".encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_rollout_start_refuses_a_plan_no_server_would_take_in_one_line(
    api: FakeApi, run: Run, tmp_path: Path, text: str | bytes, reason: str
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(text if isinstance(text, bytes) else text.encode())
    tracemalloc.start()
    try:
        _, err = run("rollout", "start", "--bundle", "demo@1.2.3", "--plan", plan, url=api.url,
                     status=2)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(err.splitlines()) == 1 and err.startswith(f"error [usage]: plan {plan}: {reason}")
    assert peak < 20 * 1024 * 1024  # an alias bomb expanded would take gigabytes
    assert api.requests == []


def test_rollout_status_shows_stage_gate_and_history(api: FakeApi, run: Run) -> None:
    api.rollout_states = [{"state": "running"}]
    out, _ = run("rollout", "status", "4", url=api.url)
    assert "rollout:   4  demo@1.2.3" in out
    assert "devices:   1 succeeded, 1 installing" in out
    assert "gate:      wait (on telemetry read 8 s ago)" in out
    assert "  - waiting: 1 of 2 devices installed" in out
    assert "not judged yet" in out
    assert re.search(r"2026-11-25 10:00:00\s+created\s+running\s+1\s+ci\s+started", out)


def test_watch_prints_a_line_per_change_until_final(api: FakeApi, run: Run) -> None:
    running = {"state": "running"}
    api.rollout_states = [running, running, {"state": "completed", "stage_index": 1}]
    out, _ = run("rollout", "status", "4", "--watch", "--interval", "0.01", url=api.url)
    lines = out.splitlines()
    assert len(lines) == 2, out  # the repeated running status printed once
    assert "demo@1.2.3 running, stage 1/2" in lines[0]
    assert "demo@1.2.3 completed, stage 2/2" in lines[1]
    assert len(api.requests) == 3


def test_watch_exits_1_when_the_rollout_is_aborted(api: FakeApi, run: Run) -> None:
    api.rollout_states = [{"state": "aborted", "reason": "gate failed: error rate 0.3"}]
    out, err = run(
        "rollout", "status", "4", "--watch", "--json", "--interval", "0.01", url=api.url, status=1
    )
    assert json.loads(out)["state"] == "aborted"
    assert err.strip() == "rollout 4 ended aborted: gate failed: error rate 0.3"


def test_watch_waits_out_a_rate_limit(api: FakeApi, run: Run) -> None:
    api.error(429, "rate-limited", "slow down", **{"Retry-After": "0.01"})
    out, _ = run("rollout", "status", "4", "--watch", "--interval", "0.01", url=api.url)
    assert "completed" in out


def test_pause_resume_abort_send_the_reason(api: FakeApi, run: Run) -> None:
    for action, past in [("pause", "paused"), ("resume", "resumed"), ("abort", "aborting")]:
        out, _ = run("rollout", action, "4", "--reason", "night shift", url=api.url)
        assert api.requests[-1].path == f"/api/v1/rollouts/4/{action}"
        assert api.requests[-1].json() == {"reason": "night shift"}
        assert out.startswith(f"rollout 4 {past}: ")


def test_client_commands_import_no_server_dependency(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = (
        "import sys\n"
        "from edgefleet.cli import cli\n"
        "from edgefleet.cli.errors import run_with_error_handling\n"
        "for args in (['devices', 'list'], ['rollout', 'list'], ['bundles', 'list']):\n"
        f"    assert run_with_error_handling(cli, args + ['--server', {url!r}]) == 2\n"
        "heavy = {'fastapi', 'sqlalchemy', 'alembic', 'uvicorn', 'starlette', 'paho'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert result.stdout.strip() == "[]"
    assert result.stderr.count("cannot reach the server") == 3


def test_a_success_that_is_not_json(api: FakeApi, run: Run) -> None:
    api.canned.append((200, b"<html>a login page</html>", {"Content-Type": "text/html"}))
    _, err = run("rollout", "list", url=api.url, status=2)
    assert err.strip() == (
        f"error [server-response]: the answer of {api.url}/api/v1/rollouts is not JSON: "
        f"is {api.url} an edgefleet server?"
    )


def test_watch_on_a_terminal_redraws_the_whole_status(
    api: FakeApi, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    api.rollout_states = [{"state": "running"}, {"state": "completed", "stage_index": 1}]
    out, _ = run("rollout", "status", "4", "--watch", "--interval", "0.01", url=api.url)
    screens = out.split("\033[2J\033[1;1H")
    assert len(screens) == 3 and screens[0] == ""  # cleared before each of the two draws
    assert "state:     running" in screens[1] and "state:     completed" in screens[2]
    assert "every 0.01 s; Ctrl-C stops watching" in screens[2]


def test_watch_asks_again_while_the_server_restarts(api: FakeApi, run: Run) -> None:
    running = json.dumps(api.rollout(4, "running")).encode()
    hang_up: tuple[int, bytes, dict[str, str]] = (0, b"", {})
    api.canned = [(200, running, {}), hang_up, hang_up, hang_up]  # then: completed
    out, err = run("rollout", "status", "4", "--watch", "--interval", "0.01", url=api.url)
    assert "running" in out and "completed" in out
    assert "asking again for up to 120 s" in err
    assert err.count("lost the connection") == 1  # said once, not per attempt
    assert "the server answers again" in err


def test_watch_gives_up_on_a_server_that_never_answered(api: FakeApi, run: Run) -> None:
    api.canned = [(0, b"", {})]
    _, err = run("rollout", "status", "4", "--watch", "--interval", "0.01", url=api.url, status=2)
    assert "lost the connection" in err and "asking again" not in err
