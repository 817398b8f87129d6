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
