"""End-to-end time of `hetforge verify` on a small problem on the CPU, worker start-up included.

Usage: python bench/verify/bench_verify_cpu.py [--repeats N]
Writes bench/verify/results_cpu.csv and results_cpu.md next to this file, prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for i in range(args.repeats):
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "hetforge.cli",
                "verify",
                str(HERE / "mlp_problem.py"),
                str(HERE / "mlp_candidate.py"),
                "--json",
            ],
            capture_output=True,
            text=True,
            cwd=HERE.parents[1],
        )
        wall = time.perf_counter() - start
        verdict = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "run": i + 1,
                "wall_s": round(wall, 2),
                "verdict": verdict["verdict"],
                "reference_ms": verdict["reference_ms"],
                "candidate_ms": verdict["candidate_ms"],
                "speedup": verdict["speedup"],
                "exit": proc.returncode,
            }
        )
    with open(HERE / "results_cpu.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    median_wall = statistics.median(r["wall_s"] for r in rows)
    cpu = next(
        (
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        ),
        platform.processor(),
    )
    import torch

    lines = [
        "# hetforge verify, end to end on the CPU",
        "",
        f"Problem: `bench/verify/mlp_problem.py` (128x512 -> 2048 -> 512 GELU MLP with residual), default options "
        f"(3 trials, 5 timing rounds of 10 calls). Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "| run | wall s | verdict | reference ms | candidate ms | speedup |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['run']} | {r['wall_s']} | {r['verdict']} | {r['reference_ms']} | {r['candidate_ms']} | {r['speedup']} |"
            for r in rows
        ],
        "",
        f"Median wall time: {median_wall:.2f} s (target: under 20 s).",
    ]
    (HERE / "results_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    main()
