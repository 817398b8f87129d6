"""The agent's configuration: one TOML file, written by `edgefleet agent init`.

Environment variables override paths only (EDGEFLEET_STATE_DIR,
EDGEFLEET_TRUST_ROOT, EDGEFLEET_MQTT_CA_FILE, EDGEFLEET_MQTT_CERT_FILE,
EDGEFLEET_MQTT_KEY_FILE), so that a container or a test can move files
without editing the file; every other setting lives in the file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.agent.errors import ConfigError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.mqtt.topics import DEVICE_ID_PATTERN
from edgefleet.validation import describe_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PATH_OVERRIDES = {
    "EDGEFLEET_STATE_DIR": ("state_dir",),
    "EDGEFLEET_TRUST_ROOT": ("trust_root",),
    "EDGEFLEET_MQTT_CA_FILE": ("mqtt", "ca_file"),
    "EDGEFLEET_MQTT_CERT_FILE": ("mqtt", "cert_file"),
    "EDGEFLEET_MQTT_KEY_FILE": ("mqtt", "key_file"),
}


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
        if value is not None and not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtt:// or mqtts://")
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
    timeout_ms: int = Field(default=1000, ge=1)
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
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)


class AgentConfig(_Section):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    profile: str
    state_dir: Path
    trust_root: Path
    server_url: str | None = None
    enroll_token: str | None = None
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    limits: Limits = Field(default_factory=Limits)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    local_api: LocalApiSettings = Field(default_factory=LocalApiSettings)


def _apply_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, path in PATH_OVERRIDES.items():
        value = environ.get(variable)
        if not value:
            continue
        target = raw
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read agent.toml; `environ` (default: none) overrides paths.

    Raises:
        ConfigError: missing, not TOML, or invalid, naming the field.
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror}; create it with `edgefleet agent init`"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    _apply_overrides(raw, environ or {})
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, 'config')}") from exc
    if not config.state_dir.is_absolute() or not config.trust_root.is_absolute():
        base = Path(path).resolve().parent
        config = config.model_copy(
            update={"state_dir": base / config.state_dir, "trust_root": base / config.trust_root}
        )
    return config


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


def write_config(path: Path, config: AgentConfig) -> None:
    atomic_write_bytes(Path(path), dump_config(config).encode("utf-8"), mode=0o600)
