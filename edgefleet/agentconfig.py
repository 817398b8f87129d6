"""The agent's configuration file (agent.toml): its schema and its TOML text.

In the core because two deployables write it: the agent (`edgefleet agent
init`) and provisioning (`edgefleet devices provision`, which writes it into a
root filesystem for a device that does not exist yet). Reading it, with the
environment's path overrides and the device id made at the first start, is the
agent's (`edgefleet.agent.config`).

`device_id = "auto"` (a golden image: one file for many devices) makes the
device id at the agent's first start: `device_id_prefix` (default "device"),
a dash and 12 random hex digits, kept in STATE_DIR/device-id and read from
there ever after.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.mqtt.topics import is_valid_device_id

AUTO_DEVICE_ID = "auto"  # device_id = "auto": made at the first start (settle_device_id)
DEFAULT_ID_PREFIX = "device"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MqttSettings(_Section):
    url: str | None = None  # mqtt://host:1883 or mqtts://host:8883; None: offline device
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_seconds: int = Field(default=30, ge=5)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"{value!r} is not mqtt://host[:port] or mqtts://host[:port]")
        return value


class Limits(_Section):
    max_bundle_bytes: int = Field(default=2 * 1024**3, gt=0)
    disk_reserve_bytes: int = Field(default=256 * 1024**2, ge=0)
    keep_versions: int = Field(default=3, ge=2)


class TelemetrySettings(_Section):
    window_seconds: int = Field(default=60, ge=1)
    heartbeat_seconds: int = Field(default=30, ge=1)
    outbox_max_bytes: int = Field(default=16 * 1024**2, ge=64 * 1024)


class InferenceSettings(_Section):
    # A call of n samples may take timeout_ms + n x (timeout_per_sample_ms, else
    # timeout_factor x the time per sample measured on this device): inference/timing.py.
    timeout_ms: int = Field(default=1000, ge=1)
    timeout_factor: float = Field(default=10.0, ge=1)
    timeout_per_sample_ms: float | None = Field(default=None, gt=0)
    max_batch_samples: int = Field(default=1024, ge=1)  # larger batches are refused
    breaker_failures: int = Field(default=5, ge=1)  # consecutive failures that open it
    breaker_reset_seconds: float = Field(default=30.0, gt=0)
    shadow_sample_rate: float = Field(default=0.1, ge=0, le=1)
    default_answer: Path | None = None  # .npz, one array per output: the last fallback


class HealthSettings(_Section):
    duration_seconds: float = Field(default=60.0, ge=0)
    min_requests: int = Field(default=20, ge=0)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_fallback_rate: float = Field(default=0.05, ge=0, le=1)
    max_latency_ratio: float = Field(default=1.5, gt=0)  # new p95 over previous p95


class LocalApiSettings(_Section):
    enabled: bool = True  # false: the agent serves no HTTP API (in-process use only)
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)  # 0: a free port, picked at start


class DriftSettings(_Section):
    """The device's raw inputs kept while its own check flags drift (docs/agent.md)."""

    capture_inputs: bool = False  # off: nothing is kept
    capture_samples: int = Field(default=200, ge=1)
    capture_max_bytes: int = Field(default=8 * 1024**2, ge=1)
    upload_inputs: bool = False  # off: kept files never leave the device


def check_server_url(url: str) -> str:
    """`url` without a trailing slash.

    Raises:
        ValueError: not an http:// or https:// URL with a host.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not http://host[:port] or https://host[:port]")
    return url.rstrip("/")


class AgentConfig(_Section):
    device_id: str
    # With device_id = "auto": the id made at the first start is PREFIX-<12 hex digits>.
    device_id_prefix: str | None = Field(default=None, max_length=100)
    profile: str
    state_dir: Path
    trust_root: Path
    server_url: str | None = None
    # The CA the fleet server's HTTPS certificate is checked against (None: the system's CAs).
    server_ca_file: Path | None = None
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    limits: Limits = Field(default_factory=Limits)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    local_api: LocalApiSettings = Field(default_factory=LocalApiSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    # Read from an agent.toml written by an older agent, so that such a device still
    # starts and enrolls; never written back (dump_config leaves it out).
    legacy_enroll_token: str | None = Field(default=None, alias="enroll_token", exclude=True)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not is_valid_device_id(value):
            raise ValueError(
                f"{value!r} is not a device id: 1 to 128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("device_id_prefix")
    @classmethod
    def _device_id_prefix(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_device_id(value):
            raise ValueError(
                f"{value!r} cannot start a device id: letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("server_url")
    @classmethod
    def _server_url(cls, value: str | None) -> str | None:
        return None if value is None else check_server_url(value)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def dump_config(config: AgentConfig) -> str:
    """TOML text for `config` (top-level keys, then one table per section)."""
    data = config.model_dump(exclude_none=True)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, section in data.items():
        if isinstance(section, dict):
            lines += ["", f"[{key}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"


def make_directories(directory: Path, mode: int = 0o755) -> None:
    """Create `directory` and its missing parents with exactly `mode` (whatever the umask)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        os.chmod(created, mode)
