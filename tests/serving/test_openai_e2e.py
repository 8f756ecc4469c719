"""The OpenAI API against the real parts: Ray Serve on a local instance, two vLLM CPU replicas of the tiny model
in an agent loop with a tool stage (tests/data/serving/agent_pipeline.yaml). One deployment serves every test.

The tiny model has random weights: what it says is arbitrary, so the tests check what constrained decoding
guarantees (tool calls of the offered tools with schema-valid arguments, answers valid against a JSON schema),
usage, streaming shapes and where requests ran (the replicas' own prefix-cache counters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.conftest import REPO, serving  # noqa: E402

PIPELINE = REPO / "tests" / "data" / "serving" / "agent_pipeline.yaml"
FIXTURES = REPO / "tests" / "data" / "openai"
QUERIES = "hetforge_llm_prefix_cache_queries_tokens"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["oslo", "paris"]}, "tomorrow": {"type": "boolean"}},
            "required": ["city", "tomorrow"],
        },
    },
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_llm.py")], check=True, capture_output=True, timeout=300
    )
    home = tmp_path_factory.mktemp("home")
    with serving(PIPELINE, home, HETFORGE_RAY_TMP=f"/tmp/hf-ray-oa-{os.getpid()}") as record:
        yield record.url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="none", timeout=120, max_retries=0)


def test_models_and_an_unknown_model(client):
    assert [m.id for m in client.models.list()] == ["hetforge-agent", "tiny"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"


def test_tool_round_trip_decoded_to_the_tools_schema(client):
    messages = [{"role": "user", "content": "Will it snow in Oslo tomorrow?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice=named)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)  # constrained decoding: valid JSON, of the tool's schema
    assert call.function.name == "get_weather" and args["city"] in ("oslo", "paris")
    assert isinstance(args["tomorrow"], bool) and first.usage.completion_tokens > 0
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "snow"})},
    ]
    second = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert second.choices[0].message.tool_calls is None and isinstance(second.choices[0].message.content, str)
    assert second.choices[0].finish_reason in ("stop", "length") and 0 < second.usage.completion_tokens <= 8


def test_the_pipelines_own_agent_loop_runs_with_its_tool_on_one_replica(client, served):
    """The planner puts the light tool inline, so the whole loop runs in one LLM replica (`tools.replica_loops`)."""
    status = httpx.get(f"{served}/v1/pipelines/agent-test/status", timeout=30).json()["stages"]["lookup_order"]
    assert status["placement"] == "inline" and status["also_in_replicas_of"] == ["agent"]
    before, queries = _calls(served), _queries_by_replica(served)
    reply = client.chat.completions.create(
        model="hetforge-agent",
        messages=[{"role": "user", "content": "Where is my order?"}],
        parallel_tool_calls=False,  # one call a turn: every turn's array fits max_tokens
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "status",
                "schema": {
                    "type": "object",
                    "properties": {"shipped": {"type": "boolean"}, "order": {"enum": ["1234", "5678"]}},
                    "required": ["shipped", "order"],
                },
            },
        },
    )
    # tool_choice required for 2 turns (the tool stage runs twice), then the answer, held to the JSON schema
    doc = json.loads(reply.choices[0].message.content)
    assert isinstance(doc["shipped"], bool) and doc["order"] in ("1234", "5678")
    after = _calls(served)
    assert after["lookup_order"] - before.get("lookup_order", 0) == 2  # counted by the replica that ran the loop
    again = httpx.get(f"{served}/v1/pipelines/agent-test/status", timeout=30).json()["stages"]["lookup_order"]
    assert again["attempts"] == status["attempts"]  # none of them in the ingress's process
    assert after["agent"] - before.get("agent", 0) == 3  # the replica's three LLM calls
    assert len(_served_by(served, queries)) == 1
    # usage sums the 3 LLM calls; turns 2 and 3 reuse the conversation's prefix on the replica of the session
    assert reply.usage.prompt_tokens > 3 * 400 and reply.usage.prompt_tokens_details.cached_tokens >= 2 * 256


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say hello."}],
        tool_choice="none",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 6
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def _streamed(client, **kwargs) -> tuple[list[str], list]:
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content], chunks


def test_the_pipelines_own_loop_streams_its_answer_as_generated(client, served):
    """The loop's tool turns (tool_choice required) stay inside; its last turn (tool_choice none) streams."""
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Where is my order 1234?"}], "temperature": 0}
    contents, chunks = _streamed(client, **ask, parallel_tool_calls=False)
    assert len(contents) > 1, contents  # up to 48 tokens, sent as they come, not as one chunk
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens > 3 * 400  # the loop's 3 calls, summed
    # the same answer as unstreamed, greedy; asked without tools, so that no call id (random, in the prompt) differs
    whole = client.chat.completions.create(**ask, tool_choice="none")
    contents, chunks = _streamed(client, **ask, tool_choice="none")
    assert len(contents) > 1 and "".join(contents) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_agent_framework_requests_replayed(served, fixture):
    doc = json.loads((FIXTURES / fixture).read_text())
    reply = httpx.post(f"{served}/v1/chat/completions", json=doc["request"], timeout=120)
    assert reply.status_code == 200, reply.text
    if doc["expect"]["stream"]:
        events = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
        finals = [e["choices"][0] for e in events if e["choices"]]
        message = {"tool_calls": [t for e in finals for t in e["delta"].get("tool_calls") or []]}
        finish, usage = finals[-1]["finish_reason"], events[-1]["usage"]
    else:
        body = reply.json()
        message, finish, usage = body["choices"][0]["message"], body["choices"][0]["finish_reason"], body["usage"]
    assert finish in doc["expect"]["finish_reason"] and usage["completion_tokens"] > 0
    if doc["expect"]["tool_calls"] is not None:
        assert bool(message.get("tool_calls")) == doc["expect"]["tool_calls"]
    for call in message.get("tool_calls") or []:
        offered = {t["function"]["name"] for t in doc["request"]["tools"]}
        assert call["function"]["name"] in offered and isinstance(json.loads(call["function"]["arguments"]), dict)
    if doc["expect"].get("json_schema"):
        answer = json.loads(message["content"])
        assert answer["answer"] in ("yes", "no") and isinstance(answer["sure"], bool)


def _calls(url: str) -> dict[str, float]:
    """Stage calls answered, by stage, from the ingress's /metrics (every process's series, aggregated)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "hetforge_stage_latency_seconds":
            for s in family.samples:
                if s.name.endswith("_count") and s.labels.get("pipeline") == "agent-test":
                    out[s.labels["stage"]] = out.get(s.labels["stage"], 0.0) + s.value
    return out


def _queries_by_replica(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == QUERIES:
            for s in family.samples:
                if s.name == QUERIES + "_total" and s.labels.get("pipeline") == "agent-test":
                    out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out


def _served_by(url: str, before: dict[str, float], timeout_s: float = 60) -> set[str]:
    """The replicas whose prefix-cache lookups grew since `before` (vLLM records a step's stats as it ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = _queries_by_replica(url)
        grew = {r for r, v in now.items() if v > before.get(r, 0.0)}
        if grew or time.monotonic() > deadline:
            return grew
        time.sleep(0.2)


def test_a_sessions_turns_meet_one_replica_and_its_cache(client, served):
    replicas_of_sessions, cached_second_turns = set(), []
    for i in range(12):
        session = f"session-{i}"
        messages = [{"role": "user", "content": f"Order question number {i}."}]
        seen = set()
        for turn in range(2):
            before = _queries_by_replica(served)
            reply = client.chat.completions.create(
                model="tiny",
                messages=messages,
                tool_choice="none",
                max_tokens=2,
                extra_headers={"x-session-id": session},
            )
            seen |= _served_by(served, before)
            if turn == 1:
                cached_second_turns.append(reply.usage.prompt_tokens_details.cached_tokens)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""}]
            messages += [{"role": "user", "content": "And then?"}]
        assert len(seen) == 1, f"{session} ran on {seen}"  # both turns on one replica
        replicas_of_sessions |= seen
    assert len(replicas_of_sessions) == 2  # sessions spread over both replicas
    assert all(c > 0 for c in cached_second_turns)  # every second turn found its prefix cached
