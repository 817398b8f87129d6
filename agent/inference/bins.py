"""Counting values into a drift reference's bins, in bulk, for telemetry (agent/telemetry.py).

The bins are exactly the converter's (edgefleet.drift): a value v of a feature
with edges e0..ek falls in bin i when e_i <= v < e_(i+1), in the last bin when
v == ek, below when v < e0, above when v > ek, and NaN apart; which values form
a feature follows the reference's `feature_axes`. `count_into` gives the same
counts one feature at a time; this module gets them cheaply:

- per request, `TensorBins.take` keeps one copy of the tensor's values (one
  numpy call in the usual cases: a copy, or a `take` of fixed indices), since
  the caller may reuse its buffers as soon as the call returns;
- `flush` bins everything pending in one vectorized pass per feature
  (searchsorted, then bincount), so the fixed cost of numpy calls is shared
  by up to FLUSH_REQUESTS requests (agent/telemetry.py).

Large tensors are subsampled: of each sample, at most MAX_ROWS_PER_SAMPLE
positions per feature are counted, taken with a fixed stride that is coprime
with the innermost dimension (so the picks walk across the columns of an
image instead of staying in a few). For the 32x32 digit images that is 32 of
1024 pixels (stride 33). The counts then estimate the distribution of the
pooled values rather than enumerate it; `sum(counts) + nan + below + above`
equals the number of values counted, exactly.

Input tensors also count values outside their reference range by more than the
schema margin (schema.py `allowed_range`): a warning counter, not an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from edgefleet.agent.inference.schema import allowed_range
from edgefleet.drift import DriftReference, FeatureReference
from edgefleet.mqtt.messages import BinCounts

MAX_ROWS_PER_SAMPLE = 32
MAX_PLANS = 16
_UNKNOWN: Any = object()


def stride_for(per_sample: tuple[int, ...], axis: int | None, rows: int) -> int:
    if rows <= MAX_ROWS_PER_SAMPLE:
        return 1
    inner = [size for index, size in enumerate(per_sample) if index != axis]
    width = inner[-1] if inner else 1
    stride = -(-rows // MAX_ROWS_PER_SAMPLE)
    while math.gcd(stride, width) != 1:
        stride += 1
    return stride


class _Plan(NamedTuple):
    features: int
    stride: int
    move: bool  # the feature axis is not last: move it there
    picks: np.ndarray | None  # flat indices of the values to keep (one feature, subsampled)


class TensorBins:
    """One tensor's features: values waiting to be binned, and the counts so far."""

    def __init__(
        self,
        tensor: str,
        axis: int | None,
        features: Sequence[FeatureReference],
        check_range: bool,
    ) -> None:
        self.tensor = tensor
        self.axis = axis
        ordered = sorted(features, key=lambda f: f.index or 0)
        self.names = [f.name for f in ordered]
        self.edges = [np.asarray(f.histogram.edges, dtype=np.float64) for f in ordered]
        # Per feature: one count per bin, then below, above, nan.
        self.counts = [np.zeros(len(e) + 2, dtype=np.int64) for e in self.edges]
        self.pending: list[np.ndarray] = []
        # How to cut each shape seen into rows of features (None: not countable).
        self._plans: dict[tuple[int, ...], _Plan | None] = {}
        self.skipped = 0  # tensors whose shape does not fit the reference
        # Inputs: the tensor's reference range widened by the schema margin (schema.py).
        self.allowed = (
            allowed_range((min(e[0] for e in self.edges), max(e[-1] for e in self.edges)))
            if check_range
            else None
        )

    def _plan(self, array: np.ndarray) -> _Plan | None:
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            return None
        per_sample = array.shape[1:]
        features = len(self.names)
        if self.axis is not None and (
            self.axis >= len(per_sample) or per_sample[self.axis] != features
        ):
            return None
        move = features > 1 and self.axis is not None and self.axis != len(per_sample) - 1
        stride = stride_for(per_sample, self.axis, math.prod(per_sample) // features)
        picks = np.arange(0, array.size, stride) if features == 1 and stride > 1 else None
        return _Plan(features, stride, move, picks)

    def take(self, array: np.ndarray | None) -> None:
        """Keep a copy of (a strided subsample of) this request's values, for the next flush."""
        if array is None:
            self.skipped += 1
            return
        plan = self._plans.get(array.shape, _UNKNOWN)
        if plan is _UNKNOWN:
            if len(self._plans) >= MAX_PLANS:  # batch sizes vary: keep the cache small
                self._plans.clear()
            plan = self._plans[array.shape] = self._plan(array)
        if plan is None:
            self.skipped += 1
            return
        # One numpy call (a copy) for the usual cases; rows are cut at flush time.
        if plan.picks is not None:
            self.pending.append(array.take(plan.picks))
        elif not plan.move and plan.stride == 1:
            self.pending.append(array.copy())
        else:
            if plan.move:
                assert self.axis is not None
                array = np.moveaxis(array, self.axis + 1, -1)
            self.pending.append(array.reshape(-1, plan.features)[:: plan.stride].copy())

    def flush(self) -> int:
        """Bin the pending values; returns how many inputs were outside the allowed range."""
        if not self.pending:
            return 0
        features = len(self.names)
        values = np.concatenate([p.reshape(-1, features) for p in self.pending], dtype=np.float64)
        self.pending = []
        outside = 0
        for index, edges in enumerate(self.edges):
            column = values[:, index]
            bins = len(edges) - 1
            positions = np.searchsorted(edges, column, side="right")  # NaN sorts last
            found = np.bincount(positions, minlength=bins + 2)
            counts = self.counts[index]
            counts[:bins] += found[1 : bins + 1]
            counts[bins] += found[0]  # below the first edge
            outside += int(found[0])
            at_end = int(found[bins + 1])  # at or above the last edge, or NaN
            if at_end:
                tail = column[positions == bins + 1]
                nan = int(np.isnan(tail).sum())
                on_last = int((tail == edges[-1]).sum())  # the last bin is closed
                counts[bins - 1] += on_last
                counts[bins + 1] += at_end - nan - on_last
                counts[bins + 2] += nan
                outside += at_end - nan - on_last
        if not outside or self.allowed is None:
            return 0
        low, high = self.allowed
        return int(np.count_nonzero(values < low) + np.count_nonzero(values > high))

    def bin_counts(self) -> dict[str, BinCounts]:
        """The counts so far (flush first)."""
        result = {}
        for name, counts in zip(self.names, self.counts, strict=True):
            bins = len(counts) - 3
            result[name] = BinCounts(
                counts=[int(c) for c in counts[:bins]],
                below=int(counts[bins]),
                above=int(counts[bins + 1]),
                nan=int(counts[bins + 2]),
            )
        return result


def tensor_bins(reference: DriftReference | None, outputs: bool) -> list[TensorBins]:
    if reference is None:
        return []
    by_tensor: dict[str, list[FeatureReference]] = {}
    for feature in reference.outputs if outputs else reference.inputs:
        by_tensor.setdefault(feature.tensor, []).append(feature)
    return [
        TensorBins(tensor, reference.feature_axes.get(tensor), features, not outputs)
        for tensor, features in by_tensor.items()
    ]
