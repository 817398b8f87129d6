"""`edgefleet demo` as a user runs it: a real subprocess, real servers and agents, 5 devices.

The demo works in a temporary directory under TMPDIR; pointing TMPDIR at a
directory of the test's own shows that the directory is removed and that no
process whose command line names it is left, after a full run and after Ctrl-C.
It is short, as a user's /tmp is: each agent's Unix socket lives under it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.demo.cli import drift_mismatch

pytestmark = pytest.mark.slow

AGENTS = 5


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="efd-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory)


def _as_in_a_terminal() -> None:
    # A shell runs a foreground command with Ctrl-C's default action; a test run started
    # in the background (`cmd &` in a script) would pass on SIGINT ignored instead.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "demo", "--agents", str(AGENTS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path), "NO_COLOR": "1"},
        preexec_fn=_as_in_a_terminal,
    )


def left_running(tmp_path: Path) -> list[str]:
    """Command lines of processes still naming the demo's directory."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if str(tmp_path) in line:
            found.append(line)
    return found


def test_the_whole_loop_runs_keeps_the_fleet_and_leaves_nothing_behind(tmp_path: Path) -> None:
    process = demo(tmp_path, "--keep")
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "web page: " in line:
            break
    output = "".join(lines)
    assert process.poll() is None, output
    assert "rollout of 1.0.0: completed; rollout of 1.1.0: aborted" in output, output
    assert "1.1.0 stopped because: stage 1: max_accuracy_drop" in output, output
    assert f"devices serving: 1.0.0: {AGENTS}\n" in output, output
    # The drift step: the last two devices' inputs shift; those two alone get drift alerts.
    assert "inputs shifted on: demo-04, demo-05; the other 3 calm\n" in output, output
    alerted = re.search(r"devices with drift alerts: (.*)\n", output)
    assert alerted is not None, output
    devices = re.findall(r"(demo-\d+) \([a-z, -]+\)", alerted.group(1))
    assert devices == ["demo-04", "demo-05"], output
    assert "drift alerts: exactly the shifted devices" in output, output
    url = re.search(r"web page: (\S+)", lines[-1])
    assert url is not None, output
    with urllib.request.urlopen(url.group(1), timeout=30) as page:  # the sign-in page
        assert page.status == 200
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output + rest
    assert "every process the demo started has ended" in rest, rest
    assert left_running(tmp_path) == []
    assert list(tmp_path.glob("efdemo-*")) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_demo_stops_everything_with_a_clear_message(
    tmp_path: Path, signum: signal.Signals
) -> None:
    process = demo(tmp_path)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "devices enrolled and online" in line:
            break
    assert process.poll() is None, "".join(lines)
    running = left_running(tmp_path)  # the agents and the server, once the devices are online
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert running != [], output
    assert "stopping the agents and the server, removing their files" in output, output
    assert process.returncode == 130, output
    assert left_running(tmp_path) == []
    assert list(tmp_path.glob("efdemo-*")) == []


def test_the_drift_step_fails_on_a_missing_or_a_false_alert() -> None:
    shifted = {"demo-04", "demo-05"}

    def alert(device: str, resolved: bool = False) -> dict[str, Any]:
        return {"device_id": device, "kind": "dataset-drift", "resolved_at": resolved or None}

    assert drift_mismatch(shifted, [alert("demo-04"), alert("demo-05")]) == ""
    assert drift_mismatch(shifted, [alert("demo-04"), alert("demo-05", resolved=True)]) == (
        "no open alert for the shifted demo-05 after 120 s"
    )
    calm_alerted = [alert("demo-04"), alert("demo-05"), alert("demo-01", resolved=True)]
    assert drift_mismatch(shifted, calm_alerted) == "alerts for the calm demo-01"
    assert drift_mismatch(shifted, [alert("demo-02")]) == (
        "no open alert for the shifted demo-04, demo-05 after 120 s; alerts for the calm demo-02"
    )
