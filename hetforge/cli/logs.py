"""`hetforge logs`: a deployment's log files, read from Ray's log folder of its instance on this machine.

Serve writes one file per replica, `<session>/logs/serve/replica_<pipeline>_stage-<stage>_<id>.log`, plus
its controller's and proxy's; `hetforge serve` and `hetforge status` print the folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID


def logs(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name (as `hetforge status` lists it).", show_default=False)],
    stage: Annotated[Optional[str], typer.Option(help="Only this stage's replicas.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing lines as they are written.")] = False,
    lines: Annotated[int, typer.Option(min=0, help="Lines to show from the end of each file first.")] = 50,
) -> None:
    """Print the log files of a served pipeline's replicas (all stages, or one), each under its file name.

    Exit 0, or 1 when no deployment of PIPELINE is recorded or it has no log files on this machine.
    """
    from hetforge.serving.deploy import load_state
    from hetforge.serving.ray_instance import log_files

    records = load_state(pipeline)
    if not records:
        typer.echo(f"error: no deployment of {pipeline} is recorded (hetforge status lists them)", err=True)
        raise typer.Exit(EXIT_INVALID)
    record = records[0]
    if stage is not None and stage not in record.placement:
        typer.echo(f"error: {pipeline} has no stage {stage!r} (its stages: {', '.join(record.placement)})", err=True)
        raise typer.Exit(EXIT_INVALID)
    files = log_files(record.session_dir, pipeline, stage)
    if not files:
        where = f"{record.session_dir}/logs/serve" if record.session_dir else "Ray's log folder (not recorded)"
        typer.echo(f"error: no log file of {pipeline}{' stage ' + stage if stage else ''} in {where}", err=True)
        raise typer.Exit(EXIT_INVALID)
    offsets = {}
    for path in files:
        typer.echo(f"==> {path} <==")
        data = path.read_bytes()
        tail = data.decode(errors="replace").splitlines()[-lines:] if lines else []
        for line in tail:
            typer.echo(line)
        offsets[path] = len(data)
    if follow:
        _follow(offsets, lambda: log_files(record.session_dir, pipeline, stage))


def _follow(offsets: dict[Path, int], listing) -> None:
    """Print what is appended to the files (and files that appear, such as a restarted replica's) until Ctrl-C."""
    last = None
    try:
        while True:
            for path in listing():
                start = offsets.get(path, 0)
                try:
                    with path.open("rb") as fh:
                        fh.seek(start)
                        chunk = fh.read()
                except OSError:
                    continue
                if not chunk:
                    continue
                if last != path:
                    typer.echo(f"==> {path} <==")
                    last = path
                typer.echo(chunk.decode(errors="replace"), nl=False)
                offsets[path] = start + len(chunk)
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
