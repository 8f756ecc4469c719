"""Reductions over any dim with a fused prologue, against torch in float64."""

import pytest
import torch

from hetforge.kernels.triton.epilogue import Op, torch_apply
from hetforge.kernels.triton.reduce import fused_reduce

PROLOGUE = (Op("add_v"), Op("relu"), Op("mul", 0.5))


@pytest.mark.parametrize("kind", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("keepdim", [False, True])
def test_reduce_any_dim(triton_on_cpu, kind, dim, keepdim):
    torch.manual_seed(dim + 5)
    dev = triton_on_cpu
    x, v = torch.randn(3, 7, 2, 5, device=dev), torch.randn(7, device=dev)
    out = fused_reduce(x, kind, dim, keepdim, PROLOGUE, v, 1)
    y = torch_apply(x.double(), PROLOGUE, v.double().reshape(7, 1, 1))
    ref = {"sum": y.sum, "mean": y.mean, "max": y.amax, "min": y.amin}[kind](dim, keepdim=keepdim)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,dim", [((1,), 0), ((4, 1000), 1), ((1000, 3), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_and_tiny_reductions(triton_on_cpu, shape, dim, dtype):
    x = torch.randn(*shape, device=triton_on_cpu).to(dtype)
    out = fused_reduce(x, "sum", dim)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), x.double().sum(dim), atol=tol * shape[dim] ** 0.5, rtol=tol)
