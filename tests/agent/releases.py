"""Signed releases beyond `prepare_bundles`' demo 1.0.0 to 1.3.0: other names, stated floors.

Each is packed from the same converted model (`Bundles.model_dir`), so it installs
and passes its smoke test like the demo releases; built once per path.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.bundle import build_bundle, parse_security_floor
from edgefleet.keys import SigningKey
from tests.agent.power_loss_driver import Bundles


def release(
    bundles: Bundles,
    directory: Path,
    key: SigningKey,
    name: str,
    version: str,
    security_floor: str | None = None,
) -> Path:
    """`name@version` signed by `key`, stating `security_floor` (a version or counter) if given."""
    floor = "" if security_floor is None else f"-floor-{security_floor}"
    path = directory / f"{name}-{version}{floor}.efb"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        build_bundle(
            bundles.model_dir,
            path,
            name=name,
            version=version,
            keys=[key],
            security_floor=None if security_floor is None else parse_security_floor(security_floor),
        )
    return path
