"""`hetforge serve`, `status`, `down` and `swap`: deployments on Ray Serve and their variants.

Everything from `hetforge.serving` (and so ray) is imported inside the commands: the CLI starts
without ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID, EXIT_USAGE, load_spec, located
from hetforge.cli.render import print_table

PipelineNameArg = Annotated[Optional[str], typer.Argument(help="Pipeline name; default: every recorded deployment.")]


def serve(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)],
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster address; default: start Ray locally (the embedded default).")
    ] = None,
    host: Annotated[str, typer.Option(help="HTTP host of the ingress.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port of the ingress.")] = 8000,
    timeout_s: Annotated[float, typer.Option(min=1, help="Seconds to wait for every replica to come up.")] = 600,
) -> None:
    """Deploy a pipeline on Ray Serve where the planner places its stages, and serve it.

    With no --address, Ray runs in this process and the pipeline is served until Ctrl-C, SIGTERM or
    `hetforge down`; with --address the deployment stays on the cluster and the command returns.
    Exit 0 served, 1 invalid pipeline or failed deployment, 2 usage error.
    """
    from hetforge.planners.plan import PlanError
    from hetforge.serving import deploy as dep

    spec = load_spec(pipeline)
    base_dir = pipeline.resolve().parent
    try:
        dep.check_servable(spec, base_dir)
        running = dep.running_deployment(spec.name)
        if running is not None:  # one deployment per pipeline: a second one would share its port and its record
            raise dep.DeployError(dep.already_served_message(running, pipeline))
        if address is None and dep.port_in_use(host, port):
            raise dep.DeployError(dep.busy_port_message(host, port))
        placement, notes = dep.placement_for(spec, base_dir, address=address)
    except dep.DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except (ValueError, PlanError, RuntimeError) as err:
        for line in str(err).splitlines():
            typer.echo(located(pipeline, line), err=True)
        raise typer.Exit(EXIT_INVALID) from None
    for name, where in placement.items():
        typer.echo(f"{name}: {where['device_class']} {where['ray_actor_options']}")
    for note in notes:
        typer.echo(f"note: {note}")
    try:
        record = dep.deploy(pipeline, address=address, host=host, port=port, placement=placement)
    except dep.DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        dep.wait_until_running(record, timeout_s)
    except RuntimeError as err:
        typer.echo(f"error: {err}", err=True)
        dep.state_path(record.pipeline).unlink(missing_ok=True)
        raise typer.Exit(EXIT_INVALID) from None
    dep.record_processes(record)
    typer.echo(
        f"serving {record.pipeline} at {record.url}/v1/pipelines/{record.pipeline}/run (metrics {record.url}/metrics)"
    )
    if record.session_dir:
        typer.echo(f"logs: {record.session_dir}/logs (hetforge logs {record.pipeline})")
    if record.cores:
        from hetforge.serving import cpu_cores

        typer.echo(f"cpu: {cpu_cores.describe(record.cores['engines'], record.cores['rest'])}")
        cpu_cores.pin_process(record.cores["rest"])  # this process serves too: off the engines' cores
    if address is not None:
        return
    backups = _backups(record.registry_path)
    wait_for_stop()
    if backups is not None:
        backups.stop()
    import ray
    from ray import serve as ray_serve

    ray_serve.shutdown()
    ray.shutdown()
    dep.state_path(record.pipeline).unlink(missing_ok=True)
    typer.echo(f"stopped {record.pipeline}")


def _backups(registry_path: str):
    """Regular online backups of an SQLite registry while this process serves (a PostgreSQL one has its own tools)."""
    from hetforge.config import registry_backup_s
    from hetforge.state import is_url
    from hetforge.state.backup import Schedule

    every = registry_backup_s()
    if is_url(registry_path) or every == 0:
        return None
    return Schedule(registry_path, every, keep=24).start()


def reload(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file of a served pipeline.", show_default=False)],
    timeout_s: Annotated[float, typer.Option(min=1, help="Seconds to wait for the new replicas to come up.")] = 600,
) -> None:
    """Update a served pipeline in place from its changed YAML: changed stages are redeployed, the others kept.

    A redeployed stage's new replicas start before its old ones stop, so requests keep being answered.
    Exit 0 updated, 1 invalid pipeline, not served, or new replicas that failed to start.
    """
    from hetforge.planners.plan import PlanError
    from hetforge.serving import deploy as dep

    load_spec(pipeline)
    try:
        record, changed, kept = dep.reload(pipeline, timeout_s)
    except dep.DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except (ValueError, PlanError) as err:
        for line in str(err).splitlines():
            typer.echo(located(pipeline, line), err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except RuntimeError as err:  # new replicas that did not start: one located line each (`wait_until_running`)
        for line in str(err).splitlines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(f"redeployed: {', '.join(changed) or 'nothing (no change)'}")
    typer.echo(f"kept: {', '.join(kept) or 'nothing'}")
    typer.echo(f"reloaded {record.pipeline} at {record.url}")


def wait_for_stop() -> None:
    """Block until SIGTERM or Ctrl-C."""
    import signal
    import time

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def status(
    pipeline: PipelineNameArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")] = False,
) -> None:
    """Deployments: every replica of every stage, its state, device and active variant.

    Exit 0 when every deployment shown is reachable, 1 when one is not (or none is recorded for PIPELINE).
    """
    from hetforge.serving.deploy import status as get_status

    found = get_status(pipeline)
    ok = all(d["reachable"] for d in found) and (bool(found) or pipeline is None)
    if as_json:
        typer.echo(json.dumps({"deployments": found}, default=str))
        raise typer.Exit(0 if ok else EXIT_INVALID)
    if not found:
        typer.echo("no deployment recorded" + (f" for {pipeline}" if pipeline else ""))
        raise typer.Exit(0 if ok else EXIT_INVALID)
    for d in found:
        rows = []
        for name, st in d["stages"].items():
            shown = st.get("active_variant", st.get("error", ""))
            for r in st.get("replicas") or [{"replica": st.get("replica", "-"), "state": "", "pid": ""}]:
                rows.append(
                    (
                        name,
                        st.get("planned", ""),
                        st.get("device", ""),
                        str(r.get("active_variant") or shown),
                        str(r["replica"]),
                        str(r["state"]),
                        str(r.get("pid") or ""),
                    )
                )
        print_table(
            ("stage", "planned", "device", "active variant", "replica", "state", "pid"),
            rows,
            title=f"{d['pipeline']} at {d['url']}: {d['state']}",
        )
        if d.get("log_dir"):
            typer.echo(f"logs: {d['log_dir']}")
    raise typer.Exit(0 if ok else EXIT_INVALID)


def down(pipeline: PipelineNameArg = None) -> None:
    """Stop deployments: delete them from Serve, or stop the embedded serving process and what its Ray left."""
    from hetforge.serving.deploy import down as stop

    stopped = stop(pipeline)
    for name, what in stopped:
        typer.echo(f"{name}: {what}")
    typer.echo("stopped: " + (", ".join(name for name, _ in stopped) if stopped else "nothing recorded"))


def swap(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.", show_default=False)],
    stage: Annotated[str, typer.Argument(help="Stage name.", show_default=False)],
    variant: Annotated[str, typer.Argument(help='Registry variant id, or "reference".', show_default=False)],
    wait_s: Annotated[float, typer.Option(min=0, help="Seconds to wait for the replicas' reports.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="The reports as one JSON object on the last line.")] = False,
) -> None:
    """Hot-swap a stage's variant on every replica, each checking it on its own live inputs first.

    A missing, unapproved or mismatched variant is refused before anything is sent.
    Exit 0 when every reporting replica swapped, 1 when one refused or none answered in time.
    """
    recorded = deployment(pipeline)
    if recorded is None:  # the swap reaches replicas through their deployment (its API publishes the stage config)
        typer.echo(
            f"error: no deployment of {pipeline} is recorded on this machine (hetforge status); "
            f"run the swap where it was served, or POST /v1/pipelines/{pipeline}/stages/{stage}/swap to its API",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    request_id, reports = swap_through_api(recorded.url, pipeline, stage, variant, wait_s)
    doc = {
        "request_id": request_id,
        "stage": stage,
        "variant": variant,
        "reports": [{"replica": r.replica, "outcome": r.outcome, "reason": r.reason} for r in reports],
    }
    ok = bool(reports) and all(r.outcome == "swapped" for r in reports)
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        for r in reports:
            typer.echo(f"{r.replica}: {r.outcome}{': ' + r.reason if r.reason else ''}")
        if not reports:
            typer.echo(
                f"no replica of {pipeline}/{stage} answered within {wait_s:g} s (request {request_id} stays pending)"
            )
    raise typer.Exit(0 if ok else EXIT_INVALID)


def swap_through_api(url: str, pipeline: str, stage: str, variant: str, wait_s: float):
    """Ask a recorded deployment's HTTP API for the swap: (request id, its `SwapReport`s); exit 2 if unreachable,
    1 if refused."""
    import httpx

    from hetforge.serving.ingress.auth import client_headers
    from hetforge.serving.swap_control import SwapReport

    try:
        reply = httpx.post(
            f"{url}/v1/pipelines/{pipeline}/stages/{stage}/swap",
            json={"variant": variant, "wait_s": wait_s},
            headers=client_headers(),  # an admin route: the API token of this machine (HETFORGE_API_TOKEN or its file)
            timeout=wait_s + 30,
        )
    except httpx.HTTPError as err:
        typer.echo(f"error: {url} unreachable: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    doc = reply.json()
    if "error" in doc:
        typer.echo(f"error: {doc['error']['message']}", err=True)
        raise typer.Exit(EXIT_INVALID)
    request_id = doc["request_id"]
    return request_id, [SwapReport(request_id, r["replica"], r["outcome"], r["reason"]) for r in doc["reports"]]


def deployment(pipeline: str):
    """The recorded deployment of `pipeline`, or None when none (or an unreadable one) is recorded."""
    from hetforge.serving.deploy import load_state

    try:
        found = load_state(pipeline)
    except (OSError, ValueError, TypeError):
        return None
    return found[0] if found else None
