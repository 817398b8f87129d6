"""The heartbeat: the device's health, read from /proc and /sys (no extra dependency).

CPU use is the share of non-idle time between two readings of /proc/stat, so
the first heartbeat after start reports the average since boot. Temperature is
the highest thermal zone, where /sys has one (most single-board computers do;
virtual machines do not).

Beside the readings, a heartbeat carries what the agent knows of itself
(`AgentReport`): its MQTT link's counters, the breaker of each fallback step,
its trust root's version, whether it is frozen out (its newest fleet
timestamp expired and no newer one arrived), and its answer to the last
directive it rests after (`directive_answer`: what that directive's last
status report said, read from state.json, so it survives a restart). Each is
left out of the bytes when unknown, so servers that predate them accept the
heartbeat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet import __version__
from edgefleet.agent.inference.info import ModelInfo
from edgefleet.agent.install.record import InstallRecord
from edgefleet.agent.install.states import REFUSED, TERMINAL, State
from edgefleet.agent.link import LinkCounters
from edgefleet.mqtt.messages import (
    MAX_PROBLEM_CHARS,
    BreakerReport,
    DirectiveAnswer,
    Heartbeat,
    LinkReport,
)
from edgefleet.timefmt import format_time, utcnow

PROC = Path("/proc")
THERMAL = Path("/sys/class/thermal")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cpu_times(proc: Path = PROC) -> tuple[int, int]:
    """(busy, total) jiffies since boot, from the first line of /proc/stat."""
    text = _read(proc / "stat") or ""
    fields = [int(value) for value in text.split("\n", 1)[0].split()[1:]]
    if len(fields) < 4:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def memory(proc: Path = PROC) -> tuple[int, int]:
    """(used, total) bytes; used excludes what the kernel can reclaim (MemAvailable)."""
    values: dict[str, int] = {}
    for line in (_read(proc / "meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * 1024
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return max(0, total - available), total


def uptime_seconds(proc: Path = PROC) -> int:
    text = _read(proc / "uptime")
    return int(float(text.split()[0])) if text else 0


def temperature_celsius(thermal: Path = THERMAL) -> float | None:
    readings = []
    for zone in sorted(thermal.glob("thermal_zone*")):
        text = _read(zone / "temp")
        if text and text.strip().lstrip("-").isdigit():
            readings.append(int(text) / 1000)
    return max(readings) if readings else None


def link_report(counters: LinkCounters, outbox_depth: int) -> LinkReport:
    """What a heartbeat says of the MQTT link, from its counters and the outbox's depth."""
    problem = counters.last_problem
    return LinkReport(
        connects=counters.connects,
        disconnects=counters.connection_losses,
        publish_failures=counters.heartbeats_skipped + counters.rejected,
        outbox_depth=outbox_depth,
        last_problem=None if problem is None else problem[:MAX_PROBLEM_CHARS],
    )


def breaker_reports(info: ModelInfo) -> list[BreakerReport]:
    """The breaker state of each step of the fallback chain, in chain order."""
    return [
        BreakerReport.model_validate({"step": step.step, "state": step.breaker})
        for step in info.steps
    ]


def directive_answer(state: State, install: InstallRecord | None) -> DirectiveAnswer | None:
    """The answer to the last directive, once the machine rests after it: the install state
    and reason its last status report carried (`refused` for a refusal). None before any
    directive, and while one is being carried out."""
    if install is None or install.directive_sequence is None or state not in TERMINAL:
        return None
    return DirectiveAnswer(
        sequence=install.directive_sequence,
        install_state=REFUSED if install.refused is not None else state.value,
        reason=install.reason[:2048] if install.reason else None,
    )


@dataclass(frozen=True)
class AgentReport:
    """What the agent reports of itself in each heartbeat (None: not known, left out)."""

    link: LinkReport | None = None
    breakers: list[BreakerReport] | None = None
    trust_root_version: int | None = None
    frozen_reason: str | None = None  # why it is frozen out; None: it is not
    answered: DirectiveAnswer | None = None  # see `directive_answer`


@dataclass
class HeartbeatSource:
    """Builds heartbeats; keeps the previous CPU reading to compute use between beats."""

    device_id: str
    state_dir: Path
    proc: Path = PROC
    thermal: Path = THERMAL
    _last_cpu: tuple[int, int] = field(default=(0, 0), init=False)

    def _cpu_percent(self) -> float:
        busy, total = cpu_times(self.proc)
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        if total <= last_total:
            return 0.0
        return round(100.0 * (busy - last_busy) / (total - last_total), 1)

    def beat(
        self,
        install_state: str,
        model_name: str | None,
        model_version: str | None,
        security_floors: dict[str, int] | None = None,
        report: AgentReport | None = None,
    ) -> Heartbeat:
        report = report or AgentReport()
        used, total = memory(self.proc)
        disk = os.statvfs(self.state_dir)
        return Heartbeat(
            device_id=self.device_id,
            sent_at=format_time(utcnow()),
            uptime_s=uptime_seconds(self.proc),
            cpu_percent=min(100.0, max(0.0, self._cpu_percent())),
            memory_used_bytes=used,
            memory_total_bytes=max(total, used),
            disk_free_bytes=disk.f_bavail * disk.f_frsize,
            disk_total_bytes=disk.f_blocks * disk.f_frsize,
            temperature_c=temperature_celsius(self.thermal),
            agent_version=__version__,
            model_name=model_name,
            model_version=model_version,
            install_state=install_state,
            security_floors=security_floors,
            link=report.link,
            breakers=report.breakers,
            trust_root_version=report.trust_root_version,
            frozen_out=report.frozen_reason is not None,
            frozen_reason=(
                None if report.frozen_reason is None else report.frozen_reason[:MAX_PROBLEM_CHARS]
            ),
            answered=report.answered,
        )
