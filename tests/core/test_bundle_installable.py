"""`bundle build` and `bundle verify` check what an agent checks before it installs:
a model to serve, whose runtime the bundle's profile runs (one shared check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.bundle import check_served_model, read_manifest
from edgefleet.errors import NothingToServeError, RuntimeNotOnProfileError
from edgefleet.keys import load_private_key
from tests.clirun import Cli
from tests.conftest import KeySet
from tests.core.forge import forge

ONNX = {"model.onnx": b"onnx" * 100, "smoke.json": b"{}"}
TFLITE = {"model.tflite": b"tfl3" * 100, "smoke.json": b"{}"}


def build(run: Cli, keydir: Path, src: Path, profile: str, status: int) -> str:
    _, err = run(
        "bundle", "build", src, "--name", "demo", "--version", "1.0.0", "--profile", profile,
        "--key", keydir / "release.key", "-o", src.parent / "b.efb", status=status,
    )  # fmt: skip
    return err


@pytest.mark.parametrize(
    ("files", "profile", "says"),
    [
        ({}, "aarch64", "holds none of model.onnx, model.tflite, so devices would refuse"),
        ({"notes.txt": b"x"}, "aarch64", "holds none of model.onnx, model.tflite"),
        (ONNX, "armv7-tflite", "model.onnx needs onnxruntime, which profile armv7-tflite does"),
    ],
    ids=["empty directory", "no model", "onnx for a tflite-only profile"],
)
def test_build_refuses_what_a_device_would_refuse(
    tmp_path: Path, keydir: Path, run: Cli, files: dict[str, bytes], profile: str, says: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    err = build(run, keydir, src, profile, status=2)
    assert err.startswith("error [usage]: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "b.efb").exists()


def test_build_takes_a_tflite_model_for_a_tflite_profile(
    tmp_path: Path, keydir: Path, run: Cli
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in TFLITE.items():
        (src / name).write_bytes(data)
    build(run, keydir, src, "armv7-tflite", status=0)
    assert read_manifest(tmp_path / "b.efb")[1].profiles == ["armv7-tflite"]


@pytest.mark.parametrize(
    ("files", "profiles", "verify_profile", "code"),
    [
        ({"smoke.json": b"{}"}, ["aarch64"], None, "nothing-to-serve"),
        ({"smoke.json": b"{}"}, ["aarch64"], "aarch64", "nothing-to-serve"),
        (ONNX, ["armv7-tflite"], None, "runtime-not-on-profile"),
        (ONNX, ["armv7-tflite"], "armv7-tflite", "runtime-not-on-profile"),
        (ONNX, ["aarch64", "armv7-tflite"], "armv7-tflite", "runtime-not-on-profile"),
        (ONNX, ["aarch64", "armv7-tflite"], None, "runtime-not-on-profile"),
        (ONNX, ["aarch64", "armv7-tflite"], "aarch64", None),
        (TFLITE, ["armv7-tflite", "aarch64"], None, None),
    ],
)
def test_verify_checks_a_signed_bundle_as_the_agent_does(
    tmp_path: Path,
    keydir: Path,
    keyset: KeySet,
    run: Cli,
    files: dict[str, bytes],
    profiles: list[str],
    verify_profile: str | None,
    code: str | None,
) -> None:
    # Signed elsewhere (as `bundle build` would no longer sign them); the trust root is keydir's.
    release = load_private_key(keydir / "release.key", None)
    bundle = forge(tmp_path / "b.efb", files, [release], profiles=profiles)
    extra = [] if verify_profile is None else ["--profile", verify_profile]
    _, err = run(
        "bundle", "verify", bundle, "--trust", keydir / "trust.json", *extra,
        status=0 if code is None else 1,
    )  # fmt: skip
    if code is not None:
        assert err.startswith(f"refused [{code}]: ") and err.count("\n") == 1


def test_one_check_for_build_verify_and_the_agent(tmp_path: Path, keyset: KeySet) -> None:
    bundle = forge(tmp_path / "b.efb", {"notes.txt": b"x"}, [keyset.release])
    manifest = read_manifest(bundle)[1]
    with pytest.raises(NothingToServeError, match=r"holds none of model\.onnx, model\.tflite"):
        check_served_model(manifest, manifest.profiles)
    manifest = read_manifest(forge(tmp_path / "o.efb", ONNX, [keyset.release]))[1]
    assert check_served_model(manifest, ["x86_64-avx2", "a-profile-not-shipped-here"]) == (
        "model.onnx"
    )
    with pytest.raises(RuntimeNotOnProfileError, match="it runs tflite"):
        check_served_model(manifest, ["armv7-tflite"])
