"""The core's commands end to end: keys, trust root rotation, bundle build/verify/inspect."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.extras import install_hint
from edgefleet.profiles import UnknownProfileError, all_profiles, host_profile
from tests.clirun import Cli
from tests.conftest import write_model_dir


def test_keys_init_writes_keys_and_trust_root(keydir: Path, run: Cli) -> None:
    for role in ("root", "release", "server"):
        assert stat.S_IMODE((keydir / f"{role}.key").stat().st_mode) == 0o600
        assert (keydir / f"{role}.pub").exists()
    out, _ = run("keys", "show", keydir / "trust.json", "--json")
    shown = json.loads(out)
    assert shown["version"] == 1 and not shown["expired"]
    assert set(shown["roles"]) == {"root", "release", "server"}


def test_keys_init_never_overwrites(keydir: Path, run: Cli) -> None:
    before = (keydir / "root.key").read_bytes()
    _, err = run("keys", "init", keydir, status=2)
    assert "refusing to overwrite" in err
    assert (keydir / "root.key").read_bytes() == before


def test_passphrase_encrypted_keys(
    tmp_path: Path, run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EF_PASS", "s3cret")
    run("keys", "init", tmp_path / "keys", "--passphrase-env", "EF_PASS")
    src = write_model_dir(tmp_path / "src")
    build: list[str | Path] = [
        "bundle",
        "build",
        src,
        "--name",
        "demo",
        "--version",
        "1.0.0",
        "--profile",
        "aarch64",
        "--key",
        tmp_path / "keys" / "release.key",
        "-o",
        tmp_path / "b.efb",
    ]
    _, err = run(*build, status=2)
    assert "passphrase-encrypted" in err
    monkeypatch.setenv("EF_WRONG", "guess")
    _, err = run(*build, "--passphrase-env", "EF_WRONG", status=2)
    assert "wrong passphrase" in err
    assert not (tmp_path / "b.efb").exists()
    run(*build, "--passphrase-env", "EF_PASS")
    run("bundle", "verify", tmp_path / "b.efb", "--trust", tmp_path / "keys" / "trust.json")


def test_build_verify_inspect(tmp_path: Path, keydir: Path, run: Cli) -> None:
    src = write_model_dir(tmp_path / "src")
    (src / "edgefleet-bundle.json").write_text(
        json.dumps({"profiles": ["aarch64"], "lineage": {"source_sha256": "ab" * 32}})
    )
    bundle = tmp_path / "demo.efb"
    run(
        "bundle",
        "build",
        src,
        "--name",
        "demo",
        "--version",
        "2.1.0",
        "--key",
        keydir / "release.key",
        "-o",
        bundle,
    )
    out, _ = run(
        "bundle",
        "verify",
        bundle,
        "--trust",
        keydir / "trust.json",
        "--profile",
        "aarch64",
        "--json",
    )
    verified = json.loads(out)["manifest"]
    assert verified["profiles"] == ["aarch64"]
    assert verified["lineage"] == {"source_sha256": "ab" * 32}
    assert sorted(f["path"] for f in verified["files"]) == [
        "model.float.onnx",
        "model.onnx",
        "samples/inputs.npz",
    ]
    out, _ = run("bundle", "inspect", bundle)
    assert "demo@2.1.0" in out and "NOT verified" in out
    out, _ = run("bundle", "inspect", bundle, "--json")
    assert json.loads(out)["verified"] is False


def test_build_refuses_symlink_and_leaves_nothing(tmp_path: Path, keydir: Path, run: Cli) -> None:
    src = write_model_dir(tmp_path / "src")
    (src / "link").symlink_to("/etc/passwd")
    _, err = run(
        "bundle",
        "build",
        src,
        "--name",
        "demo",
        "--version",
        "1.0.0",
        "--profile",
        "aarch64",
        "--key",
        keydir / "release.key",
        "-o",
        tmp_path / "b.efb",
        status=2,
    )
    assert "symbolic link" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "src"]


def test_build_needs_a_profile(tmp_path: Path, keydir: Path, run: Cli) -> None:
    src = write_model_dir(tmp_path / "src")
    _, err = run(
        "bundle",
        "build",
        src,
        "--name",
        "demo",
        "--version",
        "1.0.0",
        "--key",
        keydir / "release.key",
        "-o",
        tmp_path / "b.efb",
        status=2,
    )
    assert "--profile" in err


def test_build_refuses_bad_version(tmp_path: Path, keydir: Path, run: Cli) -> None:
    src = write_model_dir(tmp_path / "src")
    _, err = run(
        "bundle",
        "build",
        src,
        "--name",
        "demo",
        "--version",
        "v1",
        "--profile",
        "aarch64",
        "--key",
        keydir / "release.key",
        "-o",
        tmp_path / "b.efb",
        status=2,
    )
    assert "semantic version" in err


def test_rotation_keeps_old_version_and_devices_follow(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    run("keys", "generate", "-o", tmp_path / "release2.key")
    run("keys", "generate", "-o", tmp_path / "root2.key")
    old_release = json.loads(run("keys", "show", keydir / "trust.json", "--json")[0])
    old_release_id = old_release["roles"]["release"]["keyids"][0]
    run(
        "keys",
        "rotate",
        "--trust",
        keydir / "trust.json",
        "--root-key",
        keydir / "root.key",
        "--add-root",
        tmp_path / "root2.key",
        "--remove-root",
        keydir / "root.pub",
        "--add-release",
        tmp_path / "release2.pub",
        "--remove-release",
        old_release_id[:12],
    )
    assert (keydir / "trust.v1.json").exists()
    shown = json.loads(run("keys", "show", keydir / "trust.json", "--json")[0])
    assert shown["version"] == 2
    assert old_release_id not in shown["roles"]["release"]["keyids"]

    src = write_model_dir(tmp_path / "src")
    for key, name in ((tmp_path / "release2.key", "new.efb"), (keydir / "release.key", "old.efb")):
        run(
            "bundle",
            "build",
            src,
            "--name",
            "demo",
            "--version",
            "1.0.0",
            "--profile",
            "aarch64",
            "--key",
            key,
            "-o",
            tmp_path / name,
        )
    chain: list[str | Path] = [
        "--trust",
        keydir / "trust.v1.json",
        "--newer-trust",
        keydir / "trust.json",
    ]
    run("bundle", "verify", tmp_path / "new.efb", *chain)
    # The removed release key no longer counts once the device has version 2.
    _, err = run("bundle", "verify", tmp_path / "old.efb", *chain, status=1)
    assert "refused [unknown-key]" in err
    # A device still on version 1 does not know the new release key.
    _, err = run(
        "bundle", "verify", tmp_path / "new.efb", "--trust", keydir / "trust.v1.json", status=1
    )
    assert "refused [unknown-key]" in err


def test_rotation_without_old_root_key_refused(tmp_path: Path, keydir: Path, run: Cli) -> None:
    run("keys", "generate", "-o", tmp_path / "root2.key")
    before = (keydir / "trust.json").read_bytes()
    _, err = run(
        "keys",
        "rotate",
        "--trust",
        keydir / "trust.json",
        "--root-key",
        tmp_path / "root2.key",
        status=2,
    )
    assert "would refuse" in err
    assert (keydir / "trust.json").read_bytes() == before
    assert not (keydir / "trust.v1.json").exists()


def test_missing_file_is_a_clear_error(tmp_path: Path, run: Cli) -> None:
    _, err = run(
        "bundle", "verify", tmp_path / "nope.efb", "--trust", tmp_path / "t.json", status=2
    )
    assert "does not exist" in err


def test_cli_import_loads_no_optional_dependency() -> None:
    code = (
        "import sys, edgefleet.cli, edgefleet.bundle, edgefleet.trust\n"
        "from edgefleet.cli import cli\n"
        "heavy = {'fastapi', 'sqlalchemy', 'onnx', 'onnxruntime', 'numpy', 'paho', 'alembic'}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "deployables = sorted(m for m in sys.modules if m.startswith(('edgefleet.agent',"
        " 'edgefleet.server', 'edgefleet.converter')))\n"
        "print(loaded, deployables)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ}
    )
    assert result.stdout.strip() == "[] []"


def test_installed_command_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "--help"], capture_output=True, text=True, check=True
    )
    assert "bundle" in result.stdout and "keys" in result.stdout


def _build(run: Cli, src: Path, key: Path, output: Path, *profiles: str, status: int = 0) -> str:
    args: list[str | Path] = ["bundle", "build", src, "--name", "demo", "--version", "1.0.0"]
    for profile in profiles:
        args += ["--profile", profile]
    return run(*args, "--key", key, "-o", output, status=status)[1]


def test_host_stands_for_this_machines_profile(tmp_path: Path, keydir: Path, run: Cli) -> None:
    try:
        host = host_profile().name
    except UnknownProfileError:
        pytest.skip("no shipped hardware profile matches this machine")
    other = next(name for name in all_profiles() if name != host)
    bundle = tmp_path / "demo.efb"
    _build(run, write_model_dir(tmp_path / "src"), keydir / "release.key", bundle, "host", host)
    trust: list[str | Path] = ["--trust", keydir / "trust.json"]
    out, _ = run("bundle", "verify", bundle, *trust, "--profile", "host", "--json")
    assert json.loads(out)["manifest"]["profiles"] == [host]  # resolved, and only once
    _, err = run("bundle", "verify", bundle, *trust, "--profile", other, status=1)
    assert err.startswith("refused [profile-mismatch]: ")


def test_an_unknown_profile_is_unknown_not_a_mismatch(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    bundle = tmp_path / "demo.efb"
    src = write_model_dir(tmp_path / "src")
    err = _build(run, src, keydir / "release.key", bundle, "riscv-9000", status=2)
    assert err.startswith("error [unknown-profile]: ") and "aarch64" in err
    assert len(err.splitlines()) == 1 and not bundle.exists()
    _build(run, src, keydir / "release.key", bundle, "aarch64")
    _, err = run(
        "bundle", "verify", bundle, "--trust", keydir / "trust.json", "--profile", "riscv-9000",
        status=2,
    )  # fmt: skip
    assert err.startswith("error [unknown-profile]: ") and "aarch64" in err


def test_usage_errors_are_one_line(run: Cli) -> None:
    _, err = run("bundle", "verify", status=2)
    assert err == "error [usage]: Missing argument 'FILE' (see 'edgefleet bundle verify -h')\n"
    _, err = run("nope", status=2)
    assert err == "error [usage]: No such command 'nope' (see 'edgefleet -h')\n"


def test_a_missing_extra_is_named_when_a_command_needs_it(
    tmp_path: Path, keydir: Path, run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a device with only the agent extra: `server run` imports uvicorn when it runs.
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.delitem(sys.modules, "edgefleet.server.runner", raising=False)
    _, err = run(
        "server", "run", "--trust", keydir / "trust.json", "--server-key",
        keydir / "server.key", "--data", tmp_path / "data", status=2,
    )  # fmt: skip
    assert len(err.splitlines()) == 1 and "uvicorn" in err
    assert err.startswith("error [missing-extra]: 'edgefleet server' needs the server extra (")
    assert err.endswith(f"): {install_hint('server')}\n")
