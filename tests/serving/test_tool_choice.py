"""How an agent loop's tool choice is decoded: `required` with one tool and no parallel calls is that tool named
(vLLM then constrains only its arguments); anything else keeps the array of calls."""

from __future__ import annotations

import json

from hetforge.serving.llm import plan_call, read_decoded
from hetforge.spec.models import Pipeline

ONE = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
TWO = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def _stage():
    doc = {
        "name": "p",
        "entry": "agent",
        "output": "agent",
        "stages": [
            {
                "name": "agent",
                "kind": "llm",
                "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "x"},
                "agent_loop": {"tools": ["lookup"], "max_iterations": 3, "tool_choice": "required"},
            },
            {"name": "lookup", "kind": "tool", "callable": "tools.py:lookup"},
        ],
    }
    return Pipeline.model_validate(doc).stage("agent")


def _choice(options: dict, tools: list[dict] | None = None):
    payload = {"input": "where is my order?", "history": [], "options": options}
    return plan_call(_stage(), tools if tools is not None else [ONE], payload)[2]


def test_one_tool_without_parallel_calls_is_named():
    choice = _choice({"parallel_tool_calls": False})
    assert choice == {"type": "function", "function": {"name": "lookup"}}
    content, calls = read_decoded('{"order_id":"1234"}', [ONE], choice)
    assert content == "" and calls[0]["function"]["name"] == "lookup"
    assert json.loads(calls[0]["function"]["arguments"]) == {"order_id": "1234"}


def test_parallel_calls_another_tool_or_another_choice_keep_their_form():
    assert _choice({}) == "required"  # parallel calls allowed: the array may hold several
    assert _choice({"parallel_tool_calls": False, "tools": [TWO]}) == "required"  # two tools to choose from
    assert _choice({"parallel_tool_calls": False, "tool_choice": "none"}) == "none"
    assert _choice({"parallel_tool_calls": False, "tool_choice": "auto"}) == "auto"
