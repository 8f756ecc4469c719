"""The example pipelines are valid, and their model stages are real modules that run on the CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hetforge.spec import ModelStage, load_pipeline
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
    spec = importlib.util.spec_from_file_location(f"example_{stage.name}", path.parent / stage.problem_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(stage.seed)
    init = stage.init_args if stage.init_args is not None else module.get_init_inputs()
    model = module.Model(*init, **stage.init_kwargs).eval()
    for inputs in [module.get_inputs(), *module.get_input_variants()]:
        # The declared signature matches what the problem file generates (dynamic dims aside).
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
