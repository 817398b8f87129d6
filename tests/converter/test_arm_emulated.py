"""ARM bundles' smoke tests on an emulated ARM userland (qemu-user and a Debian root).

Bundles converted here for `aarch64` (ONNX int8, TFLite) and `armv7-tflite` (TFLite,
and ONNX converted to int8 TFLite) must load in the ARM builds of their runtimes and answer within
smoke.json's tolerance; a signed bundle whose expected outputs are not what
the model answers on ARM is refused. The tests that need qemu-user and
mmdebstrap skip without them, unless EDGEFLEET_REQUIRE_QEMU=1 (CI), which
makes that a failure (the ONNX to TFLite one needs the onnx2tf tool environment too:
EDGEFLEET_REQUIRE_TFLITE_TOOLS). The roots are cached in ~/.cache/edgefleet-arm.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefleet.bundle import build_bundle
from edgefleet.bundlefiles import SMOKE_EXPECTED_PREFIX, SMOKE_FILE, SMOKE_SPEC_FILE, SmokeSpec
from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.converter import ConvertOptions, convert
from edgefleet.converter.reference import output_steps
from edgefleet.converter.toolenv import PREPARE_COMMAND, onnx2tf_python
from edgefleet.emulate import root as emulated_root
from edgefleet.emulate.root import ARCHITECTURES, RootBuildError, ensure_root, root_key
from tests.conftest import KeySet
from tests.converter.conftest import Case

INT8_ON_ARM = "static-qdq-s8s8-per-channel-minmax"


def _require(variable: str, message: str) -> None:
    if os.environ.get(variable) == "1":
        pytest.fail(f"{message} and {variable}=1")
    pytest.skip(message)


def _require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install qemu-user mmdebstrap)"
        _require("EDGEFLEET_REQUIRE_QEMU", message)


@pytest.fixture(scope="module")
def arm_roots() -> None:
    """Both roots, built before the first test that runs one (or found in the cache)."""
    _require_tools("qemu-aarch64", "qemu-arm", "mmdebstrap")
    for arch in ARCHITECTURES.values():
        ensure_root(arch)


def _convert(case: Case, target: str, out: Path, candidate: str | None = None) -> Path:
    options = ConvertOptions(
        target=target,
        calibration=case.calibration,
        validation=case.validation,
        labels=case.labels,
        candidate=candidate,
    )
    convert(case.model, out, options)
    return out


def _bundle(model_dir: Path, keyset: KeySet, output: Path, profiles: tuple[str, ...] = ()) -> Path:
    """Signed with the test's release key; the converter's profiles unless `profiles`."""
    build_bundle(
        model_dir, output, name="digits", version="1.0.0", keys=[keyset.release], profiles=profiles
    )
    return output


def _emulated_smoke(
    bundle: Path, arch: str, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    status = run_with_error_handling(
        cli, ["emulate", "smoke", str(bundle), "--arch", arch, "--trust", str(trust_file)]
    )
    captured = capsys.readouterr()
    return status, (captured.out + captured.err).strip()


@pytest.fixture(scope="module")
def int8_for_aarch64(cnn: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = _convert(cnn, "aarch64", tmp_path_factory.mktemp("arm") / "int8", INT8_ON_ARM)
    assert json.loads((out / "report.json").read_text())["chosen"] == INT8_ON_ARM
    return out


@pytest.mark.usefixtures("arm_roots")
@pytest.mark.parametrize(
    ("target", "arch", "runtime"),
    [
        ("aarch64", "arm64", "ai-edge-litert 2.1.0"),
        ("armv7-tflite", "armhf", "tflite-runtime 2.14.0"),
    ],
)
def test_tflite_bundle_passes_its_smoke_test_on_emulated_arm(
    tflite_mlp: Case,
    tmp_path: Path,
    keyset: KeySet,
    trust_file: Path,
    capsys: pytest.CaptureFixture[str],
    target: str,
    arch: str,
    runtime: str,
) -> None:
    out = _convert(tflite_mlp, target, tmp_path / "out")
    bundle = _bundle(out, keyset, tmp_path / "lite.efb")
    status, line = _emulated_smoke(bundle, arch, trust_file, capsys)
    assert status == 0, line
    assert line == (
        f"OK {arch}: digits@1.0.0: 8 smoke samples match their expected outputs "
        f"({runtime} under emulation; correctness only, no timing)"
    )


@pytest.mark.usefixtures("arm_roots")
def test_int8_onnx_bundle_passes_its_smoke_test_on_emulated_arm64(
    int8_for_aarch64: Path,
    tmp_path: Path,
    keyset: KeySet,
    trust_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = _bundle(int8_for_aarch64, keyset, tmp_path / "int8.efb")
    status, line = _emulated_smoke(bundle, "arm64", trust_file, capsys)
    assert status == 0, line
    assert line == (
        "OK arm64: digits@1.0.0: 8 smoke samples match their expected outputs "
        "(onnxruntime 1.26.0 under emulation; correctness only, no timing)"
    )


@pytest.mark.usefixtures("arm_roots")
def test_onnx_model_converted_to_int8_tflite_passes_its_smoke_test_on_emulated_armhf(
    cnn: Case,
    tmp_path: Path,
    keyset: KeySet,
    trust_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if onnx2tf_python() is None:
        message = f"the onnx2tf tool environment is not built (`{PREPARE_COMMAND}`)"
        _require("EDGEFLEET_REQUIRE_TFLITE_TOOLS", message)
    out = _convert(cnn, "armv7-tflite", tmp_path / "out", "tflite-int8")
    assert json.loads((out / "report.json").read_text())["chosen"] == "tflite-int8"
    [step] = output_steps(out / "model.tflite").values()  # the logits' int8 step, about 0.2
    spec = SmokeSpec.model_validate_json((out / SMOKE_SPEC_FILE).read_bytes())
    assert spec.atol["logits"] > step  # allows the step armhf's kernels may round by
    bundle = _bundle(out, keyset, tmp_path / "cnn-lite.efb")
    status, line = _emulated_smoke(bundle, "armhf", trust_file, capsys)
    assert status == 0, line
    assert line == (
        "OK armhf: digits@1.0.0: 8 smoke samples match their expected outputs "
        "(tflite-runtime 2.14.0 under emulation; correctness only, no timing)"
    )


@pytest.mark.usefixtures("arm_roots")
def test_signed_bundle_that_answers_otherwise_on_arm_is_refused(
    int8_for_aarch64: Path,
    tmp_path: Path,
    keyset: KeySet,
    trust_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    altered = tmp_path / "altered"
    shutil.copytree(int8_for_aarch64, altered)
    spec = SmokeSpec.model_validate_json((altered / SMOKE_SPEC_FILE).read_bytes())
    with np.load(altered / SMOKE_FILE) as archive:
        arrays = {name: archive[name] for name in archive.files}
    [expected] = [name for name in arrays if name.startswith(SMOKE_EXPECTED_PREFIX)]
    output = expected.removeprefix(SMOKE_EXPECTED_PREFIX)
    arrays[expected][3] += 2 * spec.atol[output]
    np.savez(altered / SMOKE_FILE, **arrays)
    bundle = _bundle(altered, keyset, tmp_path / "altered.efb")  # signed: it verifies
    status, line = _emulated_smoke(bundle, "arm64", trust_file, capsys)
    assert status == 1
    assert line.startswith(
        f"refused [emulated-smoke-test]: arm64: digits@1.0.0: sample 3: output {output!r} "
        "differs by "
    ), line
    assert "\n" not in line


@pytest.mark.usefixtures("arm_roots")
def test_bundle_for_no_profile_of_the_architecture_is_refused(
    int8_for_aarch64: Path,
    tmp_path: Path,
    keyset: KeySet,
    trust_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = _bundle(int8_for_aarch64, keyset, tmp_path / "x86.efb", profiles=("x86_64-avx2",))
    status, line = _emulated_smoke(bundle, "armhf", trust_file, capsys)
    assert status == 1
    assert line == (
        "refused [profile-mismatch]: the bundle is for x86_64-avx2, none of them an armv7l "
        "profile: the armhf root runs bundles for armv7-tflite"
    )


def test_missing_emulator_says_what_to_install(
    tmp_path: Path,
    trust_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither qemu-user nor mmdebstrap on it
    status = run_with_error_handling(
        cli, ["emulate", "build-root", "--arch", "arm64", "--cache", str(tmp_path / "cache")]
    )
    assert status == 2
    assert capsys.readouterr().err == (
        "error [emulator-missing]: qemu-aarch64 and mmdebstrap not found: the emulated ARM "
        "check needs qemu-user and mmdebstrap (apt-get install qemu-user mmdebstrap)\n"
    )
    assert not (tmp_path / "cache").exists()


def test_failed_build_leaves_no_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_tools("qemu-arm", "mmdebstrap")
    monkeypatch.setattr(emulated_root, "MIRROR", "http://127.0.0.1:9/debian")  # nothing listens
    with pytest.raises(RootBuildError, match=r"^building the Debian bookworm armhf root"):
        ensure_root(ARCHITECTURES["armhf"], tmp_path)
    assert list((tmp_path / "armhf").iterdir()) == []


def test_root_is_rebuilt_when_its_package_list_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    arch = ARCHITECTURES["arm64"]
    before = root_key(arch)
    monkeypatch.setattr(emulated_root, "DEBIAN_PACKAGES", (*emulated_root.DEBIAN_PACKAGES, "file"))
    assert root_key(arch) != before
