"""The drift benchmark's windows: samples of the population, and an interval that counts overlap."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy.stats import binomtest

from edgefleet.drift import Histogram
from edgefleet.driftstats import js_distance


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    path = Path(__file__).parents[2] / "bench" / "drift.py"
    spec = importlib.util.spec_from_file_location("drift_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def group(bench: ModuleType, rows: int) -> object:
    held_out = np.arange(rows, dtype=np.float64)[:, None]
    labels = np.arange(rows) % 10
    return bench.Group("counting", "tabular", held_out, labels, lambda batch: {})


def test_a_window_takes_each_held_out_row_once_when_they_suffice(bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = bench.window_rows(group(bench, 719), 500, rng)[:, 0]
        assert np.unique(rows).size == 500


def test_a_window_repeats_rows_only_when_the_held_out_rows_are_fewer(bench: ModuleType) -> None:
    rows = bench.window_rows(group(bench, 60), 500, np.random.default_rng(0))[:, 0]
    assert rows.size == 500 and np.unique(rows).size <= 60


def test_reweighting_triples_class_0_and_repeats_only_what_it_must(bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    held_out = group(bench, 2000)
    windows = [bench.reweighted(held_out, 500, rng)[:, 0] for _ in range(40)]
    class_0 = np.mean([np.mean(window % 10 == 0) for window in windows])
    assert class_0 == pytest.approx(3 / 12, abs=0.01)  # 3 x 10% against 90% of the others
    assert all(np.unique(window).size == 500 for window in windows)


def test_overlapping_windows_widen_the_calm_interval(bench: ModuleType) -> None:
    args = argparse.Namespace(window=500, sequences=10, windows=4)
    calm = bench.Tally(windows=61 * 120, open_windows=3)
    effective = bench.effective_windows(calm, 719, args)
    assert effective < calm.windows / 50
    _, high = bench.conservative_interval(calm.open_windows / calm.windows, effective)
    independent = binomtest(calm.open_windows, calm.windows).proportion_ci(0.95).high
    assert high > 5 * independent


def test_without_overlap_the_interval_is_clopper_pearsons(bench: ModuleType) -> None:
    args = argparse.Namespace(window=1, sequences=10, windows=1)
    calm = bench.Tally(windows=3000, open_windows=30)
    effective = bench.effective_windows(calm, 10**9, args)
    assert effective == pytest.approx(3000, rel=1e-3)
    low, high = bench.conservative_interval(0.01, effective)
    exact = binomtest(30, 3000).proportion_ci(0.95)
    assert (low, high) == pytest.approx((exact.low, exact.high), rel=0.01)


def test_a_cut_detecting_as_many_is_the_largest_that_does(bench: ModuleType) -> None:
    scores = [3.0, 2.0, 2.0, 1.0]
    assert bench.above(scores, bench.cut_detecting(scores, 2)) == 3  # the tie comes along
    assert bench.above(scores, bench.cut_detecting(scores, 1)) == 1
    assert bench.cut_detecting(scores, 1) > 2.0
    assert bench.above(scores, bench.cut_detecting(scores, 0)) == 0


def tally(bench: ModuleType, ours: list[float], psi_flagged: int) -> object:
    windows = len(ours)
    flagged = dict.fromkeys(bench.METHODS, 0) | {"PSI>0.2": psi_flagged, "JS>0.1": psi_flagged}
    scores = {"ours": ours, "PSI": [0.0] * windows, "JS": [0.0] * windows}
    return bench.Tally(windows=windows, flagged=flagged, scores=scores)


def test_the_goal_is_judged_at_each_cut_offs_own_detection_and_rate(bench: ModuleType) -> None:
    calm = tally(bench, [float(score) for score in range(10)], psi_flagged=1)  # 10% calm alarms
    # Detecting the cut-off's 5 of 10 takes one calm alarm: as few as the cut-off's.
    level = tally(bench, [8.5, 8.6, 8.7, 8.8, 9.5, 0, 0, 0, 0, 0], psi_flagged=5)
    # Detecting 5 takes a cut under 6.5: three calm alarms, the cut-off raises one.
    behind = tally(bench, [6.5, 7.5, 8.5, 9.5, 9.6, 0, 0, 0, 0, 0], psi_flagged=5)
    table, weaker = bench.matched({"no shift": calm, "level": level, "behind": behind})
    assert weaker == {"PSI>0.2": ["behind"], "JS>0.1": ["behind"]}
    column = table[0].index("our calm rate at its detection %")
    assert [line[column] for line in table[1:]] == ["-", "10.00", "30.00"]


def test_the_compared_js_distance_is_the_one_shown_beside_verdicts(bench: ModuleType) -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    reference = Histogram(edges=edges, counts=[50, 30, 20], nan=0)
    live = Histogram(edges=edges, counts=[10, 30, 40], below=5, nan=15)
    rows = [np.array([bench.cells(histogram)]) for histogram in (reference, live)]
    assert bench.js_distances(*rows)[0] == pytest.approx(js_distance(reference, live))


def test_the_spread_part_sees_a_wider_window_more_than_a_shifted_one(bench: ModuleType) -> None:
    reference = np.array([[10, 20, 40, 20, 10, 0]])
    wider = np.array([[20, 20, 20, 20, 20, 0]])
    shifted = np.array([[0, 10, 20, 40, 30, 0]])
    assert bench.spread_part(reference, wider)[0] > 5 * bench.spread_part(reference, shifted)[0]
