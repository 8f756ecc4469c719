"""Placement quality and speed on random pipelines.

For random pipelines (2-12 stages, 2-5 device classes, memory limits, transfer costs):
  - gap to the exhaustive optimum on every instance small enough to enumerate (<= 200k placements);
  - hetforge against naive placements: everything on the largest GPU, and greedy per stage;
  - time to plan 50-stage pipelines (target: under 1 s).
Usage: python bench/planner/bench_placement.py [--instances N]
Writes results.csv and results.md next to this file and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import random
import statistics
import time
from pathlib import Path

from hetforge.planners.placement import PlacementProblem, brute_force, evaluate, greedy, place

HERE = Path(__file__).resolve().parent
GIB = float(1 << 30)
# (name, relative speed vs the CPU, memory GiB): a spread of device classes
CLASS_POOL = [
    ("cpu", 1.0, 256.0),
    ("L4", 6.0, 24.0),
    ("A10G", 5.0, 24.0),
    ("A100", 15.0, 80.0),
    ("H100", 25.0, 80.0),
    ("H200", 28.0, 141.0),
]


def random_pipeline(rng: random.Random, n: int, k: int) -> PlacementProblem:
    pool = [CLASS_POOL[0]] + rng.sample(CLASS_POOL[1:], k - 1)
    names = [c[0] for c in pool]
    preds = [[]] + [
        sorted(rng.sample(range(max(0, i - 3), i), rng.randint(1, min(2, i - max(0, i - 3))))) for i in range(1, n)
    ]
    has_succ = {q for ps in preds for q in ps}
    preds[n - 1] = sorted(set(preds[n - 1]) | {i for i in range(n - 1) if i not in has_succ})
    options, latency, memory = [], [], []
    for i in range(n):
        kind = rng.choice(["model", "model", "tool", "llm"])
        base = rng.uniform(5, 200) if kind != "tool" else rng.uniform(1, 20)
        opts = ["cpu"] if kind == "tool" else sorted(rng.sample(names, rng.randint(1, k)) + ["cpu"])
        opts = sorted(set(opts))
        options.append(opts)
        speed = {c[0]: c[1] for c in pool}
        latency.append({c: base / (speed[c] * rng.uniform(0.7, 1.3)) + (0.05 if c != "cpu" else 0) for c in opts})
        need = rng.uniform(0.1, 30) * GIB if kind != "tool" else 0.05 * GIB
        memory.append({c: need for c in opts})
    mem = {c[0]: c[2] * GIB for c in pool}
    count = {c: rng.randint(1, 4) for c in names}
    out_bytes = [rng.uniform(1e3, 5e7) for _ in range(n)]
    host, net = rng.uniform(10, 50), rng.uniform(5, 25)  # GB/s

    def transfer(a, b, nbytes):
        if a == b:
            return 0.0
        gbs = host if "cpu" in (a, b) else net
        return 0.02 + nbytes / (gbs * 1e6)

    return PlacementProblem(
        [f"s{i}" for i in range(n)],
        preds,
        0,
        n - 1,
        options,
        latency,
        memory,
        out_bytes,
        {c: count[c] * mem[c] for c in names},
        mem,
        count,
        transfer,
    )


def all_on_largest_gpu(p: PlacementProblem) -> float | None:
    gpus = [c for c in p.capacity if c != "cpu"]
    largest = max(gpus, key=lambda c: (p.device_memory[c], c)) if gpus else "cpu"
    assign = [
        largest if largest in opts else min(opts, key=lambda c: lat[c]) for opts, lat in zip(p.options, p.latency)
    ]
    used: dict[str, float] = {}
    for i, c in enumerate(assign):
        if p.memory[i][c] > p.device_memory[c]:
            return None  # the stage does not fit on one device of that class
        used[c] = used.get(c, 0) + p.memory[i][c]
    if any(used[c] > p.capacity[c] for c in used):
        return None
    return evaluate(p, assign)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(2026)
    rows = []
    for t in range(args.instances):
        n, k = rng.randint(2, 12), rng.randint(2, 5)
        p = random_pipeline(rng, n, k)
        combos = math.prod(len(o) for o in p.options)
        start = time.perf_counter()
        try:
            got = place(p)
        except ValueError:
            continue
        plan_s = time.perf_counter() - start
        optimum = brute_force(p)[1] if combos <= 200_000 else None
        g = greedy(p)
        rows.append(
            {
                "instance": t,
                "stages": n,
                "classes": k,
                "placements": combos,
                "hetforge_ms": round(got.latency_ms, 4),
                "exact": got.exact,
                "optimum_ms": round(optimum, 4) if optimum is not None else "",
                "gap_pct": round(100 * (got.latency_ms / optimum - 1), 6) if optimum else "",
                "largest_gpu_ms": round(v, 4) if (v := all_on_largest_gpu(p)) is not None else "",
                "greedy_ms": round(evaluate(p, g)[0], 4) if g else "",
                "plan_s": round(plan_s, 5),
            }
        )
    big = []
    for _ in range(20):
        p = random_pipeline(rng, 50, 5)
        start = time.perf_counter()
        place(p)
        big.append(time.perf_counter() - start)

    with open(HERE / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    checked = [r for r in rows if r["gap_pct"] != ""]
    worst_gap = max(r["gap_pct"] for r in checked)
    within = sum(1 for r in checked if r["gap_pct"] <= 1.0)

    def ratio(key):
        vals = [r[key] / r["hetforge_ms"] for r in rows if r[key] != ""]
        return statistics.geometric_mean(vals), len(vals)

    gpu_ratio, gpu_n = ratio("largest_gpu_ms")
    greedy_ratio, greedy_n = ratio("greedy_ms")
    lines = [
        "# Placement benchmark (random pipelines)",
        "",
        f"Python {platform.python_version()} on {platform.machine()}; `python bench/planner/bench_placement.py --instances {args.instances}`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| feasible instances (2-12 stages, 2-5 classes) | {len(rows)} |",
        f"| enumerated to the exhaustive optimum | {len(checked)} |",
        f"| within 1% of the optimum | {within} of {len(checked)} (worst gap {worst_gap:.4f}%) |",
        f"| proven exact by branch and bound | {sum(r['exact'] for r in rows)} of {len(rows)} |",
        f"| everything on the largest GPU: does not fit in memory | {len(rows) - gpu_n} of {len(rows)} |",
        f"| everything on the largest GPU: latency vs hetforge (geomean) | {gpu_ratio:.3f}x over {gpu_n} feasible |",
        f"| greedy per stage: latency vs hetforge (geomean) | {greedy_ratio:.3f}x over {greedy_n} |",
        f"| median / max planning time, instances above | {statistics.median(r['plan_s'] for r in rows) * 1e3:.1f} / {max(r['plan_s'] for r in rows) * 1e3:.1f} ms |",
        f"| 50-stage pipelines, 5 classes: median / max planning time | {statistics.median(big):.3f} / {max(big):.3f} s (target < 1 s) |",
    ]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    main()
