"""Softmax, log-softmax and log-sum-exp with a fused scale, single-block and online paths."""

import pytest
import torch

from hetforge.kernels.triton import softmax as softmax_module
from hetforge.kernels.triton.softmax import fused_softmax

TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _ref(x, mode, scale):
    x = x.double() * scale
    return {"softmax": torch.softmax, "log_softmax": torch.log_softmax, "logsumexp": torch.logsumexp}[mode](x, dim=-1)


@pytest.mark.parametrize("shape", [(1, 1), (7, 127), (2, 3, 1000)])
@pytest.mark.parametrize("mode", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_modes(triton_on_cpu, shape, mode, dtype):
    torch.manual_seed(sum(shape))
    x = (torch.randn(*shape, device=triton_on_cpu) * 4).to(dtype)
    out = fused_softmax(x, mode, 0.7)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), _ref(x, mode, 0.7), atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode", ["softmax", "log_softmax", "logsumexp"])
def test_online_path_with_masked_tail_and_minus_inf(triton_on_cpu, monkeypatch, mode):
    monkeypatch.setattr(softmax_module, "MAX_BLOCK", 64)  # 1000 columns: 16 blocks, a partial last one
    torch.manual_seed(2)
    x = torch.randn(5, 1000, device=triton_on_cpu) * 10
    x[0, :700] = float("-inf")  # whole leading blocks at -inf must not produce NaN
    out = fused_softmax(x, mode, 1.0)
    torch.testing.assert_close(out.double(), _ref(x, mode, 1.0), atol=1e-5, rtol=1e-5)
