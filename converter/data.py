"""Calibration, validation and label data: read, checked against the model, fed sample by sample.

An `.npz` holds one array per model input, the first axis indexing samples.
An array of the input's rank is fed in batches of one along its first axis; an
array with one more axis holds one whole input per entry (for inputs without a
batch axis, such as a recurrent state or a scalar). An `.npy` stands for the
only input of a single-input model.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.converter.errors import (
    DataError,
    EmptyDataError,
    ExtraInputError,
    InputDtypeError,
    InputShapeError,
    MissingInputError,
    NonFiniteDataError,
)
from edgefleet.converter.modelinfo import TensorSpec

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Dataset:
    """Samples for every input of a model, each ready to feed one inference."""

    source: Path
    arrays: dict[str, np.ndarray]
    whole_entries: dict[str, bool]  # True: arr[i] is one input; False: arr[i:i+1] is
    size: int

    def sample(self, index: int) -> Feed:
        # `array[index, ...]` keeps a scalar entry an array of rank 0: onnxruntime takes
        # arrays, not the NumPy scalars that `array[index]` gives for a 1-D array.
        return {
            name: array[index, ...] if self.whole_entries[name] else array[index : index + 1]
            for name, array in self.arrays.items()
        }

    def samples(self, indices: Sequence[int] | None = None) -> Iterator[Feed]:
        for index in range(self.size) if indices is None else indices:
            yield self.sample(index)

    def as_whole_entries(self) -> Dataset:
        """The same samples with every input as one whole entry per sample.

        A batched array gains an axis of 1 after the sample axis, so entry i is
        exactly the feed of sample i.
        """
        return Dataset(
            self.source,
            {
                name: array if self.whole_entries[name] else array[:, np.newaxis]
                for name, array in self.arrays.items()
            },
            dict.fromkeys(self.arrays, True),
            self.size,
        )

    def subset(self, count: int) -> Dataset:
        """The first `count` samples."""
        count = min(count, self.size)
        return Dataset(
            self.source,
            {name: array[:count] for name, array in self.arrays.items()},
            self.whole_entries,
            count,
        )


def _read_arrays(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            if len(inputs) != 1:
                names = ", ".join(spec.name for spec in inputs)
                raise DataError(
                    f"{path} is a single array, but the model has {len(inputs)} inputs "
                    f"({names}): use an .npz with one array per input name"
                )
            return {inputs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path} as .npz/.npy data: {exc}") from exc


def _check_array(path: Path, spec: TensorSpec, array: np.ndarray) -> tuple[np.ndarray, bool]:
    expected = np.dtype(spec.dtype)
    if array.dtype != expected:
        if not np.can_cast(array.dtype, expected, casting="same_kind"):
            raise InputDtypeError(
                f"{path}: array {spec.name!r} is {array.dtype}, the model input is {expected}"
            )
        array = array.astype(expected)
    if array.ndim == spec.rank and array.ndim > 0 and spec.fits((1, *array.shape[1:])):
        whole = False
    elif array.ndim == spec.rank + 1 and spec.fits(tuple(array.shape[1:])):
        whole = True
    else:
        raise InputShapeError(
            f"{path}: array {spec.name!r} has shape {tuple(array.shape)}, which fits neither "
            f"batches of the input shape {list(spec.shape)} along its first axis nor one whole "
            "input per entry"
        )
    if array.dtype.kind in "fc":
        bad = ~np.isfinite(array)
        if bad.any():
            first = int(np.argwhere(bad)[0][0])
            raise NonFiniteDataError(
                f"{path}: array {spec.name!r} holds {int(bad.sum())} NaN or infinite "
                f"value(s), the first in sample {first}"
            )
    return array, whole


def load_dataset(path: Path, inputs: Sequence[TensorSpec]) -> Dataset:
    """Read `path` and check it against the model's `inputs`.

    Raises:
        DataError: unreadable; MissingInputError, ExtraInputError, InputShapeError,
        InputDtypeError, NonFiniteDataError, EmptyDataError as named.
    """
    path = Path(path)
    raw = _read_arrays(path, inputs)
    wanted = {spec.name for spec in inputs}
    missing = sorted(wanted - set(raw))
    if missing:
        raise MissingInputError(
            f"{path} lacks data for model input(s) {', '.join(missing)} "
            f"(it holds: {', '.join(sorted(raw)) or 'nothing'})"
        )
    extra = sorted(set(raw) - wanted)
    if extra:
        raise ExtraInputError(
            f"{path} holds array(s) {', '.join(extra)} that are not model inputs "
            f"(the inputs are: {', '.join(sorted(wanted))})"
        )
    arrays: dict[str, np.ndarray] = {}
    whole: dict[str, bool] = {}
    for spec in inputs:
        arrays[spec.name], whole[spec.name] = _check_array(path, spec, raw[spec.name])
    sizes = {name: len(array) for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise InputShapeError(f"{path}: inputs hold different numbers of samples: {sizes}")
    size = next(iter(sizes.values()))
    if size == 0:
        raise EmptyDataError(f"{path} holds no samples")
    return Dataset(path, arrays, whole, size)


def load_labels(path: Path, expected: int) -> np.ndarray:
    """Read labels for `expected` validation samples: integers classify, floats regress.

    Raises:
        DataError: unreadable, wrong length or shape, non-finite values.
    """
    try:
        labels: np.ndarray = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read labels {path} as .npy: {exc}") from exc
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputShapeError(f"{path}: labels must be one per sample, got shape {labels.shape}")
    if len(labels) != expected:
        raise InputShapeError(
            f"{path} holds {len(labels)} labels for {expected} validation samples"
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise NonFiniteDataError(f"{path}: labels hold NaN or infinite values")
    if labels.dtype.kind not in "iuf":
        raise InputDtypeError(f"{path}: labels must be integers or floats, not {labels.dtype}")
    return np.asarray(labels)
