"""Pointwise chains in one pass: every op, a channel vector, a residual, odd sizes."""

import pytest
import torch

from hetforge.kernels.triton.epilogue import CODES, TAKES_RESIDUAL, TAKES_SCALAR, TAKES_VECTOR, Op, torch_apply
from hetforge.kernels.triton.pointwise import pointwise_chain

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("name", sorted(CODES))
def test_every_op_on_channels(triton_on_cpu, name):
    torch.manual_seed(len(name) + 7)
    dev = triton_on_cpu
    x, v, r = torch.randn(2, 5, 3, 7, device=dev) * 3, torch.randn(5, device=dev), torch.randn(2, 5, 3, 7, device=dev)
    op = Op(name, 0.25 if name in TAKES_SCALAR else 0.0)
    vv = v if name in TAKES_VECTOR else None
    rr = r if name in TAKES_RESIDUAL else None
    out = pointwise_chain(x, (op,), vv, 1, rr)
    ref = torch_apply(
        x.double(),
        (op,),
        vv.double().reshape(5, 1, 1) if vv is not None else None,
        rr.double() if rr is not None else None,
    )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sizes_and_dtypes(triton_on_cpu, n, dtype):
    torch.manual_seed(n)
    x = torch.randn(n, device=triton_on_cpu).to(dtype)
    ep = (Op("mul", 2.0), Op("sigmoid"), Op("add", -0.5), Op("abs"))
    out = pointwise_chain(x, ep)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), torch_apply(x.double(), ep), atol=atol, rtol=rtol)
    assert out.dtype == dtype
