"""The agent's configuration: one TOML file, written by `edgefleet agent init`.

Environment variables override paths only (EDGEFLEET_STATE_DIR,
EDGEFLEET_TRUST_ROOT, EDGEFLEET_SERVER_CA_FILE, EDGEFLEET_MQTT_CA_FILE, EDGEFLEET_MQTT_CERT_FILE,
EDGEFLEET_MQTT_KEY_FILE), so that a container or a test can move files
without editing the file; every other setting lives in the file.

The file holds no secret: the one-time enrollment token waits in the state
directory (`edgefleet.agent.enrolltoken`) and is deleted once the device
enrolled. `write_config` creates missing parent directories (0755) and writes
the file mode 0600, or 0640 with a group (the service's) that may read it.

The schema and the TOML text are in the core (`edgefleet.agentconfig`), since
provisioning writes the file too; reading it (with the overrides, and the id
of `device_id = "auto"` made at the first start: `settle_device_id`) and
writing it on the device are here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.agent.errors import ConfigError
from edgefleet.agent.layout import StateLayout
from edgefleet.agentconfig import (
    AUTO_DEVICE_ID,
    DEFAULT_ID_PREFIX,
    AgentConfig,
    dump_config,
    make_directories,
)
from edgefleet.fileio import atomic_writer, fsync_directory
from edgefleet.mqtt.topics import is_valid_device_id
from edgefleet.validation import describe_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PATH_OVERRIDES = {
    "EDGEFLEET_STATE_DIR": ("state_dir",),
    "EDGEFLEET_TRUST_ROOT": ("trust_root",),
    "EDGEFLEET_SERVER_CA_FILE": ("server_ca_file",),
    "EDGEFLEET_MQTT_CA_FILE": ("mqtt", "ca_file"),
    "EDGEFLEET_MQTT_CERT_FILE": ("mqtt", "cert_file"),
    "EDGEFLEET_MQTT_KEY_FILE": ("mqtt", "key_file"),
}


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
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid TOML: it is not UTF-8 text (byte {exc.start} is "
            f"0x{exc.object[exc.start]:02x}); write it again with `edgefleet agent init`"
        ) from None
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


def settle_device_id(config: AgentConfig, *, make: bool) -> AgentConfig:
    """`config` with its device id: as configured, or for `device_id = "auto"` the one
    kept in STATE_DIR/device-id, made first when `make` (the agent's start, `agent
    enroll`) and none was made yet. Once made, it never changes.

    Raises:
        ConfigError: "auto" and no id made yet (without `make`), or the kept one is
            not a device id.
        OSError: the state directory cannot be written (with `make`).
    """
    if config.device_id != AUTO_DEVICE_ID:
        return config
    path = StateLayout(config.state_dir).device_id_file
    if make and not path.exists():
        _keep_new_device_id(path, config.device_id_prefix or DEFAULT_ID_PREFIX)
    try:
        made = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(
            f'device_id is "auto" and no id was made yet in {path}: the agent makes it '
            "at its first start (`edgefleet agent run`)"
        ) from None
    if not is_valid_device_id(made):
        raise ConfigError(f"{path} holds {made!r}, not a device id: delete it to make a new one")
    return config.model_copy(update={"device_id": made})


def _keep_new_device_id(path: Path, prefix: str) -> None:
    """Write a new id to `path` unless one is there: a link never replaces a file, so two
    agents starting at once keep the same id."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".device-id.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"{prefix}-{secrets.token_hex(6)}\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)
    fsync_directory(path.parent)


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
