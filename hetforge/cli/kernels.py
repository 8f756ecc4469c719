"""`hetforge kernels ...`: the registry of verified kernel variants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID, RegistryOpt
from hetforge.cli.render import print_table

app = typer.Typer(
    help="The registry of verified kernel variants ($HETFORGE_STATE_URL, else $HETFORGE_HOME/registry.sqlite).",
    no_args_is_help=True,
)
VariantArg = Annotated[int, typer.Argument(help="Variant id.", show_default=False)]


@app.command("list")
def kernels_list(
    fingerprint: Annotated[Optional[str], typer.Option(help="Only this stage fingerprint.")] = None,
    device_class: Annotated[Optional[str], typer.Option(help="Only this device class (cpu, H100, ...).")] = None,
    status: Annotated[
        Optional[str], typer.Option(help="Only this status: active, pending_review, canary, rejected, retired.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on the last line.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """List registered variants."""
    from hetforge.kernels.registry import Registry

    variants = Registry(registry).list(fingerprint, device_class, status)
    if as_json:
        typer.echo(json.dumps([v.summary() for v in variants], default=str))
        return
    print_table(
        ("id", "name", "agent", "device", "precision", "speedup", "status", "fingerprint"),
        (
            (
                str(v.id),
                v.name,
                v.agent,
                v.device_class,
                v.precision,
                f"{v.speedup:.3f}x" if v.speedup else "-",
                v.status,
                v.fingerprint,
            )
            for v in variants
        ),
    )


def variant_or_exit(variant_id: int, registry: str | None = None):
    """The registry's variant `variant_id`, or exit 1 with the registry's error."""
    from hetforge.kernels.registry import Registry, RegistryError

    try:
        return Registry(registry).get(variant_id)
    except RegistryError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


@app.command("show")
def kernels_show(variant_id: VariantArg, registry: RegistryOpt = None) -> None:
    """Show one variant: its metadata, verdict and source."""
    variant = variant_or_exit(variant_id, registry)
    typer.echo(json.dumps({**variant.summary(), "verdict": variant.verdict}, indent=2, default=str))
    typer.echo("--- source ---")
    typer.echo(variant.source)


@app.command("export")
def kernels_export(
    variant_id: VariantArg,
    out: Annotated[Path, typer.Option(help="Folder to write the candidate file and its metadata into.")] = Path("."),
    registry: RegistryOpt = None,
) -> None:
    """Write a variant as a candidate file (ModelNew) and a metadata JSON."""
    from hetforge.kernels.registry import Registry

    variant_or_exit(variant_id, registry)
    source, meta = Registry(registry).export(variant_id, out)
    typer.echo(f"{source}\n{meta}")


def set_status(variant_id: int, status: str, approver: str, registry: str | None = None) -> None:
    """Move a variant to `status`, recording who did it."""
    from hetforge.kernels.registry import Registry

    variant_or_exit(variant_id, registry)
    variant = Registry(registry).set_status(variant_id, status, approver)
    typer.echo(f"variant {variant.id}: {variant.status} (by {variant.approver})")


@app.command("approve")
def kernels_approve(
    variant_id: VariantArg,
    by: Annotated[str, typer.Option(help="Who approves (recorded).")] = "cli",
    registry: RegistryOpt = None,
) -> None:
    """Approve a variant that waits for review: it becomes active and can be served."""
    set_status(variant_id, "active", by, registry)


@app.command("reject")
def kernels_reject(
    variant_id: VariantArg,
    by: Annotated[str, typer.Option(help="Who rejects (recorded).")] = "cli",
    registry: RegistryOpt = None,
) -> None:
    """Reject a variant: it is kept as evidence and never served."""
    set_status(variant_id, "rejected", by, registry)
