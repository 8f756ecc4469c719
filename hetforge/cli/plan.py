"""`hetforge plan`: profile the stages, place the pipeline on the devices, rank its hot stages."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID, EXIT_USAGE, load_spec, located


class Objective(StrEnum):
    latency = "latency"
    throughput = "throughput"


def plan(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)],
    cluster: Annotated[
        Optional[Path], typer.Option(help="A declared cluster YAML to plan for (default: this machine).")
    ] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Plan for a running Ray cluster at this address.")] = None,
    objective: Annotated[
        Objective, typer.Option(help="Minimize end-to-end latency, or maximize throughput under the p99 target.")
    ] = Objective.latency,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as one JSON object on the last line.")
    ] = False,
    measure_hops: Annotated[
        bool,
        typer.Option(
            "--measure-hops",
            help="Measure the Ray Serve hop cost on this machine first (starts a local Ray, about 20 s) and cache it "
            "for tool placement.",
        ),
    ] = False,
) -> None:
    """Profile every stage on every device and place the pipeline; rank its hot stages.

    Exit 0 planned, 1 invalid input or no feasible placement, 2 usage or I/O error.
    """
    from hetforge.planners import devices
    from hetforge.planners.plan import PlanError, build_plan
    from hetforge.planners.profiles import ProfileCache
    from hetforge.spec.cluster import load_cluster
    from hetforge.spec.stages import import_stage_functions

    spec = load_spec(pipeline)
    if cluster is not None:
        inventory = devices.cluster_inventory(load_spec(cluster, load_cluster))
    elif ray_address is not None:
        try:
            inventory = devices.ray_inventory(ray_address)
        except (RuntimeError, ConnectionError) as err:
            typer.echo(f"error: --ray-address {ray_address}: {err}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
    else:
        inventory = devices.local_inventory()
    if measure_hops:
        from hetforge.serving.hop_probe import measure_and_cache

        hop_ms, where = measure_and_cache()
        typer.echo(f"Ray Serve hop on this machine: {hop_ms:.2f} ms (cached in {where})", err=as_json)
    try:
        functions = import_stage_functions(spec, pipeline.resolve().parent)
        if functions:
            raise PlanError(functions)
        result = build_plan(spec, pipeline.resolve().parent, inventory, objective.value, ProfileCache())
    except PlanError as err:
        for message in err.messages:
            typer.echo(located(pipeline, message), err=True)
        raise typer.Exit(EXIT_INVALID) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), separators=(",", ":")))
        return
    print_plan(result, f"{result.pipeline} on {inventory.source} ({objective.value})")


def print_plan(result, title: str) -> None:
    """A plan as a table of stages, then its critical path, hot stages and notes."""
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "device", "latency ms", "source", "memory GiB", "replicas", title=title)
    for name, stage in result.stages.items():
        table.add_row(
            name, stage.device, f"{stage.latency_ms:.3f}", stage.source, f"{stage.memory_gib:.3f}", str(stage.replicas)
        )
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(
        f"critical path: {' -> '.join(result.critical_path)}  predicted {result.predicted_latency_ms:.2f} ms, "
        f"{result.throughput_rps:.1f} req/s ({'exact' if result.exact else 'heuristic'})"
    )
    console.print(
        "hot stages: "
        + (", ".join(f"{n} (-{result.hot_stage_savings_ms[n]:.2f} ms at 2x)" for n in result.hot_stages) or "none")
    )
    for name, stage in result.stages.items():
        if stage.hop:
            console.print(f"tool {name}: {stage.hop} ({stage.hop_reason})")
    for note in result.notes:
        console.print(f"[yellow]note[/] {note}")
