"""Serving benchmark: throughput and latency of an example pipeline on Ray Serve, the overhead of
hetforge's pipeline layer against a hand-written Ray Serve composition of the same stages, and a
kernel hot-swap under load.

    python bench/serving/bench_serving.py [--concurrency 4] [--requests 60] [--rounds 3] [--out bench/serving]

One run does everything on the embedded default (local Ray, CPU):
1. `hetforge optimize` the retrieval agent's `embed` stage (rewrites + library agents) so that the
   registry holds a verified variant to swap to;
2. deploy examples/retrieval_agent.yaml with `hetforge.serving.deploy` and, beside it, a hand-written
   ingress (`Handwritten` below) calling the *same* stage replicas through deployment handles in
   the same order: the two differ only by the pipeline layer (spec-driven walk, bindings, checks,
   metrics);
3. an async load generator (httpx, loopback only, bounded in count and time) drives both in
   interleaved rounds at a fixed concurrency: throughput, p50, p99;
4. steady load on hetforge while `embed` is hot-swapped to the registered variant: failed or
   dropped requests, p99 in the swap window against steady state.
Writes results.json and results.md next to this file (or --out) and prints the table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handler's string annotations here

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "examples" / "retrieval_agent.yaml"
QUESTIONS = [
    "What does Ray Serve do?",
    "How large is the H100 L2 cache?",
    "Why fold batch norm?",
    "What is a KV cache?",
    "How does Prometheus collect metrics?",
    "What does torch.compile generate?",
]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def load(url: str, requests: int, concurrency: int, max_s: float, start_index: int = 0) -> dict:
    """`requests` POSTs at `concurrency` (or until `max_s`): latencies (ms) with send times, failures."""
    import httpx

    out = {"lat": [], "sent": [], "fail": [], "t0": time.perf_counter()}
    counter = iter(range(start_index, start_index + requests))
    deadline = time.perf_counter() + max_s

    async def worker(client):
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {"input": {"question": QUESTIONS[i % len(QUESTIONS)]}}
            t = time.perf_counter()
            try:
                r = await client.post(url, json=body)
                ok = r.status_code == 200
            except httpx.HTTPError as err:
                ok, r = False, err
            if ok:
                out["lat"].append((time.perf_counter() - t) * 1e3)
                out["sent"].append(t)
            else:
                out["fail"].append(f"{getattr(r, 'status_code', '')} {getattr(r, 'text', r)}"[:300])

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    out["wall_s"] = time.perf_counter() - out["t0"]
    return out


def summary(runs: list[dict]) -> dict:
    lat = [x for r in runs for x in r["lat"]]
    if not lat:
        raise SystemExit(f"every request failed; first failures: {[f for r in runs for f in r['fail']][:3]}")
    wall = sum(r["wall_s"] for r in runs)
    return {
        "requests": len(lat),
        "failed": sum(len(r["fail"]) for r in runs),
        "p50_ms": statistics.median(lat),
        "p99_ms": _pct(lat, 99),
        "throughput_rps": len(lat) / wall,
    }


def optimize_embed(home: Path) -> int | None:
    """Run `hetforge optimize` on the embed stage's problem file; the registered variant id, if any."""
    cmd = [
        sys.executable,
        "-m",
        "hetforge.cli",
        "optimize",
        str(REPO / "examples" / "models" / "text_encoder.py"),
        "--agents",
        "rewrites,library",
        "--budget-s",
        "240",
        "--out",
        str(home / "opt"),
        "--json",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HETFORGE_HOME": str(home)}, timeout=900
    )
    try:
        doc = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(done.stdout[-2000:], done.stderr[-2000:])
        return None
    print(
        f"optimize embed: winner {doc.get('winner_agent')} {doc.get('speedup_vs_eager')}x over eager, registered {doc.get('registered_variant')}"
    )
    reg = doc.get("registered_variant")
    return int(reg["id"]) if isinstance(reg, dict) and "id" in reg else (int(reg) if isinstance(reg, int) else None)


def handwritten_app(pipeline_name: str):
    """A hand-written ingress over the same stage replicas: router, then search -> embed -> rerank, then answer."""
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Handwritten:
        def __init__(self):
            self.h = {
                n: serve.get_deployment_handle(f"stage-{n}", app_name=pipeline_name)
                for n in ("router", "search", "embed", "rerank", "answer")
            }

        @api.post("/run")
        async def run(self, request: Request) -> dict:
            q = (await request.json())["input"]["question"]
            route = await self.h["router"].remote({"input": {"question": q}, "history": []}, "")
            passages = None
            if route["choice"] == "search":
                found = await self.h["search"].remote({"query": q}, "")
                ranked = await self.h["embed"].remote(found, "")
                passages = (await self.h["rerank"].remote(ranked, ""))["passages"]
            answer = await self.h["answer"].remote({"input": {"question": q, "passages": passages}, "history": []}, "")
            return {"output": answer}

    return Handwritten.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=60, help="requests per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--swap-load-s", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument(
        "--skip-optimize", action="store_true", help="swap embed to its reference instead of an optimized variant"
    )
    args = parser.parse_args()

    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_llm.py")], check=True, capture_output=True)
    home = Path(tempfile.mkdtemp(prefix="hf-bench-serving-"))
    os.environ["HETFORGE_HOME"] = str(home)
    variant = None if args.skip_optimize else optimize_embed(home)

    from ray import serve

    from hetforge.serving import deploy as dep

    record = dep.deploy(PIPELINE, port=args.port)
    dep.wait_until_running(record)
    serve.run(handwritten_app(record.pipeline), name="handwritten", route_prefix="/handwritten", blocking=False)
    hetforge_url = f"{record.url}/v1/pipelines/{record.pipeline}/run"
    hand_url = f"{record.url}/handwritten/run"

    async def bench() -> dict:
        import httpx

        for _ in range(60):  # the hand-written app is up when it answers
            try:
                async with httpx.AsyncClient(timeout=60) as c:
                    if (await c.post(hand_url, json={"input": {"question": "warm"}})).status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1)
        await load(hetforge_url, 2 * args.concurrency, args.concurrency, 60)  # warm-up both paths
        await load(hand_url, 2 * args.concurrency, args.concurrency, 60)
        runs = {"hetforge": [], "handwritten": []}
        for r in range(args.rounds):  # interleaved, alternating which goes first
            order = ["hetforge", "handwritten"] if r % 2 == 0 else ["handwritten", "hetforge"]
            for name in order:
                runs[name].append(
                    await load(
                        hetforge_url if name == "hetforge" else hand_url, args.requests, args.concurrency, 300, r * 1000
                    )
                )

        # hot-swaps under load: steady first, then swaps to the variant, back to the reference, and to the variant again
        swaps: list[dict] = []

        async def swap_later():
            targets = [
                variant if variant is not None else "reference",
                "reference",
                variant if variant is not None else "reference",
            ]
            for k, target in enumerate(targets):
                await asyncio.sleep(args.swap_load_s / (len(targets) + 1))
                t = time.perf_counter()
                async with httpx.AsyncClient(timeout=120) as c:
                    reply = await c.post(
                        f"{record.url}/v1/pipelines/{record.pipeline}/stages/embed/swap",
                        json={"variant": target, "wait_s": 60},
                    )
                swaps.append(
                    {
                        **reply.json(),
                        "target": target,
                        "started": t,
                        "ended": time.perf_counter(),
                        "http": reply.status_code,
                    }
                )

        steady_and_swap, _ = await asyncio.gather(
            load(hetforge_url, 100_000, args.concurrency, args.swap_load_s, 50_000), swap_later()
        )
        return {"runs": runs, "swap_run": steady_and_swap, "swaps": swaps}

    result = asyncio.run(bench())
    serve.shutdown()
    import ray

    ray.shutdown()

    het, hand = summary(result["runs"]["hetforge"]), summary(result["runs"]["handwritten"])
    sw, swaps = result["swap_run"], result["swaps"]
    # a request is "during a swap" when its life overlaps a swap's (request posted to every replica reported)
    spans = [(t, t + x / 1e3, x) for t, x in zip(sw["sent"], sw["lat"])]
    during = [x for a, b, x in spans if any(a <= s["ended"] and b >= s["started"] for s in swaps)]
    steady = [x for a, b, x in spans if b < swaps[0]["started"]] if swaps else []
    doc = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "pipeline": "examples/retrieval_agent.yaml",
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "hetforge": het,
        "handwritten": hand,
        "overhead_p50": het["p50_ms"] / hand["p50_ms"] - 1,
        "swap": {
            "variant": variant,
            "swaps": [
                {k: s.get(k) for k in ("target", "http", "ok", "reports")} | {"s": s["ended"] - s["started"]}
                for s in swaps
            ],
            "requests": len(sw["lat"]),
            "failed": len(sw["fail"]),
            "failures": sw["fail"][:5],
            "steady_p99_ms": _pct(steady, 99) if steady else None,
            "swap_window_p99_ms": _pct(during, 99) if during else None,
            "swap_window_requests": len(during),
            "steady_requests": len(steady),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    s = doc["swap"]
    ratio = (
        (s["swap_window_p99_ms"] / s["steady_p99_ms"])
        if s["steady_p99_ms"] and s["swap_window_p99_ms"]
        else float("nan")
    )
    lines = [
        f"# Serving benchmark ({doc['machine']}, {doc['pipeline']}, concurrency {args.concurrency})",
        "",
        "| path | requests | failed | p50 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {d['requests']} | {d['failed']} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | {d['throughput_rps']:.2f} |"
            for name, d in (("hetforge pipeline layer", het), ("hand-written Ray Serve composition", hand))
        ),
        "",
        f"pipeline-layer overhead at p50: {100 * doc['overhead_p50']:+.1f}% (target at most +10%)",
        "",
        f"hot-swaps of embed under load (to variant {s['variant']}, back to the reference, to the variant again): "
        + "; ".join(
            f"{w['target']}: HTTP {w['http']} {[r['outcome'] for r in (w['reports'] or [])]} in {w['s']:.2f} s"
            for w in s["swaps"]
        ),
        f"{s['requests']} requests during the load, {s['failed']} failed; p99 steady {s['steady_p99_ms'] or float('nan'):.1f} ms "
        f"({s['steady_requests']} requests before the first swap), p99 of the requests in flight during a swap "
        f"{s['swap_window_p99_ms'] or float('nan'):.1f} ms ({s['swap_window_requests']} requests): {ratio:.2f}x, target at most 1.5x",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
