"""Figures read from a suite run's reports: how steady the timings were, and how long the checks took.

    python bench/suite/report_spread.py bench/suite/raw/h100_s9_b_reports [more report folders ...]

Per problem: the eager candidate timed against the eager reference (1.000x when timing is steady); the
largest over the smallest of the reference's medians across the run's verifications; the seconds of
checks (start + correctness) of max-autotune and of the slowest other round-1 check, with max-autotune's
status. Last, the median of the reference-median ratios over all problems given.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def check_s(candidate: dict) -> float | None:
    phases = (candidate.get("verdict") or {}).get("phases_s") or {}
    return phases.get("start", 0.0) + phases["correctness"] if "correctness" in phases else None


def main(folders: list[str]) -> None:
    ratios = []
    print(
        "| report | eager vs eager | reference medians max/min | max-autotune checks s (status) | slowest other round-1 check s |"
    )
    print("|---|---|---|---|---|")
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            report = json.loads(path.read_text())
            cands = report["candidates"]
            eager = next(
                (c for c in cands if c["name"] == "recipe:eager" and (c.get("verdict") or {}).get("speedup")), None
            )
            medians = [c["verdict"]["reference_ms"] for c in cands if (c.get("verdict") or {}).get("reference_ms")]
            ratio = max(medians) / min(medians) if medians else None
            if ratio:
                ratios.append(ratio)
            autotune = next((c for c in cands if c["name"] == "recipe:compile-max-autotune"), None)
            others = [s for c in cands if c["round"] == 1 and c is not autotune and (s := check_s(c)) is not None]
            cells = [
                f"{path.parent.name}/{path.stem}",
                f"{eager['verdict']['speedup']:.3f}x" if eager else "-",
                f"{ratio:.3f}" if ratio else "-",
                f"{check_s(autotune):.1f} ({autotune['status']})"
                if autotune and check_s(autotune) is not None
                else "-",
                f"{max(others):.1f}" if others else "-",
            ]
            print("| " + " | ".join(cells) + " |")
    if ratios:
        print(
            f"\nmedian over {len(ratios)} problems of the reference medians' max/min: {statistics.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
