"""Whether a measured speedup holds beyond the noise: a rank-based interval over interleaved timing rounds.

The judge times the reference and the candidate in alternating rounds (`timing.Timing`): round i
runs the reference's calls and then the candidate's (or the other way round), back to back. The
calls of one round share the state of the host (a load spike, a clock change), so the rounds, not
the calls, are the samples: each side's round medians. The interval is distribution-free (Moses'
interval for a ratio, the inverse of the Mann-Whitney test): of the m x n ratios
reference_round_i / candidate_round_j, `low` is the k-th smallest and `high` the k-th largest, with
k the largest count such that an exchangeable ordering (no difference) puts fewer than k pairs
below `low` with probability at most 5%. So `low` and `high` are one-sided 95% bounds, and
`low > 1` is exactly the one-sided exact Mann-Whitney test at p <= 0.05. At 3 rounds a side this
means every candidate round faster than every reference round; 2 rounds a side can never claim.

Ranks, not means: one round slowed 100x by a burst of load on a 2-core host leaves a rank interval
where it was, and inflates a t interval to nothing; clustered log ratios pass a t interval by
chance (an identical computation read 3.01x with a t interval of 1.20-6.24x at load average 39).
A speedup is claimed only when `low > 1` (`Claim.FASTER`). A median ratio alone is no claim: on a
loaded 2-core host an identical computation read 4.04x faster than its reference once and 0.95x
when rerun.

numpy and the standard library only: this runs in the judge on the GPU host.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95  # of each one-sided bound
RANK_P = 0.05  # 1 - CONFIDENCE


class Claim(enum.StrEnum):
    """What a timing supports."""

    FASTER = "faster"  # the interval lies above 1
    SLOWER = "slower"  # the interval lies below 1
    WITHIN_NOISE = "within_noise"  # the interval holds 1: no claim either way


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    confidence: float = CONFIDENCE
    # one-sided rank-test p-values: candidate rounds faster (slower) than reference rounds
    p_faster: float = 0.0
    p_slower: float = 0.0

    @property
    def claim(self) -> Claim:
        if self.low > 1.0:
            return Claim.FASTER
        if self.high < 1.0:
            return Claim.SLOWER
        return Claim.WITHIN_NOISE

    def to_dict(self) -> dict:
        return {
            "low": round(self.low, 4),
            "high": round(self.high, 4) if math.isfinite(self.high) else None,
            "confidence": self.confidence,
            "p_faster": round(self.p_faster, 4),
            "p_slower": round(self.p_slower, 4),
            "claim": str(self.claim),
        }


def speedup_interval(reference: Sequence[Sequence[float]], candidate: Sequence[Sequence[float]]) -> Interval:
    """One-sided 95% bounds on the reference-over-candidate time ratio, from per-round per-call milliseconds.

    `reference[i]` and `candidate[j]` are a round's per-call times of each side. Too few rounds for any
    bound (2 a side, or fewer): (0, inf), within noise.
    """
    if not reference or not candidate:
        raise ValueError(f"need rounds on both sides, got {len(reference)} and {len(candidate)}")
    if any(len(r) == 0 for r in [*reference, *candidate]):
        raise ValueError("every round needs at least one timed call on each side")
    ref_medians = [float(np.median(r)) for r in reference]
    cand_medians = [float(np.median(c)) for c in candidate]
    p_faster, p_slower = rank_test(ref_medians, cand_medians)
    ratios = sorted(_ratio(r, c) for r in ref_medians for c in cand_medians)
    counts = _u_counts(len(ref_medians), len(cand_medians))
    total, below, k = sum(counts), 0, 0
    for count in counts:  # the largest k with P(U <= k - 1) <= RANK_P
        if (below + count) / total > RANK_P:
            break
        below, k = below + count, k + 1
    if k == 0:
        return Interval(0.0, math.inf, p_faster=p_faster, p_slower=p_slower)
    return Interval(ratios[k - 1], ratios[-k], p_faster=p_faster, p_slower=p_slower)


def rank_test(reference: Sequence[float], candidate: Sequence[float]) -> tuple[float, float]:
    """Exact one-sided Mann-Whitney p-values: (candidate values below the reference's, above them).

    U counts the (reference, candidate) pairs where the reference is slower (ties count half); under the
    null hypothesis (both sides' rounds exchangeable) every assignment of ranks is equally likely.
    """
    m, n = len(reference), len(candidate)
    u = sum(1.0 if r > c else 0.5 if r == c else 0.0 for r in reference for c in candidate)
    counts = _u_counts(m, n)
    total = sum(counts)
    # P(U >= u) for "faster", P(U <= u) for "slower"; a half U from a tie rounds toward no claim
    p_faster = sum(counts[math.ceil(u - 1e-9) :]) / total if math.ceil(u - 1e-9) <= m * n else 0.0
    p_slower = sum(counts[: math.floor(u + 1e-9) + 1]) / total
    return p_faster, p_slower


def _u_counts(m: int, n: int) -> list[int]:
    """How many rank assignments give U = 0..m*n, for samples of m and n (the Mann-Whitney recursion)."""
    table = {(0, j): [1] for j in range(n + 1)} | {(i, 0): [1] for i in range(m + 1)}
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            a, b = table[(i - 1, j)], table[(i, j - 1)]  # the largest value is a reference (adds j) or a candidate
            out = [0] * (i * j + 1)
            for u, k in enumerate(a):
                out[u + j] += k
            for u, k in enumerate(b):
                out[u] += k
            table[(i, j)] = out
    return table[(m, n)]


def _ratio(reference_ms: float, candidate_ms: float) -> float:
    if reference_ms <= 0 or candidate_ms <= 0:
        return math.inf  # a zero time is no measurement: the interval becomes (0, inf)
    return float(reference_ms / candidate_ms)
