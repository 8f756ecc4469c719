"""A model stage as the stage-to-optimize abstraction (`hetforge.core.problem.Problem`).

One conversion for the planner, serving, background jobs and `hetforge optimize --stage`: a stage
given by a problem file, or by the team's own module with its constructor arguments, checkpoint and
declared inputs.
"""

from __future__ import annotations

from pathlib import Path

from hetforge.core.hf import HfSource
from hetforge.core.problem import InputSpec, Problem, load_module_file, resolve
from hetforge.spec.models import ModelStage, Pipeline, ToolStage


def stage_problem(stage: ModelStage, base_dir: Path) -> Problem:
    """The reference computation of `stage`, with paths resolved against the pipeline's folder."""
    init_args, init_kwargs = tuple(stage.init_args or ()), dict(stage.init_kwargs)
    buckets = tuple(tuple(sorted(b.items())) for b in stage.buckets)
    if stage.huggingface is not None:
        hf = stage.huggingface
        return Problem(
            hf=HfSource(hf.model, hf.task, hf.pooling, hf.normalize, hf.max_length, hf.dtype),
            base_dir=str(base_dir),
            buckets=buckets,
        )
    if stage.problem_file is not None:
        return Problem(
            file=str(base_dir / stage.problem_file),
            init_args=init_args,
            init_kwargs=init_kwargs,
            base_dir=str(base_dir),
        )
    signature = tuple(InputSpec(i.name, tuple(i.shape), i.dtype) for i in stage.inputs)
    return Problem(
        module=stage.module,
        base_dir=str(base_dir),
        signature=signature,
        weights=stage.weights,
        init_args=init_args,
        init_kwargs=init_kwargs,
        buckets=buckets,
    )


class StageCodeError(Exception):
    """A stage's own code failed (import, constructor, checkpoint): one line naming the stage, where it is
    declared and the cause, never a traceback."""


def stage_code_error(pipeline: Pipeline, stage: str, err: BaseException) -> StageCodeError:
    """The one-line error for `err`, raised by the code of `stage` in `pipeline`."""
    where = pipeline.where(stage)
    cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return StageCodeError(f'{where + ": " if where else ""}stage "{stage}": {type(err).__name__}: {cause}'.rstrip(": "))


def import_stage_functions(pipeline: Pipeline, base_dir: Path) -> list[str]:
    """One `stage_code_error` line per function a stage names (pre/postprocess, a tool's callable) that cannot be
    imported, runs its module's top level: `plan` and `serve` report these before any replica starts."""
    errors = []
    for stage in pipeline.stages:
        fields = ("callable",) if isinstance(stage, ToolStage) else ("preprocess", "postprocess")
        for field in fields:
            target = getattr(stage, field, None)
            if not target:
                continue
            try:
                found = _import_function(target, base_dir)
                if not callable(found):
                    raise TypeError(f"{target} ({field}) is a {type(found).__name__}, not a function")
            except Exception as err:  # noqa: BLE001 - the user's module: whatever its import raises is one line
                errors.append(str(stage_code_error(pipeline, stage.name, err)))
    return errors


def _import_function(target: str, base_dir: Path):
    """`file.py:name` (relative to the pipeline's folder) or `package.module:name`, imported."""
    location, _, name = target.rpartition(":")
    if location.endswith(".py"):
        return getattr(load_module_file(base_dir / location), name)
    return resolve(target)
