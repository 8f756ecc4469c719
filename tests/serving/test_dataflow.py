"""The pipeline walk, on plain coroutines: branches, joins, bindings, agent loops, errors, streaming;
then the tool runtime (timeouts, retries, concurrency, HTTP) and model-stage I/O (checks, batching)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time

import pytest
import torch

from hetforge.serving.dataflow import PipelineError, PipelineRunner, StageError
from hetforge.serving.model_io import decode_inputs, encode_output, run_batched
from hetforge.serving.tools import ToolRuntime
from hetforge.spec.models import ModelStage, Pipeline, ToolStage


def _pipeline(stages: list[dict], flow: list[dict], entry: str, output: str) -> Pipeline:
    return Pipeline.model_validate({"name": "p", "entry": entry, "output": output, "stages": stages, "flow": flow})


def tool(name: str, **kw) -> dict:
    return {"name": name, "kind": "tool", "callable": "m:f", **kw}


def llm(name: str, **kw) -> dict:
    return {"name": name, "kind": "llm", "endpoint": {"base_url": "http://x/v1", "model": "m"}, **kw}


class Fake:
    """Stage calls answered by functions; records calls (and the most concurrent ones)."""

    def __init__(self, answers: dict):
        self.answers, self.calls, self.running, self.most = answers, [], 0, 0

    async def __call__(self, stage, payload, request_id):
        self.calls.append((stage, payload))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.01)
            answer = self.answers[stage]
            return answer(payload) if callable(answer) else answer
        finally:
            self.running -= 1

    async def stream(self, stage, payload, request_id):
        for word in ("a", "b", "c"):
            yield word


def run(runner, request, rid="r1"):
    return asyncio.run(runner.run(request, rid))


ROUTED = _pipeline(
    [
        llm("router"),
        tool("search", args={"query": "request.question"}),
        tool("left"),
        tool("right"),
        tool("join"),
        tool("answer", args={"q": "request.question", "hits": "search.hits", "route": "router.choice"}),
    ],
    [
        {"from": "router", "to": "search", "when": {"field": "choice", "equals": "search"}},
        {"from": "router", "to": "answer", "when": {"field": "choice", "equals": "direct"}},
        {"from": "search", "to": "left"},
        {"from": "search", "to": "right"},
        {"from": "left", "to": "join"},
        {"from": "right", "to": "join"},
        {"from": "join", "to": "answer"},
    ],
    "router",
    "answer",
)


def test_branch_taken_runs_its_stages_and_joins_in_parallel():
    fake = Fake(
        {
            "router": {"choice": "search"},
            "search": lambda p: {"hits": [p["query"]]},
            "left": {"l": 1},
            "right": {"r": 2},
            "join": lambda p: p,
            "answer": lambda p: p,
        }
    )
    result = run(PipelineRunner(ROUTED, fake), {"question": "why"})
    assert result.output == {"q": "why", "hits": ["why"], "route": "search"}
    assert ("search", {"query": "why"}) in fake.calls
    assert ("join", {"left": {"l": 1}, "right": {"r": 2}}) in fake.calls  # several upstreams: {stage: output}
    assert fake.calls[0] == (
        "router",
        {"input": {"question": "why"}, "history": [], "options": {}},
    )  # an LLM: input, history, options
    assert fake.most == 2  # left and right ran at the same time
    assert result.skipped == [] and set(result.stages) == {"router", "search", "left", "right", "join", "answer"}


def test_branch_not_taken_is_skipped_and_its_bindings_are_null():
    fake = Fake({"router": {"choice": "direct"}, "answer": lambda p: p})
    result = run(PipelineRunner(ROUTED, fake), {"question": "hi"})
    assert result.output == {"q": "hi", "hits": None, "route": "direct"}
    assert sorted(result.skipped) == ["join", "left", "right", "search"]
    assert [c[0] for c in fake.calls] == ["router", "answer"]


def test_no_branch_to_the_output_is_a_located_500():
    fake = Fake({"router": {"choice": "neither"}})
    with pytest.raises(PipelineError) as caught:
        run(PipelineRunner(ROUTED, fake), {"question": "hi"}, rid="req-7")
    assert caught.value.status == 500 and caught.value.stage == "answer" and caught.value.request_id == "req-7"
    assert "no branch reached the output stage answer (stages that ran: router)" in caught.value.message


def test_missing_request_field_is_400_and_stage_errors_keep_their_status():
    fake = Fake({"router": {"choice": "search"}})
    with pytest.raises(PipelineError) as caught:
        run(PipelineRunner(ROUTED, fake), {"text": "no question"})
    assert caught.value.status == 400 and caught.value.stage == "search" and "'question'" in caught.value.message

    def bad(p):
        raise StageError("stage search: shape is wrong", 422)

    with pytest.raises(PipelineError) as caught:
        run(PipelineRunner(ROUTED, Fake({"router": {"choice": "search"}, "search": bad})), {"question": "q"})
    assert (caught.value.status, caught.value.stage, caught.value.message) == (
        422,
        "search",
        "stage search: shape is wrong",
    )

    def boom(p):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(PipelineError) as caught:
        run(PipelineRunner(ROUTED, Fake({"router": boom})), {"question": "q"})
    assert (
        caught.value.status == 500
        and caught.value.message == "stage router failed: ZeroDivisionError: division by zero"
    )


def test_binding_a_stage_that_is_not_upstream_is_refused_when_built():
    bad = _pipeline([tool("a", args={"v": "b.x"}), tool("b")], [{"from": "a", "to": "b"}], "a", "b")
    with pytest.raises(ValueError, match="stage a: args bind b, which is not upstream of it"):
        PipelineRunner(bad, Fake({}))


LOOP = _pipeline(
    [llm("agent", agent_loop={"tools": ["calc"], "max_iterations": 3}), tool("calc")], [], "agent", "agent"
)


def test_agent_loop_calls_tools_and_feeds_results_back():
    turns = iter([{"text": "{...}", "tool_call": {"name": "calc", "arguments": {"expression": "6*7"}}}, {"text": "42"}])
    fake = Fake({"agent": lambda p: next(turns), "calc": lambda p: {"value": 42}})
    result = run(PipelineRunner(LOOP, fake), "what is 6*7?")
    assert result.output == {"text": "42"}
    assert [c[0] for c in fake.calls] == ["agent", "calc", "agent"]
    assert fake.calls[1][1] == {"expression": "6*7"}
    history = fake.calls[2][1]["history"]  # OpenAI messages: the assistant's call, the tool's answer to that call
    assert history[0]["role"] == "assistant" and history[0]["tool_calls"][0]["function"]["name"] == "calc"
    assert history[1]["role"] == "tool" and history[1]["tool_call_id"] == history[0]["tool_calls"][0]["id"]
    assert json.loads(history[1]["content"]) == {"value": 42}


def test_agent_loop_runs_parallel_tool_calls_sums_usage_and_returns_client_tools():
    def call(name, args, i):
        return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}

    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    turns = iter(
        [
            {
                "text": "",
                "tool_calls": [call("calc", {"expression": "1+1"}, 1), call("calc", {"expression": "2"}, 2)],
                "usage": usage,
            },
            {"text": "", "tool_calls": [call("client_search", {"q": "x"}, 3)], "usage": usage},
        ]
    )
    fake = Fake({"agent": lambda p: next(turns), "calc": lambda p: {"value": p["expression"]}})
    result = run(PipelineRunner(LOOP, fake), "q")
    assert [c[0] for c in fake.calls] == ["agent", "calc", "calc", "agent"]
    assert [m.get("tool_call_id") for m in fake.calls[3][1]["history"]] == [None, "c1", "c2"]
    # a tool the loop does not own ends the loop: the client runs it
    assert result.output["tool_calls"][0]["function"]["name"] == "client_search"
    assert result.output["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 4,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert fake.calls[0][1]["options"] == {} and "tool_choice" not in fake.calls[3][1]["options"]


def test_agent_loop_stops_at_max_iterations_and_tool_errors_go_back_to_the_llm():
    def calc(p):
        raise StageError("tool calc: not arithmetic", 500)

    always = {"text": "", "tool_call": {"name": "calc", "arguments": {"expression": "x"}}}
    fake = Fake({"agent": always, "calc": calc})
    result = run(PipelineRunner(LOOP, fake), "loop forever")
    assert [c[0] for c in fake.calls] == ["agent", "calc", "agent", "calc", "agent"]  # 3 LLM calls at most
    assert "not arithmetic" in fake.calls[-1][1]["history"][-1]["content"]
    assert fake.calls[-1][1]["options"] == {"tool_choice": "none"}  # the last call allowed may not call a tool
    assert result.output is always


def test_stream_runs_upstream_then_streams_the_output_llm():
    pipe = _pipeline([tool("prep"), llm("talk")], [{"from": "prep", "to": "talk"}], "prep", "talk")
    fake = Fake({"prep": {"ready": True}})

    async def collect():
        return [d async for d in PipelineRunner(pipe, fake).stream({"a": 1}, "r")]

    assert asyncio.run(collect()) == ["a", "b", "c"]
    assert fake.calls == [("prep", {"a": 1})]


# ---------------------------------------------------------------------------------------------- tools
def _tool(fn, **kw) -> ToolRuntime:
    rt = ToolRuntime.__new__(ToolRuntime)
    rt.stage, rt.fn, rt._sem, rt._client, rt.attempts = (
        ToolStage(name="t", kind="tool", callable="m:f", **kw),
        fn,
        None,
        None,
        0,
    )
    return rt


def test_tool_timeout_retries_then_504():
    async def slow(x):
        await asyncio.sleep(5)

    rt = _tool(slow, timeout_s=0.1, retries=2)
    start = time.monotonic()
    with pytest.raises(StageError) as caught:
        asyncio.run(rt({"x": 1}))
    assert caught.value.status == 504 and rt.attempts == 3 and time.monotonic() - start < 2
    assert "timed out after 0.1 s on all 3 attempt(s)" in str(caught.value)


def test_tool_failure_is_retried_and_a_later_success_answers():
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return {"ok": x}

    assert asyncio.run(_tool(flaky, retries=2)({"x": 5})) == {"ok": 5} and len(calls) == 3
    calls.clear()
    with pytest.raises(StageError) as caught:
        asyncio.run(_tool(flaky, retries=1)({"x": 5}))
    assert caught.value.status == 500 and "ConnectionError: reset by peer" in str(caught.value)


def test_tool_arguments_that_do_not_fit_are_422_without_retry():
    def f(expression: str):
        return expression

    rt = _tool(f, retries=3)
    with pytest.raises(StageError) as caught:
        asyncio.run(rt({"expr": "1+1"}))
    assert (
        caught.value.status == 422
        and rt.attempts == 1
        and "missing a required argument: 'expression'" in str(caught.value)
    )


def test_tool_concurrency_limit_holds():
    state = {"now": 0, "most": 0}

    async def work(i):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return i

    rt = _tool(work, concurrency=3)

    async def many():
        return await asyncio.gather(*(rt({"i": i}) for i in range(12)))

    assert asyncio.run(many()) == list(range(12)) and state["most"] == 3


def test_http_tool_posts_json_and_4xx_is_not_retried():
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            hits.append(body)
            code, doc = (400, {"error": "bad"}) if body.get("bad") else (200, {"echo": body})
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(doc).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tool"
        rt = ToolRuntime(ToolStage(name="h", kind="tool", http={"url": url}, retries=2), base_dir=None)
        assert asyncio.run(rt({"q": 1})) == {"echo": {"q": 1}}
        with pytest.raises(StageError) as caught:
            asyncio.run(
                ToolRuntime(ToolStage(name="h", kind="tool", http={"url": url}, retries=2), base_dir=None)(
                    {"bad": True}
                )
            )
        assert caught.value.status == 422 and len(hits) == 2
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------- model I/O
STAGE = ModelStage(
    name="m",
    kind="model",
    problem_file="x.py",
    labels=["no", "yes"],
    inputs=[
        {"name": "ids", "shape": ["batch", "seq"], "dtype": "int64"},
        {"name": "mask", "shape": ["batch", "seq", 2], "dtype": "float32"},
    ],
)


def test_inputs_are_typed_and_checked_against_the_signature():
    ids, mask = decode_inputs(STAGE, {"ids": [[1, 2, 3]], "mask": [[[0, 1]] * 3]})
    assert ids.dtype == torch.int64 and mask.shape == (1, 3, 2)
    cases = [
        ({"ids": [[1]]}, "missing input(s) mask"),
        ({"ids": [1, 2], "mask": [[[0, 1]]]}, "expected 2 dimensions [batch, seq]"),
        ({"ids": [[1, 2]], "mask": [[[0, 1, 2]] * 2]}, "dimension 2 must be 2"),
        ({"ids": [[1, 2]], "mask": [[[0, 1]] * 3]}, "dimension seq is 3 here but 2 in input ids"),
        ({"ids": [[1, 2], [3]], "mask": []}, "not a rectangular array"),
        ([1, 2], "expected a JSON object with field(s) ids, mask"),
    ]
    for payload, message in cases:
        with pytest.raises(StageError) as caught:
            decode_inputs(STAGE, payload)
        assert caught.value.status == 422 and message in str(caught.value), (payload, str(caught.value))


def test_labels_and_batched_runs_split_back_per_request():
    out = encode_output(STAGE, torch.tensor([[0.1, 2.0]]), {})
    assert out["label"] == "yes" and set(out["scores"]) == {"no", "yes"}
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return x.sum(-1, keepdim=True)

    items = [[torch.ones(1, 4)], [torch.ones(3, 4) * 2], [torch.ones(2, 5)]]  # the last cannot join the first two
    outs = run_batched(model, items)
    assert sorted(calls) == [2, 4]
    assert [o.tolist() for o in outs] == [[[4.0]], [[8.0]] * 3, [[5.0]] * 2]


def test_a_join_gets_stage_keyed_input_whichever_branch_ran():
    pipe = _pipeline(
        [tool("cls"), tool("a"), tool("b"), tool("report")],
        [
            {"from": "cls", "to": "a", "when": {"field": "label", "equals": "a"}},
            {"from": "cls", "to": "b", "when": {"field": "label", "equals": "b"}},
            {"from": "a", "to": "report"},
            {"from": "b", "to": "report"},
        ],
        "cls",
        "report",
    )
    fake = Fake({"cls": {"label": "b"}, "b": {"from_b": 1}, "report": lambda p: p})
    assert run(PipelineRunner(pipe, fake), {}).output == {"b": {"from_b": 1}}
