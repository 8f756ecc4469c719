"""Whether a measured speedup holds beyond the noise: an interval over interleaved timing rounds.

The judge times the reference and the candidate in alternating rounds (`timing.Timing`): round i
runs the reference's calls and then the candidate's (or the other way round), back to back. The
calls of one round share the state of the host (a load spike, a clock change), so the rounds, not
the calls, are the independent samples: round i gives the paired ratio
median(reference_i) / median(candidate_i), and the interval is Student's t interval of the mean of
their logarithms, mapped back to a ratio. A speedup is claimed only when the whole interval lies
above 1 (`Claim.FASTER`). A median ratio alone is not a claim: on a loaded 2-core host an identical
computation read 4.04x faster than its reference once and 0.95x when rerun.

numpy and the standard library only: this runs in the judge on the GPU host.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
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
    logs = np.array([math.log(_ratio(np.median(r), np.median(c))) for r, c in zip(reference, candidate, strict=True)])
    if len(logs) < 2 or not np.all(np.isfinite(logs)):
        return Interval(0.0, math.inf)
    half = (T95[len(logs) - 2] if len(logs) - 1 <= len(T95) else 1.96) * logs.std(ddof=1) / math.sqrt(len(logs))
    return Interval(math.exp(logs.mean() - half), math.exp(logs.mean() + half))


def _ratio(reference_ms: float, candidate_ms: float) -> float:
    if reference_ms <= 0 or candidate_ms <= 0:
        return math.inf  # a zero time is no measurement: the interval becomes (0, inf)
    return float(reference_ms / candidate_ms)
