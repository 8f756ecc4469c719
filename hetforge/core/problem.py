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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from hetforge.core.files import file_digest
from hetforge.core.hf import HfSource, HfStageModule, fingerprint_source, make_inputs, model_folder


class ProblemError(Exception):
    """A problem or candidate file cannot be loaded or lacks what the convention requires."""


def load_module_file(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a Python file as a fresh module (not cached under its path)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemError(f"{path}: no such file")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = name or f"hetforge_problem_{path.stem}_{digest}"
    importable(path.parent)  # a file may import modules beside it
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


DYNAMIC_DIM_SIZES = {"batch": 1}  # sizes of named dimensions when a declared signature makes inputs
DEFAULT_DYNAMIC_SIZE = 128  # any other named dimension (seq, tokens, ...)


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a module stage: a shape with named dynamic dimensions, and a dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def make(self, sizes: dict[str, int] | None = None) -> torch.Tensor:
        """A random tensor of this signature (named dimensions from `sizes`, else the defaults), drawn from
        torch's global generator: floats standard normal, integers 0 or 1 (masks, small ids)."""
        sizes = {**DYNAMIC_DIM_SIZES, **(sizes or {})}
        shape = [d if isinstance(d, int) else sizes.get(d, DEFAULT_DYNAMIC_SIZE) for d in self.shape]
        dtype = getattr(torch, self.dtype)
        if dtype.is_floating_point:
            return torch.randn(shape).to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape).bool()
        return torch.randint(0, 2, shape, dtype=dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Problem:
    """A reference computation: how to build the module and how to make inputs. Three forms:

    - `file`: a problem file (Model, get_inputs, get_init_inputs);
    - `factory` + `inputs`: import paths of a function returning the nn.Module and of a function
      returning a list of input tensors;
    - `module` + `signature`: the team's own nn.Module class (`package.module:Class` or
      `file.py:Class` relative to `base_dir`), its constructor arguments, an optional `weights`
      checkpoint (safetensors, or a torch state_dict loaded with weights_only=True), and the declared
      inputs from which random inputs are made.

    The folders of `base_dir` and of a problem or module file are importable while loading, so a file
    may import a module that sits beside it.
    """

    file: str | None = None
    factory: str | None = None
    inputs: str | None = None
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    module: str | None = None
    base_dir: str | None = None
    signature: tuple[InputSpec, ...] = ()
    weights: str | None = None
    hf: HfSource | None = None
    buckets: tuple[tuple[tuple[str, int], ...], ...] = ()  # sizes of named dimensions per serving bucket

    def __post_init__(self):
        forms = (
            (self.file is not None)
            + (self.factory is not None or self.inputs is not None)
            + (self.module is not None)
            + (self.hf is not None)
        )
        if forms != 1 or ((self.factory is None) != (self.inputs is None)):
            raise ProblemError(
                "a Problem needs exactly one of: a problem `file`; both `factory` and `inputs` import paths; "
                "a `module` class with its input `signature`; or a HuggingFace model (`hf`)"
            )
        if self.module is not None and not self.signature:
            raise ProblemError(f"module {self.module}: a module needs its declared input signature")

    def to_json(self) -> dict:
        def absolute(path):  # workers run in their own scratch folders
            return str(Path(path).resolve()) if path else None

        return {
            "file": absolute(self.file),
            "factory": self.factory,
            "inputs": self.inputs,
            "init_args": list(self.init_args),
            "init_kwargs": dict(self.init_kwargs),
            "module": self.module,
            "base_dir": absolute(self.base_dir),
            "signature": [s.to_json() for s in self.signature],
            "weights": absolute(self._path(self.weights)) if self.weights else None,
            "hf": self.hf.to_json() if self.hf else None,
            "buckets": [dict(b) for b in self.buckets],
        }

    @classmethod
    def from_json(cls, doc: dict) -> Problem:
        signature = tuple(
            InputSpec(s["name"], tuple(s["shape"]), s.get("dtype", "float32")) for s in doc.get("signature") or ()
        )
        hf = HfSource.from_json(doc["hf"]) if doc.get("hf") else None
        buckets = tuple(tuple(sorted(b.items())) for b in doc.get("buckets") or ())
        return cls(
            doc.get("file"),
            doc.get("factory"),
            doc.get("inputs"),
            tuple(doc.get("init_args") or ()),
            dict(doc.get("init_kwargs") or {}),
            doc.get("module"),
            doc.get("base_dir"),
            signature,
            doc.get("weights"),
            hf,
            buckets,
        )

    def _path(self, rel: str) -> Path:
        path = Path(rel)
        return path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path

    def load(self) -> LoadedProblem:
        """Import the problem's code (trusted: this is the user's reference, not a candidate)."""
        if self.base_dir is not None:
            importable(self.base_dir)
        if self.file is not None:
            module = load_module_file(self.file)
            for name in ("Model", "get_inputs", "get_init_inputs"):
                if not hasattr(module, name):
                    raise ProblemError(f"{self.file}: a problem file must define {name}")
            init = list(self.init_args) if self.init_args else list(module.get_init_inputs())
            model_class, source = self._with_checkpoint(module.Model, Path(self.file).read_text())
            return LoadedProblem(
                model_class=model_class,
                get_inputs=module.get_inputs,
                get_variants=getattr(module, "get_input_variants", lambda: []),
                init_args=init,
                init_kwargs=dict(self.init_kwargs),
                source=source,
            )
        if self.module is not None:
            return self._load_module()
        if self.hf is not None:
            return self._load_hf()
        factory, inputs = resolve(self.factory), resolve(self.inputs)
        return LoadedProblem(factory, inputs, lambda: [], list(self.init_args), dict(self.init_kwargs), source="")

    def _load_module(self) -> LoadedProblem:
        location, _, attr = self.module.partition(":")
        if location.endswith(".py"):
            code = load_module_file(self._path(location))
            if not hasattr(code, attr):
                raise ProblemError(f"{location} defines no {attr}")
            cls = getattr(code, attr)
        else:
            cls = resolve(self.module)
        model_class, source = self._with_checkpoint(cls, module_source(cls))
        signature, (first, *rest) = self.signature, self._bucket_sizes()

        def get_inputs(sizes: dict = first) -> list[torch.Tensor]:
            return [spec.make(sizes) for spec in signature]

        return LoadedProblem(
            model_class,
            get_inputs,
            lambda: [get_inputs(b) for b in rest],
            list(self.init_args),
            dict(self.init_kwargs),
            source,
        )

    def _load_hf(self) -> LoadedProblem:
        try:
            folder = model_folder(self.hf.model, self.base_dir)
        except Exception as err:  # noqa: BLE001 - HfError, or the hub library's own errors: one message either way
            raise ProblemError(str(err)) from None
        hf, (first, *rest) = self.hf, self._bucket_sizes()
        kwargs = {
            "model_dir": str(folder),
            "task": hf.task,
            "pooling": hf.pooling,
            "normalize": hf.normalize,
            "dtype": hf.dtype,
        }

        def get_inputs(sizes: dict = first) -> list[torch.Tensor]:
            return make_inputs(hf, folder, batch=sizes.get("batch", 1), seq=sizes.get("seq"))

        return LoadedProblem(
            HfStageModule, get_inputs, lambda: [get_inputs(b) for b in rest], [], kwargs, fingerprint_source(folder, hf)
        )

    def _with_checkpoint(self, cls, source: str) -> tuple:
        """`cls` as a constructor that loads `weights` (when given), and `source` extended by the checkpoint's
        digest: a new checkpoint is another reference, so its variants are keyed apart."""
        if not self.weights:
            return cls, source
        weights = self._path(self.weights)
        if not weights.is_file():
            raise ProblemError(f"{weights}: no such weights file")
        return _with_weights(cls, weights), source + f"\0weights sha256 {file_digest(weights)}"

    def _bucket_sizes(self) -> list[dict]:
        """Sizes of named dimensions for the main input set, then for each other serving bucket."""
        return [dict(b) for b in self.buckets] or [{}]


def importable(folder: str | Path) -> None:
    """Put `folder` on the import path (once), so code in it can import modules beside it."""
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


def module_source(cls: type) -> str:
    """The source the registry keys a module class by: the file defining it, and the files of the
    classes it is built from (its bases and its nn.Module attributes' classes are not known before it
    is built, so its whole defining file and every base's file count)."""
    files = []
    for klass in getattr(cls, "__mro__", (cls,)):
        module = sys.modules.get(getattr(klass, "__module__", ""))
        path = getattr(module, "__file__", None)
        if path and path not in files and not path.startswith(_TORCH_DIR):
            files.append(path)
    parts = [f"{cls.__module__}.{cls.__qualname__}"]
    for path in files:
        try:
            parts.append(Path(path).read_text())
        except (OSError, UnicodeDecodeError):
            parts.append(path)
    return "\0".join(parts)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint into `module` strictly: safetensors, else a torch state_dict read with weights_only=True
    (no pickled code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: only checkpoints in this format need it

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file is the user's to fix
            raise ProblemError(f"{path}: not a state_dict torch.load(weights_only=True) can read: {err}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ProblemError(f"{path} does not fit {type(module).__name__}: {str(err).splitlines()[0]}") from None


def _with_weights(cls: type, weights: Path):
    """A constructor that builds `cls` and loads `weights` into it."""

    def build(*args, **kwargs):
        module = cls(*args, **kwargs)
        load_weights(module, weights)
        return module

    build.__name__ = build.__qualname__ = cls.__name__
    return build


_TORCH_DIR = str(Path(torch.__file__).resolve().parent.parent)  # site-packages: torch's own and other installed bases


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

    def build(
        self, cls: Callable[..., torch.nn.Module] | None = None, seed: int = 0, device: str = "cpu"
    ) -> torch.nn.Module:
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
