"""Input checks against a bundle's schema: every refusal names the input and what was expected."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.errors import InputSchemaError
from edgefleet.agent.inference import InputValidator, validate_inputs
from edgefleet.agent.inference.schema import RANGE_MARGIN, allowed_range
from edgefleet.bundlefiles import ModelSchema, TensorSchema

IMAGE = TensorSchema(
    name="image", dtype="float32", shape=["batch", 1, 32, 32], observed_range=[0.0, 1.0]
)
LOGITS = TensorSchema(name="logits", dtype="float32", shape=["batch", 10])
CNN = ModelSchema(format="onnx", inputs=[IMAGE], outputs=[LOGITS])
# Two inputs sharing the symbolic dimensions `batch` and `steps`, and an integer input.
SEQUENCE = ModelSchema(
    format="onnx",
    inputs=[
        TensorSchema(name="tokens", dtype="int32", shape=["batch", "steps"]),
        TensorSchema(name="mask", dtype="float32", shape=["batch", "steps", None]),
    ],
    outputs=[LOGITS],
)


def image(batch: int = 1, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(0).random((batch, 1, 32, 32)).astype(dtype)


def refused(schema: ModelSchema, inputs: Any, *fragments: str) -> None:
    with pytest.raises(InputSchemaError) as caught:
        validate_inputs(schema, inputs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_valid_inputs_pass_through_unchanged() -> None:
    x = image(3)
    feed = validate_inputs(CNN, {"image": x})
    assert feed["image"] is x


def test_batch_of_one_or_more_is_accepted() -> None:
    validator = InputValidator(CNN)
    for batch in (1, 2, 64):
        assert validator.validate({"image": image(batch)})["image"].shape[0] == batch


def test_missing_input_is_named_with_what_the_model_takes() -> None:
    refused(CNN, {}, "missing input 'image'", "image (float32 [batch, 1, 32, 32])")


def test_unknown_input_is_named() -> None:
    refused(CNN, {"image": image(), "extra": image()}, "unknown input 'extra'")


def test_misspelt_input_is_reported_as_missing() -> None:
    refused(CNN, {"imag": image()}, "missing input 'image'")


def test_inputs_must_be_a_mapping() -> None:
    refused(CNN, [image()], "must be a mapping", "not list")


def test_float64_is_cast_to_float32() -> None:
    feed = validate_inputs(CNN, {"image": image(dtype=np.float64)})
    assert feed["image"].dtype == np.float32


def test_lossless_cast_across_kinds_is_accepted() -> None:
    pixels = (image() * 255).astype(np.uint8)
    feed = validate_inputs(CNN, {"image": pixels})
    assert feed["image"].dtype == np.float32


def test_float_for_an_integer_input_is_refused() -> None:
    refused(
        SEQUENCE,
        {"tokens": np.ones((1, 4), np.float32), "mask": np.ones((1, 4, 2), np.float32)},
        "input 'tokens' has dtype float32; expected int32",
    )


def test_integer_narrowing_is_accepted_when_values_fit() -> None:
    feed = validate_inputs(
        SEQUENCE, {"tokens": np.arange(4, dtype=np.int64)[None], "mask": np.ones((1, 4, 2))}
    )
    assert feed["tokens"].dtype == np.int32


def test_integer_narrowing_that_loses_values_is_refused() -> None:
    tokens = np.array([[1, 2**40]], dtype=np.int64)
    refused(
        SEQUENCE,
        {"tokens": tokens, "mask": np.ones((1, 2, 1))},
        "input 'tokens'",
        "do not fit the expected int32",
    )


def test_strings_are_refused() -> None:
    refused(CNN, {"image": np.array([["a"]])}, "input 'image' has dtype str32; expected float32")


def test_python_lists_are_accepted() -> None:
    feed = validate_inputs(CNN, {"image": image().tolist()})
    assert feed["image"].dtype == np.float32


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ((1, 32, 32), "has shape [1, 32, 32] (3 dimensions); expected [batch, 1, 32, 32]"),
        ((1, 3, 32, 32), "expected [batch, 1, 32, 32] (dimension 1 must be 1)"),
        ((1, 1, 32, 31), "(dimension 3 must be 32)"),
        ((0, 1, 32, 32), "empty dimension"),
    ],
)
def test_wrong_shapes_are_refused(shape: tuple[int, ...], fragment: str) -> None:
    refused(CNN, {"image": np.zeros(shape, np.float32)}, "input 'image'", fragment)


def test_symbolic_dimension_must_agree_between_inputs() -> None:
    refused(
        SEQUENCE,
        {"tokens": np.ones((2, 5), np.int32), "mask": np.ones((2, 4, 3), np.float32)},
        "input 'mask' has 'steps' = 4",
        "input 'tokens' has 'steps' = 5",
    )


def test_unknown_dimension_is_free() -> None:
    for width in (1, 7):
        mask = np.ones((2, 5, width), np.float32)
        validate_inputs(SEQUENCE, {"tokens": np.ones((2, 5), np.int32), "mask": mask})


@pytest.mark.parametrize(
    ("bad", "word"), [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")]
)
def test_nan_and_infinity_are_refused(bad: float, word: str) -> None:
    x = image()
    x[0, 0, 3, 4] = bad
    refused(CNN, {"image": x}, "input 'image' has 1", word, "every value must be finite")


def test_nan_count_is_reported() -> None:
    x = image()
    x[0, 0, 0, :5] = np.nan
    x[0, 0, 1, 0] = np.inf
    refused(CNN, {"image": x}, "5 NaN and 1 infinite value(s) of 1024")


def test_large_finite_values_are_not_mistaken_for_infinity() -> None:
    # The sum of squares overflows float32; the exact check must see that every value is finite.
    x = np.full((1, 1, 32, 32), 3e37, np.float32)
    assert validate_inputs(CNN, {"image": x})["image"] is x


def test_values_outside_the_observed_range_are_not_errors() -> None:
    x = image() * 1000 - 500
    assert validate_inputs(CNN, {"image": x})["image"] is x


def test_allowed_range_widens_by_the_margin() -> None:
    low, high = allowed_range([0.0, 1.0])
    assert (low, high) == pytest.approx((-RANGE_MARGIN, 1 + RANGE_MARGIN))


def test_error_messages_are_one_line() -> None:
    with pytest.raises(InputSchemaError) as caught:
        validate_inputs(CNN, {"image": np.zeros((2, 2), np.float32)})
    assert not re.search(r"\n", str(caught.value))
