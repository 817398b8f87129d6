"""Calibration, validation and label data: read, checked against the model, fed sample by sample.

An `.npz` holds one array per model input, the first axis indexing samples.
An array of the input's rank is fed in batches of one along its first axis; an
array with one more axis holds one whole input per entry (for inputs without a
batch axis, such as a recurrent state or a scalar). An `.npy` stands for the
only input of a single-input model.

A conversion uses at most CALIBRATION_SAMPLES calibration and VALIDATION_SAMPLES
validation samples, drawn at random without replacement with a fixed seed
(`drawn`): the same samples on every run, never just the first ones of a file
that may be sorted by label. A draw is the first `count` of one fixed permutation,
so the calibration samples drawn from a file lie within the validation samples
drawn from the same file.
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
from edgefleet.errors import UsageError

Feed = dict[str, np.ndarray]

CALIBRATION_SAMPLES = 200
VALIDATION_SAMPLES = 500
SAMPLE_SEED = 0


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

    def take(self, indices: np.ndarray) -> Dataset:
        """The samples at `indices`, in that order."""
        return Dataset(
            self.source,
            {name: array[indices] for name, array in self.arrays.items()},
            self.whole_entries,
            len(indices),
        )

    def same_samples(self, other: Dataset) -> bool:
        """Whether `other` holds exactly these samples (the same file, or equal contents)."""
        return (
            self.size == other.size
            and self.arrays.keys() == other.arrays.keys()
            and self.whole_entries == other.whole_entries
            and all(np.array_equal(a, other.arrays[n]) for n, a in self.arrays.items())
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


def drawn(size: int, count: int) -> np.ndarray | None:
    """Sorted indices of `count` of `size` samples, drawn without replacement with a fixed
    seed (the first `count` of one fixed permutation); None when all `size` are used."""
    if size <= count:
        return None
    order = np.random.default_rng(SAMPLE_SEED).permutation(size)
    return np.sort(order[:count])


def samples_word(count: int) -> str:
    """ "1 sample", "2 samples"."""
    return f"{count} sample" if count == 1 else f"{count} samples"


@dataclass(frozen=True)
class ConversionData:
    """The samples a conversion uses, with the labels of its validation samples."""

    calibration: Dataset
    validation: Dataset
    labels: np.ndarray | None
    # Calibration and validation data are the same samples (one file, or equal contents):
    # the calibration samples drawn lie within the validation samples drawn.
    same_samples: bool
    notes: list[str]


def _draw(
    dataset: Dataset, count: int, what: str, notes: list[str]
) -> tuple[Dataset, np.ndarray | None]:
    indices = drawn(dataset.size, count)
    if indices is None:
        return dataset, None
    notes.append(
        f"{what}: {count} of {dataset.size} samples used, drawn at random with a fixed seed"
    )
    return dataset.take(indices), indices


def load_conversion_data(
    inputs: Sequence[TensorSpec],
    calibration_path: Path,
    validation_path: Path | None,
    labels_path: Path | None,
) -> ConversionData:
    """Read the calibration, validation and label files and draw the samples to use.

    Without validation data, the calibration samples are used for both.

    Raises:
        UsageError: labels without validation data.
        DataError (and subclasses): as `load_dataset` and `load_labels`.
    """
    notes: list[str] = []
    whole_calibration = load_dataset(calibration_path, inputs)
    calibration, _ = _draw(whole_calibration, CALIBRATION_SAMPLES, "calibration", notes)
    if validation_path is None:
        if labels_path is not None:
            raise UsageError("--labels needs --validation: labels belong to validation samples")
        notes.append("no validation data: fidelity measured on the calibration data")
        return ConversionData(calibration, calibration, None, True, notes)
    whole_validation = load_dataset(validation_path, inputs)
    labels = None
    if labels_path is not None:
        labels = load_labels(labels_path, whole_validation.size)
    validation, indices = _draw(whole_validation, VALIDATION_SAMPLES, "validation", notes)
    if labels is not None and indices is not None:
        labels = labels[indices]
    same = whole_calibration.same_samples(whole_validation)
    if same:
        notes.append(
            "calibration and validation data are the same samples: counted once in the "
            "drift reference and the schema"
        )
    return ConversionData(calibration, validation, labels, same, notes)


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
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read labels {path} as .npy: {exc}") from exc
    if not isinstance(loaded, np.ndarray):  # an .npz archive, whatever its name
        loaded.close()
        raise DataError(
            f"{path} is an .npz archive; labels are one array in an .npy file: save them "
            "with numpy.save"
        )
    labels: np.ndarray = loaded
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputShapeError(f"{path}: labels must be one per sample, got shape {labels.shape}")
    if len(labels) != expected:
        raise InputShapeError(
            f"{path} holds {len(labels)} label(s) for {expected} validation sample(s): "
            "give one label per validation sample, in the same order"
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise NonFiniteDataError(f"{path}: labels hold NaN or infinite values")
    if labels.dtype.kind not in "iuf":
        raise InputDtypeError(f"{path}: labels must be integers or floats, not {labels.dtype}")
    return np.asarray(labels)
