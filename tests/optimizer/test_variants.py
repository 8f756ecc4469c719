"""Variants built from a stage's own instance, as serving builds them from checkpoint weights."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hetforge.core.problem import Problem, load_module_file
from hetforge.optimizer.judge import VerifyOptions, verify
from hetforge.optimizer.variants import VariantError, VariantSpec, build_module_variant, build_variant

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROBLEMS = Path(__file__).resolve().parent / "problems"


def _checkpoint_instance(tmp_path, module_file: Path):
    """A Model whose weights came from a checkpoint file, not from the problem file's seed."""
    problem = load_module_file(module_file)
    torch.manual_seed(1234)
    trained = problem.Model(*problem.get_init_inputs()).eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "training" moved the weights
        for m in trained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(trained.state_dict(), tmp_path / "ckpt.pt")
    torch.manual_seed(0)
    served = problem.Model(*problem.get_init_inputs()).eval()
    served.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    return problem, served


@pytest.mark.parametrize(
    "spec",
    [
        VariantSpec(rewrites=("fold_bn",)),
        VariantSpec(library=True),
        VariantSpec(rewrites=("fold_bn", "dead_code"), library=True),
    ],
)
def test_transform_variant_folds_the_checkpoint_weights(tmp_path, spec):
    problem, served = _checkpoint_instance(tmp_path, EXAMPLES / "models" / "page_encoder.py")
    inputs = problem.get_inputs()
    variant = build_variant(served, spec, inputs)
    with torch.no_grad():
        torch.testing.assert_close(variant(*inputs), served(*inputs), atol=1e-4, rtol=1e-4)
        seeded = build_variant(problem.Model(*problem.get_init_inputs()).eval(), spec, inputs)
        assert not torch.allclose(seeded(*inputs), served(*inputs), atol=1e-3)  # the weights did matter
    assert VariantSpec.from_json(spec.to_json()) == spec


def test_transform_variant_of_an_untraceable_instance_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(VariantError, match="no graph to transform"):
        build_variant(Branchy(), VariantSpec(library=True), [torch.randn(3)])
    with pytest.raises(VariantError, match="kind"):
        VariantSpec.from_json({"kind": "module"})


MODULE_SOURCE = """
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        nn.init.zeros_(self.lin.weight)  # its own init differs: the reference's weights are loaded

    def forward(self, x):
        return torch.relu(torch.addmm(self.lin.bias, x, self.lin.weight.t())).mul_(2.0)
"""


def test_module_variant_takes_the_instance_weights(tmp_path):
    problem = load_module_file(PROBLEMS / "linear_relu.py")
    instance = problem.Model(*problem.get_init_inputs()).eval()
    source = types.ModuleType("cand")
    exec(compile(MODULE_SOURCE, "cand.py", "exec"), source.__dict__)
    variant = build_module_variant(source, instance, tuple(problem.get_init_inputs()))
    x = torch.randn(4, 256)
    with torch.no_grad():
        torch.testing.assert_close(variant(x), instance(x))
    renamed = types.ModuleType("bad")
    exec(compile(MODULE_SOURCE.replace("self.lin", "self.proj"), "bad.py", "exec"), renamed.__dict__)
    with pytest.raises(VariantError, match="weights"):
        build_module_variant(renamed, instance, tuple(problem.get_init_inputs()))


def test_verifier_loads_reference_weights_into_module_variants(tmp_path):
    path = tmp_path / "cand.py"
    path.write_text(MODULE_SOURCE)
    options = VerifyOptions(trials=1, rounds=1, time=False)
    problem = Problem(file=str(PROBLEMS / "linear_relu.py"))
    assert verify(problem, path, options).verdict == "rejected"  # zero weights: wrong
    from dataclasses import replace

    assert verify(problem, path, replace(options, weights_from_reference=True)).verdict == "accepted"
    path.write_text(MODULE_SOURCE.replace("self.lin", "self.proj"))
    verdict = verify(problem, path, replace(options, weights_from_reference=True))
    assert verdict.verdict == "rejected" and "state_dict" in verdict.reasons[0].message


def test_candidate_sources_are_valid_python_whatever_type_the_policy_arrives_as():
    """A stage's policy is a `Precision` enum (from the spec); the generated file must still parse."""
    import ast

    from hetforge.core.precision import Precision
    from hetforge.optimizer.variants import VariantSpec, variant_candidate_source

    source = variant_candidate_source("problem.py", VariantSpec(("dead_code",), precision=Precision.TF32))
    ast.parse(source)
    assert "'precision': 'tf32'" in source
