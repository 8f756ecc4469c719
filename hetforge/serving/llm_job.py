"""The re-optimization job of an LLM stage: search vLLM engine settings on the stage's recorded traffic.

`run_llm_job(spec)` reads the calls the stage's replicas recorded (`llm_settings.TrafficRecorder`: prompt token
ids, sampling settings, calls in flight), starts an engine with the running settings (the baseline) and, one at
a time, an engine with each candidate of `llm_settings.search_space`, and replays the calls on both in
interleaved rounds (baseline round, candidate round, order alternating), with as many calls in flight as were
recorded. A candidate is accepted when its greedy answers agree with the baseline's (`disagreement`), and wins
only when `optimizer.stats.speedup_interval` over the rounds' per-call times claims it faster beyond the noise
(the rule kernel variants follow). The winner is registered as an engine-settings variant (`canary`, or
`pending_review` under manual approval) and reaches traffic through the stage's shadow and canary rollout.
The baseline's per-call figures (TTFT, TPOT, tokens) are the stage's LLM profile for the planner.

The job stops trying candidates when the next one would not fit its budget (each costs an engine start and
its rounds, estimated from the last one).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from hetforge.kernels.registry import Registry
from hetforge.optimizer.stats import speedup_interval
from hetforge.optimizer.verdict import RejectKind
from hetforge.planners.profiles import LlmMeasurement, ProfileCache
from hetforge.serving import cpu_cores
from hetforge.serving.jobs import JobBoard, JobSpec, heartbeat, lower_priority
from hetforge.serving.llm import _engine_id, build_engine, engine_arguments, sampling_params
from hetforge.serving.llm_settings import ENGINE_SETTINGS, Candidate, disagreement, read_traffic, search_space
from hetforge.spec.models import LlmStage

ROUNDS = 4  # per side: 3 can claim only when every candidate round beats every baseline round
CALLS_PER_ROUND = 16  # the most recent recorded calls replayed each round
MAX_CONCURRENCY = 16


async def replay(engine, calls: list[dict], concurrency: int) -> list[dict]:
    """Each call's {ms, ttft_ms, tpot_ms, tokens, text}, with `concurrency` calls in flight."""
    from vllm.inputs import TokensPrompt

    gate = asyncio.Semaphore(concurrency)

    async def one(call: dict) -> dict:
        async with gate:
            start = time.perf_counter()
            first = None
            text, tokens = "", 0
            async for out in engine.generate(
                TokensPrompt(prompt_token_ids=call["ids"]),
                sampling_params(call["sampling"], True),
                _engine_id("replay"),
            ):
                for o in out.outputs:
                    if o.token_ids and first is None:
                        first = time.perf_counter()
                    text += o.text
                    tokens += len(o.token_ids)
            end = time.perf_counter()
            first = first or end
            return {
                "ms": (end - start) * 1e3,
                "ttft_ms": (first - start) * 1e3,
                "tpot_ms": (end - first) * 1e3 / (tokens - 1) if tokens > 1 else 0.0,
                "tokens": tokens,
                "prompt_tokens": len(call["ids"]),
                "text": text,
            }

    return list(await asyncio.gather(*(one(c) for c in calls)))


def _p50(runs: list[list[dict]], key: str) -> float:
    return round(statistics.median(r[key] for rnd in runs for r in rnd), 4)


async def _measure(stage, base_dir: Path, current: dict, candidate: Candidate, baseline, calls, concurrency) -> dict:
    """One candidate against the running baseline engine: interleaved rounds, agreement, the interval."""
    row: dict = {"name": candidate.name, "agent": "engine-settings", "settings": candidate.settings}
    began = time.monotonic()
    try:
        engine = build_engine(stage, base_dir, {**current, **candidate.settings})
    except Exception as err:  # noqa: BLE001 - settings the engine refuses are a rejected candidate
        return row | {"status": "rejected", "reject_kind": RejectKind.LOAD_ERROR.value, "note": f"{err}"[:300]}
    try:
        base_runs, cand_runs = [], []
        for i in range(ROUNDS):
            if i % 2 == 0:
                base_runs.append(await replay(baseline, calls, concurrency))
                cand_runs.append(await replay(engine, calls, concurrency))
            else:
                cand_runs.append(await replay(engine, calls, concurrency))
                base_runs.append(await replay(baseline, calls, concurrency))
    except Exception as err:  # noqa: BLE001
        return row | {"status": "rejected", "reject_kind": RejectKind.EXCEPTION.value, "note": f"{err}"[:300]}
    finally:
        engine.shutdown()
    for call, want, got in zip(calls, base_runs[0], cand_runs[0], strict=True):
        reason = (
            disagreement(got["text"], want["text"], candidate.exact) if call["sampling"]["temperature"] == 0 else ""
        )
        if reason:
            return row | {"status": "rejected", "reject_kind": RejectKind.MISMATCH.value, "note": reason[:300]}
    interval = speedup_interval(
        [[r["ms"] for r in rnd] for rnd in base_runs], [[r["ms"] for r in rnd] for rnd in cand_runs]
    )
    base_ms, cand_ms = _p50(base_runs, "ms"), _p50(cand_runs, "ms")
    return row | {
        "status": "accepted",
        "speedup": round(base_ms / cand_ms, 4) if cand_ms > 0 else None,
        "claim": str(interval.claim),
        "interval": interval.to_dict(),
        "reference_ms": base_ms,
        "candidate_ms": cand_ms,
        "ttft_ms": [_p50(base_runs, "ttft_ms"), _p50(cand_runs, "ttft_ms")],
        "tpot_ms": [_p50(base_runs, "tpot_ms"), _p50(cand_runs, "tpot_ms")],
        "note": f"p50 {cand_ms:.1f} ms against {base_ms:.1f} ms, interval {interval.low:.2f}-{interval.high:.2f}",
        "cost_s": round(time.monotonic() - began, 2),
        "exact": candidate.exact,
        "precision": candidate.precision,
    }


async def search(spec: JobSpec, stage, base_dir: Path, calls: list[dict]) -> tuple[list[dict], LlmMeasurement]:
    """Every candidate tried within the budget, and the baseline's measurement."""
    began = time.monotonic()
    current = dict(spec.llm.get("settings") or {})
    effective = engine_arguments(stage, base_dir, current)  # what the engine runs: defaults, spec, then settings
    concurrency = min(MAX_CONCURRENCY, max(c["inflight"] for c in calls))
    baseline = build_engine(stage, base_dir, current)
    built = time.monotonic()
    try:
        first = await replay(baseline, calls, concurrency)  # a warm-up round, and the baseline's profile
        replayed = time.monotonic()
        measured = LlmMeasurement(
            ttft_ms=round(statistics.mean(r["ttft_ms"] for r in first), 4),
            tpot_ms=round(
                statistics.mean(r["tpot_ms"] for r in first if r["tokens"] > 1)
                if any(r["tokens"] > 1 for r in first)
                else 0.0,
                4,
            ),
            queue_ms=0.0,  # in TTFT: the replay's clock starts when the call is sent
            prompt_tokens=round(statistics.mean(r["prompt_tokens"] for r in first), 2),
            output_tokens=round(statistics.mean(r["tokens"] for r in first), 2),
            requests=len(first),
            source=f"replay of {len(calls)} recorded calls, {concurrency} in flight (job {spec.job_id})",
            at=time.time(),
        )
        rows: list[dict] = []
        # a candidate costs an engine start and 2 x ROUNDS replays: estimated from the baseline's, then the last one
        estimate = (built - began) + 2 * ROUNDS * (replayed - built)
        for candidate in search_space(effective, spec.precision, calls):
            if time.monotonic() - began + estimate > spec.budget_s:
                break
            row = await _measure(stage, base_dir, current, candidate, baseline, calls, concurrency)
            rows.append(row)
            estimate = row.get("cost_s", estimate)
    finally:
        baseline.shutdown()
    return rows, measured


def run_llm_job(spec: JobSpec) -> dict:
    """Search engine settings for an LLM stage on its recorded traffic; register a winner faster beyond the noise."""
    board = JobBoard(spec.registry_path)
    with heartbeat(board, spec.job_id):
        try:
            lower_priority()
            cpu_cores.pin_process(cpu_cores.node_cores())  # engines measured on the node's cores, not Ray's alone
            began = time.monotonic()
            stage = LlmStage.model_validate(spec.llm["stage"])
            base_dir = Path(spec.llm["base_dir"])
            calls = read_traffic(Path(spec.llm["traffic"]))[-CALLS_PER_ROUND:]
            if not calls:
                raise RuntimeError(f"stage {spec.stage}: no recorded calls in {spec.llm['traffic']}")
            rows, measured = asyncio.run(search(spec, stage, base_dir, calls))
            ProfileCache().put_llm(spec.llm["fingerprint"], spec.device_class, measured)
            faster = [r for r in rows if r["status"] == "accepted" and r["claim"] == "faster"]
            winner = max(faster, key=lambda r: r["speedup"]) if faster else None
            variant_id = None
            if winner is not None:
                winner["status"] = "winner"
                variant_id = _register(spec, winner)
            summary = {
                "winner": winner["name"] if winner else None,
                "winner_agent": "engine-settings" if winner else None,
                "claim": winner["claim"] if winner else "within_noise",
                "speedup": winner["speedup"] if winner else None,
                "elapsed_s": round(time.monotonic() - began, 2),
                "candidates": len(rows),
                "accepted": sum(r["status"] in ("accepted", "winner") for r in rows),
                "recorded_calls": len(calls),
                "profile": vars(measured),
                "leaderboard": rows,
            }
            if winner is None:
                summary["not_registered"] = "no setting was faster beyond the noise with the same answers"
            board.finish(spec.job_id, "done", variant_id, summary)
            return {"job_id": spec.job_id, "variant_id": variant_id, "summary": summary}
        except BaseException as err:
            board.finish(spec.job_id, "failed", error=f"{type(err).__name__}: {err}")
            raise


def _register(spec: JobSpec, winner: dict) -> int:
    settings = {**(spec.llm.get("settings") or {}), **winner["settings"]}
    verdict = {
        "verdict": "accepted",
        "needs_review": False,
        "speedup": winner["speedup"],
        "reference_ms": winner["reference_ms"],
        "candidate_ms": winner["candidate_ms"],
        "claim": winner["claim"],
        "interval": winner["interval"],
        "ttft_ms": winner["ttft_ms"],
        "tpot_ms": winner["tpot_ms"],
    }
    variant = Registry(spec.registry_path).add(
        fingerprint=spec.llm["fingerprint"],
        device_class=spec.device_class,
        precision=winner["precision"],
        name=f"engine:{winner['name']}",
        agent="engine-settings",
        source=f"engine settings {settings}",
        verdict=verdict,
        recipe={"kind": ENGINE_SETTINGS, "settings": settings, "exact": winner["exact"]},
        signature={"recorded_calls": CALLS_PER_ROUND},
        status="pending_review" if spec.approval == "manual" else "canary",
    )
    return variant.id
