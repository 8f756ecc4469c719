"""Inline tools without Ray: the pipeline walk calls a tool placed in its own process (`tools.InlineTool`), with the
tool stage's latency metric, and a tool that raises reads exactly as it does behind a Ray Serve hop."""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hetforge.serving.dataflow import LoopError, NoLoopHere, PipelineError, PipelineRunner, StageError
from hetforge.serving.deployments import dependency_checks
from hetforge.serving.metrics import Metrics
from hetforge.serving.tools import InlineCaller, InlineTool, ToolRuntime, replica_loops
from hetforge.spec.models import Pipeline

TOOLS = """
def lookup(order_id: str) -> dict:
    return {"order_id": order_id, "status": {"1234": "shipped"}.get(order_id, "unknown")}


def broken(order_id: str) -> dict:
    raise RuntimeError(f"database down for {order_id}")
"""


def _pipeline(tool: str, loop: bool = True) -> Pipeline:
    stages = [{"name": "lookup", "kind": "tool", "callable": f"tools.py:{tool}", "placement": "inline"}]
    if loop:
        stages.insert(
            0,
            {
                "name": "agent",
                "kind": "llm",
                "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "x"},
                "agent_loop": {"tools": ["lookup"], "max_iterations": 3},
            },
        )
    name = "agent" if loop else "lookup"
    return Pipeline.model_validate({"name": "shop", "entry": name, "output": name, "stages": stages})


class Remote:
    """Stand-in for the Ray Serve handles of the other stages: a scripted agent that calls `lookup` once, then
    answers with what the tool returned. A tool call reaching it would be a hop the inline placement avoids."""

    def __init__(self):
        self.calls: list[str] = []

    async def __call__(self, stage, payload, request_id):
        self.calls.append(stage)
        history = payload["history"]
        if not history:
            call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"order_id": "1234"}'}}
            return {"text": "", "tool_calls": [call], "finish_reason": "tool_calls"}
        return {"text": f"Tool said: {history[-1]['content']}", "finish_reason": "stop"}

    async def stream(self, stage, payload, request_id):
        answer = await self(stage, payload, request_id)
        if answer["text"]:
            yield answer["text"]
        yield {k: v for k, v in answer.items() if k != "text"}


class HopLike(Exception):
    """What Ray raises in the caller for a replica's exception: the original is its `.cause`."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


class SeparateTool:
    """The tool behind a hop: the same runtime, its exception wrapped as Ray wraps it."""

    def __init__(self, runtime: ToolRuntime):
        self.runtime = runtime

    async def __call__(self, stage, payload, request_id):
        try:
            return await self.runtime(payload)
        except Exception as err:
            raise HopLike(err) from None

    def stream(self, stage, payload, request_id):
        raise NotImplementedError


@pytest.fixture()
def tools_dir(tmp_path: Path) -> Path:
    (tmp_path / "tools.py").write_text(TOOLS)
    return tmp_path


def _inline(pipeline: Pipeline, base: Path, metrics: Metrics, inner) -> tuple[PipelineRunner, InlineTool, list]:
    tool = InlineTool(pipeline.name, pipeline.stage("lookup"), base, metrics, dependency_checks)
    failures: list = []
    runner = PipelineRunner(pipeline, InlineCaller(inner, {"lookup": tool}), lambda s, k: failures.append((s, k)))
    return runner, tool, failures


def test_an_inline_tool_answers_in_the_agent_loop_with_its_stage_metric(tools_dir):
    pipeline, registry = _pipeline("lookup"), CollectorRegistry()
    remote = Remote()
    runner, tool, _ = _inline(pipeline, tools_dir, Metrics(registry), remote)
    result = asyncio.run(runner.run({"messages": [{"role": "user", "content": "where?"}]}, "r1"))
    assert json.loads(result.output["text"].removeprefix("Tool said: ")) == {"order_id": "1234", "status": "shipped"}
    assert remote.calls == ["agent", "agent"]  # the tool never went through the handles
    count = registry.get_sample_value(
        "hetforge_stage_latency_seconds_count",
        {"pipeline": "shop", "stage": "lookup", "variant": "reference", "device": "cpu"},
    )
    assert count == 1 and tool.runtime.attempts == 1
    status = asyncio.run(tool.status.remote())  # the ingress's status route asks it as it asks a replica
    assert status["stage"] == "lookup" and status["placement"] == "inline" and status["attempts"] == 1
    assert asyncio.run(tool.dependencies.remote()) == []


def test_streaming_through_an_inline_tool(tools_dir):
    pipeline = _pipeline("lookup")
    runner, _, _ = _inline(pipeline, tools_dir, Metrics(CollectorRegistry()), Remote())

    async def collect():
        return [e async for e in runner.stream({"messages": [{"role": "user", "content": "where?"}]}, "r2")]

    events = asyncio.run(collect())
    assert "shipped" in "".join(e for e in events if isinstance(e, str))


@pytest.mark.parametrize("loop", [False, True])
def test_a_tool_that_raises_reads_the_same_inline_and_behind_a_hop(tools_dir, loop):
    pipeline = _pipeline("broken", loop)
    request = {"order_id": "9"} if not loop else {"messages": [{"role": "user", "content": "where?"}]}
    runner, _, inline_failures = _inline(pipeline, tools_dir, Metrics(CollectorRegistry()), Remote())
    separate_failures: list = []
    separate = PipelineRunner(
        pipeline,
        # the agent from Remote, the tool behind a "hop" with the same runtime
        _Route(Remote(), SeparateTool(ToolRuntime(pipeline.stage("lookup"), tools_dir))),
        lambda s, k: separate_failures.append((s, k)),
    )
    if loop:  # the loop hands a tool's error back to the LLM, which quotes it: the same text either way
        inline = asyncio.run(runner.run(request, "r3")).output["text"]
        behind = asyncio.run(separate.run(request, "r3")).output["text"]
        assert inline == behind and "database down for 1234" in inline and "failed on all 1 attempt(s)" in inline
    else:
        with pytest.raises(PipelineError) as a:
            asyncio.run(runner.run(request, "r3"))
        with pytest.raises(PipelineError) as b:
            asyncio.run(separate.run(request, "r3"))
        assert (a.value.status, a.value.stage, a.value.message) == (b.value.status, b.value.stage, b.value.message)
        assert a.value.stage == "lookup" and a.value.status == 500
        assert "tool lookup: failed on all 1 attempt(s)" in a.value.message and "database down for 9" in a.value.message
    assert inline_failures == separate_failures == [("lookup", "error")]


class _Route:
    """The LLM to one caller, the tool to another."""

    def __init__(self, llm, tool):
        self.llm, self.tool = llm, tool

    async def __call__(self, stage, payload, request_id):
        return await (self.tool if stage == "lookup" else self.llm)(stage, payload, request_id)

    def stream(self, stage, payload, request_id):
        return self.llm.stream(stage, payload, request_id)


def test_an_inline_tools_code_is_part_of_the_ingress_version(tools_dir):
    from hetforge.serving.deploy import versions_of

    pipeline = _pipeline("lookup")
    placement = {"agent": {"device": "cpu"}, "lookup": {"device": "cpu", "hop": "inline"}}
    before = versions_of(pipeline, tools_dir, placement, "r.sqlite", "m")
    assert "stage-lookup" not in before  # no deployment of its own
    (tools_dir / "tools.py").write_text(TOOLS.replace("unknown", "lost"))
    after = versions_of(pipeline, tools_dir, placement, "r.sqlite", "m")
    assert after["PipelineIngress"] != before["PipelineIngress"]  # the ingress restarts with the new code
    assert after["stage-agent"] != before["stage-agent"]  # so does the LLM stage, whose replicas run the loop's tool
    separate = {**placement, "lookup": {"device": "cpu", "hop": "separate"}}
    before = versions_of(pipeline, tools_dir, separate, "r.sqlite", "m")
    (tools_dir / "tools.py").write_text(TOOLS)
    assert versions_of(pipeline, tools_dir, separate, "r.sqlite", "m")["stage-agent"] == before["stage-agent"]


def test_an_inline_tool_holds_its_limits_as_serve_holds_a_replicas(tmp_path):
    """limits.max_concurrency calls run, limits.max_queued wait, one more is refused with 503."""
    (tmp_path / "tools.py").write_text(SLOW.replace("asyncio.sleep(5)", "asyncio.sleep(0.2)"))
    doc = _pipeline("slow", loop=False).model_dump(mode="json", by_alias=True)
    doc["stages"][0]["limits"] = {"max_concurrency": 1, "max_queued": 1}
    pipeline = Pipeline.model_validate(doc)
    tool = InlineTool(
        pipeline.name, pipeline.stage("lookup"), tmp_path, Metrics(CollectorRegistry()), dependency_checks
    )

    async def three():
        return await asyncio.gather(*(tool({"order_id": str(i)}) for i in range(3)), return_exceptions=True)

    first, second, third = asyncio.run(three())
    assert first == {} and second == {}  # one ran, one waited for it
    assert isinstance(third, StageError) and third.status == 503 and "limits.max_queued 1" in str(third)
    assert tool.admitted == 0 and tool.runtime.attempts == 2


# ---------------------------------------------------------------------------------------------- loops in the replica
SLOW = (
    TOOLS
    + """

async def slow(order_id: str) -> dict:
    import asyncio

    await asyncio.sleep(5)
    return {}
"""
)


class LlmReplica:
    """Stand-in for an LLM stage's replica (`LlmStageDeployment`): a turn answered by `Remote`, a `loop` call run by
    the replica's own runner with the tool inline there; its exceptions cross as Ray's do (`HopLike`). Built
    `without_loop`, it is a replica of a version whose loop tools were not inline."""

    def __init__(self, pipeline: Pipeline, base: Path, without_loop: bool = False):
        self.remote, self.registry, self.failures = Remote(), CollectorRegistry(), []
        tool = InlineTool(pipeline.name, pipeline.stage("lookup"), base, Metrics(self.registry), dependency_checks)
        self.runner = PipelineRunner(
            pipeline, InlineCaller(self.remote, {"lookup": tool}), lambda s, k: self.failures.append((s, k))
        )
        self.without_loop = without_loop
        self.calls: list[str] = []  # the calls from the ingress: "turn" or "loop"

    async def __call__(self, stage, payload, request_id):
        self.calls.append("turn")
        return await self.remote(stage, payload, request_id)

    async def loop(self, stage, payload, request_id):
        self.calls.append("loop")
        try:
            if self.without_loop:
                raise NoLoopHere(f"stage {stage}: this replica runs no agent loop")
            return await self.runner.answer_loop(stage, payload, request_id)
        except Exception as err:
            raise HopLike(err) from None

    def stream(self, stage, payload, request_id):
        self.calls.append("turn")
        return self.remote.stream(stage, payload, request_id)


def _ingress(pipeline: Pipeline, caller) -> tuple[PipelineRunner, list]:
    placement = {"agent": {"device": "cpu"}, "lookup": {"device": "cpu", "hop": "inline"}}
    failures: list = []
    runner = PipelineRunner(
        pipeline, caller, lambda s, k: failures.append((s, k)), delegated=replica_loops(pipeline, placement)
    )
    return runner, failures


ASK = {"messages": [{"role": "user", "content": "where?"}]}


def test_replica_loops_are_the_loops_whose_tools_are_all_inline():
    pipeline = _pipeline("lookup")
    assert replica_loops(pipeline, {"agent": {}, "lookup": {"hop": "inline"}}) == {"agent"}
    assert replica_loops(pipeline, {"agent": {}, "lookup": {"hop": "separate"}}) == set()
    assert replica_loops(_pipeline("lookup", loop=False), {"lookup": {"hop": "inline"}}) == set()


def test_a_loop_with_inline_tools_is_one_call_to_the_llm_replica(tools_dir):
    pipeline = _pipeline("lookup")
    replica = LlmReplica(pipeline, tools_dir)
    ingress, failures = _ingress(pipeline, replica)
    delegated = asyncio.run(ingress.run(ASK, "r4")).output
    assert replica.calls == ["loop"]  # one call from the ingress ...
    assert replica.remote.calls == ["agent", "agent"]  # ... in which the replica ran both turns and the tool
    count = replica.registry.get_sample_value(
        "hetforge_stage_latency_seconds_count",
        {"pipeline": "shop", "stage": "lookup", "variant": "reference", "device": "cpu"},
    )
    assert count == 1 and failures == [] == replica.failures
    walked, _, _ = _inline(pipeline, tools_dir, Metrics(CollectorRegistry()), Remote())
    assert delegated == asyncio.run(walked.run(ASK, "r4")).output  # the same answer as the loop run by the ingress


def test_a_streamed_loop_stays_in_the_ingress(tools_dir):
    pipeline = _pipeline("lookup")
    replica = LlmReplica(pipeline, tools_dir)
    ingress, _ = _ingress(
        pipeline,
        InlineCaller(
            replica,
            {
                "lookup": InlineTool(
                    pipeline.name, pipeline.stage("lookup"), tools_dir, Metrics(CollectorRegistry()), dependency_checks
                )
            },
        ),
    )

    async def collect():
        return [e async for e in ingress.stream(ASK, "r5")]

    events = asyncio.run(collect())
    assert "shipped" in "".join(e for e in events if isinstance(e, str))
    assert replica.calls == ["turn", "turn"]  # a streamed call per turn: each turn's tokens pass through the ingress


def _slow_pipeline(base: Path, **agent) -> Pipeline:
    (base / "tools.py").write_text(SLOW)
    doc = _pipeline("slow").model_dump(mode="json", by_alias=True)
    doc["stages"][1]["timeout_s"] = 0.2
    doc["stages"][0].update(agent)
    return Pipeline.model_validate(doc)


def test_a_tool_timeout_in_the_replicas_loop_is_the_tools_504_reported_once(tmp_path):
    # a breaker on the LLM stage that one failure opens: a tool's failure must not count against it
    pipeline = _slow_pipeline(tmp_path, circuit_breaker={"failures": 1, "reset_s": 60})
    replica = LlmReplica(pipeline, tmp_path)
    ingress, failures = _ingress(pipeline, replica)
    for attempt in ("r6", "r7"):
        with pytest.raises(PipelineError) as caught:
            asyncio.run(ingress.run(ASK, attempt))
        err = caught.value
        assert (err.status, err.stage, err.kind, err.request_id) == (504, "lookup", "timeout", attempt)
        assert "tool lookup" in err.message and "timed out" in err.message
    assert replica.failures == [("lookup", "timeout")] * 2 and failures == []  # counted where it happened, once


def test_the_replicas_loop_ends_at_the_timeout_it_was_sent(tmp_path):
    doc = _slow_pipeline(tmp_path).model_dump(mode="json", by_alias=True)
    doc["stages"][1]["timeout_s"] = 30  # the tool alone would hold the loop for its 5 s
    pipeline = Pipeline.model_validate(doc)
    replica = LlmReplica(pipeline, tmp_path)
    with pytest.raises(LoopError) as caught:
        asyncio.run(replica.runner.answer_loop("agent", {"input": ASK, "options": {}, "timeout_s": 0.3}, "r8"))
    assert (caught.value.status, caught.value.stage, caught.value.kind) == (504, "agent", "timeout")
    assert "limits.timeout_s (0.3 s)" in caught.value.message
    restored = pickle.loads(pickle.dumps(caught.value))  # as Ray carries it back to the ingress
    assert (restored.status, restored.stage, restored.kind, restored.message) == (
        504,
        "agent",
        "timeout",
        caught.value.message,
    )


def test_a_replica_without_the_loop_leaves_it_to_the_ingress(tools_dir):
    """While a deployment changes, an LLM replica of the earlier version (its tools were not inline) answers
    NoLoopHere: the ingress runs the loop itself, a call per turn, and counts no failure."""
    pipeline = _pipeline("lookup")
    replica = LlmReplica(pipeline, tools_dir, without_loop=True)
    tool = InlineTool(
        pipeline.name, pipeline.stage("lookup"), tools_dir, Metrics(CollectorRegistry()), dependency_checks
    )
    ingress, failures = _ingress(pipeline, InlineCaller(replica, {"lookup": tool}))
    walked, _, _ = _inline(pipeline, tools_dir, Metrics(CollectorRegistry()), Remote())
    assert asyncio.run(ingress.run(ASK, "r9")).output == asyncio.run(walked.run(ASK, "r9")).output
    assert replica.calls == ["loop", "turn", "turn"] and tool.runtime.attempts == 1 and failures == []


def test_a_refused_loop_call_is_reported_by_the_ingress(tools_dir):
    pipeline = _pipeline("lookup")

    class Full:
        async def loop(self, stage, payload, request_id):  # what HandleCaller raises when Serve's queue is full
            raise StageError(f"stage {stage} is at capacity: queue full (limits.max_queued); retry later", 503)

    ingress, failures = _ingress(pipeline, Full())
    with pytest.raises(PipelineError) as caught:
        asyncio.run(ingress.run(ASK, "r7"))
    assert caught.value.status == 503 and caught.value.retry_after_s is not None
    assert failures == [("agent", "overload")]
