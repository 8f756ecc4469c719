"""End-to-end latency before and after automatic re-optimization, on the CPU through Ray Serve.

    python bench/e2e/bench_e2e_cpu.py [--pipeline examples/page_triage.yaml] [--clients 2] [--after-s 30]

First deploys the pipeline without its `reoptimize:` block and measures the reference serving
(`before`, --before-s). Then deploys it as written (it must have the block) on a fresh local Ray
instance with an empty registry, runs closed-loop clients the whole time, and reads the
controller's audit log to split the requests into phases:

    before  the first deployment, after --warmup-s     (reference serving, no controller)
    job     the job starts .. it finishes              (serving while a job optimizes on the same cores)
    rollout the rollout starts .. promotion
    after   promotion + 3 s .. + --after-s             (the promoted variant serving)

Prints a table of p50/p99 per phase, the time from the stage turning hot (job queued) to the
promoted variant, and the extra p99 serving paid while the job ran; writes results_cpu.{md,json}
next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=REPO / "examples" / "page_triage.yaml")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--before-s", type=float, default=30.0)
    parser.add_argument("--after-s", type=float, default=30.0)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()

    import httpx

    home = Path(tempfile.mkdtemp(prefix="hetforge-bench-e2e-"))
    os.environ["HETFORGE_HOME"] = str(home)
    os.environ.setdefault("HETFORGE_RAY_TMP", f"/tmp/hf-ray-bench-{os.getpid()}")
    from hetforge.serving import deploy as dep
    from hetforge.serving.rollout import RolloutBoard
    from hetforge.spec import load_pipeline

    pipeline = load_pipeline(args.pipeline)
    registry_path = str(home / "registry.sqlite")
    samples: list[tuple[float, float, bool]] = []  # (start time, ms, ok)
    stop = threading.Event()
    record = None

    def client(seed: int) -> None:
        url = record.url
        gen = torch.Generator().manual_seed(seed)
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                pages = torch.rand(1, 3, 64, 64, generator=gen).tolist()
                t0 = time.time()
                try:
                    ok = (
                        http.post(
                            f"{url}/v1/pipelines/{pipeline.name}/run",
                            json={"input": {"pages": pages, "text": "Invoice 2026-01-31 total 1,250.00"}},
                        ).status_code
                        == 200
                    )
                except httpx.HTTPError:
                    ok = False
                samples.append((t0, (time.time() - t0) * 1e3, ok))

    import ray
    import yaml
    from ray import serve

    # 1. the reference serving alone: the same pipeline without its reoptimize block
    doc = yaml.safe_load(args.pipeline.read_text())
    doc.pop("reoptimize", None)
    plain = args.pipeline.parent / f".bench-before-{os.getpid()}.yaml"
    plain.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        record = dep.deploy(plain, port=_free_port(), registry_path=registry_path)
        dep.wait_until_running(record, timeout_s=600)
        before_from = time.time() + args.warmup_s
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.warmup_s + args.before_s)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        before_to = time.time()
    finally:
        plain.unlink(missing_ok=True)
        serve.shutdown()
        ray.shutdown()
    stop.clear()

    # 2. the pipeline as written: the controller finds the hot stage, optimizes it, rolls it out
    record = dep.deploy(args.pipeline, port=_free_port(), registry_path=registry_path)
    threads = []
    try:
        dep.wait_until_running(record, timeout_s=600)
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        board = RolloutBoard(registry_path)
        promoted = None
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline and promoted is None:
            time.sleep(1)
            events = board.events(pipeline.name, limit=1000)
            promoted = next((e for e in events if e["decision"] == "promote"), None)
            done = next((e for e in events if e["decision"] == "job_done"), None)
            if (
                done
                and done["numbers"].get("outcome") != "registered"
                and not any(e["decision"] == "start" for e in events)
            ):
                break  # the job found nothing worth a rollout
            if any(e["decision"] == "rollback" for e in events):
                break  # the canary rejected it: nothing will be promoted
        if promoted is not None:
            time.sleep(3 + args.after_s)
    finally:
        stop.set()
        for t in threads:  # in-flight requests finish before Serve goes down
            t.join(timeout=60)
        events = RolloutBoard(registry_path).events(pipeline.name, limit=1000)
        serve.shutdown()
        ray.shutdown()

    def at(decision: str) -> float | None:
        return next((e["at"] for e in events if e["decision"] == decision), None)

    t_hot, t_done, t_start, t_promote = at("job"), at("job_done"), at("start"), at("promote")
    jobs_started = [e for e in events if e["decision"] == "job"]
    t_job = t_hot  # queued and launched on the same look
    phases = {
        "before": (before_from, before_to),
        "job": (t_job or float("inf"), t_done or float("inf")),
        "rollout": (t_start or float("inf"), t_promote or float("inf")),
        "after": ((t_promote or float("inf")) + 3, (t_promote or float("inf")) + 3 + args.after_s),
    }
    rows = []
    for name, (lo, hi) in phases.items():
        ms = [m for t, m, ok in samples if lo <= t < hi and ok]
        errors = sum(1 for t, _, ok in samples if lo <= t < hi and not ok)
        rows.append(
            {
                "phase": name,
                "requests": len(ms),
                "errors": errors,
                "p50_ms": _q(ms, 0.5),
                "p99_ms": _q(ms, 0.99),
                "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
            }
        )
    by = {r["phase"]: r for r in rows}
    done_event = next((e for e in events if e["decision"] == "job_done"), {"numbers": {}})
    promote_event = next((e for e in events if e["decision"] == "promote"), {"numbers": {}})
    summary = {
        "pipeline": str(args.pipeline.relative_to(REPO)) if args.pipeline.is_relative_to(REPO) else str(args.pipeline),
        "host": f"{platform.node()} ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "clients": args.clients,
        "phases": rows,
        "total_requests": len(samples),
        "failed_requests": sum(1 for *_, ok in samples if not ok),
        "hot_to_promoted_s": round(t_promote - t_hot, 1) if t_promote and t_hot else None,
        "job_s": round(t_done - t_hot, 1) if t_done and t_hot else None,
        "winner": done_event["numbers"].get("winner"),
        "verified_speedup_vs_eager": done_event["numbers"].get("speedup_vs_eager"),
        "canary_speedup_p50": promote_event["numbers"].get("speedup_p50"),
        "e2e_speedup_p50": round(by["before"]["p50_ms"] / by["after"]["p50_ms"], 3)
        if by["before"]["p50_ms"] and by["after"]["p50_ms"]
        else None,
        "e2e_speedup_p99": round(by["before"]["p99_ms"] / by["after"]["p99_ms"], 3)
        if by["before"]["p99_ms"] and by["after"]["p99_ms"]
        else None,
        "extra_p99_during_job": round(by["job"]["p99_ms"] / by["before"]["p99_ms"], 3)
        if by["job"]["p99_ms"] and by["before"]["p99_ms"]
        else None,
        "jobs": len(jobs_started),
        "events": [{k: e[k] for k in ("decision", "variant", "reason")} for e in events],
    }
    (HERE / "results_cpu.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [
        "# End to end before and after automatic re-optimization (CPU, Ray Serve)\n",
        f"`python bench/e2e/bench_e2e_cpu.py` on {summary['host']}, torch {summary['torch']}, {args.clients} closed-loop clients, "
        f"pipeline `{summary['pipeline']}`.\n",
        "| phase | requests | errors | p50 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['phase']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} |"
        for r in rows
    ]
    lines += [
        "",
        f"- winner: `{summary['winner']}`, verified {summary['verified_speedup_vs_eager']}x over eager by the job; "
        f"{summary['canary_speedup_p50']}x p50 on live traffic during the canary",
        f"- end to end: {summary['e2e_speedup_p50']}x at p50, {summary['e2e_speedup_p99']}x at p99",
        f"- stage turning hot -> promoted variant: {summary['hot_to_promoted_s']} s (the job itself: {summary['job_s']} s)",
        f"- p99 while the job ran: {summary['extra_p99_during_job']}x the p99 before",
        f"- failed requests: {summary['failed_requests']} of {summary['total_requests']}",
    ]
    (HERE / "results_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if promoted is not None else 1


if __name__ == "__main__":
    sys.exit(main())
