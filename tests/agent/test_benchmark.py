"""Benchmark requests on the device: verified as bundles, each candidate in a bounded child.

Real onnxruntime and LiteRT in real child processes; the request is a real
bundle signed by the test release key. A TFLite candidate runs with LiteRT (the
float model of a TFLite-only target is one); where LiteRT is not installed it is
reported as such and nothing is started. A candidate whose run needs more memory than the
bound is reported as such while the others are measured; a request whose
candidate file was changed after signing, or signed by a key the trust root
does not know, is refused and nothing of it runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.benchmark import measure_request
from edgefleet.agent.install.interfaces import Host
from edgefleet.benchwire import (
    REFERENCE_FILE,
    REQUEST_NAME,
    REQUEST_VERSION,
    SMOKE_FILE,
    SPEC_FILE,
    BenchmarkSpec,
    CandidateSpec,
)
from edgefleet.bundle import BundlePolicy, build_bundle
from edgefleet.keys import SigningKey
from edgefleet.litert import LiteRTModel
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.fixtures import datasets

PROFILE = "x86_64-vnni"
MEMORY_BOUND = 512 * 1024**2


def _scale_model(path: Path) -> None:
    """y = 2x over 4 features."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def _zeros_model(path: Path, scale: tuple[int, int], *, multiply: bool) -> None:
    """y = x + the sum of a tensor of zeros of shape (scale[0], 4 * scale[1]) made at run time
    (from x's shape, whose batch axis is dynamic, so nothing is folded at load: with a static
    shape onnxruntime would fold it all into a constant), squared by MatMul when `multiply`."""
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Mul", ["x_shape", "scale"], ["zeros_shape"]),
        helper.make_node("ConstantOfShape", ["zeros_shape"], ["zeros"]),
    ]
    if multiply:
        nodes.append(helper.make_node("MatMul", ["zeros", "zeros"], ["product"]))
    nodes += [
        helper.make_node("ReduceSum", ["product" if multiply else "zeros"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "zeros",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("scale", TensorProto.INT64, [2], list(scale))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


# 1 GiB of zeros: above MEMORY_BOUND.
EXTRA_MODELS = {"hungry": ((16384, 4096), False), "slow": ((512, 128), True)}


def make_request(
    folder: Path,
    out: Path,
    key: SigningKey,
    *,
    extra: str | None = None,
    rounds: int = 5,
    runs_per_round: int = 3,
    max_seconds: int = 120,
) -> Path:
    """A request for the float model (y = 2x) and the `extra` model of EXTRA_MODELS."""
    (folder / "candidates").mkdir(parents=True)
    candidates = [CandidateSpec(name="float", model="candidates/float.onnx")]
    _scale_model(folder / "candidates/float.onnx")
    if extra is not None:
        candidates.append(CandidateSpec(name=extra, model=f"candidates/{extra}.onnx"))
        scale, multiply = EXTRA_MODELS[extra]
        _zeros_model(folder / f"candidates/{extra}.onnx", scale, multiply=multiply)
    inputs = np.arange(12, dtype=np.float32).reshape(3, 1, 4)
    np.savez(folder / SMOKE_FILE, **{f"{i}/x": inputs[i] for i in range(3)})
    np.savez(folder / REFERENCE_FILE, **{f"{i}/y": 2 * inputs[i] for i in range(3)})
    return sign_request(
        folder, out, key, candidates, rounds=rounds, runs_per_round=runs_per_round,
        max_seconds=max_seconds,
    )  # fmt: skip


TFLITE_MODEL = Path(__file__).parents[1] / "fixtures" / "models" / "digits_mlp.tflite"


def make_tflite_request(folder: Path, out: Path, key: SigningKey) -> Path:
    """A request for the fixture digits MLP as TFLite, as the float model of a target that runs
    TFLite only is sent; the reference is its outputs with LiteRT here, the last one's
    halved (so that output's fidelity on the device is below 1: it was really compared)."""
    (folder / "candidates").mkdir(parents=True)
    candidates = [CandidateSpec(name="float", model="candidates/float.tflite")]
    (folder / "candidates/float.tflite").write_bytes(TFLITE_MODEL.read_bytes())
    features = datasets.digits_tabular()[0][:3]
    model = LiteRTModel(TFLITE_MODEL, 1)
    reference = [model.invoke({"features": row[None, :]}) for row in features]
    reference[-1] = {name: value / 2 for name, value in reference[-1].items()}
    np.savez(
        folder / SMOKE_FILE, **{f"{i}/features": row[None, :] for i, row in enumerate(features)}
    )
    np.savez(
        folder / REFERENCE_FILE,
        **{
            f"{i}/{name}": value
            for i, outputs in enumerate(reference)
            for name, value in outputs.items()
        },  # type: ignore[arg-type]
    )
    return sign_request(folder, out, key, candidates)


def sign_request(
    folder: Path,
    out: Path,
    key: SigningKey,
    candidates: list[CandidateSpec],
    *,
    rounds: int = 5,
    runs_per_round: int = 3,
    max_seconds: int = 120,
) -> Path:
    """Write benchmark.json for `candidates` (their files, smoke and reference already in
    `folder`) and sign `folder` as a request at `out`."""
    spec = BenchmarkSpec(
        target=PROFILE,
        candidates=candidates,
        warmup_runs=2,
        rounds=rounds,
        runs_per_round=runs_per_round,
        max_memory_bytes=MEMORY_BOUND,
        max_seconds=max_seconds,
    )
    (folder / SPEC_FILE).write_text(spec.model_dump_json())
    build_bundle(
        folder,
        out,
        name=REQUEST_NAME,
        version=REQUEST_VERSION,
        keys=[key],
        profiles=[PROFILE],
        min_agent_version="0.1.0",
        serves_model=False,
    )
    return out


POLICY = BundlePolicy(profile=PROFILE, agent_version="0.1.0")


def test_each_candidate_is_measured_in_its_bound_and_one_over_it_is_reported_so(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    request = make_request(
        tmp_path / "req", tmp_path / "request.efb", keyset.release, extra="hungry"
    )
    work = tmp_path / "work"
    work.mkdir()

    results = measure_request(request, work, trust, POLICY, "dev-1", threads=1)

    assert results.refused is None and results.device_id == "dev-1"
    assert results.profile == PROFILE
    measured, hungry = results.candidates
    assert measured.name == "float" and measured.outcome == "measured", measured
    assert measured.p50_ms is not None and measured.p99_ms is not None
    assert 0 < measured.p50_ms <= measured.p99_ms
    assert len(measured.round_ms) == 5
    assert measured.peak_rss_bytes is not None and 0 < measured.peak_rss_bytes < MEMORY_BOUND
    assert measured.fidelity["y"].cosine == pytest.approx(1.0)
    assert measured.fidelity["y"].max_abs_error == 0.0
    assert hungry.name == "hungry" and hungry.outcome == "memory-exceeded", hungry
    assert hungry.detail is not None and "512 MiB" in hungry.detail
    assert list(work.iterdir()) == []  # the extracted request is gone


def test_a_candidate_over_the_time_bound_is_killed_and_reported_so(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    # 64 000 runs of a 512x512 MatMul: minutes on any machine, against a bound of 1 s.
    request = make_request(
        tmp_path / "req",
        tmp_path / "request.efb",
        keyset.release,
        extra="slow",
        rounds=64,
        runs_per_round=1000,
        max_seconds=1,
    )
    work = tmp_path / "work"
    work.mkdir()

    results = measure_request(request, work, trust, POLICY, "dev-1", threads=1)

    slow = results.candidates[1]
    assert slow.name == "slow" and slow.outcome == "time-exceeded", slow
    assert slow.detail is not None and "1 s" in slow.detail
    assert slow.p50_ms is None


@pytest.mark.parametrize("how", ["file changed after signing", "signed by an unknown key"])
def test_a_tampered_request_is_refused_and_nothing_runs(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot, how: str
) -> None:
    key = keyset.release if how == "file changed after signing" else SigningKey.generate()
    request = make_request(tmp_path / "req", tmp_path / "request.efb", key)
    if how == "file changed after signing":
        data = bytearray(request.read_bytes())
        offset = data.index(b"two")  # inside the candidate's initializer, not the manifest
        data[offset] ^= 0x01
        request.write_bytes(bytes(data))
    work = tmp_path / "work"
    work.mkdir()

    results = measure_request(request, work, trust, POLICY, "dev-1", threads=1)

    expected = "tampered-file" if how == "file changed after signing" else "unknown-key"
    assert results.refused is not None and results.refused.startswith(expected), results
    assert results.candidates == []
    assert list(work.iterdir()) == []


def test_a_bundle_is_not_a_benchmark_request(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    folder = tmp_path / "bundle"
    folder.mkdir()
    _scale_model(folder / "model.onnx")
    bundle = tmp_path / "model.efb"
    build_bundle(
        folder, bundle, name="scale", version="1.0.0", keys=[keyset.release], profiles=[PROFILE]
    )
    work = tmp_path / "work"
    work.mkdir()

    results = measure_request(bundle, work, trust, POLICY, "dev-1", threads=1)

    assert results.refused is not None and "not a benchmark request" in results.refused


def test_a_tflite_candidate_is_measured_with_litert(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    request = make_tflite_request(tmp_path / "req", tmp_path / "request.efb", keyset.release)
    work = tmp_path / "work"
    work.mkdir()

    results = measure_request(request, work, trust, POLICY, "dev-1", threads=1)

    assert results.refused is None
    [measured] = results.candidates
    assert measured.name == "float" and measured.outcome == "measured", measured
    assert measured.p50_ms is not None and measured.p50_ms > 0
    assert len(measured.round_ms) == 5
    assert measured.peak_rss_bytes is not None and 0 < measured.peak_rss_bytes < MEMORY_BOUND
    # Two samples answer as the reference, the third twice it: same direction, half the scale.
    fidelity = measured.fidelity["probabilities"]
    assert fidelity.cosine == pytest.approx(1.0, abs=1e-5)
    assert 0.01 < fidelity.max_abs_error <= 0.5
    assert list(work.iterdir()) == []


def test_litert_missing_on_the_device_is_reported_so_and_nothing_runs(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    request = make_tflite_request(tmp_path / "req", tmp_path / "request.efb", keyset.release)
    work = tmp_path / "work"
    work.mkdir()
    onnxruntime_only = Host(has_module=lambda module: module == "onnxruntime")

    results = measure_request(
        request, work, trust, POLICY, "dev-1", threads=1, host=onnxruntime_only
    )

    assert results.refused is None
    [missing] = results.candidates
    assert missing.outcome == "runtime-missing", missing
    assert missing.detail is not None
    assert "needs tflite (ai_edge_litert or tflite_runtime), which is not installed" in (
        missing.detail
    )
    assert "[tflite]" in missing.detail
    assert missing.p50_ms is None and missing.round_ms == []
