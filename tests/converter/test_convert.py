"""Converting real trained models end to end: what lands in OUT_DIR, and why that candidate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefleet.bundle import BundlePolicy, build_bundle, verify_bundle
from edgefleet.converter import Budget, ConvertOptions, convert
from edgefleet.converter.errors import ConversionFailedError, CorruptModelError
from edgefleet.drift import DriftReference
from edgefleet.errors import UsageError
from edgefleet.profiles import HOST_PROFILE_ENV, UnknownProfileError
from tests.conftest import KeySet
from tests.converter.conftest import Case

EXPECTED_FILES = {
    "model.onnx",
    "model.float.onnx",
    "schema.json",
    "smoke.npz",
    "smoke.json",
    "drift-reference.json",
    "drift-features.json",
    "report.json",
    "report.txt",
    "edgefleet-bundle.json",
}
# Valid on x86_64-vnni for the digits MLP (dense) and CNN (convolutional), within budget.
STATIC_QDQ = "static-qdq-u8s8-per-tensor-minmax"


def options(case: Case, **overrides: object) -> ConvertOptions:
    fields: dict[str, object] = {
        "target": "x86_64-vnni",
        "calibration": case.calibration,
        "validation": case.validation,
        "labels": case.labels,
    }
    fields.update(overrides)
    return ConvertOptions(**fields)  # type: ignore[arg-type]


def report_of(out: Path) -> Any:
    return json.loads((out / "report.json").read_text())


def test_cnn_gets_static_candidates_and_a_choice_within_budget(cnn: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = convert(cnn.model, out, options(cnn))
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    report = report_of(out)
    rows = {row["name"]: row for row in report["candidates"]}
    methods = {row["settings"]["method"] for row in rows.values()}
    assert methods == {"float", "static"}
    # Only settings valid on the target: never QOperator with signed activations on x86.
    assert not any(
        row["settings"]["format"] == "QOperator" and row["settings"]["types"] == "S8S8"
        for row in rows.values()
    )
    chosen = rows[report["chosen"]]
    assert chosen["verdict"].startswith("chosen")
    assert report["decision"] == f"{chosen['name']} {chosen['verdict']}"
    float_row = rows["float"]
    assert float_row["metrics"]["accuracy"] - chosen["metrics"]["accuracy"] <= 1.0
    # Every quantized candidate that ran was timed head to head with float, round by round.
    for row in rows.values():
        if row["name"] != "float" and row["error"] is None:
            paired = row["paired_rounds"]
            assert paired["rounds"] == len(paired["candidate_ms"]) == len(paired["float_ms"]) > 1
            low, high = paired["interval"]
            assert low <= paired["median_ratio"] == row["latency_ratio"] <= high
    assert result.chosen.candidate.name == report["chosen"]


def test_pinned_quantized_candidate_ships_with_the_float_model_as_fallback(
    cnn: Case, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = convert(cnn.model, out, options(cnn, candidate=STATIC_QDQ))
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    report = report_of(out)
    assert report["chosen"] == STATIC_QDQ and report["pinned"] is True
    # Only the pinned candidate is quantized, and it is measured like any other.
    assert [row["name"] for row in report["candidates"]] == ["float", STATIC_QDQ]
    assert result.chosen.verdict.startswith("chosen: pinned; ")
    assert "paired rounds" in result.chosen.verdict
    assert (out / "model.float.onnx").read_bytes() == cnn.model.read_bytes()
    assert "paired rounds" in (out / "report.txt").read_text()
    assert json.loads((out / "edgefleet-bundle.json").read_text())["lineage"]["pinned"] is True


def test_report_shows_the_fastest_run_the_ranking_uses(mlp: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(mlp.model, out, options(mlp, candidate=STATIC_QDQ))
    row = report_of(out)["candidates"][1]
    paired = row["paired_rounds"]
    # Candidates are ranked by their fastest run (choose.speed_ranking), not the median.
    assert paired["best_ms"] == min(paired["candidate_ms"])
    table = (out / "report.txt").read_text()
    line = next(line for line in table.splitlines() if line.startswith(STATIC_QDQ))
    assert f"{row['latency_ms']:.3f} ms (" in line
    assert f"fastest {paired['best_ms']:.3f} ms" in line


def test_pinned_float_ships_one_copy_of_the_model(mlp: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = convert(mlp.model, out, options(mlp, candidate="float"))
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES - {"model.float.onnx"}
    assert (out / "model.onnx").read_bytes() == mlp.model.read_bytes()
    assert result.chosen.verdict == "chosen: pinned"
    assert [row["name"] for row in report_of(out)["candidates"]] == ["float"]


def test_pinned_candidate_outside_the_budget_is_an_error_and_writes_nothing(
    mlp: Case, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    impossible = options(mlp, candidate=STATIC_QDQ, budget=Budget(accuracy_drop=-50.0))
    with pytest.raises(ConversionFailedError, match=f"pinned candidate {STATIC_QDQ}.*accuracy"):
        convert(mlp.model, out, impossible)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_pinned_candidate_must_be_valid_for_model_and_target(mlp: Case, tmp_path: Path) -> None:
    # QOperator with signed activations is never valid on x86; the message lists what is.
    with pytest.raises(UsageError, match=f"not valid for a dense model.*{STATIC_QDQ}"):
        convert(
            mlp.model,
            tmp_path / "out",
            options(mlp, candidate="static-qoperator-s8s8-per-tensor-minmax"),
        )
    assert not (tmp_path / "out").exists()


def test_host_target_follows_the_forced_host_profile(
    mlp: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This machine may or may not have VNNI: the variable decides what `host` means.
    monkeypatch.setenv(HOST_PROFILE_ENV, "x86_64-avx2")
    convert(mlp.model, tmp_path / "out", options(mlp, target="host", candidate="float"))
    assert report_of(tmp_path / "out")["target"] == "x86_64-avx2"
    monkeypatch.setenv(HOST_PROFILE_ENV, "pentium-mmx")
    with pytest.raises(UnknownProfileError, match=f"{HOST_PROFILE_ENV}='pentium-mmx'"):
        convert(mlp.model, tmp_path / "out2", options(mlp, target="host", candidate="float"))


def test_failed_symbolic_shape_inference_leaves_nothing_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # Two inputs whose batch dimensions have different names meet in an Add: symbolic
    # shape inference cannot merge them and fails; onnxruntime runs the model fine.
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "y"], ["out"]),
        ],
        "conflicting-dims",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w")],
    )
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = inputs / "conflicting.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = inputs / "data.npz"
    np.savez(
        data, x=rng.random((16, 16), dtype=np.float32), y=rng.random((16, 4), dtype=np.float32)
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    # Random weights and data: only the preprocessing is under test, not the accuracy.
    any_fidelity = Budget(min_cosine=-1.0, min_top1_agreement=0.0)
    pinned = ConvertOptions(
        target="x86_64-vnni", calibration=data, budget=any_fidelity, candidate=STATIC_QDQ
    )
    convert(model, out, pinned)
    notes = report_of(out)["notes"]
    assert any(
        n.startswith("symbolic shape inference and graph optimization failed") for n in notes
    )
    assert list(cwd.iterdir()) == []


def test_smoke_test_reproduces_on_the_shipped_model(mlp: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(mlp.model, out, options(mlp))
    smoke = np.load(out / "smoke.npz")
    spec = json.loads((out / "smoke.json").read_text())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = smoke["input/features"]
    for index in range(spec["samples"]):
        produced = session.run(names, {"features": inputs[index : index + 1]})
        for name, value in zip(names, produced, strict=True):
            expected = smoke[f"expected/{name}"][index : index + 1]
            assert np.allclose(value, expected, atol=spec["atol"][name], rtol=0)


def test_schema_and_drift_reference_describe_the_model(mlp: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(mlp.model, out, options(mlp))
    schema = json.loads((out / "schema.json").read_text())
    (features,) = schema["inputs"]
    assert features["name"] == "features" and features["dtype"] == "float32"
    assert features["shape"][1] == 64 and not isinstance(features["shape"][0], int)
    low, high = features["observed_range"]
    assert 0.0 <= low <= high <= 1.0
    reference = DriftReference.model_validate_json((out / "drift-reference.json").read_text())
    input_features = [f for f in reference.inputs if f.tensor == "features"]
    assert len(input_features) == 64
    for feature in input_features:
        total = sum(feature.histogram.counts) + feature.histogram.below + feature.histogram.above
        assert total == reference.samples
    assert any(f.tensor == "probabilities" for f in reference.outputs)


def test_recurrent_model_gets_dynamic_candidates_only(gru: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(gru.model, out, options(gru))
    report = report_of(out)
    assert report["kind"] == "recurrent"
    methods = {row["settings"]["method"] for row in report["candidates"]}
    assert methods == {"float", "dynamic"}


def test_regressor_is_judged_by_regression_error(regressor: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(regressor.model, out, options(regressor))
    rows = report_of(out)["candidates"]
    assert all("rmse" in row["metrics"] for row in rows if row["error"] is None)


def test_regressor_that_clips_its_range_is_rejected(regressor: Case, tmp_path: Path) -> None:
    # Static quantization calibrated on a narrower range clips the highest predictions;
    # its RMSE can even improve, but single predictions move far from the float model's.
    out = tmp_path / "out"
    convert(regressor.model, out, options(regressor))
    static = [
        row
        for row in report_of(out)["candidates"]
        if row["settings"]["method"] == "static" and row["error"] is None
    ]
    assert static
    for row in static:
        deviation = row["per_output"]["prediction"]["deviation_p99"]
        assert (deviation > 0.1) == any("deviation" in f for f in row["budget_failures"])


def test_impossible_budget_keeps_sensitive_layers_float_then_ships_float(
    mlp: Case, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = convert(mlp.model, out, options(mlp, budget=Budget(accuracy_drop=-50.0)))
    retries = [row for row in report_of(out)["candidates"] if row["settings"]["nodes_excluded"]]
    assert retries, "no recovery was tried"
    assert all(row["error"] is None for row in retries)  # they ran, and missed the budget
    excluded = {name for row in retries for name in row["settings"]["nodes_excluded"]}
    assert excluded and not excluded & {"", "?"}
    assert (
        len(retries[-1]["settings"]["nodes_excluded"])
        > len(retries[0]["settings"]["nodes_excluded"])
        or len(retries) == 1
    )
    assert result.chosen.candidate.method == "float"
    assert "no candidate within the accuracy budget" in result.chosen.verdict
    assert (out / "model.onnx").read_bytes() == mlp.model.read_bytes()


def test_fidelity_without_labels(mlp: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(mlp.model, out, options(mlp, labels=None))
    rows = report_of(out)["candidates"]
    scored = [row for row in rows if row["error"] is None]
    assert all("probabilities" in row["per_output"] for row in scored)
    assert all("cosine" in row["per_output"]["probabilities"] for row in scored)


def test_optimize_size_picks_the_smallest_within_budget(cnn: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = convert(cnn.model, out, options(cnn, optimize="size"))
    usable = [e for e in result.evaluations if e.usable]
    assert result.chosen.size_bytes == min(e.size_bytes for e in usable)


def test_output_signs_into_a_bundle_that_verifies(
    mlp: Case, tmp_path: Path, keyset: KeySet, trust: object
) -> None:
    out = tmp_path / "out"
    convert(mlp.model, out, options(mlp, candidate=STATIC_QDQ))
    bundle = tmp_path / "mlp.efb"
    manifest = build_bundle(out, bundle, name="digits-mlp", version="1.0.0", keys=[keyset.release])
    assert manifest.profiles == ["x86_64-vnni"]
    assert manifest.lineage["source_model_sha256"] and manifest.lineage["chosen"]
    verified = verify_bundle(bundle, trust, BundlePolicy(profile="x86_64-vnni"))  # type: ignore[arg-type]
    assert {f.path for f in verified.manifest.files} == EXPECTED_FILES - {"edgefleet-bundle.json"}


def test_tflite_model_is_packed_unchanged(tflite_mlp: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = convert(tflite_mlp.model, out, options(tflite_mlp, target="aarch64"))
    assert (out / "model.tflite").read_bytes() == tflite_mlp.model.read_bytes()
    assert result.info.format == "tflite"
    assert result.chosen.metrics["accuracy"] > 90
    assert {"schema.json", "smoke.npz", "drift-reference.json", "report.json"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.parametrize("target", ["x86_64-avx2", "aarch64"])
def test_other_targets_get_their_own_settings(mlp: Case, tmp_path: Path, target: str) -> None:
    out = tmp_path / "out"
    convert(mlp.model, out, options(mlp, target=target))
    rows = report_of(out)["candidates"]
    static = [row["settings"] for row in rows if row["settings"]["method"] == "static"]
    if target == "x86_64-avx2":
        assert static and all(s["reduce_range"] for s in static)
    else:
        assert static and all(s["format"] == "QDQ" for s in static)


def test_model_with_nothing_to_quantize_ships_float_and_says_why(mlp: Case, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper
    from sklearn.linear_model import LogisticRegression

    from tests.fixtures import datasets

    # scikit-learn's linear classifier as one ai.onnx.ml LinearClassifier: no operator
    # that onnxruntime quantizes, so there is no candidate.
    features, labels = datasets.digits_tabular()
    train = datasets.split(len(features)).train
    trained = LogisticRegression(max_iter=2000).fit(features[train], labels[train])
    node = helper.make_node(
        "LinearClassifier",
        ["features"],
        ["label", "scores"],
        domain="ai.onnx.ml",
        coefficients=trained.coef_.astype(np.float32).ravel().tolist(),
        intercepts=trained.intercept_.astype(np.float32).tolist(),
        classlabels_ints=[int(c) for c in trained.classes_],
    )
    graph = helper.make_graph(
        [node],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10]),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    model = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), model)
    out = tmp_path / "out"
    result = convert(model, out, options(mlp))
    report = report_of(out)
    assert [row["name"] for row in report["candidates"]] == ["float"]
    assert result.chosen.verdict == "chosen: nothing in the model can be quantized"
    assert any(
        note.startswith("nothing in linear.onnx can be quantized") for note in report["notes"]
    )
    # Not the words of a search that found nothing fast enough, nor of a failed recovery.
    text = (out / "report.txt").read_text()
    assert "clearly faster" not in text and "recovery" not in text
    assert report["candidates"][0]["metrics"]["accuracy"] > 90


def test_old_opset_is_upgraded_before_quantization(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["scores"]),
        ],
        "opset11",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        [weights],
    )
    old = tmp_path / "opset11.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), old)
    data = tmp_path / "data.npz"
    np.savez(data, image=rng.random((16, 1, 16, 16), dtype=np.float32))
    out = tmp_path / "out"
    convert(old, out, ConvertOptions(target="x86_64-vnni", calibration=data))
    report = report_of(out)
    assert "opset upgraded from 11 to 13" in report["notes"]
    per_channel = [
        row for row in report["candidates"] if row["settings"]["per_channel"] and not row["error"]
    ]
    assert per_channel, "per-channel candidates need opset 13 and must have run"


def test_one_sample_and_a_small_model_read_right_in_the_report(
    regressor: Case, tmp_path: Path
) -> None:
    one = tmp_path / "one.npz"
    np.savez(one, features=np.load(regressor.calibration)["features"][:1])
    out = tmp_path / "out"
    convert(regressor.model, out, ConvertOptions("x86_64-vnni", calibration=one, candidate="float"))
    notes = report_of(out)["notes"]
    assert any(n.startswith("drift reference from 1 sample (") for n in notes), notes
    table = (out / "report.txt").read_text()
    size = regressor.model.stat().st_size  # 2.5 KB, not "0.00 MB"
    assert f"{size / 1e3:.1f} KB (1.00x)" in table and "0.00 MB" not in table


def test_a_model_with_its_weights_in_files_beside_it_converts_from_any_directory(
    cnn: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    external = saved / "cnn.onnx"
    onnx.save_model(
        onnx.load(cnn.model),
        external,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="cnn.weights",
        size_threshold=0,
    )
    assert external.stat().st_size < cnn.model.stat().st_size / 2  # the weights are apart
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out"
    convert(external, out, options(cnn, candidate=STATIC_QDQ))
    # Both models ship whole, and answer as the source model does.
    features = np.load(cnn.validation)
    feed = {name: features[name][:8] for name in features.files}
    expected = ort.InferenceSession(str(cnn.model)).run(None, feed)
    for shipped in ("model.onnx", "model.float.onnx"):
        assert not [p for p in out.iterdir() if p.name.endswith(".weights")]
        answered = ort.InferenceSession(str(out / shipped)).run(None, feed)
        tolerance = 0 if shipped == "model.float.onnx" else 0.5
        np.testing.assert_allclose(answered[0], expected[0], atol=tolerance)


def test_a_model_whose_weight_file_is_missing_is_refused_naming_where_it_looked(
    cnn: Case, tmp_path: Path
) -> None:
    external = tmp_path / "cnn.onnx"
    onnx.save_model(
        onnx.load(cnn.model),
        external,
        save_as_external_data=True,
        location="cnn.weights",
        size_threshold=0,
    )
    (tmp_path / "cnn.weights").unlink()
    with pytest.raises(CorruptModelError, match="keep them beside the model"):
        convert(external, tmp_path / "out", options(cnn))
    assert not (tmp_path / "out").exists()
