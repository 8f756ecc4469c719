"""Graph rewrites: each fires on its pattern, keeps the function, and the verifier accepts the result."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hetforge.core.problem import Problem
from hetforge.optimizer.judge import VerifyOptions, verify
from hetforge.optimizer.rewrites import apply_rewrites
from hetforge.optimizer.variants import rewrite_candidate_source
from tests.conftest import EXAMPLES


class ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class LinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.bn(self.lin(x))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x, y):
        return (self.lin(x) * 0.5) / 4.0, 3 * self.conv(y)


class SharedLayer(nn.Module):
    """One layer called twice: folding a scale into it must not change the other call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * 2.0 + self.lin(x)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 8)
        self.b = nn.Linear(8, 64)
        self.wide_a = nn.Linear(8, 64)
        self.wide_b = nn.Linear(64, 8)

    def forward(self, x, z):
        return self.b(self.a(x)), self.wide_b(self.wide_a(z))


class SumOfLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 64)

    def forward(self, x):
        return self.lin(x).sum(-1), self.lin(x).sum(dim=-1, keepdim=True)


class DeadWork(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)

    def forward(self, x):
        _ = self.unused(x).exp()
        return self.lin(x)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def _check(module, inputs, rewrite, fired):
    torch.manual_seed(0)
    module = module.eval()
    result = apply_rewrites(module, [rewrite])
    assert result is not None
    gm, applied = result
    assert applied.get(rewrite, 0) == fired, (applied, gm.graph)
    with torch.no_grad():
        want, got = module(*inputs), gm(*inputs)
    for w, g in zip(
        want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,), strict=True
    ):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    return gm


def test_fold_bn_after_conv_and_linear():
    torch.manual_seed(0)
    gm = _check(ConvBn(), [torch.randn(2, 3, 9, 9)], "fold_bn", 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    torch.manual_seed(0)
    _check(LinearBn(), [torch.randn(5, 16)], "fold_bn", 1)


def test_fold_scale_multiplies_and_divides():
    torch.manual_seed(0)
    # "* 0.5" folds, then "/ 4.0" finds the folded layer as its input and folds too; "3 *" folds into the conv.
    gm = _check(Scaled(), [torch.randn(5, 16), torch.randn(2, 4, 10)], "fold_scale", 3)
    assert not [n for n in gm.graph.nodes if n.op == "call_function"]


class ReluThenScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2.0, -torch.relu(self.lin(x)) * -3.0


def test_positive_scale_passes_back_through_relu():
    torch.manual_seed(0)
    gm = _check(ReluThenScale(), [torch.randn(4, 16)], "fold_scale", 1)  # the negative scale stays
    assert len([n for n in gm.graph.nodes if n.target is torch.relu]) == 2


def test_fold_scale_leaves_a_shared_layer_alone():
    torch.manual_seed(0)
    _check(SharedLayer(), [torch.randn(3, 16)], "fold_scale", 1)


def test_merge_linear_only_when_cheaper():
    torch.manual_seed(0)
    _check(TwoLinears(), [torch.randn(4, 64), torch.randn(4, 8)], "merge_linear", 1)


def test_sum_through_linear_becomes_matvec():
    torch.manual_seed(0)
    gm = _check(SumOfLinear(), [torch.randn(6, 32)], "sum_linear", 2)
    assert all(m.out_features == 1 for m in gm.modules() if isinstance(m, nn.Linear))


def test_dead_code_is_dropped():
    torch.manual_seed(0)
    gm = _check(DeadWork(), [torch.randn(3, 16)], "dead_code", 2)
    assert not hasattr(gm, "unused")


def test_untraceable_module_is_left_alone_and_unknown_rewrite_is_an_error():
    assert apply_rewrites(DataDependent(), ["dead_code"]) is None
    with pytest.raises(ValueError, match="for rewrites"):
        apply_rewrites(ConvBn(), ["fold_everything"])


def test_verifier_accepts_the_rewritten_example_stage(tmp_path):
    reference = str(EXAMPLES / "models" / "page_encoder.py")
    candidate = tmp_path / "page_encoder_rewritten.py"
    candidate.write_text(rewrite_candidate_source(reference, ["fold_bn", "dead_code"]))
    result = verify(Problem(file=reference), candidate, VerifyOptions(trials=2, rounds=2, calls_per_round=3, warmup=1))
    assert result.accepted, result.reasons
    assert not result.flags
