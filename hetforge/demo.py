"""`hetforge demo`: the main job on the embedded default (local, CPU), as far as hetforge goes today.

1. validate the example pipelines,
2. build each pipeline's graph and profile its model stages on this machine,
3. compute each pipeline's critical path and its hottest model stage,
4. apply the graph rewrites to each hot model stage's own instance, verify every rewritten
   variant against its reference (isolated workers, fresh inputs, interleaved timing), and store
   the accepted ones in the kernel registry,
5. deploy the document pipeline on Ray Serve (a local instance: the embedded default), send it
   traffic, show per-stage latency and the variant each stage serves, hot-swap the classifier
   between its reference and the registered variant while traffic flows, print before/after,
   and stop everything it started.
Re-optimization in the background joins this story with its issue.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hetforge.kernels.registry import Registry
from hetforge.optimizer.problem import Problem
from hetforge.optimizer.variants import VariantSpec
from hetforge.optimizer.rewrites import apply_rewrites, rewrite_candidate_source
from hetforge.optimizer.verify import VerifyOptions, verify
from hetforge.planners.graph import PipelineGraph
from hetforge.spec import ModelStage, load_pipeline

REPO = Path(__file__).resolve().parents[1]


def profile_model_stage(stage: ModelStage, base_dir: Path, repeats: int = 5) -> float:
    """Median ms per call of a model stage on the CPU, on its problem file's inputs."""
    problem = Problem(file=str(base_dir / stage.problem_file), init_args=tuple(stage.init_args or ()), init_kwargs=stage.init_kwargs).load()
    model = problem.build(seed=stage.seed)
    inputs = problem.main_inputs(seed=0)
    times = []
    with torch.inference_mode():
        model(*inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_demo(examples: Path = REPO / "examples", console: Console | None = None) -> int:
    console = console or Console(soft_wrap=True)
    pipelines = sorted(examples.glob("*.yaml"))
    console.rule("[bold]1. validate the example pipelines")
    loaded = []
    for path in pipelines:
        pipeline = load_pipeline(path)
        loaded.append((path, pipeline))
        console.print(f"[green]ok[/] {path.relative_to(REPO)}: {pipeline.name}, {len(pipeline.stages)} stages")

    console.rule("[bold]2. graph and profile (model stages measured on this CPU)")
    hot: list[tuple[float, Path, ModelStage]] = []
    table = Table("pipeline", "critical path", "model ms on path", "hottest model stage")
    for path, pipeline in loaded:
        graph = PipelineGraph(pipeline)
        costs = {s.name: profile_model_stage(s, path.parent) for s in pipeline.stages if isinstance(s, ModelStage)}
        critical = graph.critical_path(costs)
        on_path = {n: costs[n] for n in critical.stages if n in costs}
        name = max(on_path, key=on_path.get) if on_path else "-"
        if on_path:
            hot.append((on_path[name], path, pipeline.stage(name)))
        table.add_row(pipeline.name, " -> ".join(critical.stages), f"{critical.length:.1f}", f"{name} ({on_path.get(name, 0):.1f} ms)")
    console.print(table)
    console.print("LLM and tool stages are not profiled yet (they join with serving), so they count 0 ms here.")
    console.print(PipelineGraph(loaded[0][1]).to_mermaid())

    console.rule("[bold]3. rewrite the hot stages, verify, register")
    registry = Registry()
    verified = 0
    done: set[str] = set()
    for _, path, stage in sorted(hot, key=lambda h: -h[0]):
        reference = path.parent / stage.problem_file
        problem = Problem(file=str(reference), init_args=tuple(stage.init_args or ()), init_kwargs=stage.init_kwargs)
        if problem.load().fingerprint() in done:  # the same model in another example pipeline: one variant serves both
            continue
        done.add(problem.load().fingerprint())
        rewritten = apply_rewrites(problem.load().build(seed=stage.seed))
        if rewritten is None or not rewritten[1]:
            console.print(f"{stage.name}: no graph rewrite applies" + (" (not traceable by torch.fx)" if rewritten is None else ""))
            continue
        applied = rewritten[1]
        with tempfile.TemporaryDirectory(prefix="hetforge-demo-") as scratch:
            candidate = Path(scratch) / f"{stage.name}_rewritten.py"
            candidate.write_text(rewrite_candidate_source(str(reference), list(applied)))
            console.print(f"{stage.name}: rewrites {applied}; verifying against {reference.relative_to(REPO)} ...")
            verdict = verify(problem, candidate, VerifyOptions(device="cpu", trials=3, rounds=3))
        colour = "green" if verdict.accepted else "red"
        console.print(f"  verdict: [bold {colour}]{verdict.verdict}[/] in {verdict.elapsed_s:.1f} s; max abs err "
                      f"{max((t.max_abs_err for t in verdict.trials), default=float('nan')):.2e} over {len(verdict.trials)} fresh-input trials")
        for reason in verdict.reasons:
            console.print(f"  [red]{reason.kind}[/]: {reason.message}")
        if not verdict.accepted:
            continue
        console.print(f"  reference {verdict.reference_ms:.2f} ms, variant {verdict.candidate_ms:.2f} ms: [bold]{verdict.speedup:.2f}x[/] on {verdict.device}")
        fingerprint = problem.load().fingerprint()
        variant = registry.add(fingerprint=fingerprint, device_class="cpu", precision=stage.precision, name="+".join(applied),
                               agent="rewrites", source=rewrite_candidate_source(str(reference), list(applied)),
                               verdict=verdict.to_dict(), recipe=VariantSpec(rewrites=tuple(applied)).to_json())
        if verdict.speedup < 1.02:
            console.print("  (not faster on this CPU: registered anyway, so that step 5 can show the swap; "
                          "`hetforge optimize` registers only variants at least 1.02x faster)")
        best = registry.best(fingerprint, "cpu", stage.precision)
        console.print(f"  variant {variant.id} stored as {variant.status} in {registry.path}; serving would use: "
                      + (f"{best.name} ({best.speedup:.2f}x)" if best else "the reference (the variant waits for review)"))
        verified += 1
    served = serve_and_swap(examples / "document_pipeline.yaml", console)
    return 0 if verified and served else 1


def _page_request(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    texts = ["Invoice 2026-01-31 total 1,250.00 due 2026-02-28", "Dear team, the meeting moves to Friday.",
             "Receipt 2026-03-02 coffee 4.50 cake 3.20", "Form A-12: name, address, signature"]
    return {"input": {"pages": torch.rand(1, 3, 64, 64, generator=g).tolist(), "text": texts[i % len(texts)]}}


def _traffic(url: str, n: int, start: int = 0) -> tuple[dict[str, list[float]], list[float], list[str]]:
    """n requests, 2 at a time: per-stage ms, end-to-end ms, error messages."""
    import concurrent.futures

    import httpx

    def one(i: int):
        t = time.perf_counter()
        reply = httpx.post(url, json=_page_request(i), timeout=120)
        return reply, (time.perf_counter() - t) * 1e3

    stages: dict[str, list[float]] = {}
    total, errors = [], []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for reply, ms in pool.map(one, range(start, start + n)):
            if reply.status_code != 200:
                errors.append(reply.text[:200])
                continue
            total.append(ms)
            for name, stage_ms in reply.json()["stages"].items():
                stages.setdefault(name, []).append(stage_ms)
    return stages, total, errors


def serve_and_swap(pipeline_file: Path, console: Console, requests: int = 24) -> bool:
    """Step 5: deploy, traffic, per-stage latency, hot-swap under traffic, before/after; True when it all worked."""
    import socket
    import threading

    import httpx

    from hetforge.serving import deploy as dep

    console.rule(f"[bold]5. serve {pipeline_file.relative_to(REPO)} on Ray Serve (local), send traffic, hot-swap")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    record = dep.deploy(pipeline_file, port=port)
    ok = True
    try:
        dep.wait_until_running(record)
        console.print(f"deployed in {time.perf_counter() - start:.0f} s at {record.url} "
                      f"(metrics for Prometheus at {record.url}/metrics)")
        run_url = f"{record.url}/v1/pipelines/{record.pipeline}/run"
        status = httpx.get(f"{record.url}/v1/pipelines/{record.pipeline}/status", timeout=30).json()["stages"]
        stages, total, errors = _traffic(run_url, requests)
        table = Table("stage", "device", "serves", "calls", "p50 ms", title=f"{requests} requests, 2 at a time")
        for name, info in status.items():
            times = stages.get(name, [])
            table.add_row(name, info.get("device", ""), info.get("active_variant", ""), str(len(times)),
                          f"{statistics.median(times):.1f}" if times else "-")
        console.print(table)
        console.print(f"end to end: p50 {statistics.median(total) if total else float('nan'):.0f} ms over {len(total)} requests, "
                      f"{len(errors)} errors" + (f"; first: {errors[0]}" if errors else ""))
        if not total:
            return False
        ok = not errors

        classify = status["classify"]["active_variant"]
        if not classify.startswith("variant:"):
            console.print("classify serves its reference: no registered variant to swap to (step 3 accepted none)")
            return ok
        variant = classify.split(":")[1]
        rows = []
        for target in ("reference", variant):  # swap away from the variant, then back, each under traffic
            background: list = []
            load = threading.Thread(target=lambda: background.append(_traffic(run_url, 8, start=1000)))
            load.start()
            reply = httpx.post(f"{record.url}/v1/pipelines/{record.pipeline}/stages/classify/swap",
                               json={"variant": target, "wait_s": 60}, timeout=120).json()
            load.join()
            during_errors = background[0][2] if background else ["no traffic"]
            after, _, after_errors = _traffic(run_url, requests, start=2000)
            outcome = ", ".join(f"{r['replica']}: {r['outcome']}" for r in reply.get("reports", [])) or reply.get("error", {}).get("message", "")
            console.print(f"swap classify -> {target}: {outcome}; {len(during_errors)} failed requests during the swap")
            rows.append((target, statistics.median(after.get("classify", [float("nan")]))))
            ok = ok and reply.get("ok", False) and not during_errors and not after_errors
        table = Table("classify serves", "p50 ms", title="before / after (hot-swapped, no replica restarted)")
        for target, ms in rows:
            table.add_row("reference" if target == "reference" else f"variant {target}", f"{ms:.2f}")
        console.print(table)
        ref_ms, var_ms = rows[0][1], rows[1][1]
        console.print(f"classify: {ref_ms / var_ms:.2f}x with the variant (2-core CPU; stage time includes batching waits)")
    finally:
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
        dep.state_path(record.pipeline).unlink(missing_ok=True)
        console.print("stopped the deployment and the local Ray instance")
    return ok
