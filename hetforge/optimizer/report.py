"""What an optimization produced: a record per candidate (its typed verdict and outcome) and the report.

Verdicts stay `Verdict` objects here; `OptimizeReport.to_json()` turns them into dicts for
report.json and the CLI's `--json`.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

from hetforge.optimizer import verdict as V

BASELINE = "recipe:eager"  # the reference as it is, as a candidate: always verified, never registered


class CandidateStatus(enum.StrEnum):
    """What became of a candidate in the search."""

    WINNER = "winner"  # the fastest usable candidate
    ACCEPTED = "accepted"  # correct, needs no review (or a human approved it), not the fastest
    NEEDS_REVIEW = "needs_review"  # correct but flagged, and not approved
    REJECTED = "rejected"  # the verdict (or the agent's answer) rejected it
    SKIPPED = "skipped"  # not judged: the budget ran out before or during its verification


@dataclass
class CandidateRecord:
    name: str
    agent: str
    round: int
    source: str
    verdict: V.Verdict | None  # None when skipped or when no code came back
    status: CandidateStatus | None = None  # None until the search decides
    note: str = ""  # why it lost
    spec: dict | None = None  # transform variants: how to rebuild it from an instance
    # why an agent's answer was rejected without a verification (no code, endpoint error)
    refusal: V.Reason | None = None

    @property
    def speedup(self) -> float:
        return float((self.verdict.speedup if self.verdict is not None else None) or 0.0)

    @property
    def usable(self) -> bool:
        return self.verdict is not None and self.verdict.accepted and not self.verdict.needs_review

    @property
    def reject_kind(self) -> V.RejectKind | None:
        """Why a rejected candidate was rejected: its verdict's first reason, or its refusal's; else None."""
        if self.status != CandidateStatus.REJECTED:
            return None
        if self.refusal is not None:
            return self.refusal.kind
        if self.verdict is not None and self.verdict.reasons:
            return self.verdict.reasons[0].kind
        return None

    def to_json(self) -> dict:
        """The record as report.json has it: the verdict as a dict, no source."""
        doc = {k: v for k, v in asdict(self).items() if k not in ("source", "refusal")}
        return doc | {"speedup_vs_eager": self.speedup}


@dataclass
class OptimizeReport:
    task: dict
    candidates: list[CandidateRecord] = field(default_factory=list)
    winner: CandidateRecord | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None  # over `compile_baseline`: torch.compile at the same precision policy
    compile_baseline: str | None = None
    claim: str | None = None  # the winner's timing claim: faster, slower or within_noise (`stats.Claim`)
    elapsed_s: float = 0.0
    notices: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "candidates": [c.to_json() for c in self.candidates],
            "winner": self.winner.name if self.winner else None,
            "winner_agent": self.winner.agent if self.winner else None,
            "speedup_vs_eager": self.speedup_vs_eager,
            "speedup_vs_compile": self.speedup_vs_compile,
            "compile_baseline": self.compile_baseline,
            "claim": self.claim,
            "interval": self.winner.verdict.interval if self.winner and self.winner.verdict else {},
            "elapsed_s": round(self.elapsed_s, 2),
            "notices": self.notices,
        }
