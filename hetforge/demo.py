"""`hetforge demo`: the main job on the embedded default (local, CPU), as far as hetforge goes today.

1. validate the example pipelines,
2. build each pipeline's graph and profile its model stages on this machine,
3. compute each pipeline's critical path and its hottest model stage,
4. apply the graph rewrites to each hot model stage's own instance, verify every rewritten
   variant against its reference (isolated workers, fresh inputs, interleaved timing), and store
   the accepted ones in the kernel registry.
Deployment, kernel generation and hot-swap join this story as their issues land.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hetforge.kernels.registry import Registry, source_fingerprint
from hetforge.optimizer.problem import Problem
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
    for _, path, stage in sorted(hot, key=lambda h: -h[0]):
        reference = path.parent / stage.problem_file
        problem = Problem(file=str(reference), init_args=tuple(stage.init_args or ()), init_kwargs=stage.init_kwargs)
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
        fingerprint = source_fingerprint(reference.read_text(), list(stage.init_args or ()), stage.init_kwargs)
        variant = registry.add(fingerprint=fingerprint, device_class="cpu", precision=stage.precision, name="+".join(applied),
                               agent="rewrites", source=rewrite_candidate_source(str(reference), list(applied)),
                               verdict=verdict.to_dict(), recipe={"kind": "rewrites", "rewrites": applied})
        best = registry.best(fingerprint, "cpu", stage.precision)
        console.print(f"  variant {variant.id} stored as {variant.status} in {registry.path}; serving would use: "
                      + (f"{best.name} ({best.speedup:.2f}x)" if best else "the reference (the variant waits for review)"))
        verified += 1
    return 0 if verified else 1
