"""The verifier's timing against itself: each architecture's reference judged against an identical copy.

    python3 bench/models/self_timing.py --device cuda --precisions tf32 --batches 8 --tag h200
    python3 bench/models/self_timing.py --device cpu --archs tiny_bert_embed --precisions strict --batches 2 --tag cpu

For each architecture of `run_models.ARCHS`, precision policy and batch: the judge (`judge.verify`,
the options `hetforge optimize` uses: 3 rounds, up to 6 while a faster-looking candidate is within
noise) times the reference against the recipe that runs the same computation at that policy
(`same_as_reference`), in a second worker. An honest verifier reads about 1.00x and claims nothing: the
row's `claim` must be `within_noise`, and `|speedup - 1|` is the timing's noise floor for that model.
Rows go to self_timing_TAG.csv as they finish; a short table is printed last.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import run_models  # noqa: E402  (the architectures and their problem files)

FIELDS = [
    "arch",
    "batch",
    "precision",
    "device",
    "reference_ms",
    "copy_ms",
    "speedup",
    "low",
    "high",
    "claim",
    "rounds",
    "note",
]


def same_as_reference(precision: str, device: str):
    """The recipe that runs what the judge times as the reference at `precision`: eager with TF32 under tf32 on a
    GPU, eager in bf16 autocast under bf16, plain eager otherwise."""
    from hetforge.optimizer.recipes import Recipe

    if precision == "bf16":
        return Recipe("bf16-autocast", None, bf16_autocast=True)
    if precision == "tf32" and device == "cuda":
        return Recipe("tf32", None, tf32=True)
    return Recipe("eager")


def judge_self(problem: Path, precision: str, device: str, scratch: Path) -> dict:
    from hetforge.core.problem import Problem
    from hetforge.optimizer.judge import VerifyOptions, verify
    from hetforge.optimizer.recipes import recipe_candidate_source

    reference = Problem(file=str(problem))
    candidate = scratch / f"{problem.stem}_{precision}_copy.py"
    candidate.write_text(recipe_candidate_source(reference, same_as_reference(precision, device)))
    options = VerifyOptions(device=device, precision=precision, trials=1, rounds=3, startup_timeout_s=300)
    return verify(reference, candidate, options).to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(a for a in run_models.ARCHS if not a.startswith("tiny")))
    parser.add_argument("--precisions", default="tf32")
    parser.add_argument("--batches", default="8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--models", default=str(HERE / ".models"))
    args = parser.parse_args()
    out_csv = HERE / f"self_timing_{args.tag}.csv"
    scratch = Path(args.models) / "self_timing"
    scratch.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        csv.DictWriter(f, FIELDS).writeheader()
    rows = []
    for arch in args.archs.split(","):
        folder = run_models.build_model(arch, Path(args.models))
        task = run_models.ARCHS[arch][0]
        for batch in (int(b) for b in args.batches.split(",")):
            problem = scratch / f"{arch}_b{batch}.py"
            problem.write_text(
                run_models.PROBLEM.format(arch=arch, batch=batch, folder=str(folder), task=task, seq=run_models.SEQ)
            )
            for precision in args.precisions.split(","):
                row = {"arch": arch, "batch": batch, "precision": precision, "device": args.device}
                start = time.monotonic()
                try:
                    verdict = judge_self(problem, precision, args.device, scratch)
                except Exception as err:  # noqa: BLE001 - a row says what went wrong; the others still run
                    verdict, row["note"] = None, f"{type(err).__name__}: {err}"[:200]
                if verdict is not None:
                    interval = verdict.get("interval") or {}
                    row |= {
                        "reference_ms": verdict.get("reference_ms"),
                        "copy_ms": verdict.get("candidate_ms"),
                        "speedup": verdict.get("speedup"),
                        "low": interval.get("low"),
                        "high": interval.get("high"),
                        "claim": interval.get("claim"),
                        "rounds": (verdict.get("spread") or {}).get("rounds"),
                        "note": "; ".join(r["message"][:120] for r in verdict.get("reasons", []))
                        or f"{time.monotonic() - start:.0f} s",
                    }
                rows.append(row)
                with out_csv.open("a", newline="") as f:
                    csv.DictWriter(f, FIELDS).writerow(row)
                print(row, flush=True)
    print(f"\n{'arch':24} {'b':>3} {'policy':7} {'ref ms':>9} {'copy ms':>9} {'speedup':>8} {'95% interval':>16} claim")
    for r in rows:
        interval = f"{r.get('low')}-{r.get('high')}" if r.get("low") is not None else "-"
        print(
            f"{r['arch']:24} {r['batch']:>3} {r['precision']:7} {r.get('reference_ms') or '-':>9} "
            f"{r.get('copy_ms') or '-':>9} {r.get('speedup') or '-':>8} {interval:>16} {r.get('claim') or r.get('note')}"
        )


if __name__ == "__main__":
    main()
