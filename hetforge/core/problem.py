"""The stage-to-optimize abstraction: a reference computation, its inputs and its registry fingerprint.

Problems in the field's problem-file convention, and the Python API that serving and agents use.

A problem file defines `class Model(nn.Module)`, `get_inputs()` and `get_init_inputs()`, and may
define `get_input_variants()` returning extra input lists of other shapes. A candidate file defines
`class ModelNew(nn.Module)` taking the same constructor arguments.

A `Problem` is what the verifier needs of a reference, described by plain data (file paths or
import paths) so that a worker process can rebuild it without pickling code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch


class ProblemError(Exception):
    """A problem or candidate file cannot be loaded or lacks what the convention requires."""


def load_module_file(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a Python file as a fresh module (not cached under its path)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemError(f"{path}: no such file")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = name or f"hetforge_problem_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ProblemError(f"{path}: not importable as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    spec.loader.exec_module(module)
    return module


def source_fingerprint(source: str, init_args: list | tuple = (), init_kwargs: dict | None = None) -> str:
    """The registry key of a reference given as its source text and its constructor arguments."""
    doc = json.dumps([list(init_args), init_kwargs or {}], default=str, sort_keys=True)
    return hashlib.sha256(source.encode() + b"\0" + doc.encode()).hexdigest()[:24]


def resolve(target: str) -> Any:
    """The object named by `package.module:attr`."""
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ProblemError(f'Got "{target}" for an import path: package.module:attr')
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ProblemError(f"cannot import {target}: {err}") from None


@dataclass(frozen=True)
class Problem:
    """A reference computation: how to build the module and how to make inputs.

    Either `file` (problem-file convention) or `factory` + `inputs` (import paths of a function
    returning the nn.Module and of a function returning a list of input tensors).
    """

    file: str | None = None
    factory: str | None = None
    inputs: str | None = None
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.file is None) == (self.factory is None or self.inputs is None):
            raise ProblemError("a Problem needs a problem `file`, or both `factory` and `inputs` import paths")

    def to_json(self) -> dict:
        file = str(Path(self.file).resolve()) if self.file else None  # workers run in their own scratch folders
        return {"file": file, "factory": self.factory, "inputs": self.inputs,
                "init_args": list(self.init_args), "init_kwargs": dict(self.init_kwargs)}

    @classmethod
    def from_json(cls, doc: dict) -> Problem:
        return cls(doc.get("file"), doc.get("factory"), doc.get("inputs"), tuple(doc.get("init_args") or ()), dict(doc.get("init_kwargs") or {}))

    def load(self) -> LoadedProblem:
        """Import the problem's code (trusted: this is the user's reference, not a candidate)."""
        if self.file is not None:
            module = load_module_file(self.file)
            for name in ("Model", "get_inputs", "get_init_inputs"):
                if not hasattr(module, name):
                    raise ProblemError(f"{self.file}: a problem file must define {name}")
            init = list(self.init_args) if self.init_args else list(module.get_init_inputs())
            return LoadedProblem(
                model_class=module.Model,
                get_inputs=module.get_inputs,
                get_variants=getattr(module, "get_input_variants", lambda: []),
                init_args=init,
                init_kwargs=dict(self.init_kwargs),
                source=Path(self.file).read_text(),
            )
        factory, inputs = resolve(self.factory), resolve(self.inputs)
        return LoadedProblem(factory, inputs, lambda: [], list(self.init_args), dict(self.init_kwargs), source="")


@dataclass
class LoadedProblem:
    """A problem's code, imported: build modules under a seed and generate inputs under a seed."""

    model_class: Callable[..., torch.nn.Module]
    get_inputs: Callable[[], list]
    get_variants: Callable[[], list]
    init_args: list
    init_kwargs: dict
    source: str

    def fingerprint(self) -> str:
        """The registry key of this reference: its source and its effective constructor arguments."""
        return source_fingerprint(self.source, list(self.init_args), self.init_kwargs)

    def build(self, cls: Callable[..., torch.nn.Module] | None = None, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
        """`cls` (default the reference Model) constructed under `seed`, in eval mode on `device`."""
        torch.manual_seed(seed)
        module = (cls or self.model_class)(*self.init_args, **self.init_kwargs)
        return module.to(device).eval()

    def input_sets(self, seed: int, device: str = "cpu") -> list[list]:
        """The main input list and every declared variant, generated under `seed`."""
        torch.manual_seed(seed)
        sets = [self.get_inputs(), *self.get_variants()]
        return [[_to(x, device) for x in inputs] for inputs in sets]

    def main_inputs(self, seed: int, device: str = "cpu") -> list:
        """Only the main input list, under `seed`."""
        torch.manual_seed(seed)
        return [_to(x, device) for x in self.get_inputs()]


def _to(value: Any, device: str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value
