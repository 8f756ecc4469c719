"""FusedConv: chain(conv(x)) on the CPU through oneDNN, on CUDA as cuDNN (or three TF32 convolutions of split
operands) plus one Triton pass; and its matcher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hetforge.kernels import onednn
from hetforge.kernels.modules import FusedConv
from hetforge.kernels.triton.epilogue import Op, torch_apply
from hetforge.optimizer import library
from hetforge.optimizer.rewrites import symbolic_trace

CONVS = [  # (module, input shape): strides, dilation, groups, no bias, 1-D
    (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 20, 20)),
    (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, groups=4, bias=False), (2, 16, 21, 19)),
    (lambda: nn.Conv1d(8, 24, 3, padding=1), (3, 8, 50)),
    (lambda: nn.Conv1d(24, 24, 5, stride=2, padding=2, groups=3), (3, 24, 47)),
]
CHAINS = [  # a fused post-op, a vector folded into the bias, a clamp pair as hardtanh, a residual, ops after the post-op
    (),
    (Op("gelu"),),
    (Op("add_v"), Op("tanh"), Op("mul", 2.0), Op("hardswish")),
    (Op("clamp_min", -0.5), Op("clamp_max", 0.25), Op("mul_v")),
    (Op("relu"), Op("add_r")),
    (Op("mul", 0.5), Op("sigmoid")),
]
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")


def _expected(conv, x, chain, v, r):
    out = conv(x)
    shape = (-1,) + (1,) * (out.dim() - 2)
    return torch_apply(out, chain, v.view(shape) if v is not None else None, r)


@needs_onednn
@pytest.mark.parametrize("make,shape", CONVS)
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "+".join(o.name for o in c) or "none")
def test_on_the_cpu_onednn_computes_the_chain_of_the_convolution(make, shape, chain):
    torch.manual_seed(0)
    conv = make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        channels = conv.out_channels
        v = torch.randn(channels) if any(o.name.endswith("_v") for o in chain) else None
        r = torch.randn_like(conv(x)) if any(o.name.endswith("_r") for o in chain) else None
        fused = FusedConv(conv, chain, v)
        out = fused(x, r) if r is not None else fused(x)
        expected = _expected(conv, x, chain, v, r)
    assert (fused._onednn.packed is not None) == bool(chain)  # with a chain it ran oneDNN, not the eager convolution
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@needs_onednn
def test_a_weight_changed_in_place_is_packed_again_and_a_copy_packs_its_own():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 12, 12)
    fused = FusedConv(conv, (Op("relu"),))
    with torch.no_grad():
        first = fused(x)
        twin = copy.deepcopy(fused)  # oneDNN's packed tensors have no storage: the copy must not carry one
        assert twin._onednn.packed is None
        fused.weight.mul_(-1)
        again = fused(x)
        torch.testing.assert_close(again, F.relu(F.conv2d(x, -conv.weight, conv.bias, padding=1)), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(twin(x), first, atol=0, rtol=0)
    assert not torch.allclose(first, again)


def test_without_onednn_it_is_the_eager_convolution(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: False)
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 24, 3, padding=1).eval()
    x = torch.randn(3, 8, 50)
    with torch.no_grad():
        out = FusedConv(conv, (Op("tanh"), Op("mul", 3.0)), split=True)(x)
        assert torch.equal(out, torch.tanh(conv(x)) * 3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make,shape", CONVS)
def test_on_cuda_the_split_convolution_is_as_exact_as_fp32(make, shape):
    """Within the verifier's strict tolerance of the float64 convolution, as cuDNN's fp32 one is;
    TF32 alone (one product) is not, at these sizes."""
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    conv = make().cuda().eval()
    x = torch.randn(shape, device="cuda") * 3
    with torch.no_grad():
        exact = conv.double()(x.double())
        out = FusedConv(conv.float(), split=True)(x)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    torch.testing.assert_close(out.double(), exact, atol=1e-4, rtol=1e-4)
    assert not torch.backends.cudnn.allow_tf32  # asked for per call, the process-wide flag untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chain", CHAINS[1:], ids=lambda c: "+".join(o.name for o in c))
def test_on_cuda_the_chain_runs_after_the_convolution(chain):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1).cuda().eval()
    x = torch.randn(2, 16, 20, 20, device="cuda")
    with torch.no_grad():
        v = torch.randn(32, device="cuda")
        r = torch.randn(2, 32, 20, 20, device="cuda")
        fused = FusedConv(conv, chain, v if any(o.name.endswith("_v") for o in chain) else None)
        out = fused(x, r) if any(o.name.endswith("_r") for o in chain) else fused(x)
        expected = _expected(conv, x, chain, v if fused.vector is not None else None, r)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def _conv_nodes(module: nn.Module) -> list[tuple[bool, bool]]:
    gm = symbolic_trace(module)
    return [
        (library._fusable_conv(gm, n), library._splittable_conv(gm, n))
        for n in gm.graph.nodes
        if n.op == "call_module" and "conv" in str(n.target)
    ]


def test_matcher_takes_plain_fp32_convolutions_and_splits_those_with_enough_products_per_output():
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

    assert _conv_nodes(Net()) == [
        (True, True),
        (False, False),
        (False, False),
        (True, False),
        (True, True),
        (False, False),
    ]


def test_library_variant_fuses_the_chain_into_the_convolution():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(256, 16, 3, padding=1)
            self.bias = nn.Parameter(torch.randn(16, 1, 1))
            self.head = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.head(F.hardswish(torch.tanh(self.conv(x) + self.bias) * 2.0))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 256, 8, 8)
    gm, counts = library.fuse(model, [x])
    assert counts == {"split_conv": 1, "conv_epilogue": 1}
    fused = [m for m in gm.modules() if isinstance(m, FusedConv)]
    assert [len(m.epilogue) for m in fused] == [4, 0] and fused[0].weight_hi is not None and fused[1].weight_hi is None
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=2e-5, rtol=1e-5)
