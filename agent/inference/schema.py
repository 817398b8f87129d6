"""Input checks against the bundle's schema.json, before the model sees an input.

Errors (`InputSchemaError`, naming the input and what was expected): a missing
or unknown input name; a dtype that cannot be cast without changing its kind
or losing values; a rank or a fixed dimension that differs; an empty dimension;
one symbolic dimension (`batch`) given two sizes by two inputs; NaN or infinity.

Not an error, and not checked here: values outside the range seen on the
reference data by more than RANGE_MARGIN of its width (`allowed_range`). That
is drift, which telemetry is there to measure, not a broken request; the
telemetry recorder counts such values (agent/telemetry.py) when it bins the
inputs, in bulk, which keeps two more reductions per input off every request.

Accepted casts: within a kind (float64 -> float32, int64 -> int32 when every
value fits), and numpy's lossless ("safe") casts across kinds (uint8 -> float32,
bool -> anything). Refused: float -> int, complex, strings, objects.

The checker is compiled once per model version (`InputValidator`); a call costs
a few attribute reads, one tuple compare and one `vdot` (a sum of squares,
which is NaN or infinite when any value is) per float input.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import isfinite
from typing import Any, NoReturn

import numpy as np

from edgefleet.agent.errors import InputSchemaError
from edgefleet.bundlefiles import Dim, ModelSchema, TensorSchema

RANGE_MARGIN = 0.1  # of the observed range's width, on each side
_MISSING: Any = object()
_minimum = np.minimum.reduce
_maximum = np.maximum.reduce
_squares = np.vdot


def format_shape(shape: list[Dim] | tuple[Any, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class _Input:
    """One input's rules, precomputed."""

    __slots__ = (
        "dtype",
        "fixed",
        "floating",
        "name",
        "rank",
        "shape",
        "symbols",
        "tail",
    )

    def __init__(self, spec: TensorSchema) -> None:
        self.name = spec.name
        self.dtype = np.dtype(spec.dtype)
        self.shape = spec.shape
        self.rank = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int))
        self.symbols = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, str))
        # The fixed dimensions after the first, when only the first is free; else None.
        rest = spec.shape[1:]
        self.tail = tuple(rest) if self.rank and all(isinstance(d, int) for d in rest) else None
        self.floating = self.dtype.kind == "f"

    def expected(self) -> str:
        return f"{self.dtype.name} {format_shape(self.shape)}"


class InputValidator:
    """`validate(inputs)` for one model's schema; build once, call per request."""

    def __init__(self, schema: ModelSchema) -> None:
        self.schema = schema
        self._inputs = tuple(_Input(spec) for spec in schema.inputs)
        self.names = tuple(spec.name for spec in self._inputs)
        self._name_set = frozenset(self.names)
        self._bind = len(self._inputs) > 1  # symbolic dimensions shared between inputs

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The inputs as the model takes them (cast where needed; otherwise the caller's arrays).

        Raises:
            InputSchemaError: see the module docstring.
        """
        if type(inputs) is not dict and not isinstance(inputs, Mapping):
            raise InputSchemaError(
                f"inputs must be a mapping of input name to array, not {type(inputs).__name__}"
            )
        if len(inputs) != len(self._inputs):
            self._refuse_names(inputs)
        feed: dict[str, np.ndarray] = {}
        bound: dict[str, tuple[int, str]] | None = None
        for spec in self._inputs:
            value = inputs.get(spec.name, _MISSING)
            if value is _MISSING:
                self._refuse_names(inputs)
            if type(value) is not np.ndarray:
                value = _as_array(spec, value)
            if value.dtype is not spec.dtype and value.dtype != spec.dtype:
                value = _cast(spec, value)
            shape = value.shape
            # Fast path for the usual schema, [batch, fixed...]: one tuple compare.
            if (
                spec.tail is None
                or len(shape) != spec.rank
                or shape[1:] != spec.tail
                or not shape[0]
            ):
                _check_shape(spec, shape)
            if spec.symbols and self._bind:
                bound = _bind(spec, shape, {} if bound is None else bound)
            # A NaN or infinity anywhere makes the sum of squares NaN or infinite (one
            # BLAS call: vdot costs half a reduction ufunc's first call after a model run);
            # an overflowing sum of finite values is told apart by the exact check.
            if spec.floating and not isfinite(_squares(value, value)):
                _refuse_non_finite(spec, value)
            feed[spec.name] = value
        return feed

    def _refuse_names(self, inputs: Mapping[str, Any]) -> NoReturn:
        expected = ", ".join(f"{s.name} ({s.expected()})" for s in self._inputs)
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise InputSchemaError(
                f"missing input {', '.join(map(repr, missing))}; the model takes {expected}"
            )
        unknown = sorted(str(n) for n in inputs if n not in self._name_set)
        raise InputSchemaError(
            f"unknown input {', '.join(map(repr, unknown))}; the model takes {expected}"
        )


def _check_shape(spec: _Input, shape: tuple[int, ...]) -> None:
    if len(shape) != spec.rank:
        raise InputSchemaError(
            f"input {spec.name!r} has shape {format_shape(shape)} "
            f"({len(shape)} dimensions); expected {format_shape(spec.shape)}"
        )
    for axis, size in spec.fixed:
        if shape[axis] != size:
            raise InputSchemaError(
                f"input {spec.name!r} has shape {format_shape(shape)}; expected "
                f"{format_shape(spec.shape)} (dimension {axis} must be {size})"
            )
    if 0 in shape:
        raise InputSchemaError(
            f"input {spec.name!r} has an empty dimension: shape {format_shape(shape)}; "
            f"expected {format_shape(spec.shape)} with at least one sample"
        )


def allowed_range(observed: tuple[float, float] | list[float]) -> tuple[float, float]:
    """The observed range widened by RANGE_MARGIN of its width on each side."""
    low, high = float(observed[0]), float(observed[-1])
    slack = RANGE_MARGIN * (high - low)
    return low - slack, high + slack


def _as_array(spec: _Input, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputSchemaError(
            f"input {spec.name!r} is not an array ({type(value).__name__}); "
            f"expected {spec.expected()}"
        ) from exc
    if spec.dtype.kind == "f" and array.dtype.kind in "biuf":
        return array.astype(spec.dtype)  # Python numbers: exact in float64, then as the model's
    return array


def _cast(spec: _Input, value: np.ndarray) -> np.ndarray:
    source, target = value.dtype, spec.dtype
    same_kind = source.kind == target.kind or {source.kind, target.kind} <= {"i", "u"}
    if not (same_kind or np.can_cast(source, target, "safe")):
        raise InputSchemaError(
            f"input {spec.name!r} has dtype {source.name}; expected {target.name} "
            f"(casts are accepted within a kind, e.g. float64 to float32, or when lossless)"
        )
    if target.kind in "iu" and source.kind in "iu" and value.size:
        info = np.iinfo(target)
        low, high = int(_minimum(value, None)), int(_maximum(value, None))
        if low < info.min or high > info.max:
            raise InputSchemaError(
                f"input {spec.name!r} has dtype {source.name} with values from {low} to {high}, "
                f"which do not fit the expected {target.name}"
            )
    return value.astype(target)


def _bind(
    spec: _Input, shape: tuple[int, ...], bound: dict[str, tuple[int, str]]
) -> dict[str, tuple[int, str]]:
    for axis, symbol in spec.symbols:
        size = shape[axis]
        seen = bound.setdefault(symbol, (size, spec.name))
        if seen[0] != size:
            raise InputSchemaError(
                f"input {spec.name!r} has {symbol!r} = {size} (dimension {axis}) but input "
                f"{seen[1]!r} has {symbol!r} = {seen[0]}; they must agree"
            )
    return bound


def _refuse_non_finite(spec: _Input, value: np.ndarray) -> None:
    if value.dtype.kind != "f":
        return
    finite = np.isfinite(value)
    if finite.all():
        return
    nan = int(np.isnan(value).sum())
    infinite = int(value.size - finite.sum()) - nan
    parts = [f"{nan} NaN" if nan else "", f"{infinite} infinite" if infinite else ""]
    raise InputSchemaError(
        f"input {spec.name!r} has {' and '.join(p for p in parts if p)} value(s) of {value.size}; "
        "every value must be finite"
    )


def validate_inputs(schema: ModelSchema, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check `inputs` against `schema` once (a `Predictor` keeps an `InputValidator`).

    Raises:
        InputSchemaError: see the module docstring.
    """
    return InputValidator(schema).validate(inputs)
