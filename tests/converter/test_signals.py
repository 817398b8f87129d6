"""SIGTERM and SIGHUP end `convert` as SIGINT does: `aborted`, 128 + the signal, and
nothing left behind (no working directory in $TMPDIR, no output), with a real process
and a real signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.converter.conftest import Case

# Bounded waits: the working directory appears within seconds; the process ends at once.
APPEAR_S = 120.0
EXIT_S = 60.0


@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_a_signal_mid_convert_leaves_nothing(
    cnn: Case, tmp_path: Path, signum: int, status: int
) -> None:
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    subprocess.run(
        [sys.executable, "-m", "edgefleet", "keys", "init", tmp_path / "keys"],
        check=True,
        capture_output=True,
    )
    output = tmp_path / "out" / "cnn.efb"
    command: list[str | Path] = [
        sys.executable, "-m", "edgefleet", "convert", cnn.model, "--target", "x86_64-vnni",
        "--calibration", cnn.calibration, "--validation", cnn.validation,
        "--sign", tmp_path / "keys" / "release.key", "--name", "cnn", "--version", "1.0.0",
        "-o", output,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A job started in the background of a shell inherits SIGINT ignored, and Python
        # then raises no KeyboardInterrupt: give the command the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + APPEAR_S
        # Under way: the float model and candidates in the working directory (onnxruntime
        # loaded: a signal inside a C extension's import would fail the import instead).
        while len(list(scratch.glob("edgefleet-convert-*/**/*.onnx"))) < 3:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=EXIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == status, err
    assert err.rstrip().splitlines()[-1] == "aborted"
    assert "Traceback" not in err
    # (A library may leave a file of its own in $TMPDIR, a session id: not the converter's.)
    assert list(scratch.glob("edgefleet-*")) == []
    assert not output.exists()
    assert not output.parent.exists() or list(output.parent.iterdir()) == []
