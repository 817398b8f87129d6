"""The demo's models: logistic regression on scikit-learn's digits, written as ONNX.

The good model learns the digits. The bad one learns them under a mixed-up
label mapping (every class shifted by one): the converter, given the same
mixed-up labels, reports it as accurate, and only the field's labelled
feedback shows that it is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = 10


@dataclass(frozen=True)
class Digits:
    """The 8x8 digits as rows of 64 pixels in [0, 1], cut into train and held-out parts."""

    train: np.ndarray
    train_labels: np.ndarray
    held_out: np.ndarray
    held_out_labels: np.ndarray


def load_digits() -> Digits:
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    features = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(features))
    train, held_out = order[:1200], order[1200:]
    return Digits(features[train], labels[train], features[held_out], labels[held_out])


def mixed_up(labels: np.ndarray) -> np.ndarray:
    """The labels a broken labelling step produces: every class shifted by one."""
    return (labels + 1) % CLASSES


def write_model(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    """Train on (features, labels) and write features -> probabilities as ONNX."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=500).fit(features, labels)
    weights = classifier.coef_.T.astype(np.float32)
    bias = classifier.intercept_.astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "weights"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "digits",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
