"""Checks that need the whole pipeline: names are unique and every reference resolves."""

from __future__ import annotations

import json
from pathlib import Path as FsPath

from hetforge.spec.code_refs import (
    PROBLEM_FILE_NAMES,
    check_constructor,
    check_hf_model,
    check_reference,
    missing_problem_names,
)
from hetforge.spec.errors import Problem
from hetforge.spec.models import LlmStage, ModelStage, Pipeline, ToolStage


def check_references(pipeline: Pipeline, base_dir: FsPath | None) -> list[Problem]:
    """Every problem with names, references and referenced files; empty when all resolve."""
    problems: list[Problem] = []
    kinds: dict[str, str] = {}
    for i, stage in enumerate(pipeline.stages):
        if stage.name in kinds:
            problems.append(
                Problem(("stages", i, "name"), stage.name, "stage names must be unique; this one is used twice")
            )
        kinds.setdefault(stage.name, stage.kind)
    known = ", ".join(sorted(kinds))

    for field in ("entry", "output"):
        name = getattr(pipeline, field)
        if name not in kinds:
            problems.append(Problem((field,), name, f"the name of a stage ({known})"))

    seen_edges: set[tuple[str, str]] = set()
    for i, edge in enumerate(pipeline.flow):
        for end, name in (("from", edge.source), ("to", edge.target)):
            if name not in kinds:
                problems.append(Problem(("flow", i, end), name, f"the name of a stage ({known})"))
        if edge.source == edge.target:
            problems.append(
                Problem(
                    ("flow", i, "to"), edge.target, "a stage cannot feed itself; use an agent loop to repeat an LLM"
                )
            )
        if (edge.source, edge.target) in seen_edges:
            problems.append(
                Problem(("flow", i), f"{edge.source} -> {edge.target}", "each edge once; this one is declared twice")
            )
        seen_edges.add((edge.source, edge.target))
        if edge.target == pipeline.entry:
            problems.append(
                Problem(
                    ("flow", i, "to"), edge.target, "an edge into the entry stage; the entry takes the request only"
                )
            )

    for i, stage in enumerate(pipeline.stages):
        if isinstance(stage, LlmStage) and stage.agent_loop is not None:
            for j, tool in enumerate(stage.agent_loop.tools):
                where = ("stages", i, "agent_loop", "tools", j)
                if tool not in kinds:
                    problems.append(Problem(where, tool, f"the name of a tool stage ({known})"))
                elif kinds[tool] != "tool":
                    problems.append(Problem(where, tool, f"a tool stage; {tool} is a {kinds[tool]} stage"))
        if stage.fallback is not None and stage.fallback.stage is not None and stage.fallback.stage not in kinds:
            problems.append(
                Problem(("stages", i, "fallback", "stage"), stage.fallback.stage, f"the name of a stage ({known})")
            )
        if stage.on_error == "skip" and stage.name == pipeline.output:
            problems.append(
                Problem(
                    ("stages", i, "on_error"),
                    "skip",
                    "fail or fallback: the output stage answers the request, so it cannot be skipped",
                )
            )
        if stage.limits.timeout_s is not None and stage.limits.timeout_s > pipeline.limits.timeout_s:
            problems.append(
                Problem(
                    ("stages", i, "limits", "timeout_s"),
                    stage.limits.timeout_s,
                    f"at most the pipeline's limits.timeout_s ({pipeline.limits.timeout_s:g})",
                )
            )
        for arg, ref in (stage.args or {}).items():
            head = ref.split(".")[0]
            if head != "request" and head not in kinds:
                problems.append(Problem(("stages", i, "args", arg), ref, f"`request` or the name of a stage ({known})"))
            elif head == stage.name:
                problems.append(Problem(("stages", i, "args", arg), ref, "a stage cannot take its own output as input"))
        if base_dir is not None:
            problems.extend(_check_files(stage, i, base_dir))
    return problems


def _check_files(stage: ModelStage | LlmStage | ToolStage, i: int, base_dir: FsPath) -> list[Problem]:
    """Files a stage names must exist and code it names must be defined there, checked without running it
    (`code_refs`); model folders of LLMs are checked at deploy time (they may be built later)."""
    problems = []
    refs: list[tuple[str, str]] = []
    if isinstance(stage, ModelStage):
        if stage.problem_file:
            path = base_dir / stage.problem_file
            if not path.is_file():
                problems.append(Problem(("stages", i, "problem_file"), stage.problem_file, _NO_FILE.format(base_dir)))
            else:
                missing = missing_problem_names(path)
                if missing:
                    problems.append(
                        Problem(
                            ("stages", i, "problem_file"),
                            stage.problem_file,
                            f"a problem file defining {', '.join(PROBLEM_FILE_NAMES)}; it lacks {', '.join(missing)}",
                        )
                    )
        if stage.module:
            refs.append(("module", "a class"))
        if stage.huggingface:
            why = check_hf_model(stage.huggingface.model, base_dir)
            if why:
                problems.append(Problem(("stages", i, "huggingface", "model"), stage.huggingface.model, why))
        if stage.weights and not (base_dir / stage.weights).is_file():
            problems.append(Problem(("stages", i, "weights"), stage.weights, _NO_FILE.format(base_dir)))
        refs += [(field, "a function") for field in ("preprocess", "postprocess") if getattr(stage, field)]
    elif isinstance(stage, ToolStage) and stage.callable:
        refs.append(("callable", "a function"))
    for field, kind in refs:
        value = getattr(stage, field)
        why = check_reference(value, base_dir, kind)
        if why:
            problems.append(Problem(("stages", i, field), value, why))
        elif field == "module":
            why = check_constructor(value, base_dir, stage.init_args, stage.init_kwargs)
            if why:
                at = "init_kwargs" if stage.init_kwargs else "init_args" if stage.init_args else "module"
                given = stage.init_kwargs or stage.init_args
                shown = json.dumps(given, separators=(", ", ": ")) if given else value
                problems.append(Problem(("stages", i, at), shown, why))
    return problems


_NO_FILE = "an existing file relative to the pipeline's folder ({})"
