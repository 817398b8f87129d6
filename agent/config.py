"""The agent's configuration: one TOML file, written by `edgefleet agent init`.

Environment variables override paths only (EDGEFLEET_STATE_DIR,
EDGEFLEET_TRUST_ROOT, EDGEFLEET_MQTT_CA_FILE, EDGEFLEET_MQTT_CERT_FILE,
EDGEFLEET_MQTT_KEY_FILE), so that a container or a test can move files
without editing the file; every other setting lives in the file.

The file holds no secret: the one-time enrollment token waits in the state
directory (`edgefleet.agent.enrolltoken`) and is deleted once the device
enrolled. `write_config` creates missing parent directories (0755) and writes
the file mode 0600, or 0640 with a group (the service's) that may read it.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.agent.errors import ConfigError
from edgefleet.fileio import atomic_writer
from edgefleet.mqtt.topics import is_valid_device_id
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
    profile: str
    state_dir: Path
    trust_root: Path
    server_url: str | None = None
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

    @field_validator("server_url")
    @classmethod
    def _server_url(cls, value: str | None) -> str | None:
        return None if value is None else check_server_url(value)


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


def make_directories(directory: Path, mode: int = 0o755) -> None:
    """Create `directory` and its missing parents with exactly `mode` (whatever the umask)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        os.chmod(created, mode)


def write_config(path: Path, config: AgentConfig, group: int | None = None) -> None:
    """Write agent.toml atomically: mode 0600, or 0640 and group `group` (a gid) when given.

    Raises:
        OSError: a directory could not be created, or the group not given to the file
            (only root, or a member of the group, can).
    """
    path = Path(path)
    make_directories(path.parent)
    with atomic_writer(path, mode=0o600 if group is None else 0o640) as handle:
        if group is not None:
            os.fchown(handle.fileno(), -1, group)
        handle.write(dump_config(config).encode("utf-8"))
