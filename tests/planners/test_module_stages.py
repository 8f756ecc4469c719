"""Planning the team's own module stages: profiled with their checkpoint; their failures are one located line."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from hetforge.planners.devices import local_inventory
from hetforge.planners.plan import PlanError, build_plan
from hetforge.spec import load_pipeline
from hetforge.spec.errors import SpecError

MODULE = """
    import torch.nn as nn

    class Encoder(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            return self.proj(x).tanh()
"""


def _pipeline(tmp_path, stage_extra: str):
    (tmp_path / "encoder.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "p.yaml").write_text(
        textwrap.dedent(f"""\
        name: team
        entry: enc
        output: enc
        stages:
          - name: enc
            kind: model
            module: encoder.py:Encoder
            inputs: [{{name: x, shape: [batch, 32]}}]
            {stage_extra}
    """)
    )
    return load_pipeline(tmp_path / "p.yaml")


def test_a_module_stage_with_a_checkpoint_is_profiled_and_placed(tmp_path):
    save_file({"proj.weight": torch.randn(32, 32), "proj.bias": torch.zeros(32)}, tmp_path / "enc.safetensors")
    pipeline = _pipeline(tmp_path, "init_args: [32]\n            weights: enc.safetensors")
    plan = build_plan(pipeline, tmp_path, local_inventory())
    assert plan.stages["enc"].device == "cpu" and plan.stages["enc"].source == "measured"


def test_a_missing_constructor_argument_is_found_before_anything_runs(tmp_path):
    """`validate` reads the class's own __init__: no import, no construction."""
    with pytest.raises(SpecError) as info:
        _pipeline(tmp_path, "init_args: []")
    message = str(info.value)
    assert f"{tmp_path / 'p.yaml'}:7:13:" in message and "'dim' missing" in message, message


@pytest.mark.parametrize(
    "extra, cause",
    [
        ("init_args: [16]", "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ],
)
def test_a_failing_constructor_or_forward_is_one_line_with_the_stage_and_its_yaml_line(tmp_path, extra, cause):
    pipeline = _pipeline(tmp_path, extra)
    with pytest.raises(PlanError) as info:
        build_plan(pipeline, tmp_path, local_inventory())
    [message] = info.value.messages
    assert message.startswith(f'{tmp_path / "p.yaml"}:5: stage "enc": ') and cause in message and "\n" not in message
