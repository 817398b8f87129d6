"""The choice and the candidate list are pure functions: tested on made-up measurements."""

from __future__ import annotations

from edgefleet.converter.candidates import FLOAT, Candidate, structural_candidates
from edgefleet.converter.choose import Evaluation, choose
from edgefleet.profiles import load_profile

STATIC = Candidate("static", "QDQ", "S8S8", True, False, "MinMax")
OTHER = Candidate("static", "QOperator", "U8S8", False, False, "MinMax")


def evaluation(
    candidate: Candidate, latency: float, size: int = 100, accuracy: float = 98.0, **kw: object
) -> Evaluation:
    return Evaluation(
        candidate=candidate,
        latency_ms=latency,
        size_bytes=size,
        metrics={"accuracy": accuracy},
        **kw,  # type: ignore[arg-type]
    )


def test_fastest_within_budget_is_chosen() -> None:
    base = evaluation(FLOAT, 1.0, 400)
    fast = evaluation(STATIC, 0.3)
    slower = evaluation(OTHER, 0.6)
    assert choose([base, fast, slower], "latency") is fast
    assert base.verdict == "kept as the on-device fallback"
    assert slower.verdict.startswith("rejected")


def test_quantized_model_slower_than_float_is_never_shipped() -> None:
    base = evaluation(FLOAT, 1.0, 400)
    slower = evaluation(STATIC, 1.2, 100)
    barely = evaluation(OTHER, 0.98, 100)  # within timing noise: not faster
    chosen = choose([base, slower, barely], "latency")
    assert chosen is base
    assert "beats the float model's latency" in base.verdict
    assert "1.20x float latency" in slower.verdict


def test_candidate_over_budget_is_rejected_with_reason() -> None:
    base = evaluation(FLOAT, 1.0, 400)
    wrong = evaluation(STATIC, 0.2, failures=["accuracy drop 3.00 points > 1.0"])
    assert choose([base, wrong], "latency") is base
    assert wrong.verdict == "rejected: accuracy drop 3.00 points > 1.0"


def test_failed_candidate_is_rejected_with_reason() -> None:
    base = evaluation(FLOAT, 1.0, 400)
    broken = Evaluation(candidate=STATIC, error="quantization failed: boom")
    assert choose([base, broken], "latency") is base
    assert broken.verdict == "rejected: failed (quantization failed: boom)"


def test_equally_fast_candidates_go_to_the_more_accurate() -> None:
    base = evaluation(FLOAT, 1.0, 400)
    fast = evaluation(STATIC, 0.300, accuracy=97.5)
    as_fast = evaluation(OTHER, 0.305, accuracy=98.0)
    assert choose([base, fast, as_fast], "latency") is as_fast


def test_size_mode_picks_smallest_within_budget() -> None:
    base = evaluation(FLOAT, 1.0, 400)
    small = evaluation(STATIC, 0.9, 90)
    smaller_but_wrong = evaluation(OTHER, 0.5, 50, failures=["too wrong"])
    assert choose([base, small, smaller_but_wrong], "size") is small


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
