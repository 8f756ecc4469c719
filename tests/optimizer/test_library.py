"""The library agent's matcher: each pattern lands on its kernel and computes the same function."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hetforge.kernels import onednn
from hetforge.kernels.modules import (
    FusedBmm,
    FusedConv,
    FusedLinear,
    FusedNorm,
    FusedReduce,
    FusedSoftmax,
    PointwiseChain,
)
from hetforge.optimizer.library import fuse


class Everything(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 48)
        self.ln = nn.LayerNorm(48)
        self.act = nn.GELU()
        self.scale = nn.Parameter(torch.randn(48))
        self.conv = nn.Conv2d(3, 8, 3)
        self.gn = nn.GroupNorm(4, 8)
        self.bias = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x, img):
        h = torch.relu(self.lin(x)) * 2.0 + self.scale  # GEMM + relu, scalar, vector
        h = self.act(self.ln(h)) + x.sum(-1, keepdim=True).expand(-1, 48).contiguous()  # norm + gelu + residual
        attn = torch.softmax(h * 0.5, dim=-1)  # scaled softmax
        c = torch.tanh(self.conv(img) + self.bias) * 3.0  # chain after a convolution, channel vector
        c = F.leaky_relu(self.gn(c), 0.2)  # group norm + chain
        pooled = (torch.sigmoid(c) - 0.5).mean(dim=1)  # reduction with a prologue over channels
        gate = F.hardswish(F.silu(x * 0.5 + 1.0))  # a chain of its own (F.silu traces with inplace=False)
        return attn, torch.logsumexp(h, dim=-1), pooled, (c * 2).relu().amax(-1), gate


def _inputs():
    return [torch.randn(5, 32), torch.randn(2, 3, 10, 10)]


def test_every_pattern_matches_and_agrees(triton_on_cpu):
    torch.manual_seed(0)
    model, inputs = Everything().eval(), _inputs()
    gm, counts = fuse(model, inputs)
    assert counts == {"gemm_epilogue": 1, "conv_epilogue": 1, "norm": 2, "softmax": 2, "pointwise": 1, "reduce": 2}
    kinds = [type(m) for m in gm.modules()]
    for cls in (FusedLinear, FusedConv, FusedNorm, FusedSoftmax, PointwiseChain, FusedReduce):
        assert cls in kinds
    assert not any(
        f"torch.{op}(" in gm.code or f".{op}(" in gm.code.replace("self.", "")
        for op in ("relu", "softmax", "logsumexp", "tanh", "sigmoid")
    )
    with torch.no_grad():
        for got, want in zip(gm.to(triton_on_cpu)(*[x.to(triton_on_cpu) for x in inputs]), model(*inputs), strict=True):
            torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_cpu_path_agrees_without_the_interpreter():
    torch.manual_seed(1)
    model, inputs = Everything().eval(), _inputs()
    gm, _ = fuse(model, inputs)
    with torch.no_grad():
        for got, want in zip(gm(*inputs), model(*inputs), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if onednn.available():  # the GEMM and the convolution ran oneDNN with packed weights
        assert all(m._onednn.packed is not None for m in gm.modules() if isinstance(m, (FusedLinear, FusedConv)))


@pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
def test_cpu_gemm_runs_onednn_with_the_chain_and_a_vector_folded_into_the_bias():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 96)
            self.shift = nn.Parameter(torch.randn(96))

        def forward(self, x, skip):
            return F.gelu(self.lin(x) + self.shift) + skip, F.hardtanh(self.lin(x), min_val=-0.5, max_val=0.25) * 2.0

    torch.manual_seed(3)
    model = Head().eval()
    inputs = [torch.randn(4, 7, 64), torch.randn(4, 7, 96)]
    gm, counts = fuse(model, inputs)
    assert counts == {"gemm_epilogue": 2}
    chains = sorted(tuple(op.name for op in m.epilogue) for m in gm.modules() if isinstance(m, FusedLinear))
    assert chains == [("add_v", "gelu", "add_r"), ("clamp_min", "clamp_max", "mul")]
    with torch.no_grad():
        for got, want in zip(gm(*inputs), model(*inputs), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        fused = next(m for m in gm.modules() if isinstance(m, FusedLinear) and m.vector is not None)
        _, bias, rest, vector = fused._onednn.packed
        assert vector is None and [op.name for op in rest] == ["gelu", "add_r"]
        torch.testing.assert_close(bias, model.lin.bias + model.shift)


def test_batched_products_of_activations(triton_on_cpu):
    class Products(nn.Module):
        def forward(self, a, b, c):
            return (
                torch.relu(torch.bmm(a, b) * 0.5) + c,
                a @ b.transpose(1, 2).contiguous().transpose(1, 2),
                a.matmul(b[0]),
            )

    torch.manual_seed(4)
    model = Products().eval()
    inputs = [torch.randn(2, 9, 12), torch.randn(2, 12, 7), torch.randn(2, 9, 7)]
    gm, counts = fuse(model, inputs)
    assert counts == {"bmm_epilogue": 2}  # the 3-D x 2-D matmul is not a batched product
    fused = [m for m in gm.modules() if isinstance(m, FusedBmm)]
    assert sorted(len(m.epilogue) for m in fused) == [0, 3]  # scale, relu and the residual add ride on the first
    with torch.no_grad():
        for got, want in zip(gm(*[x.to(triton_on_cpu) for x in inputs]), model(*inputs), strict=True):
            torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_shared_intermediate_is_not_swallowed():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            return torch.relu(h) * 2.0, h  # h is an output too: relu/mul must not be folded into the GEMM

    torch.manual_seed(2)
    model = Shared().eval()
    gm, counts = fuse(model, [torch.randn(3, 8)])
    assert counts.get("gemm_epilogue") == 1
    x = torch.randn(3, 8)
    with torch.no_grad():
        for got, want in zip(gm(x), model(x), strict=True):
            torch.testing.assert_close(got, want)


def test_untraceable_module_gives_none():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    assert fuse(Branchy(), [torch.randn(3)]) is None


def test_shapes_from_the_meta_device_leave_the_instance_untouched():
    torch.manual_seed(3)
    model = Everything().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse(model, _inputs())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.device.type == "cpu"
