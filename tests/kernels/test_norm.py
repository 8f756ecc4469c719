"""Layer / RMS / group norm + chain against torch's own norms (float64 where it matters)."""

import pytest
import torch
import torch.nn.functional as F

from hetforge.kernels.triton import norm as norm_module
from hetforge.kernels.triton.epilogue import Op, torch_apply
from hetforge.kernels.triton.norm import fused_norm

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 4e-2)}
EP = (Op("gelu"), Op("mul", 1.5))


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 127), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["layer", "rms"])
def test_row_norms(triton_on_cpu, rows, cols, dtype, mode):
    torch.manual_seed(rows + cols)
    dev = triton_on_cpu
    x = torch.randn(rows, cols, device=dev).to(dtype)
    w, b = torch.randn(cols, device=dev).to(dtype), torch.randn(cols, device=dev).to(dtype)
    out = fused_norm(x, mode, w, b if mode == "layer" else None, 1e-5, epilogue=EP)
    xd = x.double()
    if mode == "layer":
        ref = F.layer_norm(xd, (cols,), w.double(), b.double(), 1e-5)
    else:
        ref = F.rms_norm(xd, (cols,), w.double(), 1e-5)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), torch_apply(ref, EP), atol=atol, rtol=rtol)


def test_group_norm_with_channel_vector_and_residual(triton_on_cpu):
    torch.manual_seed(0)
    dev = triton_on_cpu
    x = torch.randn(3, 12, 5, 7, device=dev)
    w, b, v = (torch.randn(12, device=dev) for _ in range(3))
    r = torch.randn(3, 12, 5, 7, device=dev)
    ep = (Op("add_v"), Op("relu"), Op("add_r"))
    out = fused_norm(x, "group", w, b, 1e-5, groups=4, epilogue=ep, v=v, r=r)
    ref = torch_apply(
        F.group_norm(x.double(), 4, w.double(), b.double(), 1e-5), ep, v.double().reshape(12, 1, 1), r.double()
    )
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_rows_longer_than_one_block(triton_on_cpu, monkeypatch):
    monkeypatch.setattr(norm_module, "MAX_BLOCK", 64)  # walk a 1000-long row in 16 blocks
    torch.manual_seed(1)
    x = torch.randn(4, 1000, device=triton_on_cpu) * 3 + 5
    for mode in ("layer", "rms"):
        out = fused_norm(x, mode, None, None, 1e-6)
        ref = (
            F.layer_norm(x.double(), (1000,), eps=1e-6)
            if mode == "layer"
            else F.rms_norm(x.double(), (1000,), eps=1e-6)
        )
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_layer_norm_over_two_dims(triton_on_cpu):
    x = torch.randn(2, 3, 4, 5, device=triton_on_cpu)
    out = fused_norm(x, "layer", None, None, 1e-5, normalized=2)
    torch.testing.assert_close(out, F.layer_norm(x, (4, 5)), atol=2e-5, rtol=2e-5)
