"""The data sets: rows that packages ship, split into fit, reference and held-out rows, and each
feature's reference (bins and calibrated thresholds)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn import datasets
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgefleet.converter.driftcal import calibrate
from edgefleet.converter.reference import WINDOW_SIZES
from edgefleet.drift import Histogram, count_into, reference_edges
from edgefleet.driftstats import FeatureThresholds

FALSE_ALARM = 0.01


MOST_ROWS = 2000


# statsmodels' bundled data sets: the column the model predicts, and whether as classes.
STATSMODELS_SETS = {"randhie": ("mdvis", False), "fair": ("affairs", True)}


PATCH = 16


POOLED_VALUES = 32


IMAGES = [
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
    "astronaut",
    "coffee",
    "chelsea",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
]


Extract = Callable[[np.ndarray], dict[str, np.ndarray]]


# Per feature, its reference: the bins' counts and the calibrated thresholds.
References = dict[str, tuple[Histogram, FeatureThresholds | None]]


@dataclass
class Group:
    """One data set: its rows, how rows become feature values, and each feature's reference."""

    name: str
    kind: str  # "tabular" or "image"
    held_out: np.ndarray
    labels: np.ndarray | None
    extract: Extract
    population: np.ndarray  # the rows that trained no model: reference and held-out rows
    reference_rows: int = 0
    reference_values: dict[str, np.ndarray] = field(default_factory=dict)
    references: References = field(default_factory=dict)


def split(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit 20%, reference 40%, held-out the rest of the rows, shuffled.

    Fit and reference take at most MOST_ROWS rows each (a converter's
    calibration and validation data), so that large data sets hold out more.
    """
    order = rng.permutation(rows)
    fit = min(int(rows * 0.2), MOST_ROWS)
    reference = fit + min(int(rows * 0.6) - int(rows * 0.2), MOST_ROWS)
    return order[:fit], order[fit:reference], order[reference:]


def scikit_learn(name: str, rng: np.random.Generator) -> Group:
    """One of scikit-learn's bundled data sets (diabetes a regression, the others classes)."""
    loaded = getattr(datasets, f"load_{name}")()
    rows, targets = np.asarray(loaded.data, dtype=np.float64), np.asarray(loaded.target)
    return tabular(name, rows, targets, name != "diabetes", rng)


def survey(name: str, rng: np.random.Generator) -> Group:
    """One of statsmodels' bundled survey data sets (STATSMODELS_SETS), offline.

    randhie: 20,190 person-years of the RAND Health Insurance Experiment, the
    number of doctor visits predicted (a regression); people were followed for
    up to five years, so one person's rows can fall in both the reference and
    the held-out rows. fair: 6,366 answers to a 1974 magazine survey, whether
    the woman had an affair (classes); its own count of affairs is left out of
    the inputs, as it gives the answer away.
    """
    target, classes = STATSMODELS_SETS[name]
    frame = importlib.import_module(f"statsmodels.datasets.{name}").load_pandas().data
    targets = np.asarray(frame[target], dtype=np.float64)
    rows = np.asarray(frame.drop(columns=[target]), dtype=np.float64)
    return tabular(name, rows, (targets > 0).astype(int) if classes else targets, classes, rng)


def tabular(
    name: str, rows: np.ndarray, targets: np.ndarray, classes: bool, rng: np.random.Generator
) -> Group:
    fit, reference, held_out = split(len(rows), rng)
    columns = [j for j in range(rows.shape[1]) if np.unique(rows[reference, j]).size >= 5]
    model = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000) if classes else Ridge()
    )
    model.fit(rows[fit], targets[fit])
    fill = rows[fit].mean(axis=0)

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        values = {f"{name}[{j}]": batch[:, j] for j in columns}
        complete = np.where(np.isnan(batch), fill, batch)  # the model sees imputed values
        if classes:
            scores = model.predict_proba(complete)
            values[f"{name}:top1"] = scores.argmax(axis=1).astype(np.float64)
            values[f"{name}:confidence"] = scores.max(axis=1)
        else:
            values[f"{name}:prediction"] = model.predict(complete)
        return values

    group = Group(
        name,
        "tabular",
        rows[held_out],
        targets[held_out] if classes else None,
        extract,
        rows[np.concatenate([reference, held_out])],
    )
    return with_references(group, rows[reference], rng)


def patches(rng: np.random.Generator) -> Group:
    """16x16 patches of scikit-image's bundled pictures, in grey from 0 to 1."""
    from skimage import data

    tiles = []
    for name in IMAGES:
        image = np.asarray(getattr(data, name)(), dtype=np.float64)
        image = image.mean(axis=2) if image.ndim == 3 else image
        image = image / 255.0
        for top in range(0, image.shape[0] - PATCH + 1, PATCH):
            for left in range(0, image.shape[1] - PATCH + 1, PATCH):
                tiles.append(image[top : top + PATCH, left : left + PATCH])
    return image_group("images", np.stack(tiles), None, rng)


def digit_images(rng: np.random.Generator) -> Group:
    """scikit-learn's 8x8 digits as images (grey from 0 to 1)."""
    loaded = datasets.load_digits()
    return image_group("digit images", loaded.images / 16.0, np.asarray(loaded.target), rng)


def image_group(
    name: str, rows: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator
) -> Group:
    """Pooled pixels (POOLED_VALUES per image, as a device subsamples) and per-image summaries."""
    _, reference, held_out = split(len(rows), rng)
    pixels = rows.shape[1] * rows.shape[2]
    positions = rng.choice(pixels, size=min(POOLED_VALUES, pixels), replace=False)

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        flat = batch.reshape(len(batch), -1)
        return {
            f"{name}[c0]": flat[:, positions],
            f"{name}:mean": flat.mean(axis=1),
            f"{name}:std": flat.std(axis=1),
        }

    held_out_labels = None if labels is None else labels[held_out]
    population = rows[np.concatenate([reference, held_out])]
    group = Group(name, "image", rows[held_out], held_out_labels, extract, population)
    return with_references(group, rows[reference], rng)


def calibrated(
    extract: Extract, reference_rows: np.ndarray, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], References]:
    """Each feature's values on the reference rows, and its reference: bins' counts, thresholds.

    As a converter does: bins from the reference's values, thresholds
    calibrated at its window sizes.
    """
    values = extract(reference_rows)
    references: References = {}
    for feature, feature_values in values.items():
        edges = reference_edges(feature_values)
        per_sample = [np.atleast_1d(row) for row in feature_values]
        thresholds = calibrate(per_sample, edges, WINDOW_SIZES, [FALSE_ALARM], rng)
        references[feature] = (count_into(feature_values, edges), thresholds)
    return values, references


def with_references(group: Group, reference_rows: np.ndarray, rng: np.random.Generator) -> Group:
    group.reference_rows = len(reference_rows)
    group.reference_values, group.references = calibrated(group.extract, reference_rows, rng)
    return group


def feature_kind(group: Group, feature: str) -> str:
    if feature.endswith((":top1", ":confidence", ":prediction")):
        return "model outputs"
    if group.kind == "image":
        return "image summaries (mean, std)" if ":" in feature else "pooled pixels"
    return "tabular inputs"


def population_rows(group: Group, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows drawn with replacement from the data set's population."""
    return np.asarray(group.population[rng.integers(len(group.population), size=count)])
