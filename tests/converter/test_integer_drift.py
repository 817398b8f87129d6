"""A one-grey-level shift of digits' pixel columns (integers 0-16, mostly 0) is detected."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edgefleet.converter.driftcal import calibrate
from edgefleet.drift import count_into, reference_edges
from edgefleet.driftstats import judge_feature

WINDOW = 500
WINDOWS = 40
FALSE_ALARM = 0.01


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Reference and held-out halves of the digits, and the columns that are mostly 0."""
    pixels = load_digits().data
    order = np.random.default_rng(0).permutation(len(pixels))
    reference, held_out = pixels[order[:900]], pixels[order[900:]]
    zero_share = (reference == 0).mean(axis=0)
    columns = [j for j in range(64) if 0.5 <= zero_share[j] <= 0.95]
    return reference, held_out, columns


def flagged(digits: tuple[np.ndarray, np.ndarray, list[int]], shift: float) -> tuple[int, int]:
    """Windows of held-out rows (drawn with replacement, shifted) judged drifting, and judged."""
    reference, held_out, columns = digits
    rng = np.random.default_rng(1)
    drifted = judged = 0
    for column in columns:
        values = reference[:, column]
        edges = reference_edges(values)
        thresholds = calibrate(list(values.reshape(-1, 1)), edges, [WINDOW], [FALSE_ALARM], rng)
        counts = count_into(values, edges)
        for _ in range(WINDOWS):
            window = held_out[rng.integers(0, len(held_out), WINDOW), column] + shift
            verdict = judge_feature("pixel", counts, thresholds, count_into(window, edges))
            drifted += verdict.status == "drift"
            judged += 1
    return drifted, judged


def test_one_grey_level_up_is_found_in_almost_every_window(
    digits: tuple[np.ndarray, np.ndarray, list[int]],
) -> None:
    assert len(digits[2]) >= 10
    drifted, judged = flagged(digits, 1.0)
    assert drifted >= 0.95 * judged


def test_without_a_shift_few_windows_are_flagged(
    digits: tuple[np.ndarray, np.ndarray, list[int]],
) -> None:
    drifted, judged = flagged(digits, 0.0)
    # The windows come from 897 held-out rows, whose own chance difference from the
    # reference every window shares: more than the calibrated 1%, but far from all.
    assert drifted <= 0.1 * judged
