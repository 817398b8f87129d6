"""`edgefleet convert` and `edgefleet targets` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from tests.converter.conftest import Case

STATIC_QDQ = "static-qdq-u8s8-per-tensor-minmax"


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    status = run_with_error_handling(cli, [str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_convert_and_sign_in_one_go(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "keys", "init", tmp_path / "keys")[0] == 0
    bundle = tmp_path / "digits.efb"
    status, out, err = run(
        capsys,
        "convert",
        mlp.model,
        "--target",
        "x86_64-vnni",
        "--calibration",
        mlp.calibration,
        "--validation",
        mlp.validation,
        "--labels",
        mlp.labels,
        "--candidate",
        STATIC_QDQ,
        "--sign",
        tmp_path / "keys" / "release.key",
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--security-floor",
        "1.0.0",
        "-o",
        bundle,
    )
    assert status == 0, err
    assert "chose" in out and str(bundle) in out
    status, out, err = run(
        capsys,
        "bundle",
        "verify",
        bundle,
        "--trust",
        tmp_path / "keys" / "trust.json",
        "--profile",
        "x86_64-vnni",
        "--json",
    )
    assert status == 0, err
    manifest = json.loads(out)["manifest"]
    assert "model.float.onnx" in {f["path"] for f in manifest["files"]}
    assert manifest["lineage"]["target"] == "x86_64-vnni"
    assert manifest["security_floor"] == 1_000_000_000_000  # stated, signed with the rest


def test_convert_json_summary(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(
        capsys,
        "convert",
        mlp.model,
        "--target",
        "x86_64-vnni",
        "--calibration",
        mlp.calibration,
        "--json",
        "-o",
        tmp_path / "out",
    )
    assert status == 0, err
    report = json.loads(out)
    assert report["out_dir"] == str(tmp_path / "out")
    assert report["chosen"] in {row["name"] for row in report["candidates"]}


@pytest.mark.parametrize(
    ("case_name", "candidate", "budget", "expected"),
    [
        ("mlp", "fastest", "accuracy_drop=1", "error [usage]: candidate 'fastest' is not valid"),
        # Any quantized prediction moves from the float one: no deviation at all is impossible.
        (
            "regressor",
            STATIC_QDQ,
            "max_deviation=0",
            "error [conversion-failed]: the pinned candidate",
        ),
    ],
)
def test_pinned_candidate_that_cannot_ship_is_one_line_and_writes_nothing(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case_name: str,
    candidate: str,
    budget: str,
    expected: str,
) -> None:
    case: Case = request.getfixturevalue(case_name)
    status, out, err = run(
        capsys,
        "convert",
        case.model,
        "--target",
        "x86_64-vnni",
        "--calibration",
        case.calibration,
        "--validation",
        case.validation,
        "--labels",
        case.labels,
        "--budget",
        budget,
        "--candidate",
        candidate,
        "-o",
        tmp_path / "out",
    )
    assert status == 2 and out == ""
    # Progress lines (stderr is not a terminal here), then the error in one line.
    *progress, last = err.splitlines()
    assert last.startswith(expected)
    assert not [line for line in progress if not line.endswith(")")]
    assert not (tmp_path / "out").exists()


def test_sign_needs_name_and_version(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(
        capsys,
        "convert",
        mlp.model,
        "--target",
        "x86_64-vnni",
        "--calibration",
        mlp.calibration,
        "--sign",
        mlp.model,
        "-o",
        tmp_path / "x.efb",
    )
    assert status == 2 and "--name and --version" in err


def test_bad_budget_refused(mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(
        capsys,
        "convert",
        mlp.model,
        "--target",
        "x86_64-vnni",
        "--calibration",
        mlp.calibration,
        "--budget",
        "speed=fast",
        "-o",
        tmp_path / "out",
    )
    assert status == 2 and "accuracy_drop" in err


@pytest.mark.parametrize(
    ("item", "allowed"),
    [
        ("min_cosine=2", "min_cosine must be in (0, 1]"),
        ("min_cosine=0", "min_cosine must be in (0, 1]"),
        ("min_top1_agreement=1.5", "min_top1_agreement must be in (0, 1]"),
        ("accuracy_drop=-5", "accuracy_drop must be a number >= 0"),
        ("accuracy_drop=nan", "accuracy_drop must be a number >= 0"),
        ("regression_error_increase=inf", "regression_error_increase must be a number >= 0"),
        ("max_deviation=-0.1", "max_deviation must be a number >= 0"),
        ("min_cosine=nan", "min_cosine must be in (0, 1]"),
    ],
)
def test_budget_out_of_range_refused(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], item: str, allowed: str
) -> None:
    status, out, err = run(
        capsys,
        "convert",
        mlp.model,
        "--target",
        "x86_64-vnni",
        "--calibration",
        mlp.calibration,
        "--budget",
        item,
        "-o",
        tmp_path / "out",
    )
    assert status == 2 and out == ""
    assert err == f"error [usage]: --budget {item!r}: {allowed}\n"
    assert not (tmp_path / "out").exists()


def test_report_states_every_budget_key(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(
        capsys,
        "convert",
        mlp.model,
        "--target",
        "x86_64-vnni",
        "--calibration",
        mlp.calibration,
        "--candidate",
        "float",
        "--budget",
        "max_deviation=0.25",
        "-o",
        tmp_path / "out",
    )
    assert status == 0, err
    budget = json.loads((tmp_path / "out" / "report.json").read_text())["budget"]
    assert budget["max_deviation"] == 0.25
    assert budget["min_cosine"] == 0.99


def test_convert_help_says_what_each_optimization_may_ship(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run(capsys, "convert", "--help")
    assert status == 0
    text = " ".join(out.split())
    # --optimize size may ship a smaller, slower model (docs/converter.md, step 8).
    assert "With --optimize latency (the default)" in text
    assert "a model slower than the float one is never shipped. With --optimize size" in text
    assert "smaller than the float model, whatever its speed" in text


def test_targets_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "targets", "list", "--json")
    assert status == 0
    names = {p["name"] for p in json.loads(out)["profiles"]}
    assert "aarch64" in names
    status, out, _ = run(capsys, "targets", "show", "x86_64-avx2")
    assert status == 0 and "reduce range" in out
    status, _, err = run(capsys, "targets", "show", "nope")
    assert status == 2 and "unknown target" in err


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--name", "Digits", "'Digits' is not a bundle name: use 1 to 64 of lowercase letters"),
        ("--name", "chiffres-é", "is not a bundle name"),
        ("--version", "1.0", "'1.0' is not a semantic version: MAJOR.MINOR.PATCH"),
        ("--version", "20261208.0.0", "the largest major version allowed is 9223371"),
        ("--security-floor", "2.0.0", "security floor 2000000000000 is above the release"),
    ],
)
def test_bundle_fields_are_checked_before_the_conversion_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, says: str
) -> None:
    assert run(capsys, "keys", "init", tmp_path / "keys")[0] == 0
    # Not a model: had the conversion started, it would have refused the model first.
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not a model")
    calibration = tmp_path / "cal.npy"
    calibration.write_bytes(b"")
    fields = {"--name": "digits", "--version": "1.0.0", option: value}
    status, _, err = run(
        capsys, "convert", model, "--target", "x86_64-vnni", "--calibration", calibration,
        "--sign", tmp_path / "keys" / "release.key", *(a for kv in fields.items() for a in kv),
        "-o", tmp_path / "x.efb",
    )  # fmt: skip
    assert status == 2, err
    assert err.startswith("error [usage]: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "x.efb").exists()


def test_convert_help_gives_the_name_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "convert", "--help")
    assert status == 0 and "^[a-z0-9][a-z0-9._-]{0,63}$" in " ".join(out.split())


def test_targets_list_names_a_bad_host_profile_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_HOST_PROFILE", "nosuch")
    for args in (("targets", "list"), ("targets", "list", "--json"), ("targets", "show", "host")):
        status, out, err = run(capsys, *args)
        assert status == 2 and out == ""
        assert err.startswith("error [unknown-profile]: EDGEFLEET_HOST_PROFILE='nosuch' names no")
    monkeypatch.setenv("EDGEFLEET_HOST_PROFILE", "aarch64")
    status, out, _ = run(capsys, "targets", "list")
    assert status == 0 and "* aarch64" in out and "* matches this machine" in out


def _not_a_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model file that is not one: an output check that came after the work would
    report the model instead."""
    model, calibration = tmp_path / "model.onnx", tmp_path / "cal.npy"
    model.write_bytes(b"not a model")
    calibration.write_bytes(b"")
    return model, calibration


@pytest.mark.parametrize("sign", [True, False], ids=["bundle file", "directory"])
def test_an_unusable_output_path_is_named_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sign: bool
) -> None:
    assert run(capsys, "keys", "init", tmp_path / "keys")[0] == 0
    model, calibration = _not_a_model(tmp_path)
    signing: list[str | Path] = [
        "--sign",
        tmp_path / "keys" / "release.key",
        "--name",
        "d",
        "--version",
        "1.0.0",
    ]
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-dir" / "x").write_text("not empty")
    (tmp_path / "a-file").write_text("x")
    cases = {
        tmp_path / "a-file" / "b.efb": f"{tmp_path / 'a-file'} is not a directory",
        tmp_path / ("a-dir" if sign else "a-file"): "is a directory" if sign else "is a file",
    }
    if not sign:
        cases[tmp_path / "a-dir"] = "exists and is not empty"
    for output, says in cases.items():
        status, _, err = run(
            capsys, "convert", model, "--target", "x86_64-vnni", "--calibration", calibration,
            *(signing if sign else []), "-o", output,
        )  # fmt: skip
        assert status == 2, err
        assert err.startswith(f"error [usage]: -o {output}") and says in err, err
        assert ".tmp" not in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-dir", "a-file", "cal.npy", "keys", "model.onnx",
    ]  # fmt: skip


def test_a_bundle_file_under_missing_directories_is_written_there(
    mlp: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "keys", "init", tmp_path / "keys")[0] == 0
    bundle = tmp_path / "nodir3" / "deeper" / "b.efb"
    status, _, err = run(
        capsys, "convert", mlp.model, "--target", "x86_64-vnni", "--calibration", mlp.calibration,
        "--candidate", "float", "--sign", tmp_path / "keys" / "release.key", "--name", "digits",
        "--version", "1.0.0", "-o", bundle,
    )  # fmt: skip
    assert status == 0, err
    assert (
        run(capsys, "bundle", "verify", bundle, "--trust", tmp_path / "keys" / "trust.json")[0] == 0
    )
    assert [p.name for p in bundle.parent.iterdir()] == ["b.efb"]
