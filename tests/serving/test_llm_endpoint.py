"""An LLM stage on an OpenAI-compatible endpoint (a local replay server started here), in an agent
loop that calls a real tool stage, walked by the pipeline runner."""

from __future__ import annotations

import asyncio
import json

import pytest

from hetforge.serving.dataflow import PipelineError, PipelineRunner
from hetforge.serving.llm import LlmRuntime, loop_tools
from hetforge.serving.tools import ToolRuntime
from hetforge.spec.models import Pipeline
from tests.conftest import EXAMPLES
from tests.optimizer.replay_server import ReplayServer


def _pipeline(base_url: str) -> Pipeline:
    return Pipeline.model_validate(
        {
            "name": "voice",
            "entry": "agent",
            "output": "agent",
            "stages": [
                {
                    "name": "agent",
                    "kind": "llm",
                    "endpoint": {"base_url": base_url, "model": "replay", "timeout_s": 10},
                    "system_prompt": "Strategy (voice): answer, calling tools when needed.",
                    "prompt_template": "Q: {question}",
                    "agent_loop": {"tools": ["calculator"], "max_iterations": 3},
                },
                {
                    "name": "calculator",
                    "kind": "tool",
                    "description": "Evaluates arithmetic.",
                    "callable": "tools/calculator.py:calculate",
                },
            ],
        }
    )


class LocalCaller:
    def __init__(self, pipeline: Pipeline):
        agent = pipeline.stage("agent")
        self.runtimes = {
            "agent": LlmRuntime(agent, EXAMPLES, loop_tools(pipeline, agent, EXAMPLES)),
            "calculator": ToolRuntime(pipeline.stage("calculator"), EXAMPLES),
        }

    async def __call__(self, stage, payload, request_id):
        return await self.runtimes[stage](payload)

    def stream(self, stage, payload, request_id):
        return self.runtimes[stage].stream(payload, request_id)


CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}
    ],
}


def test_agent_loop_over_an_endpoint_calls_the_tool_and_answers():
    script = {"voice": [CALL, "It is 42."]}
    with ReplayServer(script) as server:
        pipeline = _pipeline(server.base_url)
        result = asyncio.run(PipelineRunner(pipeline, LocalCaller(pipeline)).run({"question": "what is 6*7?"}, "r1"))
        assert result.output["text"] == "It is 42." and result.output["usage"]["total_tokens"] == 4
        first, second = server.requests
        # the endpoint gets the loop's tool in OpenAI's format, its parameters from the function's signature
        assert first["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "calculator",
                    "description": "Evaluates arithmetic.",
                    "parameters": {
                        "type": "object",
                        "properties": {"expression": {"type": "string"}},
                        "required": ["expression"],
                    },
                },
            }
        ]
        assert first["tool_choice"] == "auto" and first["messages"][0]["role"] == "system"
        assert first["messages"][1] == {"role": "user", "content": "Q: what is 6*7?"}
        assert second["messages"][-2]["tool_calls"] == CALL["tool_calls"]
        assert second["messages"][-1]["tool_call_id"] == "call_1"
        assert json.loads(second["messages"][-1]["content"]) == {"expression": "6*7", "value": 42}


def test_endpoint_failure_is_a_located_502():
    with ReplayServer({"voice": ["HTTP 500"]}) as server:
        pipeline = _pipeline(server.base_url)
        with pytest.raises(PipelineError) as caught:
            asyncio.run(PipelineRunner(pipeline, LocalCaller(pipeline)).run({"question": "q"}, "r2"))
    assert (
        caught.value.status == 502 and caught.value.stage == "agent" and "InternalServerError" in caught.value.message
    )
