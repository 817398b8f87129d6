"""The shift scenarios: how a window's rows are drawn from the held-out rows and shifted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from driftbench.data import Group

# A shift: (rows, labels, rng) -> rows drawn for one window, already shifted.
Shift = Callable[[Group, int, np.random.Generator], np.ndarray]


def window_rows(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """A window's rows: without replacement when the held-out rows suffice, else with.

    Rows drawn without replacement from i.i.d. held-out rows are themselves an
    i.i.d. sample of the population, as a device's window is. Drawn with
    replacement, a window differs from the population by the held-out rows'
    own chance difference on top of its own: noisier than a real window.
    """
    held_out = len(group.held_out)
    return np.asarray(group.held_out[rng.choice(held_out, size, replace=size > held_out)])


def mean_shift(sigmas: float) -> Shift:
    def draw(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
        rows = window_rows(group, size, rng)
        return np.asarray(rows + sigmas * group.held_out.std(axis=0))

    return draw


def scale(factor: float) -> Shift:
    def draw(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
        rows = window_rows(group, size, rng)
        middle = group.held_out.mean(axis=0)
        return np.asarray(middle + factor * (rows - middle))

    return draw


def one_column_shift(column: int, sigmas: float) -> Shift:
    """A mean shift of `sigmas` of one input column (its held-out spread); the rest unchanged."""

    def draw(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
        rows = np.array(window_rows(group, size, rng), dtype=np.float64)
        rows[:, column] += sigmas * group.held_out[:, column].std()
        return rows

    return draw


def reweighted(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0 three times as frequent as in the held-out rows.

    The window's class 0 rows and other rows are each drawn as `window_rows`
    draws: class 0's rows repeat where the held-out rows hold fewer than the
    window needs.
    """
    assert group.labels is not None
    class_0 = np.flatnonzero(group.labels == 0)
    rest = np.flatnonzero(group.labels != 0)
    share = 3 * len(class_0) / (3 * len(class_0) + len(rest))
    count = int(rng.binomial(size, share))
    chosen = [
        indices[rng.choice(len(indices), wanted, replace=wanted > len(indices))]
        for indices, wanted in ((class_0, count), (rest, size - count))
    ]
    return np.asarray(group.held_out[rng.permutation(np.concatenate(chosen))])


def stuck(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    """Every input stuck at its held-out median (counted per input that this changes)."""
    return np.tile(np.median(group.held_out, axis=0), (size, 1))


def missing(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = window_rows(group, size, rng)
    return np.where(rng.random(rows.shape) < 0.05, np.nan, rows)


def brightness(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(window_rows(group, size, rng) + 0.05, 0.0, 1.0)


def noise(group: Group, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = window_rows(group, size, rng)
    return np.clip(rows + rng.normal(0.0, 0.05, rows.shape), 0.0, 1.0)


@dataclass(frozen=True)
class Scenario:
    """A shift of every window of a run, or (`one_input`, in sigmas) a mean shift of one input
    drawn at random for each run (`for_run`), where `shift` is unused."""

    name: str
    shift: Shift
    applies: Callable[[Group], bool]
    one_input: float | None = None

    def for_run(self, group: Group, judged: list[str], rng: np.random.Generator) -> Run:
        """The shift of one run's windows and the features it judges (of `judged`).

        A one-input scenario shifts one of the judged tabular inputs, drawn at
        random, and judges it alone: the other features are judged in the
        window as always, and count in the rate the verdict shares among them.
        """
        if self.one_input is None:
            return Run(self.shift, judged)
        inputs = [feature for feature in judged if feature.startswith(f"{group.name}[")]
        feature = inputs[int(rng.integers(len(inputs)))]
        column = int(feature[len(group.name) + 1 : -1])
        return Run(one_column_shift(column, self.one_input), [feature])


@dataclass(frozen=True)
class Run:
    shift: Shift
    judged: list[str]


def everywhere(group: Group) -> bool:
    return True


def tabular_only(group: Group) -> bool:
    return group.kind == "tabular"


SCENARIOS = [
    Scenario("no shift", window_rows, everywhere),
    *[Scenario(f"mean +{s} sigma", mean_shift(s), everywhere) for s in (0.1, 0.2, 0.3, 0.5)],
    *[Scenario(f"scale x{f}", scale(f), everywhere) for f in (1.1, 1.25, 1.5)],
    Scenario("class 0 x3", reweighted, lambda group: group.labels is not None),
    Scenario("one input +0.3 sigma", window_rows, tabular_only, one_input=0.3),
    Scenario("stuck sensor", stuck, tabular_only),
    Scenario("5% missing", missing, tabular_only),
    Scenario("brightness +0.05", brightness, lambda group: group.kind == "image"),
    Scenario("pixel noise 0.05", noise, lambda group: group.kind == "image"),
]


def changed(scenario: str, feature: str, unshifted: np.ndarray) -> bool:
    """Whether the scenario changes the feature at all (`unshifted`: its held-out values).

    Not: a mean shift of an image's spread; an output or a mostly constant
    input when the inputs are stuck at their median.
    """
    if scenario.startswith("mean") and feature.endswith(":std"):
        return False
    if scenario == "stuck sensor":
        at_median = np.mean(unshifted == np.median(unshifted))
        return ":" not in feature and at_median < 0.5
    return True
