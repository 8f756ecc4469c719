"""End-to-end latency of a pipeline's model stages before and after re-optimization, on the GPU host.

    python3 bench/e2e/bench_e2e_gpu.py [--budget-s 90] [--requests 300]

The GPU host has no Ray (nor pydantic), so the model stages run in process, one after the other as
the pipeline calls them: the voice-search chain of the examples, `listen` (audio encoder, voice
agent) -> `embed` (text encoder) -> `rerank` (reranker, retrieval agent), each at its problem file's
input sizes and the precision policy its pipeline file gives it. What a background job does for a
stage, this script does for each: `optimize` on the device (recipes, rewrites, library kernels),
then the winner is built from the served instance (`build_variant`) and checked against it.

Prints a table (per stage and end to end: p50/p99 before and after, winner) and writes
results_gpu.{md,json} next to this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from hetforge.core.problem import Problem  # noqa: E402
from hetforge.core.tolerance import compare  # noqa: E402
from hetforge.optimizer.supervisor import OptimizeTask, optimize  # noqa: E402
from hetforge.optimizer.variants import VariantSpec, build_module_variant, build_variant  # noqa: E402

# (stage, problem file, precision as in the example pipeline files)
STAGES = [
    ("listen", "examples/models/audio_encoder.py", "strict"),  # voice_agent.yaml
    ("embed", "examples/models/text_encoder.py", "tf32"),  # retrieval_agent.yaml
    ("rerank", "examples/models/reranker.py", "tf32"),  # retrieval_agent.yaml
]


def _flat(x):
    return [y for v in x for y in _flat(v)] if isinstance(x, (list, tuple)) else [x]


def _time_chain(modules: list, inputs: list[list[list]], warmup: int = 20) -> tuple[list[float], list[list[float]]]:
    """Per request: end-to-end ms (device events around the chain) and each stage's ms."""
    with torch.inference_mode():
        for i in range(warmup):
            for m, per_request in zip(modules, inputs):
                m(*per_request[i % len(per_request)])
        torch.cuda.synchronize()
        total, per_stage = [], [[] for _ in modules]
        n = len(inputs[0])
        for i in range(n):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(modules) + 1)]
            events[0].record()
            for k, (m, per_request) in enumerate(zip(modules, inputs)):
                m(*per_request[i])
                events[k + 1].record()
            torch.cuda.synchronize()
            total.append(events[0].elapsed_time(events[-1]))
            for k in range(len(modules)):
                per_stage[k].append(events[k].elapsed_time(events[k + 1]))
    return total, per_stage


def _q(v: list[float], q: float) -> float:
    s = sorted(v)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=90.0)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = "cuda"
    scratch = Path(tempfile.mkdtemp(prefix="hetforge-bench-e2e-gpu-"))
    served, optimized, rows = [], [], []
    inputs: list[list[list]] = []
    for name, file, precision in STAGES:
        loaded = Problem(file=str(REPO / file)).load()
        instance = loaded.build(seed=0, device=device)
        inputs.append([loaded.main_inputs(1000 + i, device) for i in range(args.requests)])
        started = time.monotonic()
        report = optimize(
            OptimizeTask(
                str(REPO / file),
                device,
                precision,
                args.budget_s,
                ("recipes", "rewrites", "library"),
                trials=2,
                rounds=3,
            ),
            scratch / name,
        )
        optimize_s = time.monotonic() - started
        winner = report.winner
        variant, note = instance, "reference kept"
        if winner is not None and winner.name != "recipe:eager" and winner.speedup >= 1.02:
            example = loaded.main_inputs(0, device)
            if winner.spec:
                variant = build_variant(instance, VariantSpec.from_json(winner.spec), example)
            else:
                import types

                module = types.ModuleType(f"variant_{name}")
                exec(compile(winner.source, f"<{name}>", "exec"), module.__dict__)
                variant = (
                    build_module_variant(module, instance, tuple(loaded.init_args), loaded.init_kwargs)
                    .to(device)
                    .eval()
                )
            with torch.inference_mode():  # the variant built from the served instance must agree with it
                for x in inputs[-1][:5]:
                    for got, want in zip(_flat(variant(*x)), _flat(instance(*x))):
                        c = compare(got.float().cpu(), want.float().cpu(), precision)
                        if not c.ok:
                            raise SystemExit(f"{name}: variant disagrees with the served instance: {c.reason}")
            note = winner.name
        served.append(instance)
        optimized.append(variant)
        rows.append(
            {
                "stage": name,
                "problem": file,
                "precision": precision,
                "winner": note,
                "verified_speedup_vs_eager": report.speedup_vs_eager,
                "speedup_vs_compile": report.speedup_vs_compile,
                "optimize_s": round(optimize_s, 1),
            }
        )
        print(f"{name}: {note} {report.speedup_vs_eager}x over eager in {optimize_s:.0f} s", flush=True)
    before, before_stages = _time_chain(served, inputs)
    after, after_stages = _time_chain(optimized, inputs)
    for row, b, a in zip(rows, before_stages, after_stages):
        row.update(
            before_p50_ms=_q(b, 0.5), after_p50_ms=_q(a, 0.5), stage_speedup_p50=round(_q(b, 0.5) / _q(a, 0.5), 3)
        )
    e2e = {
        "before_p50_ms": _q(before, 0.5),
        "before_p99_ms": _q(before, 0.99),
        "after_p50_ms": _q(after, 0.5),
        "after_p99_ms": _q(after, 0.99),
        "speedup_p50": round(_q(before, 0.5) / _q(after, 0.5), 3),
        "speedup_p99": round(_q(before, 0.99) / _q(after, 0.99), 3),
        "mean_before_ms": round(statistics.fmean(before), 3),
        "mean_after_ms": round(statistics.fmean(after), 3),
    }
    env = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "requests": args.requests,
        "budget_s": args.budget_s,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    (HERE / "results_gpu.json").write_text(json.dumps({"env": env, "stages": rows, "end_to_end": e2e}, indent=2))
    lines = [
        "# Model stages end to end before and after re-optimization (GPU, in process)",
        "",
        f"`python3 bench/e2e/bench_e2e_gpu.py` on {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"triton {env.get('triton')}; {args.requests} requests, budget {args.budget_s:g} s per stage.",
        "",
        "| stage | precision | winner | verified x eager | x compile | p50 before ms | p50 after ms | speedup | optimize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['stage']} | {r['precision']} | {r['winner']} | {r['verified_speedup_vs_eager']} | {r['speedup_vs_compile']} | "
        f"{r['before_p50_ms']} | {r['after_p50_ms']} | {r['stage_speedup_p50']}x | {r['optimize_s']} |"
        for r in rows
    ]
    lines += [
        "",
        f"End to end (listen -> embed -> rerank): p50 {e2e['before_p50_ms']} -> {e2e['after_p50_ms']} ms "
        f"(**{e2e['speedup_p50']}x**), p99 {e2e['before_p99_ms']} -> {e2e['after_p99_ms']} ms ({e2e['speedup_p99']}x). "
        "Target: at least 1.7x.",
    ]
    (HERE / "results_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
