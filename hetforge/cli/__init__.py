"""The `hetforge` command line: the typer app and its commands, one module per command group.

Exit codes, for every command: 0 success, 1 the input is invalid (or a verdict is negative),
2 usage or I/O error (`common`). Heavy imports happen inside commands, so that `hetforge --help`
starts without torch or ray and the optimizer's commands work on hosts without the `spec` extra.
"""

from __future__ import annotations

from hetforge.cli import common  # noqa: F401  first, since `common.STARTED` marks the start of the user's wall time

# isort: split
import sys
from typing import Annotated, Optional

import typer

from hetforge import __version__
from hetforge.cli import approvals, dashboards, demo, kernels, logs, optimize, plan, serve, spec, verify

app = typer.Typer(
    name="hetforge",
    help="Plan, optimize and serve agentic AI pipelines on heterogeneous hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hetforge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Plan, optimize and serve agentic AI pipelines on heterogeneous hardware."""


# Registration order is the order `hetforge --help` lists the commands in.
for command in (
    spec.validate,
    spec.schema,
    spec.graph,
    verify.verify,
    optimize.optimize,
    plan.plan,
    demo.demo,
    serve.swap,
    serve.serve,
    serve.reload,
    serve.status,
    logs.logs,
    serve.down,
    dashboards.dashboards,
):
    app.command()(command)
app.add_typer(kernels.app, name="kernels")
app.add_typer(approvals.app, name="approvals")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
