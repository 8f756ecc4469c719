"""An LLM stage on an OpenAI-compatible endpoint (a local replay server started here), in an agent
loop that calls a real tool stage, walked by the pipeline runner."""

from __future__ import annotations

import asyncio
import json

import pytest

from hetforge.serving.dataflow import PipelineError, PipelineRunner
from hetforge.serving.llm import LlmRuntime
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
            "agent": LlmRuntime(agent, EXAMPLES, [{"name": "calculator", "description": "Evaluates arithmetic."}]),
            "calculator": ToolRuntime(pipeline.stage("calculator"), EXAMPLES),
        }

    async def __call__(self, stage, payload, request_id):
        return await self.runtimes[stage](payload)

    def stream(self, stage, payload, request_id):
        return self.runtimes[stage].stream(payload, request_id)


def test_agent_loop_over_an_endpoint_calls_the_tool_and_answers():
    script = {"voice": ['{"tool": "calculator", "arguments": {"expression": "6*7"}}', "It is 42."]}
    with ReplayServer(script) as server:
        pipeline = _pipeline(server.base_url)
        result = asyncio.run(PipelineRunner(pipeline, LocalCaller(pipeline)).run({"question": "what is 6*7?"}, "r1"))
        assert result.output == {"text": "It is 42."}
        first, second = server.requests
        assert (
            first["messages"][0]["role"] == "system"
            and "- calculator: Evaluates arithmetic." in first["messages"][0]["content"]
        )
        assert first["messages"][1] == {"role": "user", "content": "Q: what is 6*7?"}
        tool_result = json.loads(second["messages"][-1]["content"])
        assert tool_result == {"tool": "calculator", "result": {"expression": "6*7", "value": 42}}


def test_endpoint_failure_is_a_located_502():
    with ReplayServer({"voice": ["HTTP 500"]}) as server:
        pipeline = _pipeline(server.base_url)
        with pytest.raises(PipelineError) as caught:
            asyncio.run(PipelineRunner(pipeline, LocalCaller(pipeline)).run({"question": "q"}, "r2"))
    assert (
        caught.value.status == 502 and caught.value.stage == "agent" and "InternalServerError" in caught.value.message
    )
