"""The install context: everything the engine and the state handlers work with.

One object, built by `Installer` and passed to every handler (handlers.py) and
to the engine (engine.py), as the Mender client passes its context: the
device's configuration and state directory, the trust root a state.json
without one trusts (the device's trust itself is in state.json: `device_trust`), the transport,
the callbacks into the rest of the agent, the clock and the host; then what
the call in progress has learned, which a restart forgets (it is never needed
to resume: what must survive is in state.json).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent.errors import InstallError
from edgefleet.agent.install.interfaces import (
    Clock,
    Fetcher,
    HealthProbe,
    Host,
    OnActivated,
    OnBenchmark,
    OnDiagnostics,
    OnShadow,
    Reporter,
)
from edgefleet.agent.install.record import StateFile
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import Versions
from edgefleet.agentconfig import AgentConfig
from edgefleet.devicetrust import DeviceTrust
from edgefleet.errors import MalformedDocumentError, TrustRootError
from edgefleet.trust import TrustRoot, parse_trust_root


@dataclass
class InstallContext:
    config: AgentConfig
    layout: StateLayout
    trust: TrustRoot  # trusted while state.json holds no trust root (an older format)
    versions: Versions
    fetcher: Fetcher | None
    reporter: Reporter | None
    probe: HealthProbe | None
    on_activated: OnActivated | None
    on_shadow: OnShadow | None
    clock: Clock
    host: Host
    rng: random.Random
    on_diagnostics: OnDiagnostics | None = None
    on_benchmark: OnBenchmark | None = None
    # --- the call in progress (`engine.locked` starts each call afresh) ---
    persisted: StateFile = field(default_factory=StateFile)  # the last state read or written
    mark: object | None = None  # the probe's mark at the start of the run (the baseline)
    handed: list[str | None] = field(default_factory=list)  # challengers handed to on_shadow
    # A bundle file whose length and SHA-256 were checked in this call (copied in, or
    # delivered by a transport that checks them): VERIFYING does not hash it again.
    checked_download: Path | None = None
    _parsed_root: TrustRoot | None = None  # the last root parsed from state.json

    def device_trust(self, state: StateFile | None = None) -> DeviceTrust:
        """The device's trust as `state` holds it (default: the last state read or written).

        Raises: InstallError when the trust root in state.json fails its own checks.
        """
        snapshot = (state or self.persisted).trust_snapshot(self.trust.raw)
        root = next(
            (
                known
                for known in (self.trust, self._parsed_root)
                if known and known.raw == snapshot.root
            ),
            None,
        )
        if root is None:
            try:
                root = self._parsed_root = parse_trust_root(snapshot.root, "state.json trust_root")
            except (MalformedDocumentError, TrustRootError) as exc:
                raise InstallError(f"{self.layout.state_file}: {exc}") from exc
        return DeviceTrust(
            root, snapshot.directive_sequence, snapshot.timestamp_sequence, snapshot.security_floors
        )

    def start_call(self) -> None:
        """Forget what the previous call learned."""
        self.mark = None
        self.handed = []
        self.checked_download = None
