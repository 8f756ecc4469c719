"""`hetforge demo`: the whole story on the embedded default (local Ray, SQLite, this CPU).

1. validate the example pipelines;
2. plan `examples/page_triage.yaml`: profile its stages on this machine, place them, find the
   critical path and the hot stage;
3. deploy it on Ray Serve (a local Ray instance) with an empty registry of its own, and print the
   addresses: the pipeline, the built-in dashboard page, the Prometheus metrics;
4. send it traffic from two clients for the whole run and print per-stage latency;
5. let the re-optimization controller work, printing each of its decisions as it makes them: the
   stage turning hot, the optimization job (candidates verified in confined workers) and its
   winner, the shadow step, the canary steps and the promotion (a hot-swap under traffic);
6. print before/after (end to end and per stage, from the requests themselves) with the dashboard's
   address, and stop everything it started, unless `--keep` asks it to keep serving.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hetforge.config import home_dir
from hetforge.spec import load_pipeline

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "examples" / "page_triage.yaml"
TEXTS = (
    "Invoice 2026-01-31 total 1,250.00 due 2026-02-28",
    "Dear team, the meeting moves to Friday.",
    "Receipt 2026-03-02 coffee 4.50 cake 3.20",
    "Form A-12: name, address, signature",
)


@dataclass
class Traffic:
    """Closed-loop clients sending page-triage requests until stopped; every answer's timings are kept."""

    url: str
    clients: int = 2
    samples: list[tuple[float, float, dict[str, float]]] = field(default_factory=list)  # (sent at, e2e ms, stage ms)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()

    def _client(self, seed: int) -> None:
        import httpx

        gen = torch.Generator().manual_seed(seed)
        with httpx.Client(timeout=120) as http:
            i = 0
            while not self._stop.is_set():
                body = {
                    "input": {"pages": torch.rand(1, 3, 64, 64, generator=gen).tolist(), "text": TEXTS[i % len(TEXTS)]}
                }
                sent = time.time()
                try:
                    reply = http.post(self.url, json=body)
                except httpx.HTTPError as err:
                    self.errors.append(f"{type(err).__name__}: {err}"[:300])
                    continue
                if reply.status_code != 200:
                    self.errors.append(f"HTTP {reply.status_code}: {reply.text[:300]}")
                    continue
                self.samples.append((sent, (time.time() - sent) * 1e3, reply.json()["stages"]))
                i += 1

    def window(self, start: float, end: float) -> dict:
        """p50/p99 end to end and p50 per stage of the requests sent in [start, end)."""
        rows = [s for s in self.samples if start <= s[0] < end]
        e2e = sorted(ms for _, ms, _ in rows)
        stages: dict[str, list[float]] = {}
        for _, _, per_stage in rows:
            for name, ms in per_stage.items():
                stages.setdefault(name, []).append(ms)
        return {
            "requests": len(rows),
            "p50": _q(e2e, 0.5),
            "p99": _q(e2e, 0.99),
            "rps": len(rows) / max(end - start, 1e-9),
            "stages": {n: statistics.median(v) for n, v in stages.items()},
        }

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def _q(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(event: dict) -> str:
    """One line for one controller decision from the audit log."""
    n, d = event["numbers"], event["decision"]
    if d == "job":
        return f"[bold]{event['stage']}[/] is {n.get('trigger')} ({event['reason']}): optimization job {n.get('job_id')} started"
    if d == "job_done":
        if n.get("outcome") != "registered":
            return f"job {n.get('job_id')} ended: {n.get('outcome')} {event['reason']}"
        return (
            f"job {n.get('job_id')} done in {n.get('elapsed_s') or 0:.0f} s: {n.get('candidates')} candidates verified, winner "
            f"[bold]{n.get('winner')}[/], {n.get('speedup_vs_eager') or 0:.2f}x over the reference -> variant {n.get('variant_id')}"
        )
    if d in ("start", "advance", "promote", "rollback", "resume"):
        colour = {"promote": "green", "rollback": "red"}.get(d, "cyan")
        return f"[{colour}]{d}[/] variant {event['variant']} on {event['stage']}: {event['reason']}"
    return f"{d} {event['stage']}: {event['reason']}"


def _plan(pipeline_file: Path, console: Console) -> None:
    from hetforge.planners import devices
    from hetforge.planners.plan import build_plan
    from hetforge.planners.profiles import ProfileCache

    pipeline = load_pipeline(pipeline_file)
    plan = build_plan(pipeline, pipeline_file.parent, devices.local_inventory(), "latency", ProfileCache())
    table = Table(
        "stage", "kind", "device", "ms (planner)", "source", title=f"{pipeline.name}: placement on this machine"
    )
    for stage in pipeline.stages:
        p = plan.stages[stage.name]
        table.add_row(stage.name, stage.kind, p.device, f"{p.latency_ms:.2f}", p.source)
    console.print(table)
    console.print(
        f"critical path: {' -> '.join(plan.critical_path)}, predicted {plan.predicted_latency_ms:.1f} ms; "
        f"hot stages: {', '.join(plan.hot_stages) or 'none'} (tools count their default estimate until serving measures them)"
    )


def run_demo(
    examples: Path = REPO / "examples",
    console: Console | None = None,
    keep: bool = False,
    before_s: float = 20.0,
    after_s: float = 20.0,
    timeout_s: float = 480.0,
) -> int:
    """Run the story end to end (steps in the module docstring); 0 when a variant was promoted and no request failed."""
    console = console or Console(soft_wrap=True)
    started = time.monotonic()
    console.rule("[bold]1. validate the example pipelines")
    for path in sorted(examples.glob("*.yaml")):
        pipeline = load_pipeline(path)
        console.print(f"[green]ok[/] {path.relative_to(REPO)}: {pipeline.name}, {len(pipeline.stages)} stages")

    pipeline_file = examples / PIPELINE.name
    pipeline = load_pipeline(pipeline_file)
    console.rule(f"[bold]2. plan {pipeline_file.relative_to(REPO)}")
    _plan(pipeline_file, console)

    console.rule("[bold]3. deploy on Ray Serve (a local Ray instance: the embedded default)")
    from ray import serve

    from hetforge.serving import deploy as dep
    from hetforge.serving.rollout import RolloutBoard

    demo_home = home_dir() / "demo"
    shutil.rmtree(demo_home, ignore_errors=True)  # an empty registry: the story starts from the reference each time
    demo_home.mkdir(parents=True)
    registry_path = str(demo_home / "registry.sqlite")
    t0 = time.perf_counter()
    record = dep.deploy(pipeline_file, port=_free_port(), registry_path=registry_path)
    traffic = None
    ok = False
    try:
        dep.wait_until_running(record)
        console.print(
            f"deployed in {time.perf_counter() - t0:.0f} s\n  pipeline   POST {record.url}/v1/pipelines/{pipeline.name}/run\n"
            f"  dashboard  {record.url}/dashboard\n  metrics    {record.url}/metrics (for Prometheus; Grafana dashboards in dashboards/)"
        )

        console.rule(f"[bold]4. traffic: 2 clients, the whole run ({before_s:.0f} s before anything changes)")
        traffic = Traffic(f"{record.url}/v1/pipelines/{pipeline.name}/run")
        begin = time.time()
        time.sleep(before_s)
        before = traffic.window(begin + 3, time.time())  # the first seconds warm the replicas
        before_compute = _compute_p50(record)
        status = _status(record)
        table = Table(
            "stage", "device", "serves", "p50 ms", title=f"{before['requests']} requests, {before['rps']:.1f}/s"
        )
        for name, info in status.items():
            table.add_row(
                name,
                info.get("device_class", info.get("device", "")),
                info.get("active_variant", ""),
                f"{before['stages'].get(name, float('nan')):.1f}",
            )
        console.print(table)
        console.print(
            f"end to end: p50 {before['p50']:.1f} ms, p99 {before['p99']:.1f} ms; {len(traffic.errors)} errors"
        )

        console.rule(
            "[bold]5. re-optimization: the controller watches, optimizes the hot stage, canaries and promotes it"
        )
        board = RolloutBoard(registry_path)
        seen, promoted, ended = 0, None, None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and promoted is None and ended is None:
            time.sleep(1)
            for event in board.events(pipeline.name, limit=1000):
                if event["id"] <= seen:
                    continue
                seen = event["id"]
                console.print(f"[dim]{time.time() - begin:5.0f} s[/]  {_describe(event)}")
                if event["decision"] == "promote":
                    promoted = event
                elif event["decision"] == "rollback" or (
                    event["decision"] == "job_done" and event["numbers"].get("outcome") != "registered"
                ):
                    ended = event
        if promoted is None:
            console.print(
                "[red]no variant was promoted[/]" + (f": {ended['reason']}" if ended else f" within {timeout_s:.0f} s")
            )
            return 1

        console.rule("[bold]6. before / after")
        mark = time.time() + 3  # the swap has reached every replica
        time.sleep(3 + after_s)
        after = traffic.window(mark, time.time())
        after_compute = _compute_p50(record)
        traffic.stop()
        status = _status(record)
        table = Table(
            "",
            "before",
            "after",
            "speedup",
            title=f"{pipeline.name}: {before['requests']} requests before, {after['requests']} after",
        )
        table.add_row(
            "end to end p50 ms", f"{before['p50']:.1f}", f"{after['p50']:.1f}", f"{before['p50'] / after['p50']:.2f}x"
        )
        table.add_row(
            "end to end p99 ms", f"{before['p99']:.1f}", f"{after['p99']:.1f}", f"{before['p99'] / after['p99']:.2f}x"
        )
        for name in status:
            b, a = before["stages"].get(name), after["stages"].get(name)
            if b and a:
                table.add_row(
                    f"{name} p50 ms ({status[name].get('active_variant', '')})", f"{b:.1f}", f"{a:.1f}", f"{b / a:.2f}x"
                )
        for name in status:
            b, a = before_compute.get(name), after_compute.get(name)
            if b and a and name in _model_stages(pipeline):
                table.add_row(f"{name} compute p50 ms (replica metric)", f"{b:.2f}", f"{a:.2f}", f"{b / a:.2f}x")
        console.print(table)
        console.print(
            "(a stage's time in the request includes batching waits and Ray Serve hops; its compute is the module alone, "
            "from hetforge_stage_latency_seconds over the last 10 s)"
        )
        errors = traffic.errors
        console.print(
            f"{len(traffic.samples)} requests served during the whole run, {len(errors)} failed"
            + (f"; first: {errors[0]}" if errors else "")
            + f"; hot -> promoted in {promoted['at'] - _first_job_at(board, pipeline.name):.0f} s"
        )
        console.print(f"dashboard: {record.url}/dashboard  (the same panels for Grafana: dashboards/hetforge.json)")
        console.print(
            f"audit log and variants: hetforge kernels list; HETFORGE_HOME={home_dir()} (registry {registry_path})"
        )
        ok = not errors
        if keep:
            console.print("[bold]--keep[/]: serving until Ctrl-C")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        if traffic is not None:
            traffic.stop()
        serve.shutdown()
        import ray

        ray.shutdown()
        dep.state_path(record.pipeline).unlink(missing_ok=True)
        console.print(
            f"stopped the deployment and the local Ray instance; the demo took {time.monotonic() - started:.0f} s"
        )
    return 0 if ok else 1


def _status(record) -> dict:
    import httpx

    return httpx.get(f"{record.url}/v1/pipelines/{record.pipeline}/status", timeout=30).json()["stages"]


def _compute_p50(record) -> dict[str, float]:
    """Per-stage p50 of the stage call itself (the replica's metric, last 10 s), from the dashboard's numbers."""
    import httpx

    latest = httpx.get(f"{record.url}/v1/pipelines/{record.pipeline}/dashboard", timeout=30).json()["latest"] or {}
    return latest.get("stage_p50_ms", {})


def _model_stages(pipeline) -> set[str]:
    return {s.name for s in pipeline.stages if s.kind == "model"}


def _first_job_at(board, pipeline: str) -> float:
    return next(e["at"] for e in board.events(pipeline, limit=1000) if e["decision"] == "job")
