"""Precision policies: the one enum and which policy serves which (the tolerance table is `tolerance.py`).

A stage declares the policy it is served at:
- `strict`: IEEE fp32 results (TF32 off for matmul and cuDNN), compared at atol = rtol = 1e-4 for fp32;
- `tf32`: TF32 matrix math allowed;
- `bf16`: bf16 compute (autocast) with the stage's output dtype.
`strict` is the default. A variant verified under a stricter policy also serves a looser stage
(`serves`). Standard library only: the CLI and the spec name policies without importing torch.
"""

from __future__ import annotations

import enum


class Precision(enum.StrEnum):
    """A precision policy, ordered from strictest to loosest. Compares equal to its string value."""

    STRICT = "strict"
    TF32 = "tf32"
    BF16 = "bf16"

    @classmethod
    def parse(cls, value: str) -> Precision:
        """The policy named `value`; a ValueError in the house pattern otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f'Got "{value}" for precision: one of {", ".join(PRECISIONS)}.') from None


PRECISIONS: tuple[str, ...] = tuple(p.value for p in Precision)


def serves(variant_policy: str, stage_policy: str) -> bool:
    """Whether a variant verified under `variant_policy` may serve a stage declared at `stage_policy`:
    a stricter (or the same) policy serves a looser one."""
    return PRECISIONS.index(Precision.parse(variant_policy)) <= PRECISIONS.index(Precision.parse(stage_policy))


def serving_policies(stage_policy: str) -> tuple[str, ...]:
    """Every policy whose variants may serve a stage declared at `stage_policy`, strictest first."""
    return tuple(p for p in PRECISIONS if serves(p, stage_policy))
