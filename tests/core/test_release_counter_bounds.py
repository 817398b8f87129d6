"""Release counters and floors stay within what the server stores and devices accept: 2**63-1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgefleet.bundle import build_bundle, parse_security_floor, verify_bundle
from edgefleet.errors import MalformedDocumentError, UsageError
from edgefleet.semver import MAX_DERIVED_MAJOR, MAX_RELEASE_COUNTER, Version
from edgefleet.trust import TrustRoot
from tests.clirun import Cli
from tests.conftest import KeySet, write_model_dir
from tests.core.forge import forge

MODEL = {"model.onnx": b"onnx" * 100}


def build_args(tmp_path: Path, keydir: Path, version: str, *extra: str) -> list[str | Path]:
    src = tmp_path / "src"
    if not src.exists():
        write_model_dir(src)
    return [
        "bundle", "build", src, "--name", "demo", "--version", version, "--profile", "aarch64",
        "--key", keydir / "release.key", "-o", tmp_path / "b.efb", *extra,
    ]  # fmt: skip


def test_a_version_whose_derived_counter_overflows_is_refused_naming_the_largest_major(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    _, err = run(*build_args(tmp_path, keydir, "20261208.0.0"), status=2)
    assert err.startswith("error [usage]: major version 20261208 is too large")
    assert f"the largest major version allowed is {MAX_DERIVED_MAJOR}" in err
    assert err.count("\n") == 1 and not (tmp_path / "b.efb").exists()


def test_the_largest_major_packs_every_minor_and_patch() -> None:
    top = Version.parse(f"{MAX_DERIVED_MAJOR}.999999.999999").derived_release_counter()
    assert top <= MAX_RELEASE_COUNTER
    with pytest.raises(ValueError, match="largest major version allowed"):
        Version.parse(f"{MAX_DERIVED_MAJOR + 1}.0.0").derived_release_counter()


def test_an_explicit_counter_above_the_bound_is_a_usage_error(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    too_big = str(MAX_RELEASE_COUNTER + 1)
    _, err = run(*build_args(tmp_path, keydir, "1.0.0", "--release-counter", too_big), status=2)
    assert err.startswith("error [usage]: Invalid value for '--release-counter'")
    assert not (tmp_path / "b.efb").exists()
    _, err = run(*build_args(tmp_path, keydir, "1.0.0", "--security-floor", too_big), status=2)
    assert err.startswith(f"error [usage]: security floor {too_big} is outside 0 to ")
    run(*build_args(tmp_path, keydir, "1.0.0", "--release-counter", str(MAX_RELEASE_COUNTER)))
    _, err = run(
        "bundle", "verify", tmp_path / "b.efb", "--trust", keydir / "trust.json",
        "--floor", too_big, status=2,
    )  # fmt: skip
    assert err.startswith("error [usage]: Invalid value for '--floor'")


def test_a_counter_above_the_bound_in_the_metadata_is_refused(
    tmp_path: Path, keyset: KeySet
) -> None:
    src = write_model_dir(tmp_path / "src")
    (src / "edgefleet-bundle.json").write_text(f'{{"release_counter": {2**64}}}')
    with pytest.raises(UsageError, match="outside 0 to 9223372036854775807"):
        build_bundle(
            src, tmp_path / "b.efb", name="demo", version="1.0.0", keys=[keyset.release],
            profiles=["aarch64"],
        )  # fmt: skip
    with pytest.raises(UsageError, match="outside 0 to"):
        parse_security_floor(str(2**63))


@pytest.mark.parametrize("field", ["release_counter", "security_floor"])
def test_a_signed_manifest_with_a_counter_above_the_bound_is_refused(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot, field: str
) -> None:
    overrides: dict[str, Any] = {"release_counter": 2**64, "security_floor": 2**64}
    if field == "security_floor":
        overrides["release_counter"] = MAX_RELEASE_COUNTER
    bundle = forge(tmp_path / "b.efb", MODEL, [keyset.release], **overrides)
    with pytest.raises(MalformedDocumentError, match=f"{field}: Input should be less than"):
        verify_bundle(bundle, trust)
