"""Field types shared by the MQTT schemas, so each rule is written once."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from edgefleet.bundle.manifest import NAME_PATTERN
from edgefleet.mqtt.topics import DEVICE_ID_PATTERN
from edgefleet.semver import SEMVER_PATTERN

DeviceIdText = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
BundleName = Annotated[str, Field(pattern=NAME_PATTERN)]
Version = Annotated[str, Field(pattern=SEMVER_PATTERN)]
# The largest integer a database stores (a signed 64-bit BIGINT): counts and sequences
# above it are refused, so a message cannot carry a number the server cannot keep.
MAX_STORED_INT = 2**63 - 1
Count = Annotated[int, Field(ge=0, le=MAX_STORED_INT)]
Ordinal = Annotated[int, Field(ge=1, le=MAX_STORED_INT)]  # sequences and ids, from 1
