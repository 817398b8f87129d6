"""What one simulated device says: its key, what it serves, and every message it sends.

Messages are built with the core's schemas (`edgefleet.mqtt.messages`) and
signed with the device's own Ed25519 key (`edgefleet.mqtt.devicesig`), as
the agent's link sends them. A directive is answered as the agent answers it:
an install reports `downloading`, then `committed` (the served version moves)
or `failed` with a reason; a shadow install commits beside the served
version; a rollback names the bundle it undoes (a device not serving it keeps
what it serves) and reports `rolling_back`, then `committed`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from edgefleet.mqtt.devicesig import DeviceKey, sign_device_payload
from edgefleet.mqtt.directives import Directive
from edgefleet.mqtt.messages import (
    BinCounts,
    Heartbeat,
    LatencyHistogram,
    Message,
    StatusReport,
    TelemetryWindow,
    encode_message,
)
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.timefmt import format_time

LATENCY_BOUNDS = [5.0, 10.0, 50.0, 100.0]
DEFAULT_PROFILE = "x86_64-avx2"


@dataclass
class SimDevice:
    """One simulated device: its id, key, profile and what it serves."""

    id: str
    key: DeviceKey = field(default_factory=DeviceKey.generate)
    profile: str = DEFAULT_PROFILE
    model_name: str | None = None
    model_version: str | None = None
    previous_version: str | None = None
    status_sequence: int = 0
    directive_sequence: int = 0

    @property
    def public_key(self) -> str:
        return self.key.public_hex

    @property
    def topics(self) -> DeviceTopics:
        return DeviceTopics(self.id)

    def frame(self, kind: TopicKind, message: Message) -> tuple[str, bytes]:
        """The topic and signed payload of `message` from this device."""
        topic = self.topics.topic(kind)
        return topic, sign_device_payload(topic, encode_message(message), self.key)

    def enrollment(self, agent_version: str, token: str | None) -> dict[str, Any]:
        """The body of POST /api/v1/devices/enroll for this device."""
        return {
            "device_id": self.id,
            "public_key": self.public_key,
            "profile": self.profile,
            "arch": "x86_64",
            "runtimes": ["onnxruntime"],
            "agent_version": agent_version,
            "tags": {},
            "enroll_token": token,
        }

    def heartbeat(self, now: dt.datetime, agent_version: str, **overrides: Any) -> Heartbeat:
        fields: dict[str, Any] = {
            "device_id": self.id,
            "sent_at": format_time(now),
            "uptime_s": 100,
            "cpu_percent": 12.5,
            "memory_used_bytes": 100 << 20,
            "memory_total_bytes": 1 << 30,
            "disk_free_bytes": 1 << 30,
            "disk_total_bytes": 8 << 30,
            "agent_version": agent_version,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "install_state": "committed" if self.model_version else "idle",
        }
        fields.update(overrides)
        return Heartbeat(**fields)

    def status(self, now: dt.datetime, install_state: str, **fields: Any) -> StatusReport:
        """The next status report (its sequence one above the last)."""
        self.status_sequence += 1
        return StatusReport(
            device_id=self.id,
            sent_at=format_time(now),
            sequence=fields.pop("sequence", self.status_sequence),
            install_state=install_state,
            **fields,
        )

    def telemetry(self, start: dt.datetime, **fields: Any) -> TelemetryWindow:
        if self.model_name and self.model_version and "bundle" not in fields:
            fields["bundle"] = (self.model_name, self.model_version)
        return telemetry_window(self.id, start, **fields)

    # -- answering a directive -----------------------------------------------------------

    def begin(self, directive: Directive, now: dt.datetime) -> list[StatusReport]:
        """What the device reports on accepting `directive`, before any download."""
        if directive.action == "install" and directive.bundle is not None:
            return [self.status(now, "downloading", **self._install_fields(directive))]
        if directive.action == "rollback":
            return [
                self.status(
                    now,
                    "rolling_back",
                    bundle_name=self.model_name,
                    bundle_version=self.model_version,
                    directive_sequence=directive.sequence,
                )
            ]
        return []  # diagnostics: no install state changes

    def finish(
        self, directive: Directive, now: dt.datetime, failure: str | None = None
    ) -> list[StatusReport]:
        """What the device reports once `directive` was carried out, or failed (`failure`)."""
        if directive.action == "rollback":
            named = directive.bundle
            if named is None or (self.model_name, self.model_version) == (
                named.name,
                named.version,
            ):
                self.model_version, self.previous_version = self.previous_version, None
            return [
                self.status(
                    now,
                    "committed",
                    bundle_name=self.model_name,
                    bundle_version=self.model_version,
                    directive_sequence=directive.sequence,
                    reason="rolled back on request",
                )
            ]
        bundle = directive.bundle
        if directive.action != "install" or bundle is None:
            return []
        common = self._install_fields(directive)
        if failure is not None:
            return [self.status(now, "failed", reason=failure, **common)]
        if directive.shadow:
            reason = f"{bundle.name}-{bundle.version} runs in shadow beside {self.model_version}"
            return [self.status(now, "committed", reason=reason, **common)]
        self.previous_version = self.model_version
        self.model_name, self.model_version = bundle.name, bundle.version
        return [self.status(now, "committed", **common)]

    def _install_fields(self, directive: Directive) -> dict[str, Any]:
        assert directive.bundle is not None
        return {
            "bundle_name": directive.bundle.name,
            "bundle_version": directive.bundle.version,
            "previous_version": self.model_version,
            "directive_sequence": directive.sequence,
        }


def telemetry_window(
    device_id: str,
    start: dt.datetime,
    *,
    bundle: tuple[str, str] = ("demo", "1.2.3"),
    requests: int = 100,
    errors: int = 0,
    fallbacks: int = 0,
    seconds: int = 60,
    features: int = 2,
    bins: int = 10,
) -> TelemetryWindow:
    """A plausible telemetry window: latencies spread over the bounds, bins filled evenly."""
    per_bin = [requests // bins] * bins
    latency = [requests // 5] * 4 + [requests - 4 * (requests // 5)]
    inputs = {
        f"f{i}": BinCounts(counts=per_bin, nan=0, below=requests % bins, above=0)
        for i in range(features)
    }
    return TelemetryWindow(
        device_id=device_id,
        window_start=format_time(start),
        window_end=format_time(start + dt.timedelta(seconds=seconds)),
        bundle_name=bundle[0],
        bundle_version=bundle[1],
        requests=requests,
        errors=errors,
        fallbacks=fallbacks,
        schema_violations=0,
        latency=LatencyHistogram(bounds_ms=LATENCY_BOUNDS, counts=latency),
        inputs=inputs,
        outputs={"y": BinCounts(counts=per_bin, nan=0, below=requests % bins, above=0)},
    )
