"""A bundle forge: writes bundles the way an attacker could, byte for byte.

It implements nothing of edgefleet's verifier; it only writes tar archives with
a chosen manifest, chosen signatures and chosen members, so that each test can
describe one attack precisely.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.keys import SigningKey
from edgefleet.signing import Envelope, sign_document
from edgefleet.timefmt import format_time, utcnow

PROFILE = "x86_64-avx2"


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


def file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest_for(files: dict[str, bytes], **overrides: Any) -> dict[str, Any]:
    """A valid signed-part of a manifest listing `files`, with `overrides` applied."""
    signed: dict[str, Any] = {
        "_type": "bundle-manifest",
        "spec_version": 1,
        "name": "demo",
        "version": "1.2.3",
        "release_counter": 7,
        "created": format_time(utcnow()),
        "profiles": [PROFILE],
        "min_agent_version": "0.1.0",
        "files": [file_entry(path, data) for path, data in files.items()],
        "lineage": {},
    }
    signed.update(overrides)
    return signed


def write_bundle(path: Path, manifest: bytes | Envelope, members: Sequence[Member]) -> Path:
    """Write `manifest` as the first member, then `members`, as a ustar archive."""
    raw = manifest.to_bytes() if isinstance(manifest, Envelope) else manifest
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member in [Member("manifest.json", raw), *members]:
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.linkname = member.linkname
            info.size = len(member.data) if member.type == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(member.data) if info.size else None)
    return path


def forge(
    path: Path,
    files: dict[str, bytes],
    signers: Sequence[SigningKey],
    *,
    members: Sequence[Member] | None = None,
    **overrides: Any,
) -> Path:
    """A bundle listing `files`, signed by `signers`; its members default to `files`."""
    envelope = sign_document(manifest_for(files, **overrides), signers)
    if members is None:
        members = [Member(name, data) for name, data in files.items()]
    return write_bundle(path, envelope, members)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
