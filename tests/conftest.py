"""Fixtures shared by every test package: keys, trust roots, a built bundle."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.bundle import build_bundle
from edgefleet.keys import SigningKey
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot, build_trust_root_signed, sign_trust_root

PROFILE = "x86_64-avx2"


@dataclass(frozen=True)
class KeySet:
    root: SigningKey
    release: SigningKey
    server: SigningKey


def make_trust_root(
    keys: KeySet,
    *,
    version: int = 1,
    expires: dt.datetime | None = None,
    release: list[SigningKey] | None = None,
    thresholds: dict[str, int] | None = None,
) -> TrustRoot:
    signed = build_trust_root_signed(
        version=version,
        expires=expires or utcnow() + dt.timedelta(days=30),
        root=[keys.root.public],
        release=[key.public for key in (release or [keys.release])],
        server=[keys.server.public],
        thresholds=thresholds,
    )
    return sign_trust_root(signed, [keys.root])


@pytest.fixture(scope="session")
def keyset() -> KeySet:
    return KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())


@pytest.fixture(scope="session")
def trust(keyset: KeySet) -> TrustRoot:
    return make_trust_root(keyset)


@pytest.fixture
def trust_file(tmp_path: Path, trust: TrustRoot) -> Path:
    path = tmp_path / "trust.json"
    path.write_bytes(trust.raw)
    return path


def write_model_dir(directory: Path) -> Path:
    """A small directory shaped like a converter's output."""
    (directory / "samples").mkdir(parents=True)
    (directory / "model.onnx").write_bytes(os.urandom(70_000))
    (directory / "model.float.onnx").write_bytes(os.urandom(20_000))
    (directory / "samples" / "inputs.npz").write_bytes(os.urandom(1_000))
    return directory


@pytest.fixture
def bundle_file(tmp_path: Path, keyset: KeySet) -> Path:
    src = write_model_dir(tmp_path / "src")
    output = tmp_path / "model.efb"
    build_bundle(
        src, output, name="demo", version="1.2.3", keys=[keyset.release], profiles=[PROFILE]
    )
    return output
