"""The drift benchmark's windows: samples of the population, and calm windows drawn from it."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from scipy.stats import binomtest

from edgefleet.drift import Histogram, count_into
from edgefleet.driftstats import Persistence, js_distance, judge_window

BENCH = Path(__file__).parents[2] / "bench"
PARTS = ("data", "scenarios", "tally", "runs", "cutoffs", "variants", "calm")


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """The drift benchmark's parts (bench/driftbench), as one namespace."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # as `python bench/drift.py` has it
    parts = [importlib.import_module(f"driftbench.{name}") for name in PARTS]
    return SimpleNamespace(
        **{name: value for part in parts for name, value in vars(part).items() if name[0] != "_"}
    )


def test_the_benchmark_script_finds_its_parts() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH / "drift.py"), "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "--window-sizes" in run.stdout


def group(bench: Any, rows: int) -> object:
    held_out = np.arange(rows, dtype=np.float64)[:, None]
    labels = np.arange(rows) % 10
    return bench.Group("counting", "tabular", held_out, labels, lambda batch: {}, held_out)


def test_a_window_takes_each_held_out_row_once_when_they_suffice(bench: Any) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = bench.window_rows(group(bench, 719), 500, rng)[:, 0]
        assert np.unique(rows).size == 500


def test_a_window_repeats_rows_only_when_the_held_out_rows_are_fewer(bench: Any) -> None:
    rows = bench.window_rows(group(bench, 60), 500, np.random.default_rng(0))[:, 0]
    assert rows.size == 500 and np.unique(rows).size <= 60


def test_reweighting_triples_class_0_and_repeats_only_what_it_must(bench: Any) -> None:
    rng = np.random.default_rng(0)
    held_out = group(bench, 2000)
    windows = [bench.reweighted(held_out, 500, rng)[:, 0] for _ in range(40)]
    class_0 = np.mean([np.mean(window % 10 == 0) for window in windows])
    assert class_0 == pytest.approx(3 / 12, abs=0.01)  # 3 x 10% against 90% of the others
    assert all(np.unique(window).size == 500 for window in windows)


def test_the_interval_is_clopper_pearsons(bench: Any) -> None:
    low, high = bench.clopper_pearson(30, 3000)
    exact = binomtest(30, 3000).proportion_ci(0.95)
    assert (low, high) == pytest.approx((exact.low, exact.high), rel=0.01)


def test_a_cut_detecting_as_many_is_the_largest_that_does(bench: Any) -> None:
    scores = [3.0, 2.0, 2.0, 1.0]
    assert bench.above(scores, bench.cut_detecting(scores, 2)) == 3  # the tie comes along
    assert bench.above(scores, bench.cut_detecting(scores, 1)) == 1
    assert bench.cut_detecting(scores, 1) > 2.0
    assert bench.above(scores, bench.cut_detecting(scores, 0)) == 0


def tally(bench: Any, ours: list[float], psi_flagging: list[int]) -> object:
    """Feature-windows with our scores; PSI (and JS alike) flags those at `psi_flagging`."""
    windows = len(ours)
    psi = [1.0 if index in psi_flagging else 0.0 for index in range(windows)]
    flagged = dict.fromkeys(bench.METHODS, 0) | {
        "PSI>0.2": len(psi_flagging),
        "JS>0.1": len(psi_flagging),
    }
    return bench.Tally(
        windows=windows, flagged=flagged, scores={"ours": ours, "PSI": psi, "JS": psi}
    )


def test_the_goal_is_judged_at_each_cut_offs_own_detection_and_rate(bench: Any) -> None:
    # 10% calm alarms: the cut-off flags the calm window ours scores lowest.
    calm = tally(bench, [float(score) for score in range(10)], psi_flagging=[0])
    shifted = [0, 1, 2, 3, 4]  # the cut-off flags these shifted windows
    # Detecting the cut-off's 5 of 10 takes one calm alarm: as few as the cut-off's.
    level = tally(bench, [8.5, 8.6, 8.7, 8.8, 9.5, 0, 0, 0, 0, 0], psi_flagging=shifted)
    # Detecting 5 takes a cut under 6.5: three calm alarms, the cut-off raises one.
    behind = tally(bench, [6.5, 7.5, 8.5, 9.5, 9.6, 0, 0, 0, 0, 0], psi_flagging=shifted)
    overlapping = tally(bench, [0.0] * 10, psi_flagging=[])  # the scenario runs' own: not judged
    scenarios = {"no shift": overlapping, "level": level, "behind": behind}
    table, comparisons = bench.matched(scenarios, calm)
    assert set(comparisons) == {"PSI>0.2", "JS>0.1"}
    for by_scenario in comparisons.values():
        assert list(by_scenario) == ["level", "behind"]
        # At the cut-off's calm rate ours' cut is 8: it detects the same 5 windows.
        # At its detection, ours flags calm window 9 and the cut-off window 0.
        assert by_scenario["level"] == bench.Comparison(0, 0, 1, 1)
        assert not by_scenario["level"].short()
        # Ours detects 3 of the cut-off's 5; at its detection it flags calm 7, 8, 9.
        assert by_scenario["behind"] == bench.Comparison(2, 0, 3, 1)
        assert by_scenario["behind"].short()
        assert not by_scenario["behind"].weaker()  # 2 against 0 is a draw's lead
    assert [line[0] for line in table[1:]] == ["no shift (population)", "level", "behind"]
    column = table[0].index("our calm rate at its detection %")
    assert [line[column] for line in table[1:]] == ["-", "10.00", "30.00"]


def test_ours_is_weaker_only_when_the_cut_offs_lead_is_more_than_the_draw(bench: Any) -> None:
    def one_sided(ahead: int, behind: int) -> float:
        """P(at least `ahead` of the discordant pairs fall to one side, each side 1/2)."""
        pairs = ahead + behind
        return float(sum(math.comb(pairs, k) for k in range(ahead, pairs + 1)) / 2**pairs)

    draw = bench.Comparison(detected_only_by_it=13, detected_only_by_ours=8)
    assert draw.short() and not draw.weaker()
    assert draw.its_lead_chance() == pytest.approx(one_sided(13, 8))
    detects_less = bench.Comparison(detected_only_by_it=20, detected_only_by_ours=5)
    assert detects_less.weaker()
    assert detects_less.its_lead_chance() == pytest.approx(one_sided(20, 5))  # 0.002
    # The other way: at the cut-off's detection, ours flags more calm windows.
    alarms_more = bench.Comparison(calm_only_by_ours=10, calm_only_by_it=0)
    assert alarms_more.weaker() and alarms_more.its_lead_chance() == pytest.approx(2**-10)
    # Ours ahead, or none flagged alone: no lead for the cut-off at all.
    ahead = bench.Comparison(3, 40, 0, 25)
    assert not ahead.short() and ahead.its_lead_chance() > 0.99
    assert bench.Comparison().its_lead_chance() == 1.0
    assert draw + detects_less == bench.Comparison(33, 13, 0, 0)


def feature_tally(bench: Any, by_feature: dict[str, tuple[list[float], list[float]]]) -> object:
    """Per feature, its windows' scores: ours and PSI (JS the same as PSI)."""
    features = [name for name, (ours, _) in by_feature.items() for _ in ours]
    ours = [score for scores, _ in by_feature.values() for score in scores]
    psi = [score for _, scores in by_feature.values() for score in scores]
    flagged = dict.fromkeys(bench.METHODS, 0) | {
        "ours": sum(score > 0 for score in ours),
        "PSI>0.2": sum(score > 0.2 for score in psi),
        "JS>0.1": sum(score > 0.1 for score in psi),
    }
    return bench.Tally(
        windows=len(ours),
        flagged=flagged,
        scores={"ours": ours, "PSI": psi, "JS": psi},
        features=features,
    )


def test_per_feature_the_cut_offs_calm_rate_counts_where_it_is_known(bench: Any) -> None:
    high, low = [1.0] * 20, [0.0] * 20
    # "busy": the cut-off flags half its calm windows, on which ours ranks the calm scores 0-19.
    # "quiet": the cut-off flags none of its calm windows; ours' highest there is 100.
    calm = feature_tally(
        bench,
        {
            "busy": ([float(score) for score in range(20)], high[:10] + low[:10]),
            "quiet": ([100.0] + [0.0] * 19, low),
        },
    )
    # Shifted: the cut-off flags all of "busy" and none of "quiet"; ours scores 15 on both.
    shifted = feature_tally(bench, {"busy": ([15.0] * 4, high[:4]), "quiet": ([15.0] * 4, low[:4])})
    table, comparisons = bench.per_feature({"no shift": calm, "shifted": shifted}, calm)
    header, line = table[0], table[1]
    assert line[0] == "shifted" and len(table) == 2  # the scenario runs' own no-shift is not
    # At the cut-off's rate on "busy" (10 of 20), ours' cut is 9: it flags all 4 there. On
    # "quiet", with the other features taken together (only "quiet" here), its cut is 100.
    assert line[header.index("ours at its calm rates %")] == "50.00"
    assert line[header.index("PSI>0.2 %")] == "50.00"
    # Detecting the 4 on "busy" takes a cut just under 15: calm scores 15 to 19 lie above it.
    assert line[header.index("our calm at its detections %")] == "12.50"  # 5 of 40
    assert line[header.index("PSI>0.2 calm %")] == "25.00"  # 10 of 40
    # The calm windows only ours flags at its detection: 15-19 on "busy"; only the cut-off: 0-9.
    assert comparisons["PSI>0.2"]["shifted"] == bench.Comparison(0, 0, 5, 10)
    assert comparisons["JS>0.1"]["shifted"] == bench.Comparison(0, 0, 5, 10)
    # Ours scoring 5 on the shifted "busy" windows stays under its cut there (9): behind, and
    # at its detection (a cut under 5) ours flags calm 10-19 alone, the cut-off 0-4.
    behind = feature_tally(bench, {"busy": ([5.0] * 4, high[:4]), "quiet": ([15.0] * 4, low[:4])})
    comparisons = bench.per_feature({"behind": behind}, calm)[1]
    assert comparisons["PSI>0.2"]["behind"] == bench.Comparison(4, 0, 10, 5)
    assert bench.short_in(comparisons["PSI>0.2"]) == ["behind"]
    assert bench.weaker_in(comparisons["PSI>0.2"]) == []  # 4 against 0, 10 against 5: the draw
    # A cut-off that flags fewer than RESOLVED calm windows on every feature: all taken together.
    sparse = feature_tally(bench, {"busy": ([float(score) for score in range(20)], low)})
    assert set(bench.known_rate_parts(sparse, "PSI", 0.2)) == {""}


def test_the_compared_js_distance_is_the_one_shown_beside_verdicts(bench: Any) -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    reference = Histogram(edges=edges, counts=[50, 30, 20], nan=0)
    live = Histogram(edges=edges, counts=[10, 30, 40], below=5, nan=15)
    rows = [np.array([bench.cells_apart(histogram)]) for histogram in (reference, live)]
    assert bench.js_distances(*rows)[0] == pytest.approx(js_distance(reference, live))


def test_the_spread_part_sees_a_wider_window_more_than_a_shifted_one(bench: Any) -> None:
    reference = np.array([[10, 20, 40, 20, 10, 0]])
    wider = np.array([[20, 20, 20, 20, 20, 0]])
    shifted = np.array([[0, 10, 20, 40, 30, 0]])
    assert bench.spread_part(reference, wider)[0] > 5 * bench.spread_part(reference, shifted)[0]


def test_an_alert_is_open_only_in_or_right_after_a_drifted_window(bench: Any) -> None:
    """What bounds the calm share of windows with an alert open by twice the share drifted."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        drifted = list(rng.random(30) < rng.uniform(0.1, 0.9))
        persistence = Persistence()
        for index, flagged in enumerate(drifted):
            if persistence.update(flagged) in ("open", "still-open"):
                assert flagged or (index > 0 and drifted[index - 1])


def test_the_calm_bound_is_twice_clopper_pearsons_upper_end(bench: Any) -> None:
    for drifted, windows in ((0, 300), (0, 800), (3, 2000)):
        upper = binomtest(drifted, windows).proportion_ci(0.95).high
        calm = bench.Calm(windows=windows, drifted=drifted)
        assert calm.open_bound() == pytest.approx(2 * upper, rel=1e-6)
    assert bench.Calm(windows=300).open_bound() > 0.01  # 300 calm windows cannot show 1%
    assert bench.Calm(windows=800).open_bound() < 0.01


def test_the_spaced_bound_is_clopper_pearsons_upper_end_of_the_states_counted_apart(
    bench: Any,
) -> None:
    for spaced_open, spaced in ((0, 600), (2, 1200), (3, 6000)):
        upper = binomtest(spaced_open, spaced).proportion_ci(0.95).high
        calm = bench.Calm(windows=5 * spaced, drifted=50, spaced=spaced, spaced_open=spaced_open)
        assert calm.spaced_open_bound() == pytest.approx(upper, rel=1e-6)
        assert calm.spaced_open_bound() < calm.open_bound()  # 50 drifted: twice theirs is more
    assert bench.Calm(windows=500).spaced_open_bound() == 1.0  # no state counted apart
    merged = bench.Calm(10, 1, 1, 2, 1).merged(bench.Calm(5, 0, 0, 1, 0))
    assert merged == bench.Calm(15, 1, 1, 3, 1)


def calm_group(bench: Any, extract: object) -> Any:
    """Rows 0 to 999: 0-199 fit a model, 200-499 the reference, 500-999 held out."""
    rows = (
        np.random.default_rng(1).normal(size=(1000, 1)) + 1000 * (np.arange(1000) >= 200)[:, None]
    )
    group = bench.Group("calm", "tabular", rows[500:], None, extract, rows[200:])
    return bench.with_references(group, rows[200:500], np.random.default_rng(2))


def test_calm_references_and_windows_come_from_the_population_with_replacement(
    bench: Any,
) -> None:
    batches: list[np.ndarray] = []

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        batches.append(batch[:, 0])
        return {"x": batch[:, 0]}

    group = calm_group(bench, extract)
    batches.clear()
    tally, scored = bench.calm_population(group, [100, 400], 2, 5, np.random.default_rng(0))
    # Per reference: its 300 rows, then 5 windows at each size.
    assert [batch.size for batch in batches] == [300, 500, 2000] * 2
    population = set(group.population[:, 0])
    for batch in batches:
        assert set(batch) <= population  # never a fit row
        assert np.unique(batch).size < batch.size  # rows repeat: drawn with replacement
    assert [[by_kind["tabular inputs"].windows for by_kind in tally[size]] for size in tally] == [
        [5, 5],
        [5, 5],
    ]
    assert [scored[size].windows for size in scored] == [10, 10]
    assert scored[100].where == ["calm: tabular inputs"] * 10


def test_the_calm_tally_keeps_each_references_windows_apart(bench: Any) -> None:
    """The windows judged against the second reference are shifted: they alone drift."""
    window_batches = 0

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal window_batches
        if batch.size == 6 * 100:  # the windows, one batch per reference (not the reference)
            window_batches += 1
            if window_batches == 2:
                return {"x": batch[:, 0] + 10}
        return {"x": batch[:, 0]}

    group = calm_group(bench, extract)
    tally, scored = bench.calm_population(group, [100], 3, 6, np.random.default_rng(0))
    drifted = [by_kind["tabular inputs"].drifted for by_kind in tally[100]]
    still_open = [by_kind["tabular inputs"].open for by_kind in tally[100]]
    assert drifted[1] == 6 and still_open[1] == 5  # open from the second drifted window on
    assert drifted[0] < 6 and drifted[2] < 6 and still_open[0] == still_open[2] == 0
    # Of 6 windows in a row, the 5th is counted apart (every 5th): open only where shifted.
    spaced = [(c.spaced, c.spaced_open) for by_kind in tally[100] for c in by_kind.values()]
    assert spaced == [(1, 0), (1, 1), (1, 0)]
    # The scores behind the goal against the cut-offs: the same windows, the same verdicts.
    assert scored[100].flagged["ours"] == sum(drifted)
    surprises = scored[100].scores["ours"]
    assert all(value > 0 for value in surprises[6:12])  # beyond the calibrated cut: drifted
    assert scored[100].flagged["PSI>0.2"] == sum(value > 0.2 for value in scored[100].scores["PSI"])
    assert scored[100].flagged["PSI>0.2"] >= 6  # shifted by 10 where the spread is 1


def test_a_whole_window_counts_once_when_any_of_its_features_is_flagged(bench: Any) -> None:
    """Two features; the windows judged against the second reference are shifted in both."""
    window_batches = 0

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal window_batches
        shift = 0.0
        if batch.size == 6 * 100:  # the windows, one batch per reference (not the reference)
            window_batches += 1
            shift = 10.0 if window_batches == 2 else 0.0
        return {"x": batch[:, 0] + shift, "y": np.exp(batch[:, 0] - 1000) + shift}

    group = calm_group(bench, extract)
    scored = bench.calm_population(group, [100], 3, 6, np.random.default_rng(0))[1][100]
    assert (scored.whole_windows, scored.windows) == (18, 36)
    verdicts = np.array(scored.scores["ours"]).reshape(18, 2) > 0
    for method, name, limit in (("PSI>0.2", "PSI", 0.2), ("JS>0.1", "JS", 0.1)):
        flagged = np.array(scored.scores[name]).reshape(18, 2) > limit
        assert scored.windows_flagged[method] == int(flagged.any(axis=1).sum())
        assert flagged[6:12].all()  # both features of each shifted window
    assert scored.windows_flagged["ours"] == int(verdicts.any(axis=1).sum())
    assert 6 <= scored.windows_flagged["ours"] < scored.flagged["ours"]


def test_the_calm_table_shows_the_most_drifted_reference(
    bench: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    group = bench.Group(
        "calm", "tabular", np.zeros((5, 1)), None, lambda batch: {}, np.zeros((5, 1))
    )
    kind = "tabular inputs"
    tally = {
        100: [{kind: bench.Calm(400, 0)}, {kind: bench.Calm(400, 8)}, {kind: bench.Calm(400, 2)}]
    }
    totals = bench.calm_table([group], {"calm": tally}, [100])
    assert totals[100] == bench.Calm(1200, 10)
    lines = capsys.readouterr().out.splitlines()
    all_row = next(line for line in lines if line.split()[:2] == ["100", "all"])
    assert all_row.split()[-1] == "2.00"  # 8 of the second reference's 400
    per_reference = next(line for line in lines if line.startswith("calm ("))
    assert per_reference.split()[-4:] == ["400", "0", "8", "2"]


def test_large_data_sets_keep_most_rows_held_out(bench: Any) -> None:
    fit, reference, held_out = bench.split(20190, np.random.default_rng(0))
    assert (len(fit), len(reference), len(held_out)) == (2000, 2000, 16190)
    fit, reference, held_out = bench.split(1797, np.random.default_rng(0))
    assert (len(fit), len(reference), len(held_out)) == (359, 719, 719)  # as 20/40/40%


def shared_group(bench: Any) -> Any:
    """Three independent inputs: rows 0-299 fit, 300-799 the reference, 800-1299 held out."""
    rows = np.random.default_rng(3).normal(size=(1300, 3))

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {f"shared[{column}]": batch[:, column] for column in range(3)}

    group = bench.Group("shared", "tabular", rows[800:], None, extract, rows[300:])
    return bench.with_references(group, rows[300:800], np.random.default_rng(4))


def test_our_score_above_zero_is_the_verdict_with_the_rate_shared_by_benjamini_hochberg(
    bench: Any,
) -> None:
    group = shared_group(bench)
    rng = np.random.default_rng(5)
    drifted = 0
    for shift in np.linspace(0.0, 0.4, 40):
        window = group.held_out[rng.choice(500, 200, replace=False)] + [shift, shift / 2, 0.0]
        values = group.extract(window)
        live = {name: count_into(values[name], group.references[name][0].edges) for name in values}
        verdict = judge_window(group.references, live)
        both = bench.window_scores(group.references, verdict)
        scores = {name: score.shared for name, score in both.items()}
        alone = {
            feature.feature: bench.surprise(group.references[feature.feature][1], feature)
            for feature in verdict.features
        }
        assert alone == {name: score.alone for name, score in both.items()}
        for feature in verdict.features:
            assert (scores[feature.feature] > 0) == (feature.status == "drift")
            drifted += feature.status == "drift"
        # Ranked by surprise, the k-th of 3 drifts at rate * k / 3 or when one after it does.
        ranked = sorted(alone, key=alone.__getitem__, reverse=True)
        cuts = [alone[name] - np.log(3 / rank) for rank, name in enumerate(ranked, 1)]
        for place, name in enumerate(ranked):
            assert scores[name] == pytest.approx(max(cuts[place:]))
        assert all(scores[name] <= alone[name] for name in alone)  # sharing never flags more
    assert 0 < drifted < 3 * 40


def test_a_one_input_run_shifts_one_input_and_judges_it_alone(bench: Any) -> None:
    group = shared_group(bench)
    (scenario,) = [s for s in bench.SCENARIOS if s.one_input is not None]
    judged = list(group.references)
    chosen = set()
    for seed in range(20):
        run = scenario.for_run(group, judged, np.random.default_rng(seed))
        (feature,) = run.judged
        column = judged.index(feature)
        rows = run.shift(group, 500, np.random.default_rng(seed))
        unshifted = bench.window_rows(group, 500, np.random.default_rng(seed))
        moved = (rows - unshifted).mean(axis=0)
        spread = group.held_out[:, column].std()
        assert moved[column] == pytest.approx(scenario.one_input * spread)
        assert np.all(np.delete(moved, column) == 0)
        chosen.add(feature)
    assert chosen == set(judged)  # each input is drawn in some run
