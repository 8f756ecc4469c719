"""Honest timing: a speedup is claimed only with confidence, over torch.compile at the same precision policy,
and hetforge's own compiler recipes are never flagged for being fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetforge.core.problem import Problem
from hetforge.kernels.registry import Registry
from hetforge.optimizer import stats
from hetforge.optimizer import verdict as V
from hetforge.optimizer.judge import VerifyOptions, verify
from hetforge.optimizer.recipes import matched_compile, recipes_for
from hetforge.optimizer.registration import register_winner
from hetforge.optimizer.report import CandidateRecord, CandidateStatus, OptimizeReport
from hetforge.optimizer.supervisor import choose_winner, review_against_recipes

PROBLEMS = Path(__file__).resolve().parent / "problems"
CANDIDATES = Path(__file__).resolve().parent / "candidates"


def rounds(rng, center: float, n_rounds: int = 4, calls: int = 10, noise: float = 0.03) -> list[list[float]]:
    return [list(center * (1 + rng.normal(0, noise, calls))) for _ in range(n_rounds)]


def test_interval_claims_faster_slower_or_nothing():
    rng = np.random.default_rng(7)
    ref = rounds(rng, 1.0)
    assert stats.speedup_interval(ref, rounds(rng, 1.0)).claim == stats.Claim.WITHIN_NOISE
    faster = stats.speedup_interval(ref, rounds(rng, 0.8))
    assert faster.claim == stats.Claim.FASTER and 1.15 < faster.low <= faster.high < 1.35
    assert stats.speedup_interval(ref, rounds(rng, 1.25)).claim == stats.Claim.SLOWER
    # the interval is a statistic of the samples: the same samples, the same interval
    same = rounds(rng, 0.9)
    assert stats.speedup_interval(ref, same) == stats.speedup_interval(ref, same)


def test_a_median_ratio_that_one_noisy_round_makes_is_no_claim():
    """Two rounds of the reference hit by load make the median ratio over 1.1x: not a claim."""
    rng = np.random.default_rng(3)
    cand = rounds(rng, 1.0, n_rounds=3, noise=0.01)
    ref = rounds(rng, 1.0, n_rounds=3, noise=0.01)
    ref[1] = [t * 1.6 for t in ref[1]]
    ref[2] = [t * 1.15 for t in ref[2]]
    interval = stats.speedup_interval(ref, cand)
    assert float(np.median(np.concatenate(ref)) / np.median(np.concatenate(cand))) > 1.1
    assert interval.claim == stats.Claim.WITHIN_NOISE, interval


def test_a_burst_of_load_in_one_round_does_not_hide_a_real_speedup():
    """Ranks, not means: a reference round slowed 100x leaves the bounds where the other rounds put them."""
    ref = [[2.0], [2.1], [200.0], [2.2]]
    cand = [[1.0], [1.05], [1.1], [1.02]]
    interval = stats.speedup_interval(ref, cand)
    assert interval.claim == stats.Claim.FASTER and 1.0 < interval.low < 2.0, interval


def test_three_clustered_ratios_are_no_claim_unless_the_rounds_separate():
    """Load in bursts: round ratios of 2-3.6x whose rounds overlap by rank claim nothing."""
    ref = [[3.0], [1.0], [9.0]]
    cand = [[1.5], [0.4], [2.5]]  # the candidate's slowest round beats two of the reference's rounds
    interval = stats.speedup_interval(ref, cand)
    assert interval.low < 1.0 and interval.p_faster > stats.RANK_P
    assert interval.claim == stats.Claim.WITHIN_NOISE
    separated = stats.speedup_interval([[2.0], [2.1], [2.2]], [[1.0], [1.1], [1.2]])
    # 3 rounds a side: the bound is the smallest ratio, and claiming means every candidate round beat every reference round
    assert separated.claim == stats.Claim.FASTER and separated.low == pytest.approx(2.0 / 1.2)
    assert stats.rank_test([2.0, 2.1, 2.2], [1.0, 1.1, 1.2]) == (0.05, 1.0)  # 1 in C(6, 3) = 20 orderings
    assert stats.rank_test([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) == (0.8, 0.35)


@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        ("cuda", "strict", "compile"),
        ("cuda", "tf32", "compile-tf32"),
        ("cuda", "bf16", "compile-bf16-autocast"),
        ("cpu", "strict", "compile"),
        ("cpu", "tf32", "compile"),  # no TF32 on a CPU: the tf32 policy runs IEEE fp32 there
        ("cpu", "bf16", "compile-bf16-autocast"),
    ],
)
def test_the_compile_baseline_is_compile_at_the_same_policy(device, precision, expected):
    assert matched_compile(device, precision) == expected
    offered = [r.name for r in recipes_for(device, precision, has_conv=False)]
    assert expected in offered


def record(name: str, agent: str, speedup: float, claim: str = "faster", flags=()) -> CandidateRecord:
    low, high = (speedup * 0.95, speedup * 1.05) if claim == "faster" else (0.97, 1.04)
    verdict = V.Verdict(
        verdict=V.Status.ACCEPTED,
        speedup=speedup,
        flags=list(flags),
        needs_review=bool(flags),
        interval={"low": low, "high": high, "confidence": 0.95, "claim": claim},
    )
    status = CandidateStatus.NEEDS_REVIEW if flags else CandidateStatus.ACCEPTED
    return CandidateRecord(name, agent, 1, "class ModelNew: ...", verdict, status=status)


def test_speedup_over_compile_divides_by_compile_at_the_same_policy():
    """Under tf32 on a GPU, a TF32 winner over IEEE-fp32 torch.compile would report what TF32 alone gives."""
    report = OptimizeReport(task={})
    report.candidates = [
        record("recipe:eager", "recipes", 1.0, "within_noise"),
        record("recipe:compile", "recipes", 1.2),  # IEEE fp32
        record("recipe:compile-tf32", "recipes", 6.0),
        record("library:fused", "library", 6.6),
    ]
    choose_winner(report, "cuda", "tf32")
    assert report.winner.name == "library:fused" and report.compile_baseline == "recipe:compile-tf32"
    assert report.speedup_vs_compile == pytest.approx(1.1)
    strict = OptimizeReport(task={}, candidates=report.candidates[:2] + report.candidates[3:])
    choose_winner(strict, "cuda", "strict")
    assert strict.compile_baseline == "recipe:compile" and strict.speedup_vs_compile == pytest.approx(5.5)
    missing = OptimizeReport(task={}, candidates=[record("recipe:compile", "recipes", 1.2)])
    choose_winner(missing, "cuda", "bf16")
    assert missing.speedup_vs_compile is None
    assert any("recipe:compile-bf16-autocast" in n for n in missing.notices), missing.notices


def test_a_claim_within_noise_ranks_after_a_confident_one_and_is_not_registered(tmp_path):
    noisy = OptimizeReport(task={}, candidates=[record("rewrites:x", "rewrites", 1.3, "within_noise")])
    choose_winner(noisy, "cpu", "strict")
    assert noisy.winner.name == "rewrites:x" and noisy.claim == "within_noise"
    registry = Registry(str(tmp_path / "registry.sqlite"))
    done = register_winner(noisy, registry, fingerprint="f", device_class="cpu", precision="strict")
    assert done.variant is None and "within noise" in done.reason and "0.970-1.040x" in done.reason
    assert registry.list() == []
    both = OptimizeReport(
        task={},
        candidates=[record("rewrites:x", "rewrites", 1.3, "within_noise"), record("library:y", "library", 1.2)],
    )
    choose_winner(both, "cpu", "strict")
    assert both.winner.name == "library:y" and both.claim == "faster"
    done = register_winner(both, registry, fingerprint="f", device_class="cpu", precision="strict")
    assert done.variant is not None and done.variant.name == "library:y"


def test_the_speedup_review_bar_is_the_best_recipe_not_eager():
    flag = f"{V.Flag.SPEEDUP}: 24.0x exceeds 10x"
    near = record("llm:a", "llm", 24.0, flags=[flag])
    cheat = record("llm:b", "llm", 400.0, flags=[f"{V.Flag.SPEEDUP}: 400.0x exceeds 10x"])
    other = record("llm:c", "llm", 20.0, flags=[flag, "static:reads_environment"])
    report = OptimizeReport(task={}, candidates=[record("recipe:compile", "recipes", 25.0), near, cheat, other])
    review_against_recipes(report, review_speedup=10.0)
    assert near.status == CandidateStatus.ACCEPTED and near.usable and near.verdict.flags == []
    assert cheat.status == CandidateStatus.NEEDS_REVIEW and not cheat.usable  # 16x the best recipe
    assert other.status == CandidateStatus.NEEDS_REVIEW and other.verdict.flags == ["static:reads_environment"]
    no_recipes = record("llm:d", "llm", 24.0, flags=[flag])
    review_against_recipes(OptimizeReport(task={}, candidates=[no_recipes]), review_speedup=10.0)
    assert no_recipes.status == CandidateStatus.NEEDS_REVIEW  # against eager alone, 24x still needs a human


def test_the_judges_verdict_carries_its_interval_and_recipes_are_never_flagged_for_speed():
    fast = dict(trials=1, rounds=3, max_rounds=3, calls_per_round=3, warmup=1, review_speedup=0.0)
    problem = Problem(file=str(PROBLEMS / "wasteful.py"))
    candidate = CANDIDATES / "legit_drop_dead_code.py"
    flagged = verify(problem, candidate, VerifyOptions(**fast))
    assert flagged.accepted, flagged.reasons
    interval = flagged.interval
    assert interval["high"] is not None and interval["low"] <= interval["high"] and interval["confidence"] == 0.95
    kept = stats.Interval(
        interval["low"], interval["high"] or float("inf"), 0.95, interval["p_faster"], interval["p_slower"]
    )
    assert flagged.claim == kept.claim
    assert any(f.startswith(V.Flag.SPEEDUP) for f in flagged.flags)
    recipe = verify(problem, candidate, VerifyOptions(**fast, flag_speedup=False))
    assert recipe.accepted and not any(f.startswith(V.Flag.SPEEDUP) for f in recipe.flags)
    assert V.Verdict.from_dict(recipe.to_dict()).interval == recipe.interval
