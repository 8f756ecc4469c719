"""Probe: verification workers with glibc's malloc thresholds fixed (`confine.FIXED_MALLOC`) and left to move.

    python bench/verify/probe_malloc_thresholds.py      # on the CPU; about 3 minutes; prints a table last

Runs `optimize` on t2_groupnorm_silu (CPU size: 1 MB outputs) three times each way, with the eager,
torch.compile and library candidates, and prints every verification's reference and candidate medians.
The same eager module should read the same time in every worker; with moving thresholds it did not.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hetforge.optimizer import confine
from hetforge.optimizer.supervisor import OptimizeTask, optimize

PROBLEM = Path(__file__).resolve().parents[1] / "suite" / "problems" / "t2_groupnorm_silu.py"
RUNS = 3


def main() -> None:
    os.environ.setdefault("HETFORGE_BENCH_SIZE", "cpu")
    fixed = dict(confine.FIXED_MALLOC)
    rows = []
    for setting, values in (("fixed", fixed), ("moving", {})):
        confine.FIXED_MALLOC = values  # read by worker_environment when each worker starts
        for run in range(1, RUNS + 1):
            task = OptimizeTask(
                str(PROBLEM), device="cpu", agents=("recipes", "library"), recipes=("eager", "compile"), compose=False
            )
            with tempfile.TemporaryDirectory() as scratch:
                report = optimize(task, Path(scratch))
            for c in report.candidates:
                v = c.verdict or {}
                rows.append((setting, run, c.name, v.get("reference_ms"), v.get("candidate_ms")))
    confine.FIXED_MALLOC = fixed
    print("| malloc thresholds | run | candidate | reference ms | candidate ms |")
    print("|---|---|---|---|---|")
    for setting, run, name, ref, cand in rows:
        print(
            f"| {setting} | {run} | {name} | {ref if ref is None else f'{ref:.3f}'} | {cand if cand is None else f'{cand:.3f}'} |"
        )


if __name__ == "__main__":
    main()
