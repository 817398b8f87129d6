"""Benchmark: how detection and calm windows depend on the size of the drift reference.

The data sets of bench/drift.py with at least 500 held-out rows (digits, the
picture patches, randhie, fair; nothing downloaded), split as there. For each
reference size (60, 100, 250, 500, 1,000, 2,000 rows, up to the data set's
reference), the reference is the first rows of the data set's own reference,
binned and calibrated as a converter does (`driftbench.data.with_references`).
So the references are nested: a smaller one is part of each larger one, and
the windows, scenarios and verdict code are those of bench/drift.py: windows
of --window samples drawn without replacement from the held-out rows, judged
with the 1% shared among the data set's features, persistence over 2 windows.

Shown per data set and reference size: for no shift, the share of
feature-windows that drifted and that had an alert open (the held-out rows'
windows overlap, so this says how the rate moves with the reference, not the
rate itself: bench/drift.py measures that on windows drawn from the
populations); for mean shifts of 0.2 and 0.3 sigma and a change of spread
(x1.25), the share of runs whose alert opened within 2 windows (`by 2`) and
of feature-windows that drifted, beside the share scipy's two-sample KS test
on the raw values flags at p < 0.05 (as Evidently does; bench/drift.py shows
its false alarms). A reference's own chance difference from the
population weighs on every window it judges: with few rows it is both a false
alarm waiting to happen and a shift it can hide.

    .venv-test/bin/python bench/drift_reference_size.py [--window 500] [--sequences 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
from driftbench.data import Group, patches, scikit_learn, survey, with_references
from driftbench.runs import run_group, run_options
from driftbench.scenarios import SCENARIOS
from driftbench.tally import Tally, percent

from edgefleet.tables import format_columns

REFERENCE_SIZES = (60, 100, 250, 500, 1000, 2000)
SHIFTS = ("mean +0.2 sigma", "mean +0.3 sigma", "scale x1.25")


def with_reference_of(group: Group, rows: int, rng: np.random.Generator) -> Group:
    """`group` judged against a reference of its own reference's first `rows` rows."""
    # The population starts with the reference rows (driftbench.data.tabular, image_group).
    return with_references(copy.copy(group), group.population[:rows], rng)


def main() -> int:
    parser = run_options(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    scenarios = {scenario.name: scenario for scenario in SCENARIOS}
    groups = [
        scikit_learn("digits", rng),
        patches(rng),
        survey("randhie", rng),
        survey("fair", rng),
    ]
    table: list[list[object]] = [
        [
            "data set",
            "reference rows",
            "no shift: drifted %",
            "open %",
            "no shift: KS p<.05 %",
            *(f"{name}: by 2 %" for name in SHIFTS),
            *(f"{name}: drifted %" for name in SHIFTS),
            *(f"{name}: KS p<.05 %" for name in SHIFTS),
        ]
    ]
    for group in groups:
        sizes = [size for size in REFERENCE_SIZES if size < group.reference_rows]
        for size in [*sizes, group.reference_rows]:
            judged = with_reference_of(group, size, rng)
            calm = run_group(scenarios["no shift"], judged, args, rng)
            shifted: list[Tally] = [
                run_group(scenarios[name], judged, args, rng) for name in SHIFTS
            ]
            table.append(
                [
                    group.name,
                    size,
                    percent(calm.flagged["ours"], calm.windows),
                    percent(calm.open_windows, calm.windows),
                    percent(calm.flagged["KS p<.05"], calm.windows),
                    *(percent(tally.opened_by_two, tally.runs) for tally in shifted),
                    *(percent(tally.flagged["ours"], tally.windows) for tally in shifted),
                    *(percent(tally.flagged["KS p<.05"], tally.windows) for tally in shifted),
                ]
            )
            print(f"{group.name}, reference of {size} rows: done", file=sys.stderr, flush=True)
    print(
        f"Windows of {args.window} samples from the held-out rows, {args.sequences} runs of "
        f"{args.windows} windows per scenario and data set ({3 * args.sequences} without "
        f"shift), seed {args.seed}; each reference the first rows of the data set's own:"
    )
    print(format_columns(table, rule=True))
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
