"""Fixtures of the agent's tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.layout import StateLayout
from edgefleet.converter import ConvertOptions, convert
from tests.converter.conftest import _write_case
from tests.fixtures import datasets

# --- inference and telemetry: converted bundles of the fixture models (edgefleet.agent.inference)


@dataclass(frozen=True)
class Bundles:
    """Converted bundle directories (converter output) of the fixture models; never modify them.

    The converter's choice is pinned, so the bundles are the same on every machine:
    the MLP ships its float model alone (model.onnx, no model.float.onnx); the CNN
    ships a static QDQ model with its float model as the fallback.
    """

    mlp: Path  # digits_mlp.onnx for x86_64-vnni: input features [batch, 64]; label, probabilities
    cnn: Path  # digits_cnn.onnx for x86_64-vnni: input image [batch, 1, 32, 32]; logits
    tflite: Path  # digits_mlp.tflite for aarch64: input features [batch, 64]; probabilities


CNN_CANDIDATE = "static-qdq-u8s8-per-channel-minmax"


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for key, model, input_name, data, target, candidate in (
        ("mlp", "digits_mlp.onnx", "features", datasets.digits_tabular, "x86_64-vnni", "float"),
        ("cnn", "digits_cnn.onnx", "image", datasets.digits_images, "x86_64-vnni", CNN_CANDIDATE),
        ("tflite", "digits_mlp.tflite", "features", datasets.digits_tabular, "aarch64", "float"),
    ):
        case = _write_case(root / f"{key}-data", model, input_name, data)
        out = root / key
        options = ConvertOptions(
            target=target,
            calibration=case.calibration,
            validation=case.validation,
            labels=case.labels,
            candidate=candidate,
        )
        convert(case.model, out, options)
        made[key] = out
    return Bundles(**made)


def install_version(
    layout: StateLayout, bundle: Path, version_id: str, link: str = "current"
) -> Path:
    """Copy a bundle directory to versions/<version_id> and point `link` (current, previous) at it.

    `version_id` is `<name>@<version>-<id>`, which names the version when it has no manifest.json.
    """
    layout.create()
    directory = layout.versions / version_id
    if not directory.exists():
        shutil.copytree(bundle, directory)
    layout.point(layout.current if link == "current" else layout.previous, directory)
    return directory


def write_onnx_model(path: Path, kind: str, steps: int = 1000) -> Path:
    """A drop-in model.onnx for the CNN bundle (image [batch,1,32,32] -> logits [batch,10]).

    kind:
      "nan_on_zero"  logits = (x W) / sum(x): NaN for an all-zero image, finite otherwise
      "raise"        reshapes the image to [7, 13] at run time, which onnxruntime refuses
      "slow"         correct shapes, `steps` chained 512x512 MatMuls first (a second or more)
      "constant"     logits favour class 3 whatever the image
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(1024, 10)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([-1, 1024], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Reshape", ["image", "flat"], ["x"]),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
    ]
    if kind == "nan_on_zero":
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1),
            helper.make_node("Div", ["xw", "total"], ["logits"]),
        ]
    elif kind == "raise":
        inits.append(numpy_helper.from_array(np.array([7, 13], dtype=np.int64), "bad"))
        nodes = [helper.make_node("Reshape", ["image", "bad"], ["logits"])]
    elif kind == "constant":
        bias = np.zeros(10, dtype=np.float32)
        bias[3] = 100.0
        inits += [
            numpy_helper.from_array(np.zeros((1024, 10), dtype=np.float32), "Z"),
            numpy_helper.from_array(bias, "bias"),
        ]
        nodes = [
            helper.make_node("Reshape", ["image", "flat"], ["x"]),
            helper.make_node("MatMul", ["x", "Z"], ["xz"]),
            helper.make_node("Add", ["xz", "bias"], ["logits"]),
        ]
    elif kind == "slow":
        inits += [
            numpy_helper.from_array(np.eye(512, dtype=np.float32), "C"),
            numpy_helper.from_array(np.ones((512, 512), dtype=np.float32), "ones"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
        # y0 depends on the input, so onnxruntime cannot fold the chain at load time.
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["s0"]),
            helper.make_node("Add", ["ones", "s0"], ["y0"]),
        ]
        for i in range(steps):
            nodes.append(helper.make_node("MatMul", [f"y{i}", "C"], [f"y{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"y{steps}"], ["t"], keepdims=0),
            helper.make_node("Mul", ["t", "zero"], ["t0"]),
            helper.make_node("Add", ["xw", "t0"], ["logits"]),
        ]
    else:
        raise ValueError(kind)
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_broken_cnn(tmp_path: Path, bundles: Bundles, served: str, fallback: str | None) -> Path:
    """A copy of the CNN bundle whose model.onnx (and model.float.onnx) are replaced."""
    directory = tmp_path / f"cnn-{served}-{fallback}"
    shutil.copytree(bundles.cnn, directory)
    write_onnx_model(directory / "model.onnx", served)
    if fallback is not None:
        write_onnx_model(directory / "model.float.onnx", fallback)
    return directory
