"""The optimizer suite: `hetforge optimize` on every problem of bench/suite/problems, then a fresh
verifier run on each winner; CSV + markdown with eager, torch.compile and hetforge times.

    python bench/suite/run_suite.py --device cuda --tag h100              # whole suite on the GPU
    python bench/suite/run_suite.py --device cuda --problems t1_gemm,t3_mlp_block --tag h100 --append
    python bench/suite/run_suite.py --device cpu --problems t2_gemm_relu_scale --tag cpu
    python bench/suite/run_suite.py --summarize --tag h100                # markdown from the CSV only
    python bench/suite/run_suite.py --merge bench/suite/raw/h100_*.csv --tag h100   # join partial runs

Sizes: HETFORGE_BENCH_SIZE=gpu on CUDA (1-15 ms a call on an H100), cpu sizes otherwise. Each
problem runs as the user runs it (`python -m hetforge.cli optimize ... --json`) with its own
budget; rows are appended as they finish, so a cut-off run keeps what it measured. Speedups over
torch.compile divide the winner's speedup over eager by torch.compile's (both from the verifier,
interleaved with their own eager runs, at the same precision policy).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIELDS = [
    "problem",
    "tier",
    "device",
    "eager_ms",
    "compile_ms",
    "hetforge_ms",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "winner",
    "winner_agent",
    "candidates",
    "rejected",
    "optimize_s",
    "reverify",
    "note",
]


def problems(selected: str) -> list[Path]:
    every = sorted(p for p in (HERE / "problems").glob("t*.py"))
    if not selected:
        return every
    names = [s.strip() for s in selected.split(",") if s.strip()]
    missing = [n for n in names if not (HERE / "problems" / f"{n}.py").is_file()]
    if missing:
        sys.exit(f"unknown problems: {', '.join(missing)}")
    return [HERE / "problems" / f"{n}.py" for n in names]


def run_one(problem: Path, args, scratch: Path) -> dict:
    env = {
        **os.environ,
        "HETFORGE_BENCH_SIZE": "gpu" if args.device == "cuda" else "cpu",
        "HETFORGE_HOME": str(scratch / "home"),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    out = scratch / problem.stem
    cmd = [
        sys.executable,
        "-m",
        "hetforge.cli",
        "optimize",
        str(problem),
        "--device",
        args.device,
        "--budget-s",
        str(args.budget_s),
        "--agents",
        args.agents,
        "--out",
        str(out),
        "--json",
    ]
    if args.recipes:
        cmd += ["--recipes", args.recipes]
    if args.lean:  # what fits the GPU host's time: 2 trials, 2 timing rounds, no round-2 compositions
        cmd += ["--trials", "2", "--rounds", "2", "--no-compose"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.budget_s * 4 + 300)
    elapsed = time.monotonic() - t0
    row = {"problem": problem.stem, "tier": problem.stem[:2], "device": args.device, "optimize_s": round(elapsed, 1)}
    report_path = out / "report.json"
    if not report_path.is_file():
        return row | {"note": f"optimize failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    report = json.loads(report_path.read_text())
    kept = HERE / "raw" / f"{args.tag or args.device}_reports"  # every candidate's verdict, for the notes
    kept.mkdir(parents=True, exist_ok=True)
    (kept / f"{problem.stem}.json").write_text(json.dumps(report, indent=1))
    by_name = {c["name"]: c for c in report["candidates"]}
    eager = by_name.get("recipe:eager", {}).get("verdict") or {}
    compiled = by_name.get("recipe:compile", {}).get("verdict") or {}
    winner = by_name.get(report["winner"]) if report["winner"] else None
    row |= {
        "candidates": len(report["candidates"]),
        "rejected": sum(c["status"] == "rejected" for c in report["candidates"]),
        "compile_ms": compiled.get("candidate_ms"),
        "eager_ms": eager.get("reference_ms"),
    }
    if winner is None:
        why = "; ".join(f"{c['name']}: {c['status']} {c['note'][:120]}" for c in report["candidates"])
        return row | {"note": f"no accepted variant ({why})"}
    verdict = winner["verdict"]
    row |= {
        "winner": winner["name"],
        "winner_agent": winner["agent"],
        "hetforge_ms": verdict.get("candidate_ms"),
        "speedup_vs_eager": report["speedup_vs_eager"],
        "speedup_vs_compile": report["speedup_vs_compile"],
    }
    row["eager_ms"] = row["eager_ms"] or verdict.get("reference_ms")
    # a fresh verifier run on the winner, new seeds: an accepted variant must pass it again
    check = [
        sys.executable,
        "-m",
        "hetforge.cli",
        "verify",
        str(problem),
        str(out / "best_variant.py"),
        "--device",
        args.device,
        "--no-timing",
        "--json",
    ]
    if winner["agent"] == "llm":
        check.append("--weights-from-reference")
    again = subprocess.run(check, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    row["reverify"] = "accepted" if again.returncode == 0 else "REJECTED"
    why_rejected = ""
    if again.returncode != 0:  # keep the verifier's reason: a rejection nobody can explain later is no evidence
        try:
            why_rejected = "; re-verify: " + "; ".join(
                r["message"][:200] for r in json.loads(again.stdout.strip().splitlines()[-1])["reasons"]
            )
        except (ValueError, IndexError, KeyError):
            why_rejected = "; re-verify: " + (again.stderr or again.stdout).strip()[-300:]
    split = {
        k: sum((c.get("verdict") or {}).get("phases_s", {}).get(k, 0.0) for c in report["candidates"])
        for k in ("start", "correctness", "timing")
    }
    verified = sum(1 for c in report["candidates"] if c.get("verdict"))
    row["note"] = (
        f"time split over {verified} verifications: start {split['start']:.1f} s, correctness "
        f"{split['correctness']:.1f} s, timing {split['timing']:.1f} s (summed over checks side by side){why_rejected}"
    )
    return row


def merge(paths: list[Path], csv_path: Path) -> None:
    """One row per problem from several runs' CSVs, in the order given: a later run's row replaces an
    earlier one unless it lacks the torch.compile figure the earlier one has. Each row names its run."""
    rows: dict[str, dict] = {}
    for path in paths:
        for row in csv.DictReader(path.open()):
            row["note"] = f"{row['note'] + ' ' if row['note'] else ''}[run: {path.stem}]"
            old = rows.get(row["problem"])
            if old is None or row["compile_ms"] or not old["compile_ms"]:
                rows[row["problem"]] = row
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(csv_path: Path, md_path: Path, header: str) -> str:
    rows = list(csv.DictReader(csv_path.open()))
    f = lambda v: float(v) if v not in (None, "") else None  # noqa: E731
    lines = [
        header,
        "",
        "| problem | eager ms | torch.compile ms | hetforge ms | vs eager | vs compile | winner | fresh re-verify |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda v, d=3: f"{f(v):.{d}f}" if f(v) is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['problem']} | {fmt(r['eager_ms'])} | {fmt(r['compile_ms'])} | {fmt(r['hetforge_ms'])} | "
            f"{fmt(r['speedup_vs_eager'], 2)}x | {fmt(r['speedup_vs_compile'], 2)}x | {r['winner'] or r['note']} | {r['reverify'] or '-'} |"
        )
    lines.append("")
    for tier in ("t1", "t2", "t3", None):
        sel = [r for r in rows if tier is None or r["tier"] == tier]
        ge, gc = geomean([f(r["speedup_vs_eager"]) for r in sel]), geomean([f(r["speedup_vs_compile"]) for r in sel])
        label = {"t1": "tier 1 (single ops)", "t2": "tier 2 (fused chains)", "t3": "tier 3 (blocks)", None: "all"}[tier]
        n_eager = sum(1 for r in sel if f(r["speedup_vs_eager"]))
        n_compile = sum(1 for r in sel if f(r["speedup_vs_compile"]))
        lines.append(
            f"- geomean {label}: {ge or 0:.3f}x over eager ({n_eager} problems), "
            f"{gc or 0:.3f}x over torch.compile ({n_compile} problems with a compile figure)"
        )
    # A row won by the eager candidate times eager against eager: its "speedup" is noise. Counted at exactly
    # eager's speed, its speedup over torch.compile is 1 / torch.compile's own speedup over eager.
    at_eager = [
        f(r["speedup_vs_compile"]) / f(r["speedup_vs_eager"])
        if r["winner"] == "recipe:eager"
        else f(r["speedup_vs_compile"])
        for r in rows
        if f(r["speedup_vs_compile"]) and f(r["speedup_vs_eager"])
    ]
    lines.append(
        f"- geomean all, rows won by eager counted at eager's speed: {geomean(at_eager) or 0:.3f}x over torch.compile "
        f"({len(at_eager)} problems)"
    )
    rejected = [r["problem"] for r in rows if r["reverify"] == "REJECTED"]
    lines.append(f"- winners a fresh verifier run rejected: {', '.join(rejected) if rejected else 'none'}")
    text = "\n".join(lines) + "\n"
    notes = md_path.with_suffix(".notes.md")  # hand-written caveats about how the rows were measured
    if notes.is_file():
        text += "\n" + notes.read_text()
    md_path.write_text(text)
    return text


def environment(device: str) -> str:
    import torch
    import triton

    gpu = ""
    if device == "cuda":
        gpu = torch.cuda.get_device_name(0)
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            driver = "?"
        gpu += f", driver {driver}"
    else:
        from hetforge.core.devices import device_name

        gpu = f"{device_name('cpu')}, {os.cpu_count()} cores"
    return f"{gpu}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--problems", default="", help="comma-separated problem names (default: all)")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--agents", default="recipes,rewrites,library")
    parser.add_argument("--recipes", default="", help="restrict compiler recipes (eager always runs)")
    parser.add_argument(
        "--lean", action="store_true", help="2 trials, 2 timing rounds, no compositions (GPU time is scarce)"
    )
    parser.add_argument("--tag", default="", help="results file suffix, e.g. h100 or cpu")
    parser.add_argument("--append", action="store_true", help="add rows to an existing CSV")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the markdown from the CSV")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="join these runs' CSVs (in order) into the tag's CSV, then summarize"
    )
    args = parser.parse_args()
    tag = args.tag or args.device
    csv_path, md_path = HERE / f"results_{tag}.csv", HERE / f"results_{tag}.md"
    header_path = HERE / f"results_{tag}.env"
    if args.merge:
        merge(args.merge, csv_path)
    elif not args.summarize:
        header_path.write_text(environment(args.device) + "\n") if not args.append or not header_path.exists() else None
        new = not (args.append and csv_path.exists())
        with csv_path.open("w" if new else "a", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS)
            if new:
                writer.writeheader()
            with tempfile.TemporaryDirectory(prefix="hetforge-suite-") as tmp:
                for problem in problems(args.problems):
                    row = run_one(problem, args, Path(tmp))
                    writer.writerow({k: row.get(k, "") for k in FIELDS})
                    fh.flush()
                    print(json.dumps(row), flush=True)
    env_line = header_path.read_text().strip() if header_path.exists() else ""
    print(
        summarize(
            csv_path,
            md_path,
            f"# Optimizer suite, {tag}\n\n{env_line}; precision strict (fp32), budget {args.budget_s:.0f} s a problem",
        )
    )


if __name__ == "__main__":
    main()
