"""The `hetforge` command line.

Exit codes, for every command: 0 success, 1 the input is invalid (or a verdict is negative),
2 usage or I/O error. Heavy imports happen inside commands, so that `hetforge --help` is fast and
the optimizer's commands work on hosts without the `spec` extra.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # `optimize --budget-s` counts from here: the user's wall time, start-up included

import json  # noqa: E402
import sys  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from hetforge import __version__
from hetforge.core.precision import Precision

app = typer.Typer(
    name="hetforge",
    help="Plan, optimize and serve agentic AI pipelines on heterogeneous hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_INVALID, EXIT_USAGE = 1, 2
REGISTER_MIN_GAIN = 1.02  # `optimize` registers a winner only this much faster than eager (noise margin)


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


def _load(path: Path, loader=None):
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


@app.command()
def validate(
    pipelines: Annotated[list[Path], typer.Argument(help="Pipeline YAML files to check.", show_default=False)],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing for valid files.")] = False,
) -> None:
    """Check pipeline files; print every error as FILE:LINE:COL: message.

    Exit 0 when all are valid, 1 when any is invalid, 2 when a file cannot be read.
    """
    from hetforge.spec import SpecError, SpecIOError, load_pipeline

    worst = 0
    for path in pipelines:
        try:
            pipeline = load_pipeline(path)
        except SpecIOError as err:
            typer.echo(f"error: {err}", err=True)
            worst = max(worst, EXIT_USAGE)
            continue
        except SpecError as err:
            for diagnostic in err.diagnostics:
                typer.echo(str(diagnostic), err=True)
            worst = max(worst, EXIT_INVALID)
            continue
        if not quiet:
            typer.echo(f"{path}: ok: pipeline {pipeline.name}, {len(pipeline.stages)} stages")
    raise typer.Exit(worst)


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files (for editors' completion and checking)."""
    from hetforge.spec.models import Pipeline

    doc = Pipeline.model_json_schema(by_alias=True)
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "hetforge pipeline"
    typer.echo(json.dumps(doc, indent=2))


class GraphFormat(str, Enum):
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


@app.command()
def graph(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)],
    format: Annotated[GraphFormat, typer.Option("--format", "-f", help="Output format.")] = GraphFormat.mermaid,
    cost: Annotated[
        Optional[list[str]],
        typer.Option("--cost", help="STAGE=MS, repeatable: print the critical path under these per-stage costs."),
    ] = None,
) -> None:
    """Print the pipeline graph as Mermaid, DOT or JSON (and its critical path, given costs)."""
    from hetforge.spec.graph import PipelineGraph

    spec = _load(pipeline)
    g = PipelineGraph(spec)
    typer.echo({"mermaid": g.to_mermaid, "dot": g.to_dot, "json": g.to_json}[format.value]())
    if cost:
        costs = _parse_costs(cost, {s.name for s in spec.stages})
        path = g.critical_path(costs)
        typer.echo(f"critical path: {' -> '.join(path.stages)} ({path.length:.3f} ms)", err=True)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Baseline(str, Enum):
    eager = "eager"
    compile = "compile"


@app.command()
def verify(
    reference: Annotated[Path, typer.Argument(help="Reference problem file (Model, get_inputs, get_init_inputs).", show_default=False)],
    candidate: Annotated[Path, typer.Argument(help="Candidate file defining ModelNew.", show_default=False)],
    device: Annotated[Device, typer.Option(help="Where to run and time both.")] = Device.cpu,
    precision: Annotated[Precision, typer.Option(help="Tolerance policy: strict fp32, or tf32 / bf16 where allowed.")] = Precision.STRICT,
    trials: Annotated[int, typer.Option(min=1, max=100, help="Correctness trials on fresh inputs.")] = 3,
    timeout: Annotated[float, typer.Option(min=1, max=3600, help="Seconds per worker request before a candidate counts as hung.")] = 60.0,
    baseline: Annotated[Baseline, typer.Option(help="Time the reference eager or under torch.compile.")] = Baseline.eager,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Timing rounds (reference and candidate interleaved).")] = 5,
    no_timing: Annotated[bool, typer.Option("--no-timing", help="Check correctness only.")] = False,
    min_speedup: Annotated[float, typer.Option(min=0, help="Reject candidates slower than this speedup (0: never).")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as one JSON object on the last line.")] = False,
    register: Annotated[Optional[str], typer.Option(help="If accepted, store the candidate in the kernel registry under this name.")] = None,
    weights_from_reference: Annotated[bool, typer.Option("--weights-from-reference", help="Load Model's state_dict into ModelNew (an agent's module variant).")] = False,
) -> None:
    """Judge a candidate kernel against its reference: correctness on fresh inputs, then speed.

    Exit 0 accepted, 1 rejected, 2 usage or I/O error.
    """
    from hetforge.core.problem import Problem
    from hetforge.optimizer.verify import VerifyOptions, verify as run_verify

    for path in (reference, candidate):
        if not path.is_file():
            typer.echo(f"error: {path}: no such file", err=True)
            raise typer.Exit(EXIT_USAGE)
    _require_device(device)
    options = VerifyOptions(device=device.value, precision=precision.value, trials=trials, timeout_s=timeout,
                            baseline=baseline.value, rounds=rounds, time=not no_timing, min_speedup=min_speedup,
                            weights_from_reference=weights_from_reference)
    result = run_verify(Problem(file=str(reference)), candidate, options)
    variant = _register(reference, candidate, register, device.value, precision.value, result.to_dict()) if register and result.accepted else None
    if as_json:
        typer.echo(result.to_json())
    else:
        _print_verdict(result)
        if variant is not None:
            typer.echo(f"registered as variant {variant.id} ({variant.status})")
    raise typer.Exit(0 if result.accepted else EXIT_INVALID)


def _require_device(device: Device) -> None:
    """Exit 2 when --device cuda is asked for on a machine without a CUDA device."""
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            typer.echo("error: --device cuda: no CUDA device is available here", err=True)
            raise typer.Exit(EXIT_USAGE)


def _names(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def _print_leaderboard(console, records) -> None:
    from rich.table import Table

    table = Table(title="candidates, fastest first")
    for col in ("candidate", "agent", "round", "status", "speedup vs eager", "note"):
        table.add_column(col)
    for r in sorted(records, key=lambda r: -r.speedup):
        table.add_row(r.name, r.agent, str(r.round), r.status, f"{r.speedup:.3f}x" if r.speedup else "-", r.note[:80])
    console.print(table)


def _register(reference: Path, candidate: Path, name: str, device: str, precision: str, verdict: dict, agent: str = "human",
              recipe: dict | None = None):
    from hetforge.kernels.registry import Registry
    from hetforge.core.devices import local_device_class
    from hetforge.core.problem import Problem

    device_class = local_device_class(device)
    return Registry().add(
        fingerprint=Problem(file=str(reference)).load().fingerprint(), device_class=device_class, precision=precision, name=name,
        agent=agent, source=candidate.read_text(), verdict=verdict, recipe=recipe or {"kind": "candidate_file", "file": candidate.name},
    )


def _print_verdict(result) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    colour = "green" if result.accepted else "red"
    console.print(f"[bold {colour}]{result.verdict}[/]" + (" [yellow](needs review)[/]" if result.needs_review else "")
                  + f"  on {result.device}, precision {result.precision}, {result.elapsed_s:.1f} s")
    for reason in result.reasons:
        console.print(f"  [red]{reason.kind}[/]: {reason.message}", highlight=False)
    for flag in result.flags:
        console.print(f"  [yellow]flag[/] {flag}", highlight=False)
    for note in result.notes:
        console.print(f"  note {note}", highlight=False)
    for trial in result.trials:
        console.print(f"  trial seed {trial.seed}: max abs err {trial.max_abs_err:.3g}, max rel err {trial.max_rel_err:.3g}")
    if result.speedup is not None:
        console.print(f"  reference {result.reference_ms:.4f} ms ({result.baseline}), candidate {result.candidate_ms:.4f} ms: "
                      f"[bold]{result.speedup:.3f}x[/]")


@app.command()
def optimize(
    problem: Annotated[Path, typer.Argument(help="Problem file (Model, get_inputs, get_init_inputs).", show_default=False)],
    device: Annotated[Device, typer.Option(help="Target device: candidates are verified and timed there.")] = Device.cpu,
    precision: Annotated[Precision, typer.Option(help="Numerics the variant may use.")] = Precision.STRICT,
    budget_s: Annotated[float, typer.Option(min=1, help="Wall-time budget in seconds: every check and timing ends within it.")] = 60.0,
    agents: Annotated[str, typer.Option(help="Comma-separated agents: recipes, rewrites, library, llm (llm needs HETFORGE_LLM_BASE_URL and HETFORGE_LLM_MODEL).")] = "recipes,rewrites,library,llm",
    hint: Annotated[str, typer.Option(help="A human hint: goes into every LLM prompt and the report.")] = "",
    llm_agents: Annotated[int, typer.Option(min=1, max=3, help="LLM swarm size (one strategy each: fuse, reexpress, tile).")] = 3,
    llm_turns: Annotated[int, typer.Option(min=1, max=10, help="Answers per LLM conversation (first try, then repairs).")] = 3,
    recipes: Annotated[str, typer.Option(help="Only these compiler recipes (comma-separated names; eager always runs).")] = "",
    compose: Annotated[bool, typer.Option(help="Round 2: join the round-1 winners (rewrites, library, compile) into one variant.")] = True,
    trials: Annotated[int, typer.Option(min=1, max=20, help="Correctness trials per candidate, each on fresh inputs.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Timing rounds per candidate (interleaved with the reference).")] = 3,
    out: Annotated[Path, typer.Option(help="Folder for the best variant (a candidate file) and report.json.")] = Path("hetforge-out"),
    interactive: Annotated[bool, typer.Option(help="Ask before keeping a variant flagged needs_review.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")] = False,
) -> None:
    """Search for a faster implementation of a problem: every candidate verified on the target device.

    Writes the best variant as a candidate file plus report.json, and registers it.
    Exit 0 with a winner, 1 without one, 2 usage error.
    """
    from rich.console import Console

    from hetforge.optimizer.supervisor import OptimizeTask, optimize as run_optimize

    if not problem.is_file():
        typer.echo(f"error: {problem}: no such file", err=True)
        raise typer.Exit(EXIT_USAGE)
    _require_device(device)
    console = Console(soft_wrap=True, stderr=as_json)
    task = OptimizeTask(str(problem), device.value, precision.value, budget_s, _names(agents), hint,
                        llm_agents=llm_agents, llm_turns=llm_turns, recipes=_names(recipes), compose=compose, trials=trials, rounds=rounds)

    def progress(record) -> None:
        shown = f"{record.speedup:.3f}x" if record.verdict and record.verdict.get("speedup") else "-"
        colour = {"accepted": "green", "rejected": "red", "needs_review": "yellow"}.get(record.status, "white")
        console.print(f"round {record.round} [{colour}]{record.status:>12}[/] {shown:>9}  {record.name}  {record.note[:120]}", highlight=False)

    def approve(record) -> bool:
        if not interactive:
            return False
        _print_leaderboard(console, records_so_far + [record])
        return typer.confirm(f"{record.name} is flagged ({'; '.join(record.verdict['flags'])}). Keep it?", default=False)

    records_so_far: list = []

    def progress_and_keep(record) -> None:
        records_so_far.append(record)
        progress(record)

    def notice(text: str) -> None:
        console.print(f"[yellow]{text}[/]", highlight=False)

    try:
        report = run_optimize(task, out / "candidates", progress_and_keep, approve, notice, started=_STARTED)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    out.mkdir(parents=True, exist_ok=True)
    doc = report.to_json()
    best_path = None
    if report.winner is not None:
        best_path = out / "best_variant.py"
        best_path.write_text(report.winner.source)
        recipe = report.winner.spec or {"kind": "module", "weights": "reference state_dict"}
        if report.winner.name == "recipe:eager" or report.winner.speedup < REGISTER_MIN_GAIN:
            # Serving would swap this in: a variant that does not beat the reference by the margin stays out.
            doc["registered_variant"] = None
            doc["not_registered"] = (f"{report.winner.name} is {report.winner.speedup:.3f}x over eager: "
                                     f"the registry takes variants at least {REGISTER_MIN_GAIN:g}x faster than the reference")
            console.print(f"[yellow]not registered[/]: {doc['not_registered']}")
        else:
            doc["registered_variant"] = _register(problem, best_path, report.winner.name, device.value, precision.value,
                                                  report.winner.verdict, agent=report.winner.agent, recipe=recipe).id
    if not as_json:
        _print_leaderboard(console, report.candidates)
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    summary = {"best_variant_path": str(best_path) if best_path else None, "speedup_vs_eager": report.speedup_vs_eager,
               "speedup_vs_compile": report.speedup_vs_compile, "winner_agent": doc["winner_agent"],
               "verdict": "accepted" if report.winner else "none", "report": str(out / "report.json"),
               "registered_variant": doc.get("registered_variant"), "not_registered": doc.get("not_registered")}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        console.print(summary)
    raise typer.Exit(0 if report.winner else EXIT_INVALID)


class Objective(str, Enum):
    latency = "latency"
    throughput = "throughput"


@app.command()
def plan(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)],
    cluster: Annotated[Optional[Path], typer.Option(help="A declared cluster YAML to plan for (default: this machine).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Plan for a running Ray cluster at this address.")] = None,
    objective: Annotated[Objective, typer.Option(help="Minimize end-to-end latency, or maximize throughput under the p99 target.")] = Objective.latency,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object on the last line.")] = False,
) -> None:
    """Profile every stage on every device and place the pipeline; rank its hot stages.

    Exit 0 planned, 1 invalid input or no feasible placement, 2 usage or I/O error.
    """
    from hetforge.planners import devices
    from hetforge.planners.plan import PlanError, build_plan
    from hetforge.planners.profiles import ProfileCache
    from hetforge.spec.cluster import load_cluster

    spec = _load(pipeline)
    if cluster is not None:
        inventory = devices.cluster_inventory(_load(cluster, load_cluster))
    elif ray_address is not None:
        try:
            inventory = devices.ray_inventory(ray_address)
        except (RuntimeError, ConnectionError) as err:
            typer.echo(f"error: --ray-address {ray_address}: {err}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
    else:
        inventory = devices.local_inventory()
    try:
        result = build_plan(spec, pipeline.resolve().parent, inventory, objective.value, ProfileCache())
    except PlanError as err:
        for message in err.messages:
            typer.echo(f"{pipeline}: {message}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), separators=(",", ":")))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "device", "latency ms", "source", "memory GiB", "replicas", title=f"{result.pipeline} on {inventory.source} ({objective.value})")
    for name, stage in result.stages.items():
        table.add_row(name, stage.device, f"{stage.latency_ms:.3f}", stage.source, f"{stage.memory_gib:.3f}", str(stage.replicas))
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"critical path: {' -> '.join(result.critical_path)}  predicted {result.predicted_latency_ms:.2f} ms, "
                  f"{result.throughput_rps:.1f} req/s ({'exact' if result.exact else 'heuristic'})")
    console.print("hot stages: " + (", ".join(f"{n} (-{result.hot_stage_savings_ms[n]:.2f} ms at 2x)" for n in result.hot_stages) or "none"))
    for note in result.notes:
        console.print(f"[yellow]note[/] {note}")


@app.command()
def demo(keep: Annotated[bool, typer.Option("--keep", help="Keep serving (and the dashboard page up) until Ctrl-C.")] = False) -> None:
    """The whole story on the embedded default (local Ray, SQLite, CPU): plan and deploy an example pipeline,
    send it traffic, let hetforge find the hot stage, optimize, canary and hot-swap it, print before/after."""
    from hetforge.demo import run_demo

    raise typer.Exit(run_demo(keep=keep))


@app.command()
def swap(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.", show_default=False)],
    stage: Annotated[str, typer.Argument(help="Stage name.", show_default=False)],
    variant: Annotated[str, typer.Argument(help='Registry variant id, or "reference".', show_default=False)],
    replicas: Annotated[int, typer.Option(min=1, help="Replica reports to wait for.")] = 1,
    wait_s: Annotated[float, typer.Option(min=0, help="Seconds to wait for the replicas' reports.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="The reports as one JSON object on the last line.")] = False,
) -> None:
    """Hot-swap a stage's variant on every replica, each checking it on its own live inputs first.

    A missing, unapproved or mismatched variant is refused before anything is sent.
    Exit 0 when every reporting replica swapped, 1 when one refused or none answered in time.
    """
    from hetforge.serving.swap_control import SwapBoard, SwapError, SwapReport, check_variant

    recorded = _deployment(pipeline)
    if recorded is not None:  # a deployment of this pipeline is recorded: ask its API (it knows the replica count)
        import httpx

        try:
            reply = httpx.post(f"{recorded.url}/v1/pipelines/{pipeline}/stages/{stage}/swap", json={"variant": variant, "wait_s": wait_s},
                               timeout=wait_s + 30)
        except httpx.HTTPError as err:
            typer.echo(f"error: {recorded.url} unreachable: {err}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        doc = reply.json()
        if "error" in doc:
            typer.echo(f"error: {doc['error']['message']}", err=True)
            raise typer.Exit(EXIT_INVALID)
        request_id = doc["request_id"]
        reports = [SwapReport(request_id, r["replica"], r["outcome"], r["reason"]) for r in doc["reports"]]
    else:
        try:
            check_variant(None, variant)
        except SwapError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(EXIT_INVALID) from None
        board = SwapBoard()
        request_id = board.request(pipeline, stage, variant)
        reports = board.wait(request_id, replicas, wait_s)
    doc = {"request_id": request_id, "stage": stage, "variant": variant,
           "reports": [{"replica": r.replica, "outcome": r.outcome, "reason": r.reason} for r in reports]}
    ok = bool(reports) and all(r.outcome == "swapped" for r in reports)
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        for r in reports:
            typer.echo(f"{r.replica}: {r.outcome}{': ' + r.reason if r.reason else ''}")
        if not reports:
            typer.echo(f"no replica of {pipeline}/{stage} answered within {wait_s:g} s (request {request_id} stays pending)")
    raise typer.Exit(0 if ok else EXIT_INVALID)


def _deployment(pipeline: str):
    from hetforge.serving.deploy import load_state

    try:
        found = load_state(pipeline)
    except (OSError, ValueError, TypeError):
        return None
    return found[0] if found else None


@app.command()
def serve(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)],
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: start Ray locally (the embedded default).")] = None,
    host: Annotated[str, typer.Option(help="HTTP host of the ingress.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port of the ingress.")] = 8000,
    timeout_s: Annotated[float, typer.Option(min=1, help="Seconds to wait for every replica to come up.")] = 600,
) -> None:
    """Deploy a pipeline on Ray Serve where the planner places its stages, and serve it.

    With no --address, Ray runs in this process and the pipeline is served until Ctrl-C, SIGTERM or
    `hetforge down`; with --address the deployment stays on the cluster and the command returns.
    Exit 0 served, 1 invalid pipeline or failed deployment, 2 usage error.
    """
    import signal
    import time

    from hetforge.planners.plan import PlanError
    from hetforge.serving import deploy as dep

    spec = _load(pipeline)
    base_dir = pipeline.resolve().parent
    try:
        dep.check_servable(spec, base_dir)
        placement, notes = dep.placement_for(spec, base_dir, address=address)
    except (ValueError, PlanError, RuntimeError) as err:
        for line in str(err).splitlines():
            typer.echo(f"{pipeline}: {line}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    for name, where in placement.items():
        typer.echo(f"{name}: {where['device_class']} {where['ray_actor_options']}")
    for note in notes:
        typer.echo(f"note: {note}")
    record = dep.deploy(pipeline, address=address, host=host, port=port, placement=placement)
    try:
        dep.wait_until_running(record, timeout_s)
    except RuntimeError as err:
        typer.echo(f"error: {err}", err=True)
        dep.state_path(record.pipeline).unlink(missing_ok=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(f"serving {record.pipeline} at {record.url}/v1/pipelines/{record.pipeline}/run (metrics {record.url}/metrics)")
    if address is not None:
        return
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    from ray import serve as ray_serve

    ray_serve.shutdown()
    dep.state_path(record.pipeline).unlink(missing_ok=True)
    typer.echo(f"stopped {record.pipeline}")


@app.command()
def status(
    pipeline: Annotated[Optional[str], typer.Argument(help="Pipeline name; default: every recorded deployment.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")] = False,
) -> None:
    """Deployments, their stages' replicas, devices and active variants."""
    from hetforge.serving.deploy import status as get_status

    found = get_status(pipeline)
    if as_json:
        typer.echo(json.dumps({"deployments": found}, default=str))
        return
    if not found:
        typer.echo("no deployment recorded" + (f" for {pipeline}" if pipeline else ""))
        return
    from rich.console import Console
    from rich.table import Table

    for d in found:
        table = Table("stage", "planned", "device", "active variant", "replica", title=f"{d['pipeline']} at {d['url']}: {d['state']}")
        for name, st in d["stages"].items():
            table.add_row(name, st.get("planned", ""), st.get("device", ""), st.get("active_variant", st.get("error", "")), st.get("replica", ""))
        Console(soft_wrap=True).print(table)


@app.command()
def down(pipeline: Annotated[Optional[str], typer.Argument(help="Pipeline name; default: every recorded deployment.")] = None) -> None:
    """Stop deployments: delete them from Serve (or stop the embedded serving process)."""
    from hetforge.serving.deploy import down as stop

    stopped = stop(pipeline)
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing recorded"))


@app.command()
def dashboards(
    out: Annotated[Path, typer.Option(help="Folder for the dashboard JSON and Grafana's provisioning files.")] = Path("dashboards"),
    configmap: Annotated[Optional[Path], typer.Option(help="Also write them as a Kubernetes ConfigMap manifest here.")] = None,
) -> None:
    """Write the Grafana dashboards (generated from hetforge.serving.dashboards) and their provisioning files."""
    from hetforge.serving import dashboards as gen

    for path in gen.write(out):
        typer.echo(f"wrote {path}")
    if configmap is not None:
        configmap.parent.mkdir(parents=True, exist_ok=True)
        configmap.write_text(gen.configmap())
        typer.echo(f"wrote {configmap}")


kernels_app = typer.Typer(help="The registry of verified kernel variants ($HETFORGE_HOME/registry.sqlite).", no_args_is_help=True)
app.add_typer(kernels_app, name="kernels")


@kernels_app.command("list")
def kernels_list(
    fingerprint: Annotated[Optional[str], typer.Option(help="Only this stage fingerprint.")] = None,
    device_class: Annotated[Optional[str], typer.Option(help="Only this device class (cpu, H100, ...).")] = None,
    status: Annotated[Optional[str], typer.Option(help="Only this status: active, pending_review, canary, rejected, retired.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on the last line.")] = False,
) -> None:
    """List registered variants."""
    from hetforge.kernels.registry import Registry

    variants = Registry().list(fingerprint, device_class, status)
    if as_json:
        typer.echo(json.dumps([v.summary() for v in variants], default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "name", "agent", "device", "precision", "speedup", "status", "fingerprint")
    for v in variants:
        table.add_row(str(v.id), v.name, v.agent, v.device_class, v.precision, f"{v.speedup:.3f}x" if v.speedup else "-", v.status, v.fingerprint)
    Console(soft_wrap=True).print(table)


def _variant_or_exit(variant_id: int):
    from hetforge.kernels.registry import Registry, RegistryError

    try:
        return Registry().get(variant_id)
    except RegistryError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


@kernels_app.command("show")
def kernels_show(variant_id: Annotated[int, typer.Argument(help="Variant id.", show_default=False)]) -> None:
    """Show one variant: its metadata, verdict and source."""
    variant = _variant_or_exit(variant_id)
    typer.echo(json.dumps({**variant.summary(), "verdict": variant.verdict}, indent=2, default=str))
    typer.echo("--- source ---")
    typer.echo(variant.source)


@kernels_app.command("export")
def kernels_export(
    variant_id: Annotated[int, typer.Argument(help="Variant id.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder to write the candidate file and its metadata into.")] = Path("."),
) -> None:
    """Write a variant as a candidate file (ModelNew) and a metadata JSON."""
    from hetforge.kernels.registry import Registry

    _variant_or_exit(variant_id)
    source, meta = Registry().export(variant_id, out)
    typer.echo(f"{source}\n{meta}")


def _set_status(variant_id: int, status: str, approver: str) -> None:
    from hetforge.kernels.registry import Registry

    _variant_or_exit(variant_id)
    variant = Registry().set_status(variant_id, status, approver)
    typer.echo(f"variant {variant.id}: {variant.status} (by {variant.approver})")


@kernels_app.command("approve")
def kernels_approve(
    variant_id: Annotated[int, typer.Argument(help="Variant id.", show_default=False)],
    by: Annotated[str, typer.Option(help="Who approves (recorded).")] = "cli",
) -> None:
    """Approve a variant that waits for review: it becomes active and can be served."""
    _set_status(variant_id, "active", by)


@kernels_app.command("reject")
def kernels_reject(
    variant_id: Annotated[int, typer.Argument(help="Variant id.", show_default=False)],
    by: Annotated[str, typer.Option(help="Who rejects (recorded).")] = "cli",
) -> None:
    """Reject a variant: it is kept as evidence and never served."""
    _set_status(variant_id, "rejected", by)


approvals_app = typer.Typer(help="Variants that background re-optimization found, waiting for a human.", no_args_is_help=True)
app.add_typer(approvals_app, name="approvals")
PipelineArg = Annotated[Path, typer.Argument(help="The pipeline YAML file.", show_default=False)]


def _approval_call(fn, *args):
    from hetforge.serving.swap_control import SwapError

    try:
        return fn(*args)
    except SwapError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


def _registry_path(registry: Optional[Path]) -> str:
    from hetforge.kernels.registry import default_path

    return str(registry or default_path())


RegistryOpt = Annotated[Optional[Path], typer.Option(help="The registry file (default $HETFORGE_HOME/registry.sqlite).")]


@approvals_app.command("list")
def approvals_list(pipeline_file: PipelineArg, registry: RegistryOpt = None,
                   as_json: Annotated[bool, typer.Option("--json", help="One JSON list on the last line.")] = False) -> None:
    """Variants of the pipeline's jobs that wait for approval."""
    from hetforge.serving import approvals

    rows = approvals.pending(_registry_path(registry), _load(pipeline_file))
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("variant", "stage", "job", "name", "agent", "speedup", "flags", "trigger")
    for r in rows:
        table.add_row(str(r["variant_id"]), r["stage"], str(r["job_id"]), r["name"], r["agent"], f"{r['speedup'] or 0:.3f}x",
                      "; ".join(r["flags"])[:80], r["trigger"])
    Console(soft_wrap=True).print(table if rows else "no variant waits for approval")


@approvals_app.command("show")
def approvals_show(pipeline_file: PipelineArg, variant_id: Annotated[int, typer.Argument(help="Variant id.", show_default=False)],
                   registry: RegistryOpt = None) -> None:
    """The report of a variant: speedups, flags, errors, the job's leaderboard, and its diff against the reference."""
    from hetforge.serving import approvals

    doc = _approval_call(approvals.show, _registry_path(registry), _load(pipeline_file), pipeline_file.resolve().parent, variant_id)
    diff = doc.pop("diff")
    doc.pop("source")
    typer.echo(json.dumps(doc, indent=2, default=str))
    typer.echo("--- diff against the reference ---")
    typer.echo(diff)


@approvals_app.command("approve")
def approvals_approve(pipeline_file: PipelineArg, variant_id: Annotated[int, typer.Argument(help="Variant id.", show_default=False)],
                      by: Annotated[str, typer.Option(help="Who approves (recorded in the audit log).")] = "cli",
                      hint: Annotated[str, typer.Option(help="Also start a new job for the stage with this hint.")] = "",
                      registry: RegistryOpt = None) -> None:
    """Approve a waiting variant: the controller rolls it out (canary) on its next look."""
    from hetforge.serving import approvals

    typer.echo(json.dumps(_approval_call(approvals.approve, _registry_path(registry), _load(pipeline_file), variant_id, by, hint)))


@approvals_app.command("reject")
def approvals_reject(pipeline_file: PipelineArg, variant_id: Annotated[int, typer.Argument(help="Variant id.", show_default=False)],
                     by: Annotated[str, typer.Option(help="Who rejects (recorded in the audit log).")] = "cli",
                     hint: Annotated[str, typer.Option(help="Start a new job for the stage with this hint.")] = "",
                     registry: RegistryOpt = None) -> None:
    """Reject a waiting variant (kept as evidence, never served); a hint starts a new job."""
    from hetforge.serving import approvals

    typer.echo(json.dumps(_approval_call(approvals.reject, _registry_path(registry), _load(pipeline_file), variant_id, by, hint)))


@approvals_app.command("guide")
def approvals_guide(pipeline_file: PipelineArg, stage: Annotated[str, typer.Argument(help="The model stage.", show_default=False)],
                    hint: Annotated[str, typer.Option(help="Text that goes into every agent's prompt.", show_default=False)],
                    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "cli", registry: RegistryOpt = None) -> None:
    """Start a new optimization job for a stage with a human's hint (the controller launches it)."""
    from hetforge.serving.controller import queue_hint_job

    job = _approval_call(queue_hint_job, _registry_path(registry), _load(pipeline_file), stage, hint, by)
    typer.echo(json.dumps({"queued_job": job.id, "stage": stage, "hint": hint}))


def _parse_costs(items: list[str], names: set[str]) -> dict[str, float]:
    costs: dict[str, float] = {}
    for item in items:
        name, _, ms = item.partition("=")
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if name not in names or value < 0:
            typer.echo(f'error: Got "{item}" for --cost: STAGE=MS with a stage of the pipeline and a number >= 0.', err=True)
            raise typer.Exit(EXIT_USAGE)
        costs[name] = value
    return costs


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
