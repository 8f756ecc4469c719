"""`hetforge registry ...`: the state store itself: check it, back it up, restore it, start it fresh."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID, EXIT_USAGE, RegistryOpt

app = typer.Typer(
    help="The registry's store: check, back up, restore, reset (SQLite file or $HETFORGE_STATE_URL).",
    no_args_is_help=True,
)


def _fail(err: Exception, code: int = EXIT_INVALID) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(code)


@app.command("check")
def registry_check(
    registry: RegistryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")] = False,
) -> None:
    """Open the registry (checking an SQLite file's integrity) and print its schema versions and row counts."""
    from hetforge.kernels.registry import Registry
    from hetforge.serving.jobs import JobBoard
    from hetforge.serving.rollout import RolloutBoard
    from hetforge.serving.swap_control import SwapBoard
    from hetforge.state import StoreError, redact

    try:
        reg = Registry(registry)
        for board in (SwapBoard, JobBoard, RolloutBoard):
            board(reg.path)
        store = reg.store
        versions = {
            r[0]: int(r[1])
            for r in store.execute("SELECT component, MAX(version) FROM schema_migrations GROUP BY component")
        }
        counts = {
            table: int(store.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("variants", "jobs", "rollouts", "rollout_events", "swap_requests")
        }
    except StoreError as err:
        raise _fail(err) from None
    out = {"backend": store.kind, "location": redact(str(reg.path)), "schema": versions, "rows": counts}
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{out['backend']} {out['location']}: ok")
    typer.echo("schema: " + ", ".join(f"{k} v{v}" for k, v in sorted(versions.items())))
    typer.echo("rows: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command("backup")
def registry_backup(
    registry: RegistryOpt = None,
    to: Annotated[
        Optional[Path], typer.Option(help="Folder for the backups (default: `backups` beside the file).")
    ] = None,
    keep: Annotated[int, typer.Option(min=1, help="Backups kept in the folder, newest first.")] = 24,
    every: Annotated[
        Optional[float], typer.Option(min=1.0, help="Back up every this many seconds until interrupted.")
    ] = None,
) -> None:
    """Back up the SQLite registry online (SQLite's backup API: serving carries on meanwhile)."""
    from hetforge.state import StoreError, location_of
    from hetforge.state.backup import backup

    location = location_of(registry)
    while True:
        try:
            out = backup(location, to, keep)
            typer.echo(f"backed up {location} to {out}")
        except StoreError as err:
            if every is None:
                raise _fail(err) from None
            typer.echo(f"error: {err}", err=True)  # a scheduled run reports and tries again next time
        if every is None:
            return
        time.sleep(every)


@app.command("restore")
def registry_restore(
    backup_file: Annotated[Path, typer.Argument(help="A backup written by `hetforge registry backup`.")],
    registry: RegistryOpt = None,
) -> None:
    """Put a backup in place of the registry (stop the deployments that use it first); the current file is kept aside."""
    from hetforge.state import StoreError, forget, location_of
    from hetforge.state.backup import restore

    location = location_of(registry)
    try:
        aside = restore(location, backup_file)
    except StoreError as err:
        raise _fail(err, EXIT_USAGE if not Path(backup_file).exists() else EXIT_INVALID) from None
    forget(location)
    typer.echo(f"restored {location} from {backup_file}" + (f"; the replaced file is {aside}" if aside else ""))


@app.command("reset")
def registry_reset(
    registry: RegistryOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: start with an empty registry.")] = False,
) -> None:
    """Start fresh on purpose: the current SQLite file (if any) is moved aside and an empty registry created."""
    from hetforge.kernels.registry import Registry
    from hetforge.state import StoreError, forget, location_of
    from hetforge.state.backup import reset

    location = location_of(registry)
    if not yes:
        typer.echo(
            f"error: this starts {location} empty (its variants, jobs and rollouts stay in the file moved aside); "
            "add --yes to confirm",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    try:
        aside = reset(location)
        forget(location)
        Registry(location)
    except StoreError as err:
        raise _fail(err) from None
    typer.echo(f"started {location} fresh" + (f"; the previous file is {aside}" if aside else ""))
