"""Bad values for what a manifest states are usage errors up front: one line, nothing built."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.bundle import BundlePolicy
from edgefleet.errors import UsageError
from tests.clirun import Cli
from tests.conftest import write_model_dir


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--min-agent-version", "banana", "'banana' is not a semantic version: MAJOR.MINOR.PATCH"),
        ("--name", "Digits", "'Digits' is not a bundle name: use 1 to 64 of lowercase letters"),
        ("--name", "modèle", "'modèle' is not a bundle name"),
        ("--version", "v1", "'v1' is not a semantic version"),
    ],
)
def test_bundle_build_refuses_bad_fields_in_one_line(
    tmp_path: Path, keydir: Path, run: Cli, option: str, value: str, says: str
) -> None:
    src = write_model_dir(tmp_path / "src")
    fields = {"--name": "demo", "--version": "1.0.0", option: value}
    _, err = run(
        "bundle", "build", src, *(a for kv in fields.items() for a in kv),
        "--profile", "aarch64", "--key", keydir / "release.key", "-o", tmp_path / "b.efb",
        status=2,
    )  # fmt: skip
    assert err.startswith(f"error [usage]: Invalid value for '{option}': ") and says in err
    assert err.count("\n") == 1 and "pattern" not in err.split("(")[0]
    assert not (tmp_path / "b.efb").exists()


def test_bundle_verify_refuses_a_bad_agent_version_up_front(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    src = write_model_dir(tmp_path / "src")
    bundle = tmp_path / "b.efb"
    run(
        "bundle", "build", src, "--name", "demo", "--version", "1.0.0", "--profile", "aarch64",
        "--key", keydir / "release.key", "-o", bundle,
    )  # fmt: skip
    _, err = run(
        "bundle", "verify", bundle, "--trust", keydir / "trust.json", "--agent-version", "banana",
        status=2,
    )  # fmt: skip
    assert err.startswith("error [usage]: Invalid value for '--agent-version': 'banana' is not")
    assert err.count("\n") == 1


def test_a_policy_with_a_bad_agent_version_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="agent version 'banana' is not a semantic version"):
        BundlePolicy(agent_version="banana")


def test_metadata_with_a_bad_min_agent_version_names_the_field(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    src = write_model_dir(tmp_path / "src")
    (src / "edgefleet-bundle.json").write_text('{"min_agent_version": "latest"}')
    _, err = run(
        "bundle", "build", src, "--name", "demo", "--version", "1.0.0", "--profile", "aarch64",
        "--key", keydir / "release.key", "-o", tmp_path / "b.efb", status=2,
    )  # fmt: skip
    assert err == (
        "error [usage]: minimum agent version 'latest' is not a semantic version: "
        "MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD], e.g. 1.4.0 or 2.0.0-rc.1\n"
    )
