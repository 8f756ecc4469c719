"""The OpenAI routes without Ray or vLLM: the `openai` client against the ingress app, a scripted LLM stage behind it.

What the real engine does with tools and schemas is `test_openai_e2e.py`'s; here: the request's fields reach the
output stage, answers and chunks have OpenAI's shapes, errors OpenAI's format, sessions are carried."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from hetforge.serving.dashboard_page import DashboardSampler
from hetforge.serving.dataflow import PipelineRunner
from hetforge.serving.ingress import create_app
from hetforge.serving.ingress.state import SESSION, IngressState
from hetforge.serving.llm import decoding_schema, read_decoded
from hetforge.serving.llm_metrics import LLM_SPEC, LlmMetrics
from hetforge.serving.metrics import Metrics
from hetforge.spec.models import Pipeline
from tests.conftest import REPO

openai = pytest.importorskip("openai")
FIXTURES = REPO / "tests" / "data" / "openai"
USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 5,
    "total_tokens": 35,
    "prompt_tokens_details": {"cached_tokens": 16},
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["oslo", "paris"]}}, "required": ["city"]},
    },
}


class ScriptedLlm:
    """The LLM stage: calls the first tool offered unless tool_choice is none; records what it was given."""

    def __init__(self):
        self.calls: list[tuple[dict, str]] = []

    def answer(self, payload: dict) -> dict:
        options = payload.get("options") or {}
        if options.get("tools") and options.get("tool_choice") != "none":
            name = options["tools"][0]["function"]["name"]
            call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": '{"city": "oslo"}'}}
            return {"text": "", "tool_calls": [call], "finish_reason": "tool_calls", "usage": USAGE}
        if (options.get("response_format") or {}).get("type") == "json_schema":
            return {"text": '{"answer": "yes", "sure": true}', "finish_reason": "stop", "usage": USAGE}
        return {"text": "It snows in Oslo.", "finish_reason": "stop", "usage": USAGE}

    async def __call__(self, stage, payload, request_id):
        self.calls.append((payload, SESSION.get()))
        return self.answer(payload)

    async def stream(self, stage, payload, request_id):
        self.calls.append((payload, SESSION.get()))
        answer = self.answer(payload)
        for word in answer["text"].split(" "):
            yield word + " "
        yield {k: v for k, v in answer.items() if k != "text"}


PIPELINE = {
    "name": "chat",
    "entry": "agent",
    "output": "agent",
    "openai": {"models": ["hetforge-agent", "tiny"]},
    "stages": [
        {"name": "agent", "kind": "llm", "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "x"}},
    ],
}


@pytest.fixture()
def served(tmp_path):
    pipeline = Pipeline.model_validate(PIPELINE)
    llm = ScriptedLlm()
    state = IngressState(
        pipeline=pipeline,
        runner=PipelineRunner(pipeline, llm),
        handles={},
        registry_path=str(tmp_path / "registry.sqlite"),
        metrics_dir=str(tmp_path),
        metrics=Metrics(CollectorRegistry()),
        sampler=DashboardSampler(pipeline.name, str(tmp_path)),
    )
    http = TestClient(create_app(state))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    return client, http, llm


def test_models_lists_the_names_the_yaml_declares_and_others_are_refused(served):
    client, http, _ = served
    assert [m.id for m in client.models.list()] == ["hetforge-agent", "tiny"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and "hetforge-agent" in error["message"]


def test_tool_round_trip_with_the_openai_client(served):
    client, _, llm = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(
        model="hetforge-agent", messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=12, seed=7
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert first.usage.total_tokens == 35 and first.usage.prompt_tokens_details.cached_tokens == 16
    payload, _ = llm.calls[0]
    # the entry stage gets something bindings can index; the output stage gets the request's settings
    assert payload["input"]["last_user_message"] == "Weather in Oslo?"
    assert payload["options"] == {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 12, "seed": 7}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": '{"sky": "snow"}'},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none")
    assert second.choices[0].message.content == "It snows in Oslo." and second.model == "tiny"
    assert llm.calls[1][0]["input"]["messages"][-1]["tool_call_id"] == "call_1"
    # the conversation's opening is its session: both turns carry the same one
    assert llm.calls[0][1] and llm.calls[0][1] == llm.calls[1][1]


def test_streaming_with_usage_and_tool_calls(served):
    client, _, llm = served
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-session-id": "conv-42"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "It snows in Oslo."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1]) and llm.calls[-1][1] == "conv-42"
    calls = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER], stream=True
    )
    chunks = list(calls)
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].function.name == "get_weather" and deltas[0][0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_bad_requests_are_openai_errors_naming_the_field(served):
    client, http, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert caught.value.body["param"] == "temperature" and caught.value.body["type"] == "invalid_request_error"
    reply = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert reply.status_code == 400 and "role" in reply.json()["error"]["message"]
    reply = http.post("/v1/chat/completions", content=b"{not json")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
    reply = http.post("/v1/chat/completions", json={"model": "tiny"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_agent_framework_requests_replayed(served, fixture):
    _, http, llm = served
    doc = json.loads((FIXTURES / fixture).read_text())
    reply = http.post("/v1/chat/completions", json=doc["request"])
    assert reply.status_code == 200, reply.text
    if doc["expect"]["stream"]:
        events = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
        assert reply.text.rstrip().endswith("data: [DONE]") and events[-1]["usage"]["total_tokens"] == 35
        finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
    else:
        finish = reply.json()["choices"][0]["finish_reason"]
    assert finish in doc["expect"]["finish_reason"]
    options = llm.calls[-1][0]["options"]
    assert options.get("tool_choice") == doc["request"].get("tool_choice")
    assert options.get("max_tokens") == doc["request"]["max_tokens"]


def test_decoding_schemas_are_vllms_and_answers_are_read_back():
    pytest.importorskip("vllm")
    required = decoding_schema([WEATHER], "required", False)
    assert required["type"] == "array" and required["maxItems"] == 1
    assert required["items"]["anyOf"][0]["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    auto = decoding_schema([WEATHER], "auto", None)
    assert [set(s["properties"]) for s in auto["anyOf"]] == [{"tool_calls"}, {"content"}]
    named = decoding_schema([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named == WEATHER["function"]["parameters"]
    assert decoding_schema([WEATHER], "none", None) is None
    text, calls = read_decoded(
        '{"tool_calls": [{"name": "get_weather", "parameters": {"city": "oslo"}}]}', [WEATHER], "auto"
    )
    assert text == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "oslo"}
    assert read_decoded('{"content": "hello"}', [WEATHER], "auto") == ("hello", [])
    assert read_decoded('[{"name": "get_weather", "par', [WEATHER], "required") == ('[{"name": "get_weather", "par', [])


def test_llm_metric_names_are_pinned():
    assert LLM_SPEC == {
        name: (kind, LLM_SPEC[name][1], ("pipeline", "stage", "replica"))
        for name, kind in {
            "hetforge_llm_prefix_cache_queries_tokens_total": "counter",
            "hetforge_llm_prefix_cache_hits_tokens_total": "counter",
            "hetforge_llm_prompt_tokens_total": "counter",
            "hetforge_llm_generation_tokens_total": "counter",
            "hetforge_llm_time_to_first_token_seconds": "histogram",
            "hetforge_llm_time_per_output_token_seconds": "histogram",
            "hetforge_llm_queue_time_seconds": "histogram",
        }.items()
    }
    registry = CollectorRegistry()
    metrics = LlmMetrics(registry)

    class Stats:  # the fields of vLLM's SchedulerStats / IterationStats the logger reads
        prefix_cache_stats = type("P", (), {"queries": 256, "hits": 128})()
        prompt_token_stats = type("T", (), {"computed": 128})()
        num_generation_tokens = 4
        time_to_first_tokens_iter = [0.02]
        finished_requests = [
            type("F", (), {"queued_time": 0.001, "num_generation_tokens": 4, "mean_time_per_output_token": 0.003})()
        ]

    metrics.record(("p", "s", "r"), Stats(), Stats())
    value = registry.get_sample_value
    labels = {"pipeline": "p", "stage": "s", "replica": "r"}
    assert value("hetforge_llm_prefix_cache_hits_tokens_total", labels) == 128
    assert value("hetforge_llm_prefix_cache_queries_tokens_total", labels) == 256
    assert value("hetforge_llm_time_per_output_token_seconds_count", labels) == 1
    assert value("hetforge_llm_queue_time_seconds_sum", labels) == pytest.approx(0.001)


def test_messages_for_a_template_without_tools_and_tool_schemas_from_signatures():
    from hetforge.serving.llm import for_template, parameters_of

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "oslo"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "snow"}'},
    ]
    plain = for_template(messages, [WEATHER], "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert plain[0]["content"].startswith("Be brief.\n\nTools you may call") and '"get_weather"' in plain[0]["content"]
    assert json.loads(plain[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "parameters": '{"city": "oslo"}'}]
    }
    assert plain[3] == {"role": "user", "content": 'Tool result (c1): {"sky": "snow"}'}
    assert for_template(messages, [WEATHER], "{{ m.tool_calls }}") == messages  # a template that knows tools

    def tool(city: Literal["oslo", "paris"], days: int, verbose: bool = False, *rest, note=None):
        return city

    assert parameters_of(tool) == {
        "type": "object",
        "properties": {
            "city": {"enum": ["oslo", "paris"]},
            "days": {"type": "integer"},
            "verbose": {"type": "boolean"},
            "note": {},
        },
        "required": ["city", "days"],
    }
