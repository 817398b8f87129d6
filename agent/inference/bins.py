"""Counting values into a drift reference's bins, in bulk, for telemetry (agent/telemetry.py).

The bins are exactly the converter's (edgefleet.drift): a value v of a feature
with edges e0..ek falls in bin i when e_i <= v < e_(i+1), in the last bin when
v == ek, below when v < e0, above when v > ek, and NaN apart. `count_into`
gives the same counts one feature at a time; this module gets them cheaply.
Which values form a feature depends on the reference the bundle carries
(`edgefleet.driftfeatures.load_reference` prefers drift-features.json):

- drift-features.json (`SummaryBins`): per sample of each request, the
  feature's summary (`edgefleet.driftfeatures.sample_values`, the converter's
  own function: the value itself, a channel's mean and standard deviation, the
  top-1 class, the confidence); a tensor without a batch axis (a scalar, a
  state) is one sample. `take` keeps a copy of the samples as bytes
  (`tobytes`: numpy's cheapest copy, no array object built per request); the
  summaries are computed in bulk, a few vectorized numpy reductions per tensor,
  when the values are binned or once RAW_BYTES of samples wait (so a large
  image is summarized every request or two, and memory stays bounded);
  requests of one per-sample shape but different dtypes are stacked as numpy
  promotes them;
- drift-reference.json (`TensorBins`): pooled values along the reference's
  `feature_axes`, a rank-0 tensor (a scalar input) being one value.

Either way:

- per request, `take` keeps a copy of the values (for pooled values one numpy
  call in the usual cases: a copy, or a `take` of fixed indices), since the
  caller may reuse its buffers as soon as the call returns;
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

Input tensors of raw values (pooled, or `value` features) also count values
outside their reference range by more than the schema margin (schema.py
`allowed_range`): a warning counter, not an error.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from edgefleet.agent.inference.schema import allowed_range
from edgefleet.drift import DriftReference, FeatureReference
from edgefleet.driftfeatures import (
    AnyReference,
    DriftFeature,
    TensorLayout,
    as_samples,
    sample_values,
)
from edgefleet.mqtt.messages import BinCounts

MAX_ROWS_PER_SAMPLE = 32
RAW_BYTES = 1 << 20  # per tensor: samples kept for summarizing in bulk before it is done
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


class _Kept(NamedTuple):
    """Requests of one tensor shape and dtype, kept as bytes until they are summarized."""

    per_sample: tuple[int, ...]
    samples: int  # per request
    dtype: np.dtype[Any]
    parts: list[bytes]


class _Plan(NamedTuple):
    features: int
    stride: int
    move: bool  # the feature axis is not last: move it there
    picks: np.ndarray | None  # flat indices of the values to keep (one feature, subsampled)


class FeatureBins(ABC):
    """One tensor's features: values waiting to be binned, and the counts so far.

    `take` keeps a request's values as rows of one value per feature, in the
    order of `names`; `flush` bins them.
    """

    def __init__(self, tensor: str, ordered: Sequence[FeatureReference], check_range: bool) -> None:
        self.tensor = tensor
        self.names = [f.name for f in ordered]
        self.edges = [np.asarray(f.histogram.edges, dtype=np.float64) for f in ordered]
        # Per feature: one count per bin, then below, above, nan.
        self.counts = [np.zeros(len(e) + 2, dtype=np.int64) for e in self.edges]
        self.pending: list[np.ndarray] = []
        self.skipped = 0  # tensors whose shape does not fit the reference
        # Inputs: the tensor's reference range widened by the schema margin (schema.py).
        self.allowed = (
            allowed_range((min(e[0] for e in self.edges), max(e[-1] for e in self.edges)))
            if check_range
            else None
        )

    @abstractmethod
    def take(self, array: np.ndarray | None) -> None:
        """Keep this request's values for the next flush (None: the tensor was not there)."""

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


class TensorBins(FeatureBins):
    """Pooled values of drift-reference.json's features (subsampled: see the module docstring)."""

    def __init__(
        self,
        tensor: str,
        axis: int | None,
        features: Sequence[FeatureReference],
        check_range: bool,
    ) -> None:
        super().__init__(tensor, sorted(features, key=lambda f: f.index or 0), check_range)
        self.axis = axis
        # How to cut each shape seen into rows of features (None: not countable).
        self._plans: dict[tuple[int, ...], _Plan | None] = {}

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
        if array.ndim == 0:  # a scalar input: one value per request
            array = array.reshape(1)
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


class SummaryBins(FeatureBins):
    """drift-features.json's features of one tensor: per-sample summaries of each request."""

    def __init__(
        self, layout: TensorLayout, features: Sequence[DriftFeature], check_range: bool
    ) -> None:
        summaries = list(dict.fromkeys(f.summary for f in features))
        ordered = sorted(features, key=lambda f: (summaries.index(f.summary), f.index or 0))
        super().__init__(layout.tensor, ordered, check_range)
        self.layout = layout
        # Per summary, the columns of `sample_values` that are features, in `names` order.
        self.columns = [
            (summary, np.asarray([f.index or 0 for f in ordered if f.summary == summary]))
            for summary in summaries
        ]

        # The requests' values not yet summarized, as bytes, by tensor shape and dtype.
        self.raw: dict[tuple[tuple[int, ...], str], _Kept] = {}
        self.raw_bytes = 0
        # Tensor shapes and dtypes seen that do not fit the layout (checked once: cached).
        self._unfit: set[tuple[tuple[int, ...], str]] = set()

    def take(self, array: np.ndarray | None) -> None:
        """Keep a copy of this request's values; summarized in bulk (`flush`, or RAW_BYTES).

        The copy is `tobytes`, the cheapest copy numpy makes (no new array object);
        the first request of each shape and dtype since the last summary is checked
        against the layout, the others cost one dict lookup.
        """
        if array is None:
            self.skipped += 1
            return
        key = (array.shape, array.dtype.str)
        kept = self.raw.get(key)
        if kept is None:
            kept = self._start(key, array)
            if kept is None:
                self.skipped += 1
                return
        kept.parts.append(array.tobytes())
        self.raw_bytes += array.nbytes
        if self.raw_bytes >= RAW_BYTES:
            self._summarize()

    def _start(self, key: tuple[tuple[int, ...], str], array: np.ndarray) -> _Kept | None:
        if key in self._unfit:
            return None
        rows = as_samples(array, self.layout)
        if rows is None:
            if len(self._unfit) >= MAX_PLANS:  # batch sizes vary: keep the cache small
                self._unfit.clear()
            self._unfit.add(key)
            return None
        kept = self.raw[key] = _Kept(rows.shape[1:], len(rows), array.dtype, [])
        return kept

    def _summarize(self) -> None:
        """Turn the kept samples into rows of feature values, one vectorized pass per shape."""
        by_shape: dict[tuple[int, ...], list[_Kept]] = {}
        for kept in self.raw.values():
            by_shape.setdefault(kept.per_sample, []).append(kept)
        for per_sample, group in by_shape.items():
            rows = np.concatenate(  # dtypes as numpy promotes them
                [
                    np.frombuffer(b"".join(k.parts), k.dtype).reshape(
                        (k.samples * len(k.parts), *per_sample)
                    )
                    for k in group
                ]
            )
            blocks = []
            for summary, columns in self.columns:
                values = sample_values(rows, self.layout, summary)
                if values is None or values.shape[1] <= columns.max():
                    self.skipped += sum(len(k.parts) for k in group)
                    break
                blocks.append(values[:, columns])
            else:
                self.pending.append(blocks[0] if len(blocks) == 1 else np.hstack(blocks))
        self.raw = {}
        self.raw_bytes = 0

    def flush(self) -> int:
        self._summarize()
        return super().flush()


def tensor_bins(reference: AnyReference | None, outputs: bool) -> list[FeatureBins]:
    """The counters of a reference's input (or output) features, one per tensor."""
    if reference is None:
        return []
    by_tensor: dict[str, list[FeatureReference]] = {}
    for feature in reference.outputs if outputs else reference.inputs:
        by_tensor.setdefault(feature.tensor, []).append(feature)
    if isinstance(reference, DriftReference):
        return [
            TensorBins(tensor, reference.feature_axes.get(tensor), features, not outputs)
            for tensor, features in by_tensor.items()
        ]
    layouts = {layout.tensor: layout for layout in reference.tensors}
    result: list[FeatureBins] = []
    for tensor, features in by_tensor.items():
        if tensor in layouts:
            summaries = [f for f in features if isinstance(f, DriftFeature)]
            raw_values = all(f.summary == "value" for f in summaries)
            result.append(SummaryBins(layouts[tensor], summaries, not outputs and raw_values))
    return result
