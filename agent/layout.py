"""Where the agent keeps its state: one directory, laid out here and nowhere else.

    STATE_DIR/
      state.json            the install state machine (edgefleet.agent.install), atomic writes
      trust/root.json       the newest trusted trust root (starts as the configured one)
      downloads/            <sha256>.part and <sha256>.blocks (resume bitmaps) of bundles in flight
      versions/<id>/        extracted, verified bundles; <id> = <name>@<version>-<sha256[:12]>
                            each holds the bundle's files and manifest.json (the signed envelope)
      current -> versions/<id>    symlink: the version being served (atomically replaced)
      previous -> versions/<id>   symlink: the version to roll back to
      timings/<id>.json     the time per sample this device measured for a version (smoke
                            test, health check): it scales the inference time limit
      outbox/               store-and-forward queue of MQTT messages (edgefleet.agent.outbox)
      inbox/                directives received over MQTT, persisted before they are
                            acknowledged and removed once the installer has handled them
      agent.lock            flock held by the running agent for its life (edgefleet.agent.
                            statelock): one agent per state directory; holds its pid
      localapi.json         address and pid of the running agent's local HTTP API
      api.sock              the local API's Unix socket (mode 0600): installs and rollbacks
                            from root and the agent's user (edgefleet.agent.localapi)
      api-token             the secret a TCP caller of the local API presents for an install
                            or a rollback (mode 0600), made anew at each start
      device.key            this device's Ed25519 signing key (raw 32-byte seed, mode 0600),
                            made at enrollment; it signs every message the device sends
      enrolled.json         the fleet server this device enrolled with, and the key it enrolled
      enroll-failure.json   why the last enrollment attempt failed (mode 0600), for `agent
                            status`; removed once the device enrolled
      tls/                  the device's X.509 identity (edgefleet.agent.tlsidentity):
                            device.key (ECDSA, mode 0600, made here), device.csr, device.crt
                            (mode 0600) and device.json (its not-after), ca.crt (the fleet CA)
      device-id             the id made at the first start when agent.toml says device_id =
                            "auto" (edgefleet.agent.config.settle_device_id); never changed
      enroll-token          the one-time enrollment token from `agent init` (mode 0600),
                            deleted once the device enrolled (edgefleet.agent.enrolltoken)
      samples/              raw inputs kept while the device's own check flags drift, one
                            <start>-<bundle>-<version>.npz (mode 0600) and its .json per
                            episode (edgefleet.agent.reservoir; off by default)

Private: the state directory and its subdirectories are mode 0700 (`create`
makes them so, also when they existed), and the files that hold secrets or
the device's state (`state.json`, `enrolled.json`, `device.key`,
`enroll-token`, `tls/device.key`, `tls/device.crt`, everything under
downloads/) are written with mode `PRIVATE_FILE`.

Invariant: `current` always names a complete, verified, smoke-tested version
directory, or does not exist (nothing installed yet); it is only ever changed
by an atomic rename of a new symlink over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgefleet.fileio import fsync_directory

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


@dataclass(frozen=True)
class StateLayout:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    @property
    def trust_root(self) -> Path:
        return self.trust_dir / "root.json"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def previous(self) -> Path:
        return self.root / "previous"

    @property
    def timings(self) -> Path:
        return self.root / "timings"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def lock_file(self) -> Path:
        return self.root / "agent.lock"

    @property
    def local_api_file(self) -> Path:
        return self.root / "localapi.json"

    @property
    def local_api_socket(self) -> Path:
        return self.root / "api.sock"

    @property
    def local_api_token(self) -> Path:
        return self.root / "api-token"

    @property
    def enroll_failure_file(self) -> Path:
        return self.root / "enroll-failure.json"

    @property
    def device_key(self) -> Path:
        return self.root / "device.key"

    @property
    def enrollment_file(self) -> Path:
        return self.root / "enrolled.json"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def tls_key(self) -> Path:
        return self.tls_dir / "device.key"

    @property
    def tls_certificate(self) -> Path:
        return self.tls_dir / "device.crt"

    @property
    def tls_ca_certificate(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def device_id_file(self) -> Path:
        return self.root / "device-id"

    @property
    def enroll_token_file(self) -> Path:
        return self.root / "enroll-token"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def create(self) -> None:
        """Make the state directory and its subdirectories, mode `PRIVATE_DIR` (also
        when they existed, so that an older, readable state directory becomes private)."""
        for directory in (
            self.root,
            self.trust_dir,
            self.tls_dir,
            self.downloads,
            self.versions,
            self.timings,
            self.outbox,
            self.inbox,
        ):
            directory.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)
            directory.chmod(PRIVATE_DIR)

    def resolve_link(self, link: Path) -> Path | None:
        """The version directory a link names, or None when the link is absent."""
        if not link.is_symlink():
            return None
        return (link.parent / os.readlink(link)).resolve()

    def point(self, link: Path, target: Path | None) -> None:
        """Make `link` name `target` (None removes it), atomically and durably."""
        if target is None:
            link.unlink(missing_ok=True)
        else:
            temporary = link.with_name(f".{link.name}.new")
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(os.path.relpath(target, link.parent))
            os.replace(temporary, link)
        fsync_directory(link.parent)
