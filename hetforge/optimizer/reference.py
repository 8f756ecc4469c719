"""The reference a generated candidate rebuilds: any `Problem`, carried as its JSON.

Candidate files of hetforge's own agents (recipes, rewrites, library kernels, compositions) build the
reference's instance in the worker and transform it, so the verifier judges the variant of the stage's
own instance (a module with its checkpoint, a HuggingFace model with its weights) against that same
instance. A candidate file names its reference as `Problem.to_json()`; a plain path is a problem file
(candidate files written before references were problems).
"""

from __future__ import annotations

import json
from pathlib import Path

from hetforge.core.problem import LoadedProblem, Problem

_LOADED: dict[str, LoadedProblem] = {}  # one import of a reference's code per process


def reference_doc(reference: str | Path | dict | Problem) -> dict:
    """The JSON of a reference given as a Problem, its JSON, or a problem file's path."""
    if isinstance(reference, Problem):
        return reference.to_json()
    if isinstance(reference, dict):
        return reference
    return Problem(file=str(Path(reference).resolve())).to_json()


def load_reference(reference: str | Path | dict | Problem) -> LoadedProblem:
    """The loaded reference (its code imported once per process)."""
    doc = reference_doc(reference)
    key = json.dumps(doc, sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = Problem.from_json(doc).load()
    return _LOADED[key]


def describe(reference: str | Path | dict | Problem) -> str:
    """A short name for docstrings of generated files: the problem file, module class or model folder."""
    doc = reference_doc(reference)
    return str(doc.get("file") or doc.get("module") or (doc.get("hf") or {}).get("model") or doc.get("factory"))
