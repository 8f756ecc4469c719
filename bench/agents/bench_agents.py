"""Agent workload: hetforge's agent loop against a plain vLLM OpenAI server driven by a client-side loop.

The committed figures (`results.md` reads them):

    python bench/agents/bench_agents.py --tasks 48 --rounds 3 --separate-tool --shared-cores  # results.json
    python bench/agents/bench_agents.py --tasks 48 --rounds 3 --separate-tool  # committed as results_earlier.json

The workload (the same for both): a shared system prompt of about 1,500 tokens, tasks of `--turns`
LLM turns each (every turn but the last calls the `lookup_order` tool, the last answers), `--sessions`
tasks in flight at once, one tool call a turn, greedy decoding, 40 tokens at most per turn (a tool call is 28), on
the tiny Llama of `scripts/build_tiny_llm.py` (context raised to 4,096 positions with `hf_overrides`) on vLLM's CPU
engine.

- baseline: `python -m vllm.entrypoints.openai.api_server` (defaults, plus a tool-call parser, which
  vLLM 0.32 requires for tool_choice required, and the same structured-output settings as hetforge's:
  xgrammar without whitespace), and the loop most teams start with, in the client: call the server with the tool,
  run the tool, append, call again (tool_choice required, then none on the last turn). Time to first token per turn
  is measured by the client (streamed turns); the prefix-cache hit rate from the server's `vllm:prefix_cache_*`
  counters.
- hetforge: `bench/agents/pipeline.yaml` (one LLM stage with `agent_loop: {tool_choice: required}` and
  one tool stage), one POST /v1/chat/completions per task; the loop, the tool calls and the session's
  routing happen server-side. Time to first token from the replica's `hetforge_llm_time_to_first_token_seconds`
  (vLLM's engine statistic; the baseline's engine figure `vllm:time_to_first_token_seconds` is reported beside
  it), the hit rate from `hetforge_llm_prefix_cache_*`. The tool runs where the planner puts it (inline, for this
  light tool, so the whole loop runs in the LLM replica: one Ray Serve call a task); `--separate-tool` runs hetforge
  again with `placement: separate` (the loop in the ingress: a Ray Serve hop per LLM turn and per tool call);
  `--shared-cores` runs it with `vllm.isolate_cores: false` (the engine's processes free to run on every core,
  beside Ray's, instead of on cores of their own: `hetforge/serving/cpu_cores.py`). Where a task's time goes
  (`breakdown_ms_per_task`): its LLM calls as the LLM replica timed them, its tool calls, and the rest (the
  ingress, the hops, HTTP), from `hetforge_stage_latency_seconds`.

The client (this process) runs on the same cores for every side (`--client-cores`, default the highest-numbered
core: see `_client_cores`). Each side runs one engine replica, alone on the machine while measured: a round starts,
measures and stops each side in turn (who goes first alternates), and `--rounds` rounds let the machine's drift
reach every side alike. Each measurement records the figures above and the CPU time every process used (`cpu`:
which processes the machine's cores went to). Writes results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hetforge.serving import cpu_cores

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODEL = REPO / "examples" / "models" / "tiny-llm"
MAX_TOKENS = 40
OVERRIDES = {"max_position_embeddings": 4096}
SYSTEM = "You are the support agent of a parcel company. " + " ".join(
    f"Policy {i}: look the order up with the tool before you answer, quote its status exactly, never invent a "
    f"parcel, a date or a carrier, and keep the customer's order number {1000 + i} private."
    for i in range(1, 26)
)
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "An order's status.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"enum": ["1234", "5678"]}},
            "required": ["order_id"],
        },
    },
}


def lookup_order(order_id: str) -> dict:
    return {"order_id": order_id, "status": {"1234": "shipped", "5678": "packed"}.get(order_id, "unknown")}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _counters(url: str, names: dict[str, str]) -> dict[str, float]:
    """Sums of the named samples on a /metrics page (key -> sample name)."""
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            for key, name in names.items():
                if s.name == name:
                    out[key] += s.value
    return out


def _wait(url: str, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url}{path} not ready after {timeout_s} s")


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's CPU time so far (user + system), with its title (its command line's first word)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(") ", 1)[1].split()
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue
        if title:
            # ray titles its workers (ray::ServeReplica:app:deployment); vLLM its engine (VLLM::EngineCore)
            out[int(proc.name)] = (Path(title.split()[0]).name[:60], (int(fields[11]) + int(fields[12])) * _TICK_S)
    return out


def _cpu_during(before: dict[int, tuple[str, float]], wall_s: float, top: int = 8) -> dict:
    """CPU seconds per process title between `before` and now, as a share of the window's core-seconds."""
    used: dict[str, float] = {}
    for pid, (title, seconds) in _cpu_seconds().items():
        used[title] = used.get(title, 0.0) + seconds - before.get(pid, (title, 0.0))[1]
    ranked = sorted(used.items(), key=lambda kv: -kv[1])
    capacity = wall_s * (os.cpu_count() or 1)
    return {
        "cores_busy": round(sum(used.values()) / wall_s, 2),
        "by_process_pct_of_machine": {t: round(100 * v / capacity, 1) for t, v in ranked[:top] if v > 0},
    }


def question(i: int) -> str:
    return f"Task {i}: where is my order {1234 if i % 2 else 5678}, and when will it arrive?"


# ---------------------------------------------------------------------------------------------- baseline
async def baseline_task(client: httpx.AsyncClient, url: str, i: int, turns: int) -> dict:
    """The hand-written loop: one streamed call per turn, the tool run in the client."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(i)}]
    ttfts, cached, prompt, completion = [], [], [], []
    start = time.perf_counter()
    for turn in range(turns):
        body = {
            "model": "tiny",
            "messages": messages,
            "tools": [TOOL],
            "tool_choice": "none" if turn == turns - 1 else "required",
            "parallel_tool_calls": False,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent, first, calls, text, usage = time.perf_counter(), None, {}, "", {}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"task {i} turn {turn}: {reply.status_code} {(await reply.aread())[:500]!r}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if first is None and (delta.get("content") or delta.get("tool_calls")):
                        first = time.perf_counter()
                    text += delta.get("content") or ""
                    for call in delta.get("tool_calls") or []:
                        slot = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                        slot["id"] = call.get("id") or slot["id"]
                        fn = call.get("function") or {}
                        slot["name"] += fn.get("name") or ""
                        slot["arguments"] += fn.get("arguments") or ""
        ttfts.append(((first or time.perf_counter()) - sent) * 1e3)
        prompt.append(usage.get("prompt_tokens", 0))
        completion.append(usage.get("completion_tokens", 0))
        cached.append(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        if not calls:
            break
        tool_calls = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls.values()
        ]
        messages.append({"role": "assistant", "content": text or None, "tool_calls": tool_calls})
        for c in calls.values():
            try:
                result = lookup_order(**json.loads(c["arguments"] or "{}"))
            except (ValueError, TypeError) as err:
                result = {"error": str(err)}
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(result)})
    return {
        "task_ms": (time.perf_counter() - start) * 1e3,
        "ttft_ms": ttfts,
        "turns": len(ttfts),
        "cached": cached,
        "prompt": prompt,
        "completion": completion,
    }


BASELINE_METRICS = {
    "hits": "vllm:prefix_cache_hits_total",
    "queries": "vllm:prefix_cache_queries_total",
    "ttft_sum": "vllm:time_to_first_token_seconds_sum",
    "ttft_count": "vllm:time_to_first_token_seconds_count",
    "tpot_sum": "vllm:request_time_per_output_token_seconds_sum",
    "tpot_count": "vllm:request_time_per_output_token_seconds_count",
    "generated": "vllm:generation_tokens_total",
}


@contextlib.contextmanager
def baseline_server(work: Path, turns: int):
    """vLLM's OpenAI server on the tiny model, warmed up (the system prompt cached); yields its URL."""
    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(work / "vllm")}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--enforce-eager", "--dtype", "float32",
        "--hf-overrides", json.dumps(OVERRIDES), "--enable-prompt-tokens-details",
        # vLLM 0.32 refuses tool_choice required without a tool-call parser; the decoding settings match hetforge's
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]  # fmt: skip
    log = open(work / "vllm_server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(url, "/health", 600)
        asyncio.run(_drive(lambda c, i: baseline_task(c, url, i, turns), 2, 2))
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def measure_baseline(url: str, tasks: int, sessions: int, turns: int, offset: int, client: set[int] | None) -> dict:
    before, cpu = _counters(url, BASELINE_METRICS), _cpu_seconds()
    t0 = time.perf_counter()
    with _client_on(client):
        results = asyncio.run(_drive(lambda c, i: baseline_task(c, url, i, turns), tasks, sessions, offset=offset))
    wall = time.perf_counter() - t0
    cpu = _cpu_during(cpu, wall)
    after = _counters(url, BASELINE_METRICS)
    out = _summary(results, wall, {k: after[k] - before[k] for k in BASELINE_METRICS})
    out["cpu"] = cpu
    return out


# ---------------------------------------------------------------------------------------------- hetforge
async def hetforge_task(client: httpx.AsyncClient, url: str, i: int, turns: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(i)}]
    start = time.perf_counter()
    reply = await client.post(
        f"{url}/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "parallel_tool_calls": False,
        },
        headers={"x-session-id": f"task-{i}"},
        timeout=300,
    )
    reply.raise_for_status()
    usage = reply.json()["usage"]
    return {
        "task_ms": (time.perf_counter() - start) * 1e3,
        "turns": turns,
        "cached": [usage["prompt_tokens_details"]["cached_tokens"]],
        "prompt": [usage["prompt_tokens"]],
        "completion": [usage["completion_tokens"]],
    }


def _variant_copy(work: Path, name: str, tool_separate: bool = False, isolate_cores: bool = True) -> Path:
    """pipeline.yaml changed as named, beside a copy of tools.py: the tool in a replica of its own
    (`placement: separate`), or the engine sharing every core (`vllm.isolate_cores: false`)."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tools.py").write_text((HERE / "tools.py").read_text())
    text = (HERE / "pipeline.yaml").read_text().replace("../../examples/models/tiny-llm", str(MODEL))
    if tool_separate:
        text = text.replace(
            "callable: tools.py:lookup_order", "callable: tools.py:lookup_order\n    placement: separate"
        )
    if not isolate_cores:
        text = text.replace("      engine_args:", "      isolate_cores: false\n      engine_args:")
    (folder / "pipeline.yaml").write_text(text)
    return folder / "pipeline.yaml"


def _stage_seconds(url: str, pipeline: str) -> dict[str, float]:
    """hetforge_stage_latency_seconds sums and counts per stage (stage calls that answered)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name.startswith("hetforge_stage_latency_seconds_") and s.labels.get("pipeline") == pipeline:
                key = f"{s.labels['stage']}_{s.name.rsplit('_', 1)[-1]}"
                if key.endswith(("_sum", "_count")):
                    out[key] = out.get(key, 0.0) + s.value
    return out


HETFORGE_METRICS = {
    "hits": "hetforge_llm_prefix_cache_hits_tokens_total",
    "queries": "hetforge_llm_prefix_cache_queries_tokens_total",
    "ttft_sum": "hetforge_llm_time_to_first_token_seconds_sum",
    "ttft_count": "hetforge_llm_time_to_first_token_seconds_count",
    "tpot_sum": "hetforge_llm_time_per_output_token_seconds_sum",
    "tpot_count": "hetforge_llm_time_per_output_token_seconds_count",
    "queue_sum": "hetforge_llm_queue_time_seconds_sum",
    "queue_count": "hetforge_llm_queue_time_seconds_count",
    "generated": "hetforge_llm_generation_tokens_total",
}


@contextlib.contextmanager
def hetforge_deployment(work: Path, pipeline_file: Path, turns: int):
    """The pipeline served on the embedded default, warmed up; yields its deploy record."""
    os.environ["HETFORGE_HOME"] = str(work / "home")
    os.environ["HETFORGE_RAY_TMP"] = str(work / "ray")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm"))
    from hetforge.serving import deploy as dep
    from hetforge.spec import load_pipeline

    if load_pipeline(pipeline_file).stage("agent").agent_loop.max_iterations != turns:
        raise SystemExit(f"{pipeline_file}: agent_loop.max_iterations must equal --turns ({turns})")
    record = dep.deploy(pipeline_file, port=_port(), registry_path=str(work / "home" / "registry.sqlite"))
    try:
        dep.wait_until_running(record, timeout_s=600)
        asyncio.run(_drive(lambda c, i: hetforge_task(c, record.url, i, turns), 2, 2))
        yield record
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        dep.state_path(record.pipeline).unlink(missing_ok=True)  # this process served it: the next run may serve again


def measure_hetforge(record, tasks: int, sessions: int, turns: int, offset: int, client: set[int] | None) -> dict:
    url = record.url
    before, stages_before = _counters(url, HETFORGE_METRICS), _stage_seconds(url, record.pipeline)
    cpu = _cpu_seconds()
    t0 = time.perf_counter()
    with _client_on(client):
        results = asyncio.run(_drive(lambda c, i: hetforge_task(c, url, i, turns), tasks, sessions, offset=offset))
    wall = time.perf_counter() - t0
    cpu = _cpu_during(cpu, wall)
    time.sleep(2)  # the last engine step's statistics
    after, stages_after = _counters(url, HETFORGE_METRICS), _stage_seconds(url, record.pipeline)
    engine = {k: after[k] - before[k] for k in HETFORGE_METRICS}
    out = _summary(results, wall, engine)
    out["tool_placement"] = record.placement.get("lookup_order", {}).get("hop", "")
    out["cpu"] = cpu
    stage = {k: stages_after.get(k, 0.0) - stages_before.get(k, 0.0) for k in stages_after}
    # where a task's time goes, per task (means): its LLM calls as the LLM replica timed them (engine queue,
    # prefill and decode, prompt rendering), its tool calls as the tool timed them, and the rest (the ingress's
    # walk and loop, the Ray Serve hops to the LLM replica and to a separate tool, HTTP)
    task_mean = statistics.mean(r["task_ms"] for r in results)
    llm_ms = stage.get("agent_sum", 0.0) * 1e3 / len(results)
    tool_ms = stage.get("lookup_order_sum", 0.0) * 1e3 / len(results)
    out["breakdown_ms_per_task"] = {
        "task_mean": round(task_mean, 1),
        "llm_calls": round(llm_ms, 1),
        "llm_calls_count": round(stage.get("agent_count", 0.0) / len(results), 2),
        "engine_ttft_total": round(engine["ttft_sum"] * 1e3 / len(results), 1),
        "engine_queue_total": round(engine["queue_sum"] * 1e3 / len(results), 1),
        "tool_calls": round(tool_ms, 2),
        "rest": round(task_mean - llm_ms - tool_ms, 1),
    }
    return out


# ---------------------------------------------------------------------------------------------- common
async def _drive(task, tasks: int, sessions: int, offset: int = 0) -> list[dict]:
    """`tasks` tasks, `sessions` at a time."""
    gate = asyncio.Semaphore(sessions)
    async with httpx.AsyncClient() as client:

        async def one(i: int) -> dict:
            async with gate:
                return await task(client, i)

        return await asyncio.gather(*(one(offset + i) for i in range(tasks)))


def _summary(results: list[dict], wall_s: float, engine: dict) -> dict:
    task_ms = [r["task_ms"] for r in results]
    out = {
        "tasks": len(results),
        "wall_s": round(wall_s, 2),
        "task_ms_p50": round(statistics.median(task_ms), 1),
        "task_ms_p90": round(_pct(task_ms, 90), 1),
        "llm_turns_per_task": statistics.mean(r["turns"] for r in results),
        "engine_ttft_ms_mean": round(engine["ttft_sum"] / max(engine["ttft_count"], 1) * 1e3, 2),
        "engine_generations": engine["ttft_count"],
        "engine_time_per_output_token_ms_mean": round(engine["tpot_sum"] / max(engine["tpot_count"], 1) * 1e3, 2),
        "engine_generated_tokens_per_task": round(engine["generated"] / max(len(results), 1), 1),
        "prefix_cache_hit_rate": round(engine["hits"] / engine["queries"], 4) if engine["queries"] else None,
        "prompt_tokens": sum(sum(r["prompt"]) for r in results),
        "cached_prompt_tokens": sum(sum(r["cached"]) for r in results),
        "completion_tokens_per_task": round(statistics.mean(sum(r["completion"]) for r in results), 1),
    }
    if results and "ttft_ms" in results[0]:
        turns = max(len(r["ttft_ms"]) for r in results)
        out["client_ttft_ms_p50_by_turn"] = [
            round(statistics.median(r["ttft_ms"][t] for r in results if len(r["ttft_ms"]) > t), 1) for t in range(turns)
        ]
        later = [(c, p) for r in results for c, p in zip(r["cached"][1:], r["prompt"][1:], strict=True)]
        out["hit_rate_after_first_turn"] = round(sum(c for c, _ in later) / max(1, sum(p for _, p in later)), 4)
    return out


def _client_cores(choice: str) -> set[int] | None:
    """The load generator's cores. A deployment's clients are on other machines; on one host, the client's own CPU
    time lands wherever the kernel puts it, on an engine's cores too, unless it is kept off them alike for both
    sides: vLLM binds an engine's threads to the lowest cores (vLLM's server: core 0 of 2, the other reserved;
    hetforge's split: the same), so by default the client runs on the highest-numbered core."""
    everything = sorted(os.sched_getaffinity(0))
    if choice == "none" or len(everything) < 2:
        return None
    if choice == "last":
        return {everything[-1]}
    return {int(c) for c in choice.split(",")}


@contextlib.contextmanager
def _client_on(cores: set[int] | None):
    """Every thread of this process on `cores` for the block (the measured load only: the servers this process
    starts, and Ray when it deploys hetforge, start with its full set of cores), then back."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    cpu_cores.pin_process(sorted(cores))
    try:
        yield
    finally:
        cpu_cores.pin_process(sorted(before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--separate-tool", action="store_true", help="also run hetforge with the tool in its own replica"
    )
    parser.add_argument(
        "--shared-cores", action="store_true", help="also run hetforge with the engine sharing every core"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds: each side started, measured and stopped in turn")
    parser.add_argument(
        "--client-cores",
        default="last",
        help="cores of this process, the load generator, on both sides: 'last' (the highest-numbered core, off the "
        "cores both engines bind their threads to), 'none' (anywhere), or a list such as 2,3",
    )
    parser.add_argument("--work", type=Path, default=Path(f"/tmp/hetforge-bench-agents-{os.getpid()}"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    client_cores = _client_cores(args.client_cores)
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_llm.py")], check=True, capture_output=True)
    import torch
    import vllm

    doc: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "client_cores": sorted(client_cores) if client_cores else "any",
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "workload": {
            "tasks": args.tasks,
            "sessions": args.sessions,
            "llm_turns_per_task": args.turns,
            "max_tokens": MAX_TOKENS,
            "system_prompt_chars": len(SYSTEM),
        },
    }
    variants = [("hetforge", HERE / "pipeline.yaml")]
    if args.separate_tool:
        variants.append(("hetforge_tool_separate", _variant_copy(args.work, "separate", tool_separate=True)))
    if args.shared_cores:
        variants.append(("hetforge_shared_cores", _variant_copy(args.work, "shared", isolate_cores=False)))

    def baseline(offset: int) -> dict:
        with baseline_server(args.work, args.turns) as url:
            return measure_baseline(url, args.tasks, args.sessions, args.turns, offset, client_cores)

    def hetforge(pipeline_file: Path, offset: int) -> dict:
        with hetforge_deployment(args.work, pipeline_file, args.turns) as record:
            return measure_hetforge(record, args.tasks, args.sessions, args.turns, offset, client_cores)

    rounds: list[dict] = []
    for r in range(args.rounds):
        sides = [("baseline_vllm_server", baseline)] + [
            (name, lambda offset, f=pipeline_file: hetforge(f, offset)) for name, pipeline_file in variants
        ]
        row: dict = {"round": r}
        for name, run in sides[:: 1 if r % 2 == 0 else -1]:  # who goes first alternates
            row[name] = run(100 + 1000 * r)  # new questions each round: no whole prompt seen before
        for name, _ in variants:
            row[f"task_p50_speedup_{name}"] = round(
                row["baseline_vllm_server"]["task_ms_p50"] / row[name]["task_ms_p50"], 3
            )
        rounds.append(row)
        print(json.dumps(row), flush=True)  # each round's figures as soon as it ends
    doc["rounds"] = rounds
    doc["summary"] = {"baseline_task_ms_p50_per_round": [r["baseline_vllm_server"]["task_ms_p50"] for r in rounds]}
    for name, _ in variants:
        ratios = [r[f"task_p50_speedup_{name}"] for r in rounds]
        doc["summary"][name] = {
            "task_ms_p50_per_round": [r[name]["task_ms_p50"] for r in rounds],
            "task_p50_speedup_per_round": ratios,
            "task_p50_speedup_median": round(statistics.median(ratios), 3),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
