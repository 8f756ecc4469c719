"""The comparison every verdict rests on: element-wise tolerance, NaN/Inf placement, chunking."""

import pytest
import torch

from hetforge.core import tolerance
from hetforge.core.tolerance import compare


@pytest.fixture(params=[None, 7])
def chunk(request, monkeypatch):
    """Whole tensors, and tiny chunks (so every path crosses chunk boundaries)."""
    if request.param:
        monkeypatch.setattr(tolerance, "_CHUNK", request.param)


def test_within_and_outside_tolerance(chunk):
    r = torch.randn(10, 10)
    before = r.clone()
    assert compare(r + 5e-5, r, "strict").ok
    bad = r.clone()
    bad[3, 4] += 1.0
    bad[9, 9] -= 0.5
    result = compare(bad, r, "strict")
    assert (
        not result.ok and result.reason.startswith("values: 2 of 100 elements") and result.max_abs == pytest.approx(1.0)
    )
    assert compare(bad, r, "bf16").ok is False and compare(r + 1e-3, r, "tf32").ok
    assert torch.equal(r, before)  # the reference is never modified


def test_nan_and_inf_must_match(chunk):
    r = torch.randn(50)
    r[10], r[20] = float("nan"), float("inf")
    assert compare(r.clone(), r, "strict").ok
    c = r.clone()
    c[11] = float("nan")
    assert compare(c, r, "strict").reason.startswith("nan:")
    c = r.clone()
    c[20] = float("-inf")
    assert compare(c, r, "strict").reason.startswith("inf:")
    c = r.clone()
    c[30] = float("inf")
    assert compare(c, r, "strict").reason.startswith("inf:")


def test_shapes_dtypes_and_exact_types():
    r = torch.randn(4, 4)
    assert compare(r.reshape(16), r, "strict").reason.startswith("shape")
    assert compare(r.double(), r, "strict").reason.startswith("dtype")
    i = torch.arange(10)
    assert compare(i, i.clone(), "strict").ok and not compare(i + (i == 3), i, "strict").ok
    h = torch.randn(100).half()
    assert compare(h, h.clone(), "strict").ok and not compare(h + 1, h, "strict").ok


@pytest.mark.parametrize(
    "cand, ref, kind",
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), "shape"),
        (torch.zeros(2, dtype=torch.float64), torch.zeros(2), "dtype"),
        (torch.tensor([float("nan"), 0.0]), torch.zeros(2), "nan"),
        (torch.tensor([float("inf"), 0.0]), torch.zeros(2), "inf"),
        (torch.tensor([1.0, 0.0]), torch.zeros(2), "values"),
        (torch.tensor([1, 0]), torch.zeros(2, dtype=torch.long), "values"),
        (torch.zeros(2), torch.zeros(2), ""),
    ],
)
def test_a_failed_comparison_says_its_kind(cand, ref, kind):
    assert compare(cand, ref, "strict").kind == kind
