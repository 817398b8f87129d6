"""Every command, with any subset of the extras installed, ends in one line and 0, 1 or 2.

The package is installed into fresh virtual environments (no system site
packages, so nothing leaks in, `tests.wheelenv`): the core alone, the core with
the agent extra, and the core with the client extra. Each runs every command
of the click tree with plausible arguments; a command of a group whose extra is
missing must say which extra to install.
The test environment itself (every extra) runs the same commands.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from edgefleet.cli import COMMANDS, cli
from edgefleet.extras import install_hint
from tests.wheelenv import build_wheel, fresh_venv

ERROR_LINE = re.compile(r"^(error|refused) \[[a-z0-9-]+\]: \S")


def plausible_args(work: Path, free_port: int) -> dict[str, list[str]]:
    """Arguments a user could well type, for every command (keyed by its path)."""
    keys = work / "keys"
    trust = str(keys / "trust.json")
    bundle = str(work / "demo.efb")
    config = str(work / "agent.toml")
    return {
        "keys init": ["keys", "init", str(work / "keys2")],
        "keys generate": ["keys", "generate", "-o", str(work / "spare.key")],
        "keys show": ["keys", "show", trust],
        "keys rotate": [
            "keys",
            "rotate",
            "--trust",
            trust,
            "--root-key",
            str(keys / "root.key"),
            "--add-release",
            str(work / "extra.pub"),
        ],
        "bundle build": [
            "bundle",
            "build",
            str(work / "model"),
            "--name",
            "demo",
            "--version",
            "1.1.0",
            "--profile",
            "host",
            "--key",
            str(keys / "release.key"),
            "-o",
            str(work / "demo2.efb"),
        ],
        "bundle verify": ["bundle", "verify", bundle, "--trust", trust, "--profile", "aarch64"],
        "bundle inspect": ["bundle", "inspect", bundle],
        "targets list": ["targets", "list"],
        "targets show": ["targets", "show", "host"],
        "ca init": ["ca", "init", str(work / "ca")],
        # Builds the armhf root into the default cache once (or says what to install).
        "emulate build-root": ["emulate", "build-root", "--arch", "armhf"],
        # The bundle is for aarch64: refused before any root is needed.
        "emulate smoke": ["emulate", "smoke", bundle, "--arch", "armhf", "--trust", trust],
        # No agent runs on the armhf root (no 32-bit ARM wheels of its dependencies): refused.
        "emulate agent": [
            "emulate",
            "agent",
            "--arch",
            "armhf",
            "--",
            "status",
            "--config",
            config,
        ],
        "ca issue": ["ca", "issue", "fleet.example", "--ca", str(work / "ca"), "-o", str(work)],
        "broker config": [
            "broker",
            "config",
            "--ca",
            str(work / "ca"),
            "--port",
            "8883",
            "-o",
            str(work / "broker"),
        ],
        "broker check": ["broker", "check", f"mqtt://127.0.0.1:{free_port}", "--timeout", "2"],
        "demo": ["demo", "--agents", "1"],
        "simulate": [
            "simulate",
            "--devices",
            "1",
            "--server",
            f"http://127.0.0.1:{free_port}",
            "--mqtt",
            f"mqtt://127.0.0.1:{free_port}",
            "--trust",
            trust,
        ],
        "agent init": [
            "agent",
            "init",
            "--device-id",
            "cam-1",
            "--trust",
            trust,
            "--profile",
            "host",
            "--state-dir",
            str(work / "state"),
            "-o",
            config,
        ],
        "agent status": ["agent", "status", "--config", config],
        "agent install": ["agent", "install", bundle, "--config", config],
        "agent rollback": ["agent", "rollback", "--config", config],
        "agent predict": ["agent", "predict", "--input", str(work / "x.npy"), "--config", config],
        "agent enroll": ["agent", "enroll", "--config", config],
        "agent run": ["agent", "run", "--config", str(work / "no-such-agent.toml")],
        "convert": [
            "convert",
            str(work / "model" / "model.onnx"),
            "--target",
            "host",
            "--calibration",
            str(work / "cal.npz"),
            "-o",
            str(work / "c.efb"),
        ],
        # The release key is no server key: with every extra it stops before serving.
        "server run": [
            "server",
            "run",
            "--trust",
            trust,
            "--server-key",
            str(keys / "release.key"),
            "--data",
            str(work / "server"),
            "--port",
            str(free_port),
        ],
        "server token create": [
            "server",
            "token",
            "create",
            "--role",
            "admin",
            "--name",
            "me",
            "--data",
            str(work / "server"),
        ],
        "trust push": ["trust", "push", trust],
        "trust show": ["trust", "show"],
        "bundles push": ["bundles", "push", bundle],
        "bundles list": ["bundles", "list"],
        "bundles show": ["bundles", "show", "demo@1.0.0"],
        "devices list": ["devices", "list"],
        "devices show": ["devices", "show", "cam-1"],
        "devices health": ["devices", "health", "cam-1"],
        "devices diagnose": ["devices", "diagnose", "cam-1"],
        "devices remove": ["devices", "remove", "cam-1"],
        "devices enroll-token": ["devices", "enroll-token", "--ttl", "2h"],
        "devices provision": [
            "devices",
            "provision",
            "cam-1",
            "--profile",
            "aarch64",
            "--trust",
            trust,
            "--ca-cert",
            str(work / "ca" / "ca.crt"),
            "--mqtt",
            "mqtts://broker.example:8883",
            "-o",
            str(work / "cam-1-image"),
        ],
        "rollout start": [
            "rollout",
            "start",
            "--bundle",
            "demo@1.0.0",
            "--plan",
            str(work / "plan.yaml"),
        ],
        "rollout status": ["rollout", "status", "1"],
        "rollout list": ["rollout", "list"],
        "rollout pause": ["rollout", "pause", "1"],
        "rollout resume": ["rollout", "resume", "1"],
        "rollout abort": ["rollout", "abort", "1", "--reason", "test"],
        "alerts list": ["alerts", "list", "--open"],
        "alerts ack": ["alerts", "ack", "1"],
        "webhooks deliveries": ["webhooks", "deliveries", "--failed"],
        "webhooks retry": ["webhooks", "retry", "1"],
        "dead-letters list": ["dead-letters", "list", "--device", "cam-1"],
        "dead-letters show": ["dead-letters", "show", "1"],
        "dead-letters replay": ["dead-letters", "replay", "1"],
        "dead-letters discard": ["dead-letters", "discard", "1"],
        "samples list": ["samples", "list", "--device", "cam-1"],
        "samples get": ["samples", "get", "1", "-o", str(work / "samples.npz")],
    }


def command_paths() -> set[str]:
    """Every leaf command of the `edgefleet` tree (this environment has every extra)."""
    ctx = click.Context(cli)

    def walk(command: click.Command, path: list[str]) -> Iterator[str]:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path)

    return set(walk(cli, []))


def test_every_command_has_plausible_args(tmp_path: Path) -> None:
    assert set(plausible_args(tmp_path, 1)) == command_paths()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built once from a copy of the sources (the tree stays untouched)."""
    built, _ = build_wheel(tmp_path_factory.mktemp("wheel"))
    return built


def _run(python: Path | str, args: list[str], work: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "EDGEFLEET_SERVER": "http://127.0.0.1:9",  # nothing listens there
        "EDGEFLEET_TOKEN": "efa_" + "x" * 43,
    }
    return subprocess.run(
        [python, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=300,
    )


def _prepare(python: Path | str, work: Path) -> None:
    """Keys, a model directory, a bundle, a plan: made with the environment's own core."""
    model = work / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"not really a model")
    (model / "notes.txt").write_text("release notes\n")
    (work / "x.npy").write_bytes(b"not an array")
    (work / "cal.npz").write_bytes(b"not an archive")
    (work / "plan.yaml").write_text("stages: [{percent: 100}]\n")
    keys = work / "keys"
    for args in (
        ["keys", "init", str(keys)],
        ["keys", "generate", "-o", str(work / "extra.key")],
        ["bundle", "build", str(model), "--name", "demo", "--version", "1.0.0", "--profile",
         "aarch64", "--key", str(keys / "release.key"), "-o", str(work / "demo.efb")],
    ):  # fmt: skip
        made = _run(python, args, work)
        assert made.returncode == 0, made.stderr


def _check_every_command(python: Path | str, installed: set[str], work: Path) -> None:
    _prepare(python, work)
    failures = []
    for path, args in plausible_args(work, _free_port()).items():
        result = _run(python, args, work)
        lines = result.stderr.strip().splitlines()
        extra = COMMANDS[path.split()[0]].extra
        problem = None
        if "Traceback" in result.stdout + result.stderr:
            problem = "a traceback"
        elif result.returncode not in (0, 1, 2):
            problem = f"exit status {result.returncode}"
        elif result.returncode != 0 and not (len(lines) == 1 and ERROR_LINE.match(lines[0])):
            problem = "not one error line"
        elif (
            extra is not None
            and extra not in installed
            and (result.returncode != 2 or install_hint(extra) not in result.stderr)
        ):
            problem = f"does not name the missing {extra} extra"
        if problem:
            failures.append(f"{path}: {problem} (exit {result.returncode})\n{result.stderr}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extras", "installed"),
    [("", set()), ("[agent]", {"agent"}), ("[client]", {"client"})],
    ids=["core", "agent", "client"],
)
def test_every_command_ends_in_one_line_without_extras(
    wheel: Path, tmp_path: Path, extras: str, installed: set[str]
) -> None:
    python = fresh_venv(tmp_path / "venv", f"{wheel}{extras}")
    work = tmp_path / "work"
    work.mkdir()
    _check_every_command(python, installed, work)


@pytest.mark.slow
def test_every_command_ends_in_one_line_with_every_extra(tmp_path: Path) -> None:
    _check_every_command(
        sys.executable, {"agent", "server", "client", "converter", "simulate", "all"}, tmp_path
    )
