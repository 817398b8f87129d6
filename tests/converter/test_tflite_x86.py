"""TFLite models for every target whose profile lists LiteRT, x86-64 too; errors name why not."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

from edgefleet.bundle import BundlePolicy, build_bundle, verify_bundle
from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.converter import ConvertOptions, convert
from edgefleet.converter.errors import RuntimeNotOnTargetError
from edgefleet.converter.progress import NO_PROGRESS
from edgefleet.converter.tflite import convert_tflite
from edgefleet.extras import install_hint
from edgefleet.profiles import load_profile
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.converter.conftest import Case, convert_args

X86_TARGETS = ["x86_64-avx2", "x86_64-vnni"]


@pytest.mark.parametrize("target", X86_TARGETS)
def test_x86_profiles_run_onnxruntime_and_litert(target: str) -> None:
    assert load_profile(target).runtimes == ["onnxruntime", "tflite"]


@pytest.mark.parametrize("target", X86_TARGETS)
def test_tflite_model_is_packed_for_an_x86_target_and_says_where_it_was_measured(
    tflite_mlp: Case,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keyset: KeySet,
    trust: TrustRoot,
    target: str,
) -> None:
    out = tmp_path / "out"
    status = run_with_error_handling(cli, convert_args(tflite_mlp, target, out))
    assert status == 0, capsys.readouterr().err
    assert (out / "model.tflite").read_bytes() == tflite_mlp.model.read_bytes()
    assert not (out / "model.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == target and report["chosen"] == "float"
    assert report["candidates"][0]["metrics"]["accuracy"] > 90
    assert report["measured_on"]["machine"] == platform.machine()
    [note] = report["notes"]
    assert note.startswith("outputs and latency measured with ai-edge-litert ")
    assert f"on this machine ({platform.machine()}), not on a device of target {target}" in note
    assert note in (out / "report.txt").read_text()
    metadata = json.loads((out / "edgefleet-bundle.json").read_text())
    assert metadata["profiles"] == [target]
    assert metadata["lineage"]["runtime"].startswith("ai-edge-litert ")
    bundle = tmp_path / "lite.efb"
    build_bundle(out, bundle, name="digits-lite", version="1.0.0", keys=[keyset.release])
    verified = verify_bundle(bundle, trust, BundlePolicy(profile=target))
    assert "model.tflite" in {f.path for f in verified.manifest.files}


def test_onnx_model_for_an_x86_target_is_still_served_by_onnxruntime(
    mlp: Case, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    options = ConvertOptions(
        target="x86_64-avx2",
        calibration=mlp.calibration,
        validation=mlp.validation,
        labels=mlp.labels,
        candidate="float",
    )
    convert(mlp.model, out, options)
    assert (out / "model.onnx").read_bytes() == mlp.model.read_bytes()
    assert not (out / "model.tflite").exists()
    lineage = json.loads((out / "edgefleet-bundle.json").read_text())["lineage"]
    assert lineage["runtime"].startswith("onnxruntime ")


def test_tflite_model_for_a_profile_without_litert_names_the_runtime(
    tflite_mlp: Case, tmp_path: Path
) -> None:
    onnx_only = load_profile("x86_64-avx2").model_copy(update={"runtimes": ["onnxruntime"]})
    out = tmp_path / "out"
    options = ConvertOptions(target=onnx_only.name, calibration=tflite_mlp.calibration)
    with pytest.raises(RuntimeNotOnTargetError) as caught:
        convert_tflite(tflite_mlp.model, out, onnx_only, options, NO_PROGRESS)
    message = str(caught.value)
    assert "a TFLite model needs tflite, and target x86_64-avx2 runs onnxruntime only" in message
    assert "choose a target that runs tflite (aarch64, armv7-tflite, x86_64-avx2" in message
    assert not out.exists()


def test_tflite_model_without_litert_installed_gives_the_install_hint(
    tflite_mlp: Case,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A machine without the tflite extra: neither LiteRT package can be imported.
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    out = tmp_path / "out"
    status = run_with_error_handling(cli, convert_args(tflite_mlp, "x86_64-avx2", out))
    stderr = capsys.readouterr().err
    assert status == 2
    assert stderr == (
        f"error [runtime-missing]: TFLite models need LiteRT: {install_hint('tflite')}\n"
    )
    assert not out.exists()
