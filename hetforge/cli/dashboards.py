"""`hetforge dashboards`: write the Grafana dashboards and their provisioning files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def dashboards(
    out: Annotated[Path, typer.Option(help="Folder for the dashboard JSON and Grafana's provisioning files.")] = Path(
        "dashboards"
    ),
    configmap: Annotated[
        Optional[Path], typer.Option(help="Also write them as a Kubernetes ConfigMap manifest here.")
    ] = None,
) -> None:
    """Write the Grafana dashboards (generated from hetforge.serving.dashboards) and their provisioning files."""
    from hetforge.serving import dashboards as gen

    for path in gen.write(out):
        typer.echo(f"wrote {path}")
    if configmap is not None:
        configmap.parent.mkdir(parents=True, exist_ok=True)
        configmap.write_text(gen.configmap())
        typer.echo(f"wrote {configmap}")
