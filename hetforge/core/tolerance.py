"""The one tolerance table: (output dtype, precision policy) -> (atol, rtol), and the comparison.

`strict` is the default: fp32 compared at atol = rtol = 1e-4. `tf32` and `bf16` loosen it; they
apply only where the stage opts in. Integer and boolean outputs always compare exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetforge.core.precision import Precision

TOLERANCES: dict[tuple[torch.dtype, str], tuple[float, float]] = {
    (torch.float64, "strict"): (1e-7, 1e-7),
    (torch.float32, "strict"): (1e-4, 1e-4),
    (torch.float16, "strict"): (1e-3, 1e-3),
    (torch.bfloat16, "strict"): (1e-2, 1e-2),
    # TF32 keeps 10 mantissa bits in matmul inputs: about 5e-4 relative per product, more after long sums.
    (torch.float64, "tf32"): (1e-2, 1e-2),
    (torch.float32, "tf32"): (1e-2, 1e-2),
    (torch.float16, "tf32"): (1e-2, 1e-2),
    (torch.bfloat16, "tf32"): (2e-2, 2e-2),
    # bf16 keeps 7 mantissa bits: about 4e-3 relative per rounding.
    (torch.float64, "bf16"): (5e-2, 5e-2),
    (torch.float32, "bf16"): (5e-2, 5e-2),
    (torch.float16, "bf16"): (5e-2, 5e-2),
    (torch.bfloat16, "bf16"): (5e-2, 5e-2),
}


def tolerance(dtype: torch.dtype, precision: str) -> tuple[float, float]:
    """(atol, rtol) for outputs of `dtype` under `precision`; (0, 0) for exact dtypes."""
    precision = Precision.parse(precision)
    if not (dtype.is_floating_point or dtype.is_complex):
        return (0.0, 0.0)
    return TOLERANCES.get((dtype, precision), TOLERANCES[(torch.float32, precision)])


@dataclass(frozen=True)
class Comparison:
    """How one candidate tensor compares with the reference's."""

    ok: bool
    max_abs: float
    max_rel: float
    reason: str = ""  # why not ok, for people
    kind: str = ""  # why not ok, for code: one of FAILURE_KINDS ("" when ok)


FAILURE_KINDS = ("shape", "dtype", "nan", "inf", "values")


def compare(candidate: torch.Tensor, reference: torch.Tensor, precision: str) -> Comparison:
    """Element-wise |c - r| <= atol + rtol * |r|, with NaN and Inf required at the same places.

    Computed in float32 (float64 for float64 outputs), in chunks: a tolerance of 1e-4 needs no more,
    and outputs of 256 MB took several seconds a comparison in float64 with full-size temporaries.
    """
    if candidate.shape != reference.shape:
        return Comparison(
            False, float("inf"), float("inf"), f"shape {tuple(candidate.shape)} != {tuple(reference.shape)}", "shape"
        )
    if candidate.dtype != reference.dtype:
        return Comparison(False, float("inf"), float("inf"), f"dtype {candidate.dtype} != {reference.dtype}", "dtype")
    atol, rtol = tolerance(reference.dtype, precision)
    if reference.numel() == 0:
        return Comparison(True, 0.0, 0.0)
    if not reference.dtype.is_floating_point:
        equal = torch.equal(candidate, reference)
        mismatch = (candidate != reference).sum().item()
        return Comparison(
            equal,
            0.0 if equal else float("inf"),
            0.0 if equal else float("inf"),
            "" if equal else f"values: {mismatch} elements differ",
            "" if equal else "values",
        )
    work = torch.float64 if reference.dtype == torch.float64 else torch.float32
    c_all, r_all = candidate.reshape(-1), reference.reshape(-1)
    max_abs = max_rel = 0.0
    bad = finite_count = 0
    for start in range(0, r_all.numel(), _CHUNK):
        c, r = c_all[start : start + _CHUNK].to(work), r_all[start : start + _CHUNK].to(work)
        r_finite, c_finite = torch.isfinite(r), torch.isfinite(c)
        if not torch.equal(r_finite, c_finite) or not bool(r_finite.all()):
            if not torch.equal(torch.isnan(c), torch.isnan(r)):
                return Comparison(False, float("nan"), float("nan"), "nan: NaN at different places", "nan")
            r_inf, c_inf = torch.isinf(r), torch.isinf(c)
            if not torch.equal(c_inf, r_inf) or not torch.equal(c[r_inf], r[r_inf]):
                return Comparison(False, float("inf"), float("inf"), "inf: Inf at different places or signs", "inf")
            c, r = c[r_finite], r[r_finite]
        if r.numel() == 0:
            continue
        finite_count += r.numel()
        diff = (c - r).abs_()
        ref_abs = r.abs()  # r may be the caller's tensor itself (no dtype change): nothing in place on it
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, (diff / ref_abs.clamp_min(1e-12)).max().item())
        bad += int((diff > ref_abs.mul_(rtol).add_(atol)).sum().item())
    if bad:
        return Comparison(
            False,
            max_abs,
            max_rel,
            f"values: {bad} of {finite_count} elements outside atol={atol:g}, rtol={rtol:g} (max abs err {max_abs:.3g})",
            "values",
        )
    return Comparison(True, max_abs, max_rel)


_CHUNK = 1 << 22  # elements per step of `compare`: temporaries stay small
