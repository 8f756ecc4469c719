"""The registration policy: which winner of an optimization goes into the kernel registry.

One rule for `hetforge optimize` and for background jobs: the reference itself (`recipe:eager`)
never registers, and neither does a winner under `REGISTER_MIN_GAIN` over eager, nor one whose
speedup does not hold with confidence (`Verdict.claim`, the rank-based interval of `stats`): serving
would swap it in for a gain within noise of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetforge.kernels.registry import Registry, Variant
from hetforge.optimizer.report import BASELINE, OptimizeReport

REGISTER_MIN_GAIN = 1.02  # a winner within noise of the reference is not worth a swap or a rollout
EAGER = BASELINE  # the reference as a candidate: the baseline, never a variant
MODULE_RECIPE = {
    "kind": "module",
    "weights": "reference state_dict",
}  # an agent's ModelNew, loaded with the instance's weights


@dataclass(frozen=True)
class Registration:
    """What became of an optimization's winner: the stored variant, or why none was stored."""

    variant: Variant | None
    reason: str = ""  # why not registered; empty when `variant` is set


def register_winner(
    report: OptimizeReport,
    registry: Registry,
    *,
    fingerprint: str,
    device_class: str,
    precision: str,
    status: str | None = None,
    signature: dict | None = None,
    recipe: dict | None = None,
) -> Registration:
    """Store `report.winner` (an `OptimizeReport`'s) when the policy admits it.

    `status` overrides the registry's default (`active`, or `pending_review` for a flagged verdict);
    `recipe` overrides how the variant is rebuilt from a live instance (default: the winner's spec,
    else its module loaded with the instance's weights).
    """
    winner = report.winner
    if winner is None:
        return Registration(None, "no accepted candidate")
    if winner.name == EAGER or winner.speedup < REGISTER_MIN_GAIN:
        return Registration(
            None,
            f"{winner.name} is {winner.speedup:.3f}x over eager: the registry takes variants "
            f"at least {REGISTER_MIN_GAIN:g}x faster than the reference",
        )
    interval = winner.verdict.interval
    if winner.verdict.claim not in (None, "faster"):
        high = "inf" if interval["high"] is None else f"{interval['high']:.3f}"
        return Registration(
            None,
            f"{winner.name}'s {winner.speedup:.3f}x over eager is within noise: its {interval['confidence']:.0%} "
            f"interval is {interval['low']:.3f}-{high}x",
        )
    variant = registry.add(
        fingerprint=fingerprint,
        device_class=device_class,
        precision=precision,
        name=winner.name,
        agent=winner.agent,
        source=winner.source,
        verdict=winner.verdict.to_dict(),
        recipe=recipe or winner.spec or dict(MODULE_RECIPE),
        signature=signature,
        status=status,
    )
    return Registration(variant)
