"""What a device trusts, in one value: its trust root and the counters that refuse replays.

`DeviceTrust` is immutable: each `accept_*` method either raises (the input is
refused, nothing changes) or returns the new `DeviceTrust` beside what it
accepted. The caller persists `snapshot()` of the new value before acting on
what was accepted; the snapshot is plain data (the root's bytes and the
counters), and `DeviceTrust.from_snapshot` rebuilds the value from it.

- directives: signed by the root's server role, for this device, with a
  sequence above the last accepted one (which advances);
- fleet timestamps: signed by the server role, with a sequence above the last
  accepted one (which advances); the one last accepted is accepted again without
  advancing (the broker redelivers the retained timestamp on every connect);
- trust roots: exactly version N+1, signed by the root keys of N and of N+1
  (`edgefleet.trust.update_trust_root`); a refused one leaves nothing behind;
- bundles: the policy the installer verifies them under (the security floors per
  model name, which only a committed release raises).

No I/O: reading and writing the snapshot belongs to the device.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from edgefleet.bundle import BundlePolicy
from edgefleet.mqtt.directives import (
    Directive,
    FleetTimestamp,
    verify_directive,
    verify_fleet_timestamp,
)
from edgefleet.trust import TrustRoot, parse_trust_root, update_trust_root


@dataclass(frozen=True)
class TrustSnapshot:
    """The persisted form of a `DeviceTrust`."""

    root: bytes
    directive_sequence: int = 0
    timestamp_sequence: int = 0
    security_floors: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceTrust:
    root: TrustRoot
    directive_sequence: int = 0  # the highest directive sequence accepted
    timestamp_sequence: int = 0  # the highest fleet timestamp sequence accepted
    security_floors: Mapping[str, int] = field(default_factory=dict)  # per model name

    @classmethod
    def from_snapshot(cls, snapshot: TrustSnapshot, what: str = "trust root") -> DeviceTrust:
        """Raises: MalformedDocumentError, TrustRootSignatureError (the root's own checks)."""
        return cls(
            root=parse_trust_root(snapshot.root, what),
            directive_sequence=snapshot.directive_sequence,
            timestamp_sequence=snapshot.timestamp_sequence,
            security_floors=dict(snapshot.security_floors),
        )

    def snapshot(self) -> TrustSnapshot:
        return TrustSnapshot(
            root=self.root.raw,
            directive_sequence=self.directive_sequence,
            timestamp_sequence=self.timestamp_sequence,
            security_floors=dict(self.security_floors),
        )

    def accept_directive(
        self, data: bytes, *, device_id: str, now: dt.datetime
    ) -> tuple[Directive, DeviceTrust]:
        """Raises: whatever `edgefleet.mqtt.directives.verify_directive` raises."""
        directive = verify_directive(
            data, self.root, device_id=device_id, last_sequence=self.directive_sequence, now=now
        )
        return directive, replace(self, directive_sequence=directive.sequence)

    def accept_fleet_timestamp(
        self, data: bytes, *, now: dt.datetime
    ) -> tuple[FleetTimestamp, DeviceTrust]:
        """Raises: whatever `edgefleet.mqtt.directives.verify_fleet_timestamp` raises."""
        last = max(self.timestamp_sequence - 1, 0)  # the last accepted one may come again
        stamp = verify_fleet_timestamp(data, self.root, last_sequence=last, now=now)
        return stamp, replace(self, timestamp_sequence=max(stamp.sequence, self.timestamp_sequence))

    def accept_root(self, data: bytes) -> DeviceTrust:
        """Take trust root version N+1.

        Raises: MalformedDocumentError, TrustRootVersionError, TrustRootSignatureError.
        """
        root = update_trust_root(self.root, data, f"trust root after version {self.root.version}")
        return replace(self, root=root)

    def bundle_policy(self, profile: str | None, agent_version: str | None) -> BundlePolicy:
        """What a bundle must satisfy on this device beyond its signatures."""
        return BundlePolicy(
            profile=profile, security_floors=dict(self.security_floors), agent_version=agent_version
        )
