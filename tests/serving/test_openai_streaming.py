"""A streamed agent loop through the OpenAI route, without Ray or vLLM: the `openai` client against the ingress app,
a scripted LLM stage that streams its answer token by token and calls the loop's (inline) tool first.

The engine side (an `auto` answer's content decoded from its JSON as it is generated) is `content_so_far`'s test
below; `test_openai_e2e.py` streams a loop on the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from hetforge.serving.dashboard_page import DashboardSampler
from hetforge.serving.dataflow import PipelineRunner
from hetforge.serving.deployments import dependency_checks
from hetforge.serving.ingress import create_app
from hetforge.serving.ingress.state import IngressState
from hetforge.serving.llm import content_so_far
from hetforge.serving.metrics import Metrics
from hetforge.serving.tools import InlineCaller, InlineTool
from hetforge.spec.models import Pipeline

openai = pytest.importorskip("openai")
USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 6,
    "total_tokens": 46,
    "prompt_tokens_details": {"cached_tokens": 32},
}
TOOLS = "def lookup_order(order_id: str) -> dict:\n    return {'order_id': order_id, 'status': 'shipped'}\n"
PIPELINE = {
    "name": "shop",
    "entry": "agent",
    "output": "agent",
    "openai": {"models": ["tiny"]},
    "stages": [
        {
            "name": "agent",
            "kind": "llm",
            "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "x"},
            "agent_loop": {"tools": ["lookup_order"], "max_iterations": 4},
        },
        {"name": "lookup_order", "kind": "tool", "callable": "tools.py:lookup_order", "placement": "inline"},
    ],
}


class TokenLlm:
    """Calls lookup_order on its first turn; then answers with the tool's result, one token per streamed delta."""

    def __init__(self):
        self.turns: list[int] = []  # the history's length at each call

    def _answer(self, payload: dict) -> dict:
        history, choice = payload["history"], (payload.get("options") or {}).get("tool_choice")
        if isinstance(choice, dict):  # the client named its own tool
            name = choice["function"]["name"]
            call = {"id": "c9", "type": "function", "function": {"name": name, "arguments": '{"city": "oslo"}'}}
            return {"text": "", "tool_calls": [call], "finish_reason": "tool_calls", "usage": USAGE}
        if not history:
            call = {
                "id": "c1",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": '{"order_id": "7"}'},
            }
            return {"text": "", "tool_calls": [call], "finish_reason": "tool_calls", "usage": USAGE}
        status = json.loads(history[-1]["content"])["status"]
        return {"text": f"Your order 7 is {status} and on its way.", "finish_reason": "stop", "usage": USAGE}

    async def __call__(self, stage, payload, request_id):
        self.turns.append(len(payload["history"]))
        return self._answer(payload)

    async def stream(self, stage, payload, request_id):
        self.turns.append(len(payload["history"]))
        answer = self._answer(payload)
        words = answer["text"].split(" ")
        for i, word in enumerate(words):
            yield word if i == len(words) - 1 else word + " "
        yield {k: v for k, v in answer.items() if k != "text"}


@pytest.fixture()
def served(tmp_path: Path):
    (tmp_path / "tools.py").write_text(TOOLS)
    pipeline = Pipeline.model_validate(PIPELINE)
    metrics = Metrics(CollectorRegistry())
    tool = InlineTool(pipeline.name, pipeline.stage("lookup_order"), tmp_path, metrics, dependency_checks)
    llm = TokenLlm()
    state = IngressState(
        pipeline=pipeline,
        runner=PipelineRunner(pipeline, InlineCaller(llm, {"lookup_order": tool})),
        handles={"lookup_order": tool},
        registry_path=str(tmp_path / "registry.sqlite"),
        metrics_dir=str(tmp_path),
        metrics=metrics,
        sampler=DashboardSampler(pipeline.name, str(tmp_path)),
    )
    http = TestClient(create_app(state))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0), llm


def test_a_streamed_agent_loop_sends_the_answer_token_by_token(served):
    client, llm = served
    messages = [{"role": "user", "content": "Where is order 7?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 1  # the answer arrives as it is generated, not as one chunk
    assert "".join(contents) == whole.choices[0].message.content == "Your order 7 is shipped and on its way."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)  # the loop's own tool stays inside
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == whole.usage.total_tokens == 2 * 46  # both turns
    assert usage.prompt_tokens_details.cached_tokens == 64
    assert llm.turns == [0, 2, 0, 2]  # a tool round in each request


def test_a_client_tool_call_ends_the_streamed_loop_in_openai_form(served):
    client, _ = served
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[weather],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = list(stream)
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [("get_weather", {"city": "oslo"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)


@pytest.mark.parametrize(
    "content", ["plain", 'with "quotes" and \\ backslash', "line\nbreak\ttab", "accents é ü and 😀 emoji", ""]
)
def test_content_so_far_decodes_an_auto_answer_as_it_grows(content):
    text = json.dumps({"content": content}, separators=(",", ":"))  # how vLLM emits it, whitespace disabled
    seen = ""
    for end in range(len(text) + 1):
        got = content_so_far(text[:end])
        if got is not None:
            assert got.startswith(seen), (text[:end], got, seen)  # only ever grows
            seen = got
    assert seen == content
    assert content_so_far('{"tool_calls":[{"name":"x"') is None  # a tool call is never streamed as text
    assert content_so_far('{"cont') is None
