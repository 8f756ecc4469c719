"""The example pipelines are valid, and their model stages are real modules that run on the CPU."""

from __future__ import annotations

import pytest
import torch

from hetforge.spec import ModelStage, load_pipeline
from hetforge.spec.stages import stage_problem
from tests.conftest import EXAMPLES, run_cli

PIPELINES = sorted(EXAMPLES.glob("*.yaml"))


def test_three_examples_exist():
    assert len(PIPELINES) >= 3


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_example_validates(path):
    pipeline = load_pipeline(path)
    assert pipeline.stage(pipeline.entry) and pipeline.stage(pipeline.output)


def test_cli_validates_examples():
    result = run_cli("validate", *map(str, PIPELINES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok: pipeline") == len(PIPELINES)


def _model_stages():
    for path in PIPELINES:
        for stage in load_pipeline(path).stages:
            if isinstance(stage, ModelStage):
                yield path, stage


@pytest.mark.parametrize("path,stage", list(_model_stages()), ids=lambda v: getattr(v, "name", ""))
def test_example_model_stage_runs(path, stage):
    loaded = stage_problem(stage, path.parent).load()
    model = loaded.build(seed=stage.seed)
    for inputs in loaded.input_sets(seed=0):
        # The declared signature matches what the stage's inputs are made from (dynamic dims aside).
        if stage.inputs:
            assert len(inputs) == len(stage.inputs)
            for tensor, declared in zip(inputs, stage.inputs):
                assert tensor.dtype == getattr(torch, declared.dtype)
                assert len(tensor.shape) == len(declared.shape)
                for size, dim in zip(tensor.shape, declared.shape):
                    assert isinstance(dim, str) or size == dim
        with torch.inference_mode():
            out = model(*inputs)
        assert out.shape[0] == inputs[0].shape[0]
        assert torch.isfinite(out).all()
