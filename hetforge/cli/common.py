"""What every command shares: exit codes, option types, spec loading and the device check.

Exit codes, for every command: 0 success, 1 the input is invalid (or a verdict is negative),
2 usage or I/O error.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # `optimize --budget-s` counts from here: the user's wall time, start-up included

import enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

EXIT_INVALID, EXIT_USAGE = 1, 2


class Device(enum.StrEnum):
    cpu = "cpu"
    cuda = "cuda"


def located(pipeline: Path, message: str) -> str:
    """`message` prefixed with the pipeline file, unless it already names a place in it."""
    return message if message.startswith(f"{pipeline}:") else f"{pipeline}: {message}"


def load_spec(path: Path, loader=None):
    """A validated spec file (a pipeline unless `loader` says otherwise), or exit 1 (invalid, errors
    on stderr) / 2 (unreadable)."""
    from hetforge.spec import SpecError, SpecIOError, load_pipeline

    try:
        return (loader or load_pipeline)(path)
    except SpecIOError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except SpecError as err:
        for diagnostic in err.diagnostics:
            typer.echo(str(diagnostic), err=True)
        raise typer.Exit(EXIT_INVALID) from None


def require_file(path: Path) -> None:
    """Exit 2 when `path` is not a file."""
    if not path.is_file():
        typer.echo(f"error: {path}: no such file", err=True)
        raise typer.Exit(EXIT_USAGE)


def require_device(device: Device) -> None:
    """Exit 2 when --device cuda is asked for on a machine without a CUDA device."""
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            typer.echo("error: --device cuda: no CUDA device is available here", err=True)
            raise typer.Exit(EXIT_USAGE)


def names(text: str) -> tuple[str, ...]:
    """`"a, b,"` -> `("a", "b")`: a comma-separated option as a tuple of names."""
    return tuple(a.strip() for a in text.split(",") if a.strip())


def registry_location(value: Optional[str]) -> Optional[str]:
    """--registry's value, checked: an SQLite file path or a postgresql:// URL; another URL is a usage error (exit 2)."""
    if not value:
        return None
    from hetforge.state import StoreError, location_of

    try:
        location_of(value)
    except StoreError as err:
        raise typer.BadParameter(str(err)) from None
    return value


# every command that reads or writes the registry and its boards takes it the same way
RegistryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--registry",
        callback=registry_location,
        help="The registry: an SQLite file or a postgresql:// URL (default $HETFORGE_STATE_URL, else "
        "$HETFORGE_HOME/registry.sqlite).",
    ),
]
