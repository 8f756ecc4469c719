"""`hetforge approvals ...`: variants that background re-optimization found, waiting for a human."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID, RegistryOpt, load_spec

app = typer.Typer(help="Variants that background re-optimization found, waiting for a human.", no_args_is_help=True)
PipelineArg = Annotated[
    str,
    typer.Argument(
        help="The pipeline: its name (a recorded deployment, as `hetforge status` lists it) or its YAML file.",
        show_default=False,
    ),
]
VariantArg = Annotated[int, typer.Argument(help="Variant id.", show_default=False)]


def call(fn, *args):
    """`fn(*args)`, or exit 1 with the message of the `SwapError` it raised."""
    from hetforge.serving.swap_control import SwapError

    try:
        return fn(*args)
    except SwapError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


def pipeline_file(pipeline: str) -> Path:
    """The YAML file of `pipeline`: the path itself when it is a file, else the file the recorded deployment of that
    name was served from; exit 1 when neither."""
    path = Path(pipeline)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path  # a path, even a missing one: `load_spec` reports it as such
    from hetforge.serving.deploy import load_state

    records = load_state(pipeline) if "/" not in pipeline else []
    if not records:
        typer.echo(
            f"error: no deployment of a pipeline named {pipeline!r} is recorded (hetforge status); "
            "pass its YAML file instead",
            err=True,
        )
        raise typer.Exit(EXIT_INVALID)
    return Path(records[0].pipeline_file)


def registry_path(registry: Optional[str]) -> str:
    """The registry's location: `registry`, else the default (`kernels.registry.default_path`)."""
    from hetforge.kernels.registry import default_path

    return str(registry or default_path())


@app.command("list")
def approvals_list(
    pipeline: PipelineArg,
    registry: RegistryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on the last line.")] = False,
) -> None:
    """Variants of the pipeline's jobs that wait for approval."""
    from rich.console import Console
    from rich.table import Table

    from hetforge.serving import approvals

    rows = approvals.pending(registry_path(registry), load_spec(pipeline_file(pipeline)))
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    table = Table("variant", "stage", "job", "name", "agent", "speedup", "flags", "trigger")
    for r in rows:
        table.add_row(
            str(r["variant_id"]),
            r["stage"],
            str(r["job_id"]),
            r["name"],
            r["agent"],
            f"{r['speedup'] or 0:.3f}x",
            "; ".join(r["flags"])[:80],
            r["trigger"],
        )
    Console(soft_wrap=True).print(table if rows else "no variant waits for approval")


@app.command("show")
def approvals_show(pipeline: PipelineArg, variant_id: VariantArg, registry: RegistryOpt = None) -> None:
    """The report of a variant: speedups, flags, errors, the job's leaderboard, and its diff against the reference."""
    from hetforge.serving import approvals

    path = pipeline_file(pipeline)
    doc = call(approvals.show, registry_path(registry), load_spec(path), path.resolve().parent, variant_id)
    diff = doc.pop("diff")
    doc.pop("source")
    typer.echo(json.dumps(doc, indent=2, default=str))
    typer.echo("--- diff against the reference ---")
    typer.echo(diff)


@app.command("approve")
def approvals_approve(
    pipeline: PipelineArg,
    variant_id: VariantArg,
    by: Annotated[str, typer.Option(help="Who approves (recorded in the audit log).")] = "cli",
    hint: Annotated[str, typer.Option(help="Also start a new job for the stage with this hint.")] = "",
    registry: RegistryOpt = None,
) -> None:
    """Approve a waiting variant: the controller rolls it out (canary) on its next look."""
    from hetforge.serving import approvals

    typer.echo(
        json.dumps(
            call(approvals.approve, registry_path(registry), load_spec(pipeline_file(pipeline)), variant_id, by, hint)
        )
    )


@app.command("reject")
def approvals_reject(
    pipeline: PipelineArg,
    variant_id: VariantArg,
    by: Annotated[str, typer.Option(help="Who rejects (recorded in the audit log).")] = "cli",
    hint: Annotated[str, typer.Option(help="Start a new job for the stage with this hint.")] = "",
    registry: RegistryOpt = None,
) -> None:
    """Reject a waiting variant (kept as evidence, never served); a hint starts a new job."""
    from hetforge.serving import approvals

    typer.echo(
        json.dumps(
            call(approvals.reject, registry_path(registry), load_spec(pipeline_file(pipeline)), variant_id, by, hint)
        )
    )


@app.command("guide")
def approvals_guide(
    pipeline: PipelineArg,
    stage: Annotated[str, typer.Argument(help="The model stage.", show_default=False)],
    hint: Annotated[str, typer.Option(help="Text that goes into every agent's prompt.", show_default=False)],
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "cli",
    registry: RegistryOpt = None,
) -> None:
    """Start a new optimization job for a stage with a human's hint (the controller launches it)."""
    from hetforge.serving.jobs import queue_hint_job

    job = call(queue_hint_job, registry_path(registry), load_spec(pipeline_file(pipeline)), stage, hint, by)
    typer.echo(json.dumps({"queued_job": job.id, "stage": stage, "hint": hint}))
