"""The choice and the candidate list are pure functions: tested on made-up measurements.

Timings are given as per-round samples, as the converter measures them: each
round times a candidate and the float model back to back.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from edgefleet.converter.candidates import FLOAT, Candidate, structural_candidates
from edgefleet.converter.choose import Evaluation, PairedTiming, choose
from edgefleet.converter.errors import ConversionFailedError
from edgefleet.profiles import load_profile

STATIC = Candidate("static", "QDQ", "S8S8", True, False, "MinMax")
OTHER = Candidate("static", "QOperator", "U8S8", False, False, "MinMax")
ROUNDS = 15


def rounds(
    ratio: float, float_ms: float = 1.0, spikes: dict[int, float] | None = None
) -> PairedTiming:
    """ROUNDS paired rounds at `ratio`; `spikes` multiplies the candidate's time in some rounds."""
    spikes = spikes or {}
    floats = tuple(float_ms * (1 + 0.01 * (i % 3)) for i in range(ROUNDS))
    return PairedTiming(tuple(f * ratio * spikes.get(i, 1.0) for i, f in enumerate(floats)), floats)


def evaluation(
    candidate: Candidate,
    timing: PairedTiming | None,
    size: int = 100,
    accuracy: float = 98.0,
    **kw: object,
) -> Evaluation:
    return Evaluation(
        candidate=candidate,
        latency_ms=1.0 if timing is None else sorted(timing.candidate_ms)[ROUNDS // 2],
        timing=timing,
        size_bytes=size,
        metrics={"accuracy": accuracy},
        **kw,  # type: ignore[arg-type]
    )


def baseline(size: int = 400) -> Evaluation:
    return evaluation(FLOAT, None, size)


def test_fastest_within_budget_is_chosen() -> None:
    base = baseline()
    fast = evaluation(STATIC, rounds(0.3))
    slower = evaluation(OTHER, rounds(0.6))
    assert choose([base, fast, slower], "latency") is fast
    assert base.verdict == "kept as the on-device fallback"
    assert slower.verdict.startswith("rejected: slower than")
    assert fast.verdict == (
        "chosen: 0.30x float latency (0.30-0.30), faster in 15/15 paired rounds"
    )


def test_clearly_faster_candidate_wins_despite_noisy_rounds() -> None:
    # Load hit the candidate's turn in three rounds out of fifteen (ratios 1.2 to 1.5 there).
    noisy = rounds(0.22, spikes={2: 6.0, 7: 5.5, 11: 6.8})
    fast = evaluation(STATIC, noisy)
    base = baseline()
    assert choose([base, fast], "latency") is fast
    assert "0.22x float latency" in fast.verdict
    assert "faster in 12/15 paired rounds" in fast.verdict


def test_candidate_faster_only_in_some_rounds_is_not_shipped() -> None:
    # A median below 0.95x, but half the rounds say otherwise: not clearly faster.
    mixed = rounds(0.9, spikes={i: 1.25 for i in range(0, ROUNDS, 2)})
    unsure = evaluation(STATIC, mixed)
    base = baseline()
    assert choose([base, unsure], "latency") is base
    assert "clearly faster" in base.verdict
    assert unsure.verdict.startswith("rejected: not clearly 0.95x float latency or faster")
    assert "faster in 15/15" not in unsure.verdict


def test_quantized_model_slower_than_float_is_never_shipped() -> None:
    base = baseline()
    slower = evaluation(STATIC, rounds(1.2))
    barely = evaluation(OTHER, rounds(0.98))  # within timing noise: not faster
    chosen = choose([base, slower, barely], "latency")
    assert chosen is base
    assert "1.20x float latency" in slower.verdict
    assert "faster in 0/15 paired rounds" in slower.verdict


def test_same_measurements_give_the_same_choice_in_any_order() -> None:
    def candidates() -> list[Evaluation]:
        return [
            baseline(),
            evaluation(STATIC, rounds(0.31, spikes={4: 3.0}), accuracy=97.9),
            evaluation(OTHER, rounds(0.30, spikes={9: 3.0}), accuracy=97.9, size=90),
            evaluation(replace(OTHER, quant_format="QDQ"), rounds(0.45), accuracy=98.5),
        ]

    chosen = set()
    shuffler = random.Random(0)
    for _ in range(10):
        evaluations = candidates()
        shuffler.shuffle(evaluations)
        chosen.add(choose(evaluations, "latency").candidate.name)
    assert chosen == {OTHER.name}


def test_equally_fast_candidates_go_to_the_more_accurate_whichever_measured_faster() -> None:
    for static_ratio, other_ratio in ((0.300, 0.310), (0.310, 0.300)):
        base = baseline()
        fast = evaluation(STATIC, rounds(static_ratio), accuracy=97.5)
        as_fast = evaluation(OTHER, rounds(other_ratio), accuracy=98.0)
        assert choose([base, fast, as_fast], "latency") is as_fast
        assert fast.verdict.startswith("rejected: as fast, less accurate or larger than")


def test_calibrations_of_one_structure_never_compete_on_speed() -> None:
    # Percentile and Entropy of one structure run the same operators: whichever measured
    # faster (here far beyond the tie margin), the more accurate ships.
    percentile = replace(STATIC, calibration="Percentile")
    entropy = replace(STATIC, calibration="Entropy")
    for percentile_ratio, entropy_ratio in ((0.30, 0.45), (0.45, 0.30)):
        base = baseline()
        more_accurate = evaluation(percentile, rounds(percentile_ratio), accuracy=98.3)
        less_accurate = evaluation(entropy, rounds(entropy_ratio), accuracy=98.1)
        assert choose([base, less_accurate, more_accurate], "latency") is more_accurate
        assert less_accurate.verdict.startswith(
            f"rejected: the same operators, less accurate or larger than {percentile.name}"
        )


def test_paired_timing_interval_and_counts() -> None:
    ratios = [0.1 * (i + 1) for i in range(ROUNDS)]  # 0.1 .. 1.5
    timing = PairedTiming(tuple(ratios), (1.0,) * ROUNDS)
    assert timing.ratio == pytest.approx(0.8)
    # 95% interval of the median of 15: the 4th and 12th smallest (coverage 96.5%).
    low, high = timing.interval
    assert (low, high) == pytest.approx((0.4, 1.2))
    assert timing.rounds_faster == 9
    assert not timing.clearly_faster


def test_candidate_over_budget_is_rejected_with_reason() -> None:
    base = baseline()
    wrong = evaluation(STATIC, rounds(0.2), failures=["accuracy drop 3.00 points > 1.0"])
    assert choose([base, wrong], "latency") is base
    assert wrong.verdict == "rejected: accuracy drop 3.00 points > 1.0"


def test_failed_candidate_is_rejected_with_reason() -> None:
    base = baseline()
    broken = Evaluation(candidate=STATIC, error="quantization failed: boom")
    assert choose([base, broken], "latency") is base
    assert broken.verdict == "rejected: failed (quantization failed: boom)"


def test_size_mode_picks_smallest_within_budget() -> None:
    base = baseline()
    small = evaluation(STATIC, rounds(0.9), 90)
    smaller_but_wrong = evaluation(OTHER, rounds(0.5), 50, failures=["too wrong"])
    assert choose([base, small, smaller_but_wrong], "size") is small


def test_pinned_candidate_ships_whatever_its_speed_and_says_so() -> None:
    base = baseline()
    slower = evaluation(STATIC, rounds(1.3))
    faster = evaluation(OTHER, rounds(0.3))
    assert choose([base, slower, faster], "latency", pinned=STATIC.name) is slower
    assert slower.verdict.startswith("chosen: pinned; 1.30x float latency")
    assert base.verdict == "kept as the on-device fallback"


def test_pinned_float_ships_float() -> None:
    base = baseline()
    assert choose([base], "latency", pinned="float") is base
    assert base.verdict == "chosen: pinned"


def test_pinned_candidate_outside_the_budget_is_an_error() -> None:
    base = baseline()
    wrong = evaluation(STATIC, rounds(0.2), failures=["accuracy drop 3.00 points > 1.0"])
    with pytest.raises(ConversionFailedError, match=r"pinned candidate .* accuracy drop 3\.00"):
        choose([base, wrong], "latency", pinned=STATIC.name)


def test_x86_profiles_never_offer_qoperator_s8s8() -> None:
    for name in ("x86_64-avx2", "x86_64-vnni"):
        found = structural_candidates(load_profile(name), "convolutional")
        assert found
        assert not [c for c in found if c.quant_format == "QOperator" and c.types == "S8S8"]


def test_avx2_profile_uses_reduce_range_and_arm_uses_qdq() -> None:
    avx2 = structural_candidates(load_profile("x86_64-avx2"), "convolutional")
    assert all(c.reduce_range for c in avx2)
    arm = structural_candidates(load_profile("aarch64"), "convolutional")
    assert {c.quant_format for c in arm} == {"QDQ"}
    assert any(c.types == "S8S8" for c in arm)


def test_candidates_follow_the_kind_of_model() -> None:
    profile = load_profile("x86_64-vnni")
    assert {c.method for c in structural_candidates(profile, "convolutional")} == {"static"}
    assert {c.method for c in structural_candidates(profile, "recurrent")} == {"dynamic"}
    assert {c.method for c in structural_candidates(profile, "attention")} == {"dynamic"}
    assert {c.method for c in structural_candidates(profile, "dense")} == {"static", "dynamic"}
    assert structural_candidates(profile, "other") == []
    assert structural_candidates(load_profile("armv7-tflite"), "convolutional") == []
