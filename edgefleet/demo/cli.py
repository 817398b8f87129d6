"""`edgefleet demo`: the whole loop on one machine, in a temporary directory.

Keys -> two models trained here (a good one, and one under a mixed-up label
mapping) converted for this machine and signed -> the fleet server with its
embedded broker -> N agents enrolled by one claim token -> traffic with
labelled feedback -> a canary rollout 10% -> 50% -> 100% judged on it -> the bad
version's rollout, aborted by its accuracy gate and rolled back -> the inputs of a
few devices shifted, and the server's drift alerts for exactly those -> a summary.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgefleet.agentconfig import AgentConfig, dump_config
from edgefleet.demo.fleet import Api, DemoError, Processes, free_ports, wait_for
from edgefleet.demo.model import load_digits, mixed_up, write_model
from edgefleet.demo.traffic import BRIGHTER, Traffic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BUNDLE = "digits"
GOOD, BAD = "1.0.0", "1.1.0"
STAGES = [{"percent": 10}, {"percent": 50}, {"percent": 100}]
# Every stage bakes long enough for the accuracy gate to judge its labels (min_labels).
GATES = {"bake_s": 10, "max_accuracy_drop": 0.1, "min_labels": 40}
ROLLOUT_TIMEOUT_S = 180.0
# The server judges drift over windows of seconds rather than a fleet's minutes (5-minute
# telemetry buckets, 15-minute windows, a check a minute): `server run`'s own options.
SERVER_TIMINGS = ("--telemetry-bucket", "2s", "--drift-interval", "1s",
                  "--drift-window", "10s", "--drift-window-max", "60s")  # fmt: skip
DRIFT_KINDS = ("feature-drift", "prediction-drift", "dataset-drift")
DRIFT_TIMEOUT_S = 120.0
SHIFTED_DEVICES = 3  # the last ones; of a fleet smaller than 6, half of it
# A demo's impatience (defaults 60 s windows, 30 s heartbeats, a 60 s health check).
AGENT_TIMINGS = {
    "telemetry": {"window_seconds": 2, "heartbeat_seconds": 2},
    "health": {"duration_seconds": 3.0},
}


class Story:
    """Prints the demo's progress with the time since it started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.started:5.0f}s] {text}")

    def step(self, title: str) -> None:
        click.secho(f"\n== {title}", bold=True)


@click.command("demo")
@click.option(
    "--agents",
    type=click.IntRange(2, 200),
    default=20,
    show_default=True,
    help="How many agent processes (devices) to run.",
)
@click.option(
    "--keep",
    is_flag=True,
    help="At the end, keep the fleet running and print the web page's URL, until Ctrl-C.",
)
def demo(agents: int, keep: bool) -> None:
    """Show the whole loop on this machine: convert, roll out, judge, abort, watch drift.

    A good version is rolled out in stages judged on live traffic; a bad one is
    aborted by its canaries' labelled feedback; then the inputs of a few devices
    (3 of 20) are brightened, and the demo waits for the server's drift alerts:
    it fails if a shifted device gets none or a calm one gets one.

    Everything runs in a temporary directory and stops at the end, on an error
    and on Ctrl-C: nothing is left running or on disk. See docs/quickstart.md.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):  # stopped or its terminal closed: as Ctrl-C
        signal.signal(signum, _interrupt)
    story = Story()
    work = Path(tempfile.mkdtemp(prefix="efdemo-"))
    processes = Processes(work)
    stop_traffic: list[Callable[[], None]] = []
    try:
        run(story, work, processes, agents, keep, stop_traffic)
    except KeyboardInterrupt:
        click.echo("\nstopping the agents and the server, removing their files", err=True)
        if not keep:
            raise
    finally:
        for stop in stop_traffic:
            stop()
        processes.stop()
        shutil.rmtree(work, ignore_errors=True)
    story.say(f"stopped: every process the demo started has ended; {work} is removed")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(
    story: Story,
    work: Path,
    processes: Processes,
    agents: int,
    keep: bool,
    stop_traffic: list[Callable[[], None]],
) -> None:
    try:
        import sklearn  # noqa: F401  (the demo trains its models on its digits)
    except ImportError as exc:
        raise DemoError("the demo needs scikit-learn: pip install scikit-learn") from exc

    story.step(f"A fleet on this machine, in {work}")
    keys = work / "keys"
    processes.command("keys", "init", keys)
    story.say("keys: root, release and server keys; trust root v1")

    story.step("Two models trained on scikit-learn's digits, converted for this machine, signed")
    digits = load_digits()
    write_model(work / "good.onnx", digits.train, digits.train_labels)
    write_model(work / "bad.onnx", digits.train, mixed_up(digits.train_labels))
    np.savez(work / "calibration.npz", features=digits.train[:200])
    np.savez(work / "validation.npz", features=digits.held_out)
    np.save(work / "labels.npy", digits.held_out_labels)
    np.save(work / "mixed-up-labels.npy", mixed_up(digits.held_out_labels))
    bundles = {}
    for version, model, labels, pin in (
        (GOOD, "good.onnx", "labels.npy", ()),
        (BAD, "bad.onnx", "mixed-up-labels.npy", ("--candidate", "float")),
    ):
        bundles[version] = work / f"{BUNDLE}-{version}.efb"
        report = processes.command(
            "convert", work / model, "--target", "host",
            "--calibration", work / "calibration.npz", "--validation", work / "validation.npz",
            "--labels", work / labels, *pin, "--sign", keys / "release.key",
            "--name", BUNDLE, "--version", version, "-o", bundles[version],
        )  # fmt: skip
        story.say(f"{BUNDLE}@{version}: {report.splitlines()[0]}")
    story.say(
        f"{BUNDLE}@{BAD} was trained and checked with a mixed-up label mapping: "
        "its report says it is accurate; the field will say otherwise"
    )

    story.step("The fleet server with its embedded broker, SQLite in the temporary directory")
    mqtt_port, api_port, *agent_ports = free_ports(2 + agents)
    server_url = f"http://127.0.0.1:{api_port}"
    server_log = work / "server.log"
    processes.start(
        server_log, "server", "run", "--embedded-broker", "--mqtt-port", str(mqtt_port),
        "--port", str(api_port), "--data", work / "server",
        "--trust", keys / "trust.json", "--server-key", keys / "server.key", *SERVER_TIMINGS,
    )  # fmt: skip
    api = Api(server_url)
    wait_for("healthy fleet server", api.healthy, 60, processes)
    api.token = processes.command(
        "server", "token", "create", "--role", "operator", "--name", "demo",
        "--data", work / "server",
    ).strip()  # fmt: skip
    processes.env.update(EDGEFLEET_SERVER=server_url, EDGEFLEET_TOKEN=api.token)
    for bundle in bundles.values():
        processes.command("bundles", "push", bundle)
    story.say(f"server at {server_url}, broker at mqtt://127.0.0.1:{mqtt_port}; pushed both")

    story.step(f"{agents} devices: one agent process each, enrolled by one claim token")
    claim = processes.command("devices", "enroll-token", "--uses", str(agents), "--ttl", "1h")
    ports = {}
    for number, port in enumerate(agent_ports, start=1):
        device = f"demo-{number:02d}"
        ports[device] = port
        state = work / "d" / f"{number:02d}"  # short: the agent's Unix socket lives in it
        config = work / "d" / f"{device}.toml"
        processes.command(
            "agent", "init", "--device-id", device, "--trust", keys / "trust.json",
            "--profile", "host", "--state-dir", state,
            "--mqtt", f"mqtt://127.0.0.1:{mqtt_port}", "--server", server_url,
            "--enroll-token", claim.strip(), "--local-api-port", str(port), "-o", config,
        )  # fmt: skip
        speed_up(config)
        processes.start(work / "d" / f"{device}.log", "agent", "run", "--config", config)

    def online() -> int:
        return sum(item["online"] for item in api.get("/devices?limit=1000")["items"])

    wait_for(f"{agents} online devices", lambda: online() == agents, 180, processes)
    story.say(f"{agents} devices enrolled and online, each with its own key and state")

    traffic = Traffic(digits, ports)
    traffic.start()
    stop_traffic.append(traffic.stop)
    story.say("traffic: held-out digits to every device's local API, with labelled feedback")

    plan = {"stages": STAGES, "gates": GATES, "on_gate_failure": "abort"}
    story.step(f"Canary rollout of {BUNDLE}@{GOOD}: 10% -> 50% -> 100%, judged on live traffic")
    good = rollout(story, processes, api, work, GOOD, plan)
    story.step(f"The bad version {BUNDLE}@{BAD}: its canaries' labelled feedback stops it")
    bad = rollout(story, processes, api, work, BAD, plan)
    shifted = set(sorted(ports)[-min(SHIFTED_DEVICES, agents // 2) :])
    calm = len(ports) - len(shifted)
    story.step(f"Drift: the inputs of {len(shifted)} devices shift, the other {calm} stay calm")
    alerts = drift(story, processes, api, traffic, shifted)

    story.step("Summary")
    serving: dict[str, int] = {}
    for item in api.get("/devices?limit=1000")["items"]:
        serving[str(item["model_version"])] = serving.get(str(item["model_version"]), 0) + 1
    story.say(f"rollout of {GOOD}: {good['state']}; rollout of {BAD}: {bad['state']}")
    story.say(f"{BAD} stopped because: {abort_reason(bad)}")
    story.say("devices serving: " + ", ".join(f"{v}: {n}" for v, n in sorted(serving.items())))
    for version, count in sorted(traffic.requests.items()):
        share = traffic.correct[version] / count
        story.say(f"traffic answered by {version}: {count} digits, {share:.1%} right")
    story.say(
        f"traffic rounds a device did not answer (no model yet, or switching): {traffic.failures}"
    )
    story.say(f"inputs shifted on: {', '.join(sorted(shifted))}; the other {calm} calm")
    by_device: dict[str, set[str]] = {}
    for alert in alerts:
        by_device.setdefault(alert["device_id"], set()).add(alert["kind"])
    listed = [
        f"{device} ({', '.join(sorted(kinds))})" for device, kinds in sorted(by_device.items())
    ]
    story.say(f"devices with drift alerts: {', '.join(listed) or 'none'}")
    mismatch = drift_mismatch(shifted, alerts)
    if mismatch:
        raise DemoError(f"drift alerts do not match the shift: {mismatch}")
    story.say("drift alerts: exactly the shifted devices")
    if keep:
        story.step("The fleet keeps running: Ctrl-C stops it")
        story.say(f"web page: {server_url}/login  (sign in with the token {api.token})")
        while True:
            time.sleep(3600)


def drift(
    story: Story, processes: Processes, api: Api, traffic: Traffic, shifted: set[str]
) -> list[dict[str, Any]]:
    """Shift the inputs of `shifted`; wait until each has an open drift alert, at most
    DRIFT_TIMEOUT_S. Returns every device drift alert of the demo (open or resolved)."""
    traffic.shift(shifted)
    story.say(
        f"traffic: the digits sent to {', '.join(sorted(shifted))} are brightened by "
        f"{BRIGHTER:g} (pixels in [0, 1]), as by a camera whose exposure changed"
    )
    deadline = time.monotonic() + DRIFT_TIMEOUT_S
    last = ""
    while True:
        processes.check_running()
        alerts = [
            alert
            for alert in api.get("/alerts?limit=1000")
            if alert["scope"] == "device" and alert["kind"] in DRIFT_KINDS
        ]
        alerted = sorted(shifted & open_on(alerts))
        calm = sorted({alert["device_id"] for alert in alerts} - shifted)
        line = f"drift alerts open on {len(alerted)} of {len(shifted)} shifted devices"
        line += f" ({', '.join(alerted)})" if alerted else ""
        line += f"; on calm devices: {', '.join(calm) or 'none'}"
        if line != last:
            story.say(line)
            last = line
        if len(alerted) == len(shifted) or time.monotonic() > deadline:
            return alerts
        time.sleep(1)


def open_on(alerts: list[dict[str, Any]]) -> set[str]:
    """The devices with an open alert among `alerts`."""
    return {alert["device_id"] for alert in alerts if alert["resolved_at"] is None}


def drift_mismatch(shifted: set[str], alerts: list[dict[str, Any]]) -> str:
    """What differs from "an open drift alert for each shifted device, none ever for a
    calm one"; empty when nothing does."""
    missing = sorted(shifted - open_on(alerts))
    calm = sorted({alert["device_id"] for alert in alerts} - shifted)
    problems = []
    if missing:
        problems.append(
            f"no open alert for the shifted {', '.join(missing)} after {DRIFT_TIMEOUT_S:.0f} s"
        )
    if calm:
        problems.append(f"alerts for the calm {', '.join(calm)}")
    return "; ".join(problems)


def speed_up(path: Path) -> None:
    """Rewrite the agent configuration `agent init` wrote with the demo's shorter timings."""
    data = tomllib.loads(path.read_text())
    for section, values in AGENT_TIMINGS.items():
        data.setdefault(section, {}).update(values)
    path.write_text(dump_config(AgentConfig.model_validate(data)))


def rollout(
    story: Story, processes: Processes, api: Api, work: Path, version: str, plan: dict[str, Any]
) -> dict[str, Any]:
    """Start a rollout of `version`, print each change of its progress, return its final status."""
    plan_file = work / f"plan-{version}.json"
    plan_file.write_text(json.dumps(plan))
    started = processes.command("rollout", "start", "--bundle", f"{BUNDLE}@{version}",
                                "--plan", plan_file)  # fmt: skip
    rollout_id = started.strip()  # stdout is the id alone
    story.say(f"started rollout {rollout_id}: {BUNDLE}@{version}")
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        processes.check_running()
        status: dict[str, Any] = api.get(f"/rollouts/{rollout_id}")
        line, judged = progress_line(status)
        if line != last:
            story.say(line + judged)
            last = line
        if status["state"] in ("completed", "aborted"):
            return status
        time.sleep(1)
    raise DemoError(f"rollout {rollout_id} did not end in {ROLLOUT_TIMEOUT_S:.0f} s")


def progress_line(status: dict[str, Any]) -> tuple[str, str]:
    """The state, stage, devices and decision; and what the accuracy gate judged, if it did."""
    devices = ", ".join(f"{n} {state}" for state, n in sorted(status["devices"].items()) if n)
    line = f"{status['state']}: stage {status['stage_index'] + 1}/{status['stage_count']}"
    line += f"; devices: {devices or 'none yet'}"
    stage = status["stages"][status["stage_index"]] if status["stages"] else {}
    if stage.get("decision"):
        line += f"; gates: {stage['decision']}"
    accuracy = [c for c in stage.get("checks", []) if c["name"] == "max_accuracy_drop"]
    if accuracy and accuracy[0]["passed"] is not None:
        return line, f" ({accuracy[0]['detail']})"
    return line, ""


def abort_reason(status: dict[str, Any]) -> str:
    """Why the rollout was aborted: the reason of its move to aborting."""
    reasons = [t["reason"] for t in status["transitions"] if t["to_state"] == "aborting"]
    return reasons[-1] if reasons else "it was not aborted"
