"""`hetforge optimize`: search for a faster variant of a problem, write it and report.json, register it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hetforge.cli.common import (
    EXIT_INVALID,
    EXIT_USAGE,
    STARTED,
    Device,
    names,
    require_device,
    require_file,
)
from hetforge.cli.render import print_leaderboard
from hetforge.core.precision import Precision


def optimize(
    problem: Annotated[
        Path, typer.Argument(help="Problem file (Model, get_inputs, get_init_inputs).", show_default=False)
    ],
    device: Annotated[
        Device, typer.Option(help="Target device: candidates are verified and timed there.")
    ] = Device.cpu,
    precision: Annotated[Precision, typer.Option(help="Numerics the variant may use.")] = Precision.STRICT,
    budget_s: Annotated[
        float, typer.Option(min=1, help="Wall-time budget in seconds: every check and timing ends within it.")
    ] = 60.0,
    agents: Annotated[
        str,
        typer.Option(
            help="Comma-separated agents: recipes, rewrites, library, llm (llm needs HETFORGE_LLM_BASE_URL and HETFORGE_LLM_MODEL)."
        ),
    ] = "recipes,rewrites,library,llm",
    hint: Annotated[str, typer.Option(help="A human hint: goes into every LLM prompt and the report.")] = "",
    llm_agents: Annotated[
        int, typer.Option(min=1, max=3, help="LLM swarm size (one strategy each: fuse, reexpress, tile).")
    ] = 3,
    llm_turns: Annotated[
        int, typer.Option(min=1, max=10, help="Answers per LLM conversation (first try, then repairs).")
    ] = 3,
    recipes: Annotated[
        str, typer.Option(help="Only these compiler recipes (comma-separated names; eager always runs).")
    ] = "",
    compose: Annotated[
        bool, typer.Option(help="Round 2: join the round-1 winners (rewrites, library, compile) into one variant.")
    ] = True,
    trials: Annotated[
        int, typer.Option(min=1, max=20, help="Correctness trials per candidate, each on fresh inputs.")
    ] = 3,
    rounds: Annotated[
        int, typer.Option(min=1, max=20, help="Timing rounds per candidate (interleaved with the reference).")
    ] = 3,
    out: Annotated[Path, typer.Option(help="Folder for the best variant (a candidate file) and report.json.")] = Path(
        "hetforge-out"
    ),
    interactive: Annotated[bool, typer.Option(help="Ask before keeping a variant flagged needs_review.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")] = False,
) -> None:
    """Search for a faster implementation of a problem: every candidate verified on the target device.

    Writes the best variant as a candidate file plus report.json, and registers it.
    Exit 0 with a winner, 1 without one, 2 usage error.
    """
    from rich.console import Console

    from hetforge.optimizer.supervisor import OptimizeTask
    from hetforge.optimizer.supervisor import optimize as run_optimize

    require_file(problem)
    require_device(device)
    policy = precision.value
    console = Console(soft_wrap=True, stderr=as_json)
    task = OptimizeTask(
        str(problem),
        device.value,
        policy,
        budget_s,
        names(agents),
        hint,
        llm_agents=llm_agents,
        llm_turns=llm_turns,
        recipes=names(recipes),
        compose=compose,
        trials=trials,
        rounds=rounds,
    )
    records_so_far: list = []

    def progress_and_keep(record) -> None:
        records_so_far.append(record)
        shown = f"{record.speedup:.3f}x" if record.verdict is not None and record.verdict.speedup else "-"
        colour = {"accepted": "green", "rejected": "red", "needs_review": "yellow"}.get(record.status, "white")
        console.print(
            f"round {record.round} [{colour}]{record.status:>12}[/] {shown:>9}  {record.name}  {record.note[:120]}",
            highlight=False,
        )

    def approve(record) -> bool:
        if not interactive:
            return False
        print_leaderboard(console, records_so_far + [record])
        return typer.confirm(f"{record.name} is flagged ({'; '.join(record.verdict.flags)}). Keep it?", default=False)

    def notice(text: str) -> None:
        console.print(f"[yellow]{text}[/]", highlight=False)

    try:
        report = run_optimize(task, out / "candidates", progress_and_keep, approve, notice, started=STARTED)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    out.mkdir(parents=True, exist_ok=True)
    doc = report.to_json()
    best_path = None
    if report.winner is not None:
        best_path = out / "best_variant.py"
        best_path.write_text(report.winner.source)
        doc.update(register(problem, report, device.value, policy))
        if "not_registered" in doc:
            console.print(f"[yellow]not registered[/]: {doc['not_registered']}")
    if not as_json:
        print_leaderboard(console, report.candidates)
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    summary = {
        "best_variant_path": str(best_path) if best_path else None,
        "speedup_vs_eager": report.speedup_vs_eager,
        "speedup_vs_compile": report.speedup_vs_compile,
        "winner_agent": doc["winner_agent"],
        "verdict": "accepted" if report.winner else "none",
        "report": str(out / "report.json"),
        "registered_variant": doc.get("registered_variant"),
        "not_registered": doc.get("not_registered"),
    }
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        console.print(summary)
    raise typer.Exit(0 if report.winner else EXIT_INVALID)


def register(problem: Path, report, device: str, precision: str) -> dict:
    """report.json's registration keys for the winner: `registered_variant`, else `not_registered` (why)."""
    from hetforge.core.devices import local_device_class
    from hetforge.core.problem import Problem
    from hetforge.kernels.registry import Registry
    from hetforge.optimizer.registration import register_winner

    done = register_winner(
        report,
        Registry(),
        fingerprint=Problem(file=str(problem)).load().fingerprint(),
        device_class=local_device_class(device),
        precision=precision,
    )
    if done.variant is None:
        return {"registered_variant": None, "not_registered": done.reason}
    return {"registered_variant": done.variant.id}
