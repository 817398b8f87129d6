"""Accuracy that recovers: the layers most sensitive to quantization are kept in float."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.converter.sensitivity import Layer, model_layers, output_error
from tests.converter import mask_head
from tests.converter.conftest import size_report

MIN_COSINE = 0.99  # the default budget, without labels


@pytest.fixture(scope="module")
def mask_case(tmp_path_factory: pytest.TempPathFactory) -> mask_head.MaskHeadCase:
    return mask_head.write_case(tmp_path_factory.mktemp("mask-head"))


@pytest.fixture(scope="module")
def mask_report(
    mask_case: mask_head.MaskHeadCase, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("mask-head-out") / "out"
    return size_report(mask_case.model, mask_case.calibration, mask_case.validation, out)


def _cosine(row: dict[str, Any]) -> float:
    return float(row["per_output"]["mask"]["cosine"])


def test_minmax_int8_fails_the_mask_badly(mask_report: dict[str, Any]) -> None:
    minmax = [
        row
        for row in mask_report["candidates"]
        if row["settings"]["calibration"] == "MinMax" and not row["settings"]["nodes_excluded"]
    ]
    assert minmax
    assert all(row["error"] is None and _cosine(row) < 0.9 for row in minmax)
    assert all(
        _cosine(row) < MIN_COSINE
        for row in mask_report["candidates"]
        if row["settings"]["method"] == "static" and not row["settings"]["nodes_excluded"]
    )


def test_recovery_keeps_the_two_sensitive_layers_float_and_ships_int8(
    mask_report: dict[str, Any],
) -> None:
    retries = [row for row in mask_report["candidates"] if row["settings"]["nodes_excluded"]]
    assert retries, "no recovery was tried"
    recovered = retries[-1]
    assert _cosine(recovered) >= MIN_COSINE
    assert not recovered["budget_failures"]
    excluded = set(recovered["settings"]["nodes_excluded"])
    assert excluded == {node for name in mask_head.SENSITIVE for node in (name, f"{name}.relu")}
    # Every retry before it kept fewer layers and missed the budget.
    assert all(len(row["settings"]["nodes_excluded"]) < len(excluded) for row in retries[:-1])
    assert all(_cosine(row) < MIN_COSINE for row in retries[:-1])
    chosen = next(row for row in mask_report["candidates"] if row["name"] == mask_report["chosen"])
    assert chosen is recovered and chosen["settings"]["method"] == "static"
    assert chosen["size_ratio"] < 1


def test_sensitivity_is_reported_most_sensitive_first(mask_report: dict[str, Any]) -> None:
    note = next(n for n in mask_report["notes"] if n.startswith("sensitivity of "))
    ranked = [entry.split()[0] for entry in note.split(": ", 1)[1].split(", ")]
    assert set(ranked[:2]) == set(mask_head.SENSITIVE)
    assert set(ranked) == {"stem", "features", "mix", "refine", "head"}


def _weights(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)


def test_nodes_without_weights_are_never_a_layer() -> None:
    # A block with a residual Add, pooling, a Mul by a constant, and a MatMul of two
    # activations (no weights): only the Conv, Gemm and MatMul with weights are layers.
    nodes = [
        helper.make_node("Relu", ["x"], ["x1"], name="pre"),
        helper.make_node("Conv", ["x1", "c1.w"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["sum"], name="residual"),
        helper.make_node("Mul", ["sum", "scale"], ["scaled"], name="scale"),
        helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w"], ["fc"], name="fc"),
        helper.make_node("Transpose", ["fc"], ["fc.t"], name="transpose"),
        helper.make_node("MatMul", ["fc", "fc.t"], ["gram"], name="gram"),
    ]
    graph = helper.make_graph(
        nodes,
        "weightless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("gram", TensorProto.FLOAT, [1, 1])],
        [
            _weights("c1.w", 2, 2, 3, 3),
            _weights("c2.w", 2, 2, 3, 3),
            _weights("scale", 1),
            _weights("fc.w", 2, 3),
        ],
    )
    assert model_layers(helper.make_model(graph)) == [
        Layer("c1", ("c1", "r1")),
        Layer("c2", ("c2", "residual", "scale", "pool", "flatten")),
        Layer("fc", ("fc", "transpose", "gram")),
    ]


def test_output_error_is_zero_for_float_and_grows_with_the_damage() -> None:
    reference = {"mask": np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(4, 16)}
    noisy = {"mask": reference["mask"] + np.float32(0.05)}
    worse = {"mask": reference["mask"][::-1].copy()}
    assert output_error(reference, reference) == pytest.approx(0.0, abs=1e-9)
    assert 0 < output_error(reference, noisy) < output_error(reference, worse)
