"""SplitConv: fp32 convolutions as three TF32 cuDNN convolutions of split operands, and its matcher."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hetforge.kernels.modules import SplitConv
from hetforge.optimizer import library
from hetforge.optimizer.rewrites import symbolic_trace

CONVS = [  # (module, input shape): strides, dilation, groups, no bias, 1-D
    (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 20, 20)),
    (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, groups=4, bias=False), (2, 16, 21, 19)),
    (lambda: nn.Conv1d(8, 24, 3, padding=1), (3, 8, 50)),
    (lambda: nn.Conv1d(24, 24, 5, stride=2, padding=2, groups=3), (3, 24, 47)),
]


@pytest.mark.parametrize("make,shape", CONVS)
def test_off_cuda_it_is_the_convolution_itself(make, shape):
    torch.manual_seed(0)
    conv = make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(SplitConv(conv)(x), conv(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make,shape", CONVS)
def test_on_cuda_it_is_as_exact_as_fp32(make, shape):
    """Within the verifier's strict tolerance of the float64 convolution, as cuDNN's fp32 one is;
    TF32 alone (one product) is not, at these sizes."""
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    conv = make().cuda().eval()
    x = torch.randn(shape, device="cuda") * 3
    with torch.no_grad():
        exact = conv.double()(x.double())
        out = SplitConv(conv.float())(x)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    torch.testing.assert_close(out.double(), exact, atol=1e-4, rtol=1e-4)
    assert not torch.backends.cudnn.allow_tf32  # asked for per call, the process-wide flag untouched


def _conv_nodes(module: nn.Module) -> list[bool]:
    gm = symbolic_trace(module)
    return [library._splittable_conv(gm, n) for n in gm.graph.nodes if n.op == "call_module" and "conv" in str(n.target)]


def test_matcher_takes_plain_fp32_convolutions_with_enough_products_per_output():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(256, 256, 3, padding=1)  # K = 2304
            self.conv_b = nn.Conv2d(256, 256, 3, padding="same")
            self.conv_c = nn.Conv2d(256, 256, 3, padding=1, padding_mode="reflect")
            self.conv_d = nn.Conv2d(256, 256, 3, padding=1, groups=2)  # K = 1152: cuDNN fp32 is as fast
            self.conv_e = nn.Conv1d(256, 256, 9).double()
            self.conv_f = nn.Conv1d(256, 256, 9, padding=4)  # K = 2304

        def forward(self, x):
            y = self.conv_d(self.conv_c(self.conv_b(self.conv_a(x))))
            return self.conv_f(y.flatten(2)), self.conv_e(y.flatten(2).double())

    assert _conv_nodes(Net()) == [True, False, False, False, True, False]


def test_library_variant_computes_the_convolution_off_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 256, 8, 8)
    gm, counts = library.fuse(model, [x])
    assert counts.get("split_conv") == 1 and any(isinstance(m, SplitConv) for m in gm.modules())
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
