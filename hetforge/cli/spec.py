"""`hetforge validate`, `schema` and `graph`: the pipeline file and its graph."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID, EXIT_USAGE, load_spec


def validate(
    pipelines: Annotated[list[Path], typer.Argument(help="Pipeline YAML files to check.", show_default=False)],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing for valid files.")] = False,
) -> None:
    """Check pipeline files; print every error as FILE:LINE:COL: message.

    Exit 0 when all are valid, 1 when any is invalid, 2 when a file cannot be read.
    """
    from hetforge.spec import SpecError, SpecIOError, load_pipeline

    worst = 0
    for path in pipelines:
        try:
            pipeline = load_pipeline(path)
        except SpecIOError as err:
            typer.echo(f"error: {err}", err=True)
            worst = max(worst, EXIT_USAGE)
            continue
        except SpecError as err:
            for diagnostic in err.diagnostics:
                typer.echo(str(diagnostic), err=True)
            worst = max(worst, EXIT_INVALID)
            continue
        if not quiet:
            typer.echo(f"{path}: ok: pipeline {pipeline.name}, {len(pipeline.stages)} stages")
    raise typer.Exit(worst)


def schema() -> None:
    """Print the JSON Schema of pipeline files (for editors' completion and checking)."""
    from hetforge.spec.models import Pipeline

    doc = Pipeline.model_json_schema(by_alias=True)
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "hetforge pipeline"
    typer.echo(json.dumps(doc, indent=2))


class GraphFormat(StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


def graph(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)],
    format: Annotated[GraphFormat, typer.Option("--format", "-f", help="Output format.")] = GraphFormat.mermaid,
    cost: Annotated[
        Optional[list[str]],
        typer.Option("--cost", help="STAGE=MS, repeatable: print the critical path under these per-stage costs."),
    ] = None,
) -> None:
    """Print the pipeline graph as Mermaid, DOT or JSON (and its critical path, given costs)."""
    from hetforge.spec.graph import PipelineGraph

    spec = load_spec(pipeline)
    g = PipelineGraph(spec)
    typer.echo({"mermaid": g.to_mermaid, "dot": g.to_dot, "json": g.to_json}[format.value]())
    if cost:
        costs = parse_costs(cost, {s.name for s in spec.stages})
        path = g.critical_path(costs)
        typer.echo(f"critical path: {' -> '.join(path.stages)} ({path.length:.3f} ms)", err=True)


def parse_costs(items: list[str], names: set[str]) -> dict[str, float]:
    """`["a=1.5", ...]` -> `{"a": 1.5}`; exit 2 on an unknown stage or a cost that is not a number >= 0."""
    costs: dict[str, float] = {}
    for item in items:
        name, _, ms = item.partition("=")
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if name not in names or value < 0:
            typer.echo(
                f'error: Got "{item}" for --cost: STAGE=MS with a stage of the pipeline and a number >= 0.', err=True
            )
            raise typer.Exit(EXIT_USAGE)
        costs[name] = value
    return costs
