"""A release states a security floor in its signed manifest; devices keep one per model name."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.bundle import parse_security_floor, read_manifest
from edgefleet.errors import UsageError
from tests.clirun import Cli
from tests.conftest import write_model_dir


def build(run: Cli, keydir: Path, out: Path, version: str, *extra: str, status: int = 0) -> str:
    src = write_model_dir(out.parent / f"src-{out.stem}")
    _, err = run(
        "bundle", "build", src, "--name", "demo", "--version", version, "--profile", "aarch64",
        "--key", keydir / "release.key", "-o", out, *extra, status=status,
    )  # fmt: skip
    return err


@pytest.mark.parametrize(
    ("text", "counter"),
    [("1.1.0", 1_000_001_000_000), ("2.0.0-rc.1", 2_000_000_000_000), ("17", 17)],
)
def test_a_floor_is_a_counter_or_a_version_for_its_derived_counter(text: str, counter: int) -> None:
    assert parse_security_floor(text) == counter


def test_a_floor_that_is_neither_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="neither a release counter nor a version"):
        parse_security_floor("1.1")


def test_the_manifest_states_the_floor_only_when_set(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    stating, plain = tmp_path / "stating.efb", tmp_path / "plain.efb"
    build(run, keydir, stating, "1.2.0", "--security-floor", "1.1.0")
    build(run, keydir, plain, "1.2.0")
    envelope, manifest = read_manifest(stating)
    assert manifest.security_floor == envelope.signed["security_floor"] == 1_000_001_000_000
    envelope, manifest = read_manifest(plain)
    assert manifest.security_floor is None and "security_floor" not in envelope.signed
    out, _ = run("bundle", "inspect", stating)
    assert "security floor:    1000001000000" in out


def test_a_floor_above_the_releases_own_counter_is_refused_in_one_line(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    out = tmp_path / "x.efb"
    err = build(run, keydir, out, "1.2.0", "--security-floor", "1.3.0", status=2)
    assert err.startswith("error [usage]: security floor 1000003000000 is above the release")
    assert err.count("\n") == 1 and not out.exists()


def test_verify_applies_the_floor_to_the_bundles_name(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    bundle = tmp_path / "b.efb"
    build(run, keydir, bundle, "1.2.0")
    trust = keydir / "trust.json"
    _, err = run(
        "bundle", "verify", bundle, "--trust", trust, "--floor", "1000002000001", status=1
    )  # fmt: skip
    assert err.startswith("refused [below-security-floor]: bundle demo@1.2.0 has release counter")
    run("bundle", "verify", bundle, "--trust", trust, "--floor", "1000002000000")
