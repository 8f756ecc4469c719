"""The stage-to-optimize abstraction for the team's own modules: checkpoints, fingerprints, sibling imports."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from hetforge.core.problem import InputSpec, Problem, ProblemError

MODULE = """
    import torch.nn as nn
    from helpers import width  # a module beside this file


    class Encoder(nn.Module):
        def __init__(self, dim, scale=1.0):
            super().__init__()
            self.proj = nn.Linear(dim, width(dim))
            self.scale = scale

        def forward(self, x, mask):
            return self.proj(x).relu() * self.scale * mask.unsqueeze(-1)
"""


@pytest.fixture
def team_dir(tmp_path):
    (tmp_path / "helpers.py").write_text("def width(dim):\n    return 2 * dim\n")
    (tmp_path / "encoder.py").write_text(textwrap.dedent(MODULE))
    return tmp_path


def _problem(team_dir, weights=None, **kw):
    signature = (InputSpec("x", ("batch", "seq", 8)), InputSpec("mask", ("batch", "seq"), "int64"))
    return Problem(
        module="encoder.py:Encoder", base_dir=str(team_dir), signature=signature, weights=weights, init_args=(8,), **kw
    )


def test_a_module_stage_builds_with_its_checkpoint_and_makes_declared_inputs(team_dir):
    torch.manual_seed(1)
    state = {"proj.weight": torch.randn(16, 8), "proj.bias": torch.randn(16)}
    save_file(state, team_dir / "enc.safetensors")
    torch.save(state, team_dir / "enc.pt")
    for name in ("enc.safetensors", "enc.pt"):
        loaded = _problem(team_dir, name).load()
        module = loaded.build(seed=123)  # the seed must not matter: the checkpoint is the weights
        assert torch.equal(module.proj.weight, state["proj.weight"])
        x, mask = loaded.main_inputs(seed=0)
        assert x.shape == (1, 128, 8) and x.dtype == torch.float32 and mask.dtype == torch.int64
        assert module(x, mask).shape == (1, 128, 16)


def test_the_json_form_rebuilds_the_same_problem_in_another_process(team_dir):
    problem = _problem(team_dir, init_kwargs={"scale": 2.0})
    again = Problem.from_json(problem.to_json())
    assert again.load().fingerprint() == problem.load().fingerprint()
    assert again.signature == problem.signature


def test_the_fingerprint_covers_source_arguments_and_weights(team_dir):
    save_file({"proj.weight": torch.zeros(16, 8), "proj.bias": torch.zeros(16)}, team_dir / "a.safetensors")
    save_file({"proj.weight": torch.ones(16, 8), "proj.bias": torch.zeros(16)}, team_dir / "b.safetensors")
    base = _problem(team_dir).load().fingerprint()
    assert _problem(team_dir, "a.safetensors").load().fingerprint() != base
    assert (
        _problem(team_dir, "a.safetensors").load().fingerprint()
        != _problem(team_dir, "b.safetensors").load().fingerprint()
    )
    assert _problem(team_dir, init_kwargs={"scale": 3.0}).load().fingerprint() != base
    (team_dir / "encoder.py").write_text(textwrap.dedent(MODULE).replace("relu()", "gelu()"))
    assert _problem(team_dir).load().fingerprint() != base


def test_a_checkpoint_that_does_not_fit_is_one_clear_error(team_dir):
    save_file({"proj.weight": torch.zeros(4, 8)}, team_dir / "bad.safetensors")
    with pytest.raises(ProblemError, match="does not fit Encoder"):
        _problem(team_dir, "bad.safetensors").load().build()
    (team_dir / "code.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ProblemError, match="weights_only=True"):
        _problem(team_dir, "code.pt").load().build()


def test_a_module_needs_exactly_one_form_and_a_signature(team_dir):
    with pytest.raises(ProblemError, match="exactly one of"):
        Problem(file="x.py", module="m.py:M", signature=(InputSpec("x", (1,)),))
    with pytest.raises(ProblemError, match="declared input signature"):
        Problem(module="m.py:M")


def test_a_problem_file_may_import_a_module_beside_it(team_dir):
    (team_dir / "problem.py").write_text(
        textwrap.dedent("""
        import torch
        from helpers import width
        class Model(torch.nn.Module):
            def forward(self, x):
                return x * width(1)
        def get_inputs():
            return [torch.ones(2)]
        def get_init_inputs():
            return []
    """)
    )
    loaded = Problem(file=str(team_dir / "problem.py")).load()
    assert torch.equal(loaded.build()(*loaded.main_inputs(0)), torch.full((2,), 2.0))
