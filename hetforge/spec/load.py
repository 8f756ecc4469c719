"""Load a pipeline file: safe YAML, then the schema, then references and the graph, all errors located."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path as FsPath

from pydantic import BaseModel, ValidationError

from hetforge import config
from hetforge.spec import models
from hetforge.spec.errors import Diagnostic, Path, Problem, SpecError, message
from hetforge.spec.graph import graph_problems
from hetforge.spec.models import Pipeline
from hetforge.spec.references import check_references
from hetforge.spec.yaml_source import SourceMap, YamlError, decode, parse


class SpecIOError(Exception):
    """The pipeline file cannot be read at all (missing, a directory, no permission)."""


def read_limited(path: str | FsPath) -> bytes:
    """The bytes of a spec file, refusing files over the size limit; SpecIOError if unreadable."""
    path = FsPath(path)
    limit = config.spec_max_bytes()
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise SpecIOError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > limit:
        raise SpecError(
            [
                Diagnostic(
                    str(path),
                    1,
                    1,
                    f'Got "more than {limit} bytes" for the document: a file of at most {limit} bytes (HETFORGE_SPEC_MAX_BYTES).',
                )
            ]
        )
    return data


def load_pipeline(path: str | FsPath, check_graph: bool = True) -> Pipeline:
    """The validated pipeline in `path`; SpecError with every located error, SpecIOError if unreadable."""
    data = read_limited(path)
    return load_bytes(data, str(path), FsPath(path).resolve().parent, check_graph)


def load_document(data: bytes, file: str, root: type[BaseModel]) -> tuple[BaseModel, SourceMap]:
    """Any spec document: safe YAML, then the schema of `root`; SpecError with every located error."""
    try:
        raw, source, yaml_errors = parse(decode(data))
    except YamlError as err:
        raise SpecError([err.diagnostic(file)]) from None
    diagnostics = [err.diagnostic(file) for _, err in yaml_errors]
    broken = [p for p, _ in yaml_errors]
    if not isinstance(raw, dict):
        line, col = source.locate(())
        diagnostics.append(Diagnostic(file, line, col, message(Problem((), raw, "a mapping"))))
        raise SpecError(diagnostics)
    try:
        document = root.model_validate(raw)
    except ValidationError as err:
        problems = [p for p in _problems(err, source, root) if not any(p.path[: len(b)] == b for b in broken)]
        raise SpecError(diagnostics + locate(problems, source, file)) from None
    if diagnostics:
        raise SpecError(diagnostics)
    return document, source


def load_bytes(
    data: bytes, file: str = "<string>", base_dir: FsPath | None = None, check_graph: bool = True
) -> Pipeline:
    """Validate a pipeline document; `base_dir` resolves relative files (None skips file checks)."""
    pipeline, source = load_document(data, file, Pipeline)
    problems = check_references(pipeline, base_dir)
    if not problems and check_graph:
        problems = graph_problems(pipeline)
    if problems:
        raise SpecError(locate(problems, source, file))
    return pipeline.set_stage_lines(
        {stage.name: f"{file}:{source.locate(('stages', i))[0]}" for i, stage in enumerate(pipeline.stages)}
    )


def locate(problems: list[Problem], source: SourceMap, file: str) -> list[Diagnostic]:
    out = []
    for problem in problems:
        line, col = source.locate(problem.path, problem.at_key)
        out.append(Diagnostic(file, line, col, message(problem)))
    return out


_PATTERN_RULES = {
    models.NAME_PATTERN: models.NAME_RULE,
    models.IMPORT_PATTERN: "an import path, `package.module:attr` or `file.py:attr`",
}


_TYPE_RULES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "none_required": "nothing",
}
_BOUND_RULES = {
    "greater_than": "a number greater than {gt}",
    "greater_than_equal": "a number of at least {ge}",
    "less_than": "a number less than {lt}",
    "less_than_equal": "a number of at most {le}",
    "string_too_long": "text of at most {max_length} characters",
    "string_too_short": "text of at least {min_length} characters",
    "too_long": "at most {max_length} items",
    "too_short": "at least {min_length} items",
}


def _problems(err: ValidationError, source: SourceMap, root: type[BaseModel]) -> list[Problem]:
    """pydantic's errors as document problems; several union branches failing at one place become one."""
    by_path: dict[tuple[Path, bool], tuple[object, list[tuple[str, str]]]] = {}
    for e in err.errors(include_url=False):
        kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
        path = _document_path(e["loc"], source, keep_last=kind in ("missing", "extra_forbidden"))
        at_key = False
        if kind == "missing":
            value, must = None, "a value is required here"
        elif kind == "extra_forbidden":
            at_key, value = True, path[-1]
            must = _unknown_field(root, tuple(e["loc"][:-1]), str(path[-1]))
        elif kind == "stage_kind":
            path = path + ("kind",)
            value = value.get("kind") if isinstance(value, dict) else value
            must = (
                "a stage kind: model, llm or tool"
                if isinstance(value, str) or value is None
                else "a mapping with a kind"
            )
        elif kind == "string_pattern_mismatch":
            must = _PATTERN_RULES.get(ctx.get("pattern"), f"text matching {ctx.get('pattern')}")
        elif kind in ("literal_error", "enum"):
            must = "one of " + str(ctx.get("expected", "")).replace("'", "")
        elif kind in _TYPE_RULES:
            must = _TYPE_RULES[kind]
        elif kind in _BOUND_RULES:
            must = _BOUND_RULES[kind].format(**ctx)
        else:
            must = e["msg"].removeprefix("Value error, ").removeprefix("Input should be ").removeprefix("Input ")
        value_and_musts = by_path.setdefault((path, at_key), (value, []))
        if (kind, must) not in value_and_musts[1]:
            value_and_musts[1].append((kind, must))
    problems = []
    for (path, at_key), (value, musts) in by_path.items():
        # A union reports one error per branch: when some branch got past the type check, its
        # complaint is the useful one ("min_replicas must not exceed max_replicas", not "an integer").
        specific = [m for k, m in musts if k not in _TYPE_RULES] or [m for _, m in musts]
        problems.append(Problem(path, value, " or ".join(dict.fromkeys(specific)), at_key))
    return problems


def _document_path(loc: tuple, source: SourceMap, keep_last: bool) -> Path:
    """The document path of a pydantic location: drops the union-branch names pydantic inserts."""
    path: Path = ()
    for i, part in enumerate(loc):
        if path + (part,) in source.values or (keep_last and i == len(loc) - 1):
            path = path + (part,)
    return path


def _unknown_field(root: type[BaseModel], loc: tuple, name: str) -> str:
    model = _model_at(root, loc)
    if model is None:
        return "not a known field here"
    fields = sorted(f.alias or n for n, f in model.model_fields.items())
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f'; did you mean "{close[0]}"?' if close else f"; the fields are {', '.join(fields)}"
    return "not a field of " + _describe(model) + hint


def _describe(model: type[BaseModel]) -> str:
    kind = model.model_fields.get("kind")
    if kind is not None and typing.get_args(kind.annotation):
        return f"a {typing.get_args(kind.annotation)[0]} stage"
    title = model.model_config.get("title")
    return title or {"Pipeline": "a pipeline"}.get(model.__name__, model.__name__)


_TAGGED = {"<model>": models.ModelStage, "<llm>": models.LlmStage, "<tool>": models.ToolStage}


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that validated the value at pydantic location `loc`."""
    current: object = root
    for part in loc:
        if isinstance(part, str) and part in _TAGGED:
            current = _TAGGED[part]
            continue
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            fields = {(f.alias or n): f for n, f in current.model_fields.items()}
            current = fields[part].annotation if part in fields else None
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: object) -> object:
    """Strip Annotated and Optional; a union with exactly one model member becomes that model."""
    for _ in range(8):
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            found = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(found) == 1 or len(members) == 1:
                tp = (found or members)[0]
                continue
        return tp
    return tp
