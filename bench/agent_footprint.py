"""Benchmark: what the running agent costs in memory and start-up time over bare onnxruntime.

On the digits MLP (tests/fixtures/models/digits_mlp.onnx, converted for
x86_64-vnni and signed as the agent tests do, installed offline with
`edgefleet agent install`), in one run, RUNS times, a fresh process each time:

- the agent: `python -m edgefleet agent run` on a device without a broker
  (mqtt.url unset), or connected to the broker given with --mqtt; local API
  on a free port. Timed from the spawn until the
  first successful POST /v1/predict answer (localapi.json polled, then the
  API); VmRSS and VmHWM read from /proc/<pid>/status right after that answer.
- the peer: a bare `python -c` child that imports onnxruntime, opens an
  InferenceSession on the very model.onnx the agent serves (with the agent's
  thread settings, so the thread pools match) and runs the same one sample.
  Timed from the spawn until it says it answered; its /proc status is read by
  this process at that point, the same way.

Figures are medians over the runs. Goal: agent VmRSS minus peer VmRSS (of
the medians) <= RSS_GOAL_MIB. Start-up time has no goal; the ratio is shown.
Exit status 1 when the goal is missed.

    PYTHONPATH=. .venv-test/bin/python bench/agent_footprint.py [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgefleet.agent.config import write_config
from edgefleet.agent.inference.runtimes import runtime_threads
from edgefleet.agentconfig import AgentConfig, HealthSettings, LocalApiSettings, MqttSettings
from edgefleet.keys import SigningKey
from edgefleet.profiles import load_profile
from edgefleet.tables import format_columns
from tests.agent.power_loss_driver import PROFILE, prepare_bundles
from tests.conftest import KeySet, make_trust_root
from tests.fixtures import datasets

RSS_GOAL_MIB = 30.0
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.005

PEER_CHILD = """
import json, sys
import numpy as np
import onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: np.asarray(json.loads(sys.argv[3]), dtype=np.float32)}
session.run(None, feed)
print("answered", flush=True)
sys.stdin.read()  # stay alive until the parent has read /proc
"""


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a live process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # reported in kB
    return fields


def stop(child: subprocess.Popen[Any]) -> None:
    """SIGTERM, wait, SIGKILL if it does not stop in time."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def post_json(port: int, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def run_agent(config: Path, state: Path, sample: list[list[float]], log: Path) -> dict[str, Any]:
    """One agent process: seconds from spawn to first answer, and its memory then."""
    api_file = state / "localapi.json"
    with open(log, "ab") as output:
        started = time.perf_counter()
        agent = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
        )
    try:
        while not api_file.exists():
            if agent.poll() is not None or time.perf_counter() - started > START_TIMEOUT_S:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the agent did not serve; its log ends:\n{tail}")
            time.sleep(POLL_S)
        port = int(json.loads(api_file.read_text())["port"])
        while True:
            try:
                answer = post_json(port, "/v1/predict", {"inputs": {"features": sample}})
                break
            except (ConnectionError, urllib.error.URLError):
                if time.perf_counter() - started > START_TIMEOUT_S:
                    raise
                time.sleep(POLL_S)
        elapsed = time.perf_counter() - started
        if answer.get("answered_by") != "primary":
            raise RuntimeError(f"the installed model did not answer: {answer}")
        return {"first_answer_s": elapsed, **memory_mib(agent.pid)}
    finally:
        stop(agent)


def run_peer(model: Path, threads: int, sample: list[list[float]], cwd: Path) -> dict[str, Any]:
    """One bare onnxruntime process: seconds from spawn to first answer, and its memory then."""
    started = time.perf_counter()
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER_CHILD, str(model), str(threads), json.dumps(sample)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    try:
        assert peer.stdout is not None and peer.stdin is not None
        if peer.stdout.readline().strip() != "answered":
            raise RuntimeError(f"the peer failed (exit status {peer.wait()})")
        elapsed = time.perf_counter() - started
        result = {"first_answer_s": elapsed, **memory_mib(peer.pid)}
        peer.stdin.close()
        return result
    finally:
        stop(peer)


def install_model(tmp: Path, mqtt_url: str | None) -> tuple[Path, Path]:
    """The digits MLP bundle installed offline; returns (agent.toml, state dir)."""
    keys = KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())
    bundles = prepare_bundles(tmp / "bundles", keys.release)
    (tmp / "trust.json").write_bytes(make_trust_root(keys).raw)
    config_path, state = tmp / "agent.toml", tmp / "state"
    config = AgentConfig(
        device_id="bench-footprint",
        profile=PROFILE,
        state_dir=state,
        trust_root=tmp / "trust.json",
        health=HealthSettings(duration_seconds=0, min_requests=0),
        local_api=LocalApiSettings(port=0),
        mqtt=MqttSettings(url=mqtt_url),
    )
    write_config(config_path, config)
    command = ["agent", "install", str(bundles.releases[0]), "--config", str(config_path)]
    subprocess.run([sys.executable, "-m", "edgefleet", *command], check=True, capture_output=True)
    return config_path, state


def measure(tmp: Path, runs: int, mqtt_url: str | None = None) -> dict[str, Any]:
    config, state = install_model(tmp, mqtt_url)
    model = (state / "current" / "model.onnx").resolve()
    threads = runtime_threads(load_profile(PROFILE).threads)
    features, _ = datasets.digits_tabular()
    sample: list[list[float]] = features[:1].tolist()
    agents, peers = [], []
    for _ in range(runs):  # alternate, so a noisy neighbour hits both alike
        agents.append(run_agent(config, state, sample, tmp / "agent.log"))
        peers.append(run_peer(model, threads, sample, tmp))

    def median(rows: list[dict[str, Any]]) -> dict[str, float]:
        return {key: statistics.median(row[key] for row in rows) for key in rows[0]}

    agent, peer = median(agents), median(peers)
    rss_diff = agent["VmRSS"] - peer["VmRSS"]
    return {
        "model": f"digits_mlp.onnx for {PROFILE} ({model.stat().st_size} bytes)",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "runs": runs,
        "broker": mqtt_url or "none (offline device)",
        "agent": agent,
        "peer": peer,
        "rss_diff_mib": rss_diff,
        "hwm_diff_mib": agent["VmHWM"] - peer["VmHWM"],
        "start_ratio": agent["first_answer_s"] / peer["first_answer_s"],
        "rss_goal_mib": RSS_GOAL_MIB,
        "rss_goal_met": rss_diff <= RSS_GOAL_MIB,
        "agent_runs": agents,
        "peer_runs": peers,
    }


def table(r: dict[str, Any]) -> str:
    agent, peer = r["agent"], r["peer"]
    rows = [
        ("metric", "agent", "peer", "difference", "goal", "met"),
        (
            "VmRSS after 1st answer",
            f"{agent['VmRSS']:.1f} MiB",
            f"{peer['VmRSS']:.1f} MiB",
            f"{r['rss_diff_mib']:+.1f} MiB",
            f"<= {r['rss_goal_mib']:.0f} MiB",
            "yes" if r["rss_goal_met"] else "NO",
        ),
        (
            "VmHWM (peak)",
            f"{agent['VmHWM']:.1f} MiB",
            f"{peer['VmHWM']:.1f} MiB",
            f"{r['hwm_diff_mib']:+.1f} MiB",
            "(information)",
            "-",
        ),
        (
            "spawn -> 1st answer",
            f"{agent['first_answer_s'] * 1000:.0f} ms",
            f"{peer['first_answer_s'] * 1000:.0f} ms",
            f"x{r['start_ratio']:.2f}",
            "(information)",
            "-",
        ),
    ]
    header = (
        f"{r['model']}; python {r['python']}, {r['cpus']} CPUs; median of {r['runs']} runs; "
        f"broker: {r['broker']}; peer: bare onnxruntime InferenceSession, same file"
    )
    return header + "\n" + format_columns(rows, rule=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--mqtt", metavar="URL", help="a broker for the agent to stay connected to (mqtt://...)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-footprint-") as scratch:
        result = measure(Path(scratch), args.runs, args.mqtt)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["rss_goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
