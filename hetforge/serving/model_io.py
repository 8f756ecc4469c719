"""JSON in and out of a model stage: checked input tensors, batching of requests, JSON outputs.

`ModelIO` is the one front a replica uses: a HuggingFace stage's client data (text, audio, images) goes
through `hf_io`; the team's modules and problem files take tensors as nested lists, as below.

A request's input for a model stage is a JSON object with one field per declared input (nested
lists), or whatever the stage's `preprocess` function accepts. Each input is converted to its
declared dtype and checked against its declared shape: fixed dimensions must match and a named
dimension (`batch`, `seq`, ...) must have one size across all inputs of the request. Violations
are the client's: a StageError with status 422 naming the stage, the input and both shapes.

Requests of one batch are concatenated along dimension 0 when their other dimensions agree, run
once, and the output is split back; requests that cannot be concatenated run one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hetforge.core.hf import model_folder
from hetforge.core.problem import Problem, load_module_file, resolve
from hetforge.serving.dataflow import StageError
from hetforge.serving.hf_io import HfIO

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
MAX_ELEMENTS = 1 << 26  # 64M elements per input: a larger request is refused before it is allocated


class ModelIO:
    """One model stage's request decoding, batching and response encoding, whatever its source."""

    def __init__(self, stage, problem: Problem, base_dir: Path, arity: int):
        self.stage, self.arity = stage, arity
        self.hf = HfIO(stage, problem.hf, model_folder(problem.hf.model, base_dir)) if problem.hf else None
        self.pre = resolve_function(stage.preprocess, base_dir)
        self.post = resolve_function(stage.postprocess, base_dir)

    def decode(self, payload: Any) -> list[torch.Tensor]:
        if self.hf is not None:
            return self.hf.decode(payload)
        return decode_inputs(self.stage, payload, self.pre, self.arity)

    def run(self, run: Callable[..., Any], items: list[list[torch.Tensor]]) -> list[Any]:
        if self.hf is not None:
            return self.hf.run(run, items)
        return run_batched(run, items)

    def encode(self, out: Any, payload: Any) -> Any:
        if self.hf is not None and self.post is None:
            return self.hf.encode(out, payload)
        return encode_output(self.stage, out, payload, self.post)


def resolve_function(target: str | None, base_dir: Path) -> Callable | None:
    """`file.py:function` (relative to the pipeline's folder) or `package.module:function`."""
    if target is None:
        return None
    path, _, attr = target.rpartition(":")
    if path.endswith(".py"):
        return getattr(load_module_file(base_dir / path), attr)
    return resolve(target)


def decode_inputs(
    stage, payload: Any, preprocess: Callable | None = None, arity: int | None = None
) -> list[torch.Tensor]:
    """The stage's input tensors from a request's JSON input, checked against the declared signature."""
    if preprocess is not None:
        try:
            made = preprocess(payload)
        except (KeyError, TypeError, ValueError) as err:
            raise StageError(
                f"stage {stage.name}: preprocess rejected the input: {type(err).__name__}: {err}", 422
            ) from None
        return list(made) if isinstance(made, (list, tuple)) else [made]
    specs = stage.inputs
    if not specs:  # signature from the problem file: a list of positional inputs
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
            raise StageError(f'stage {stage.name}: expected {{"inputs": [...]}} with {arity} positional input(s)', 422)
        return [_tensor(stage.name, f"inputs[{i}]", v, None) for i, v in enumerate(payload["inputs"])]
    if not isinstance(payload, dict):
        names = ", ".join(s.name for s in specs)
        raise StageError(
            f"stage {stage.name}: expected a JSON object with field(s) {names}, got {type(payload).__name__}", 422
        )
    missing = [s.name for s in specs if s.name not in payload]
    if missing:
        raise StageError(
            f"stage {stage.name}: missing input(s) {', '.join(missing)} (fields present: {', '.join(map(str, payload)) or 'none'})",
            422,
        )
    tensors, sizes = [], {}
    for spec in specs:
        t = _tensor(stage.name, spec.name, payload[spec.name], DTYPES[spec.dtype])
        if t.dim() != len(spec.shape):
            raise StageError(
                f"stage {stage.name}, input {spec.name}: expected {len(spec.shape)} dimensions {_shape(spec.shape)}, "
                f"got shape {list(t.shape)}",
                422,
            )
        for dim, (want, got) in enumerate(zip(spec.shape, t.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise StageError(
                    f"stage {stage.name}, input {spec.name}: dimension {dim} must be {want} {_shape(spec.shape)}, "
                    f"got shape {list(t.shape)}",
                    422,
                )
            if isinstance(want, str):
                if sizes.setdefault(want, (got, spec.name))[0] != got:
                    raise StageError(
                        f"stage {stage.name}, input {spec.name}: dimension {want} is {got} here but "
                        f"{sizes[want][0]} in input {sizes[want][1]}",
                        422,
                    )
        tensors.append(t)
    return tensors


def _tensor(stage: str, name: str, value: Any, dtype: torch.dtype | None) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise StageError(f"stage {stage}, input {name}: not a rectangular array of numbers ({err})", 422) from None
    if t.numel() > MAX_ELEMENTS:
        raise StageError(f"stage {stage}, input {name}: {t.numel()} elements, more than {MAX_ELEMENTS}", 413)
    return t


def _shape(shape: list) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def encode_output(stage, out: Any, payload: Any, postprocess: Callable | None = None) -> Any:
    """JSON for one request's output: the postprocess's answer, or {"output": lists} (+ label, scores)."""
    if postprocess is not None:
        return postprocess(out, payload)
    doc: dict = {"output": _lists(out)}
    if stage.labels and isinstance(out, torch.Tensor) and out.shape[-1] == len(stage.labels):
        scores = out.float().softmax(-1)
        best = scores.argmax(-1)
        if best.dim() == 1 and best.numel() == 1:
            doc["label"], doc["scores"] = (
                stage.labels[int(best)],
                dict(zip(stage.labels, scores[0].tolist(), strict=True)),
            )
        else:
            doc["label"] = [stage.labels[int(i)] for i in best.flatten()]
    return doc


def _lists(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().tolist() if out.is_floating_point() else out.detach().cpu().tolist()
    if isinstance(out, (list, tuple)):
        return [_lists(o) for o in out]
    return out


def group_batch(items: list[list[torch.Tensor]]) -> list[list[int]]:
    """Indices of requests that can run as one batch: same dtypes and same shapes past dimension 0."""
    groups: dict[tuple, list[int]] = {}
    for i, tensors in enumerate(items):
        key = tuple((t.dtype, tuple(t.shape[1:])) if t.dim() else (t.dtype, None) for t in tensors)
        if any(t.dim() == 0 for t in tensors):
            key = ("alone", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def run_batched(run: Callable[..., Any], items: list[list[torch.Tensor]]) -> list[Any]:
    """Outputs of `run` for each request's inputs, concatenating compatible requests along dim 0."""
    results: list[Any] = [None] * len(items)
    for group in group_batch(items):
        if len(group) == 1:
            results[group[0]] = run(*items[group[0]])
            continue
        sizes = [items[i][0].shape[0] for i in group]
        merged = [torch.cat([items[i][k] for i in group]) for k in range(len(items[group[0]]))]
        out = run(*merged)
        parts = _split(out, sizes)
        if parts is None:  # the output does not follow the batch dimension: run one by one
            for i in group:
                results[i] = run(*items[i])
        else:
            for i, part in zip(group, parts, strict=True):
                results[i] = part
    return results


def _split(out: Any, sizes: list[int]) -> list[Any] | None:
    total = sum(sizes)
    if isinstance(out, torch.Tensor):
        return list(out.split(sizes)) if out.dim() and out.shape[0] == total else None
    if isinstance(out, (list, tuple)):
        pieces = [_split(o, sizes) for o in out]
        if any(p is None for p in pieces):
            return None
        return [
            type(out)(p[i] for p in pieces) if isinstance(out, tuple) else [p[i] for p in pieces]
            for i in range(len(sizes))
        ]
    return None
