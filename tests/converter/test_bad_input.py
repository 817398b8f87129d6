"""Bad models and bad data: a clear error naming the problem, exit 2, and no OUT_DIR."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling
from edgefleet.converter import ConvertOptions, convert, errors
from edgefleet.errors import EdgefleetError
from edgefleet.profiles import UnknownProfileError
from tests.converter.conftest import Case

Refused = Callable[..., None]


@pytest.fixture
def assert_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Refused:
    def check(
        model: Path,
        calibration: Path,
        error: type[EdgefleetError],
        target: str = "x86_64-vnni",
        match: str | None = None,
    ) -> None:
        out = tmp_path / "out"
        with pytest.raises(error, match=match):
            convert(model, out, ConvertOptions(target=target, calibration=calibration))
        capsys.readouterr()
        status = run_with_error_handling(
            cli,
            [
                "convert",
                str(model),
                "--target",
                target,
                "--calibration",
                str(calibration),
                "-o",
                str(out),
            ],
        )
        stderr = capsys.readouterr().err
        assert status == 2, stderr
        # Progress lines (stderr is not a terminal here) may come first; the error is one line.
        *progress, last = stderr.splitlines()
        assert last.startswith("error [") and "Traceback" not in stderr
        assert all(line.endswith(")") for line in progress), stderr
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    return check


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_not_a_model_refused(tmp_path: Path, mlp: Case, assert_refused: Refused) -> None:
    model = tmp_path / "notes.onnx"
    model.write_text("these are my notes, not a model\n")
    assert_refused(model, mlp.calibration, errors.NotAModelError)


def test_empty_model_refused(tmp_path: Path, mlp: Case, assert_refused: Refused) -> None:
    model = tmp_path / "empty.onnx"
    model.write_bytes(b"")
    assert_refused(model, mlp.calibration, errors.NotAModelError)


def test_truncated_model_refused(tmp_path: Path, mlp: Case, assert_refused: Refused) -> None:
    model = tmp_path / "cut.onnx"
    data = mlp.model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    assert_refused(model, mlp.calibration, errors.CorruptModelError)


def test_calibration_missing_input_refused(
    tmp_path: Path, mlp: Case, assert_refused: Refused
) -> None:
    data = _npz(tmp_path / "cal.npz", pixels=np.zeros((4, 64), np.float32))
    assert_refused(mlp.model, data, errors.MissingInputError, match="features")


def test_calibration_extra_input_refused(
    tmp_path: Path, mlp: Case, assert_refused: Refused
) -> None:
    data = _npz(
        tmp_path / "cal.npz",
        features=np.zeros((4, 64), np.float32),
        mask=np.zeros((4, 64), np.float32),
    )
    assert_refused(mlp.model, data, errors.ExtraInputError, match="mask")


def test_calibration_wrong_shape_refused(
    tmp_path: Path, mlp: Case, assert_refused: Refused
) -> None:
    data = _npz(tmp_path / "cal.npz", features=np.zeros((4, 63), np.float32))
    assert_refused(mlp.model, data, errors.InputShapeError, match="63")


def test_calibration_wrong_dtype_refused(
    tmp_path: Path, mlp: Case, assert_refused: Refused
) -> None:
    data = _npz(tmp_path / "cal.npz", features=np.full((4, 64), "x"))
    assert_refused(mlp.model, data, errors.InputDtypeError)


def test_calibration_with_nan_refused(tmp_path: Path, mlp: Case, assert_refused: Refused) -> None:
    values = np.zeros((4, 64), np.float32)
    values[2, 5] = np.nan
    data = _npz(tmp_path / "cal.npz", features=values)
    assert_refused(mlp.model, data, errors.NonFiniteDataError, match="sample 2")


def test_calibration_without_samples_refused(
    tmp_path: Path, mlp: Case, assert_refused: Refused
) -> None:
    data = _npz(tmp_path / "cal.npz", features=np.zeros((0, 64), np.float32))
    assert_refused(mlp.model, data, errors.EmptyDataError)


def test_calibration_not_npz_refused(tmp_path: Path, mlp: Case, assert_refused: Refused) -> None:
    data = tmp_path / "cal.npz"
    data.write_text("a,b,c\n")
    assert_refused(mlp.model, data, errors.DataError)


def test_unknown_target_refused(mlp: Case, assert_refused: Refused) -> None:
    assert_refused(mlp.model, mlp.calibration, UnknownProfileError, target="riscv-9000")


def test_operator_the_runtime_lacks_refused(tmp_path: Path, assert_refused: Refused) -> None:
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.custom")
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)],
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    data = _npz(tmp_path / "cal.npz", x=np.zeros((4, 4), np.float32))
    assert_refused(path, data, errors.UnsupportedOperatorError, match="com.example.custom")


def test_existing_output_directory_is_not_touched(mlp: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgefleetError, match="not empty"):
        convert(mlp.model, out, ConvertOptions(target="x86_64-vnni", calibration=mlp.calibration))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _gather_model(path: Path) -> Path:
    """Embeds 3 indices per sample in a table of 10 rows: an index >= 10 fails in Gather."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "tokens"], ["embedded"]),
            helper.make_node("ReduceMean", ["embedded"], ["mean"], axes=[1], keepdims=0),
        ],
        "embedding",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 4])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_data_the_float_model_cannot_run_on_refused(
    tmp_path: Path, assert_refused: Refused
) -> None:
    model = _gather_model(tmp_path / "embedding.onnx")
    tokens = np.zeros((8, 3), np.int64)
    tokens[4, 1] = 50
    data = _npz(tmp_path / "tokens.npz", tokens=tokens)
    assert_refused(
        model, data, errors.DataError, match=r"cannot run embedding\.onnx on the data in .*tokens"
    )


def test_calibration_data_the_float_model_cannot_run_on_refused(tmp_path: Path) -> None:
    model = _gather_model(tmp_path / "embedding.onnx")
    good = _npz(tmp_path / "good.npz", tokens=np.zeros((8, 3), np.int64))
    bad = _npz(tmp_path / "bad.npz", tokens=np.full((8, 3), 10, np.int64))
    out = tmp_path / "out"
    with pytest.raises(errors.DataError, match=r"on the data in .*bad\.npz"):
        convert(model, out, ConvertOptions(target="x86_64-vnni", calibration=bad, validation=good))
    assert not out.exists()
