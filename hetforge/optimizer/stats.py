"""Whether a measured speedup holds beyond the noise: an interval over interleaved timing rounds.

The judge times the reference and the candidate in alternating rounds (`timing.Timing`): round i
runs the reference's calls and then the candidate's (or the other way round), back to back. The
calls of one round share the state of the host (a load spike, a clock change), so the rounds, not
the calls, are the independent samples: round i gives the paired ratio
median(reference_i) / median(candidate_i), and the interval is Student's t interval of the mean of
their logarithms, mapped back to a ratio. A speedup is claimed only when the whole interval lies
above 1 and, by a rank test, the candidate's round medians lie below the reference's (one-sided
exact Mann-Whitney, p <= 0.05; with 3 rounds a side that means every candidate round faster than
every reference round). Three log ratios can cluster by chance when load comes in bursts: on a
2-core host at load average 39, an identical computation read 3.01x with a t interval of
1.20-6.24x; the rank test alone admits such a chance ordering 1 time in 20 at 3 rounds, and both
must hold. A median ratio alone is no claim: on a loaded 2-core host an identical computation read
4.04x faster than its reference once and 0.95x when rerun.

numpy and the standard library only: this runs in the judge on the GPU host.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RANK_P = 0.05  # the rank test's one-sided level
# Student's t, two-sided 95%: T95[df - 1] for df = 1..30 (standard tables); 1.96 beyond
T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


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
        if self.low > 1.0 and self.p_faster <= RANK_P:
            return Claim.FASTER
        if self.high < 1.0 and self.p_slower <= RANK_P:
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
    """The 95% interval of the reference-over-candidate time ratio, from per-round per-call milliseconds.

    `reference[i]` and `candidate[i]` are round i's per-call times of each side (interleaved rounds:
    paired by index). One round gives no interval: (0, inf), within noise.
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"need the same number of rounds on both sides, got {len(reference)} and {len(candidate)}")
    if any(len(r) == 0 for r in [*reference, *candidate]):
        raise ValueError("every round needs at least one timed call on each side")
    ref_medians = [float(np.median(r)) for r in reference]
    cand_medians = [float(np.median(c)) for c in candidate]
    logs = np.array([math.log(_ratio(r, c)) for r, c in zip(ref_medians, cand_medians, strict=True)])
    p_faster, p_slower = rank_test(ref_medians, cand_medians)
    if len(logs) < 2 or not np.all(np.isfinite(logs)):
        return Interval(0.0, math.inf, p_faster=p_faster, p_slower=p_slower)
    half = (T95[len(logs) - 2] if len(logs) - 1 <= len(T95) else 1.96) * logs.std(ddof=1) / math.sqrt(len(logs))
    return Interval(math.exp(logs.mean() - half), math.exp(logs.mean() + half), p_faster=p_faster, p_slower=p_slower)


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
