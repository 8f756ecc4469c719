"""`hetforge demo`: the end-to-end story on the embedded default (the story itself is `hetforge.demo`)."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep serving (and the dashboard page up) until Ctrl-C.")
    ] = False,
) -> None:
    """The whole story on the embedded default (local Ray, SQLite, CPU): plan and deploy an example pipeline,
    send it traffic, let hetforge find the hot stage, optimize, canary and hot-swap it, print before/after."""
    from hetforge.demo import run_demo

    raise typer.Exit(run_demo(keep=keep))
