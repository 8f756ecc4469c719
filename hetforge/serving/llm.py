"""LLM stages: vLLM's engine in the replica, or an OpenAI-compatible endpoint.

The stage input becomes chat messages: the system prompt (plus, in an agent loop, the tools it may
call and how), then the user message (the stage's `prompt_template` filled from the input's fields,
a string as is, a `messages` list as given, anything else as JSON), then the loop's history.

The answer is {"text": ...}; with `choices` the decoding is constrained to them (vLLM structured
outputs) and the answer also carries `choice`; when the text is a JSON object its fields are added
(a router can answer {"route": "search"} for a branch condition); when it is {"tool": NAME,
"arguments": {...}} naming a tool of the loop, the answer carries `tool_call` for the pipeline walk.

vLLM runs its engine core in a child process; `vllm` is imported only here, when a stage uses it.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hetforge.serving.dataflow import StageError

TOOL_INSTRUCTIONS = (
    "You may call one tool per turn by answering only with JSON: "
    '{{"tool": "<name>", "arguments": {{...}}}}. Tools:\n{tools}\n'
    "A tool's result comes back as the next message; answer in plain text when you are done."
)


def render_user(stage, value: Any) -> list[dict]:
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        messages = value["messages"]
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant", "tool")
                or not isinstance(m.get("content"), str)
            ):
                raise StageError(
                    f"stage {stage.name}: messages[{i}] must be {{role: system|user|assistant|tool, content: string}}",
                    422,
                )
        return list(messages)
    if stage.prompt_template is not None:
        if not isinstance(value, dict):
            value = {"input": value}
        try:
            return [{"role": "user", "content": stage.prompt_template.format(**value)}]
        except (KeyError, IndexError, ValueError) as err:
            raise StageError(
                f"stage {stage.name}: prompt_template needs field {err} (input fields: {', '.join(value)})", 422
            ) from None
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), str):
        return [{"role": "user", "content": next(iter(value.values()))}]
    return [{"role": "user", "content": json.dumps(value, default=str)}]


def build_messages(stage, payload: dict, tools: list[dict]) -> list[dict]:
    system = stage.system_prompt
    if tools:
        listing = "\n".join(f"- {t['name']}: {t.get('description') or 'no description'}" for t in tools)
        system = (system + "\n\n" if system else "") + TOOL_INSTRUCTIONS.format(tools=listing)
    messages = [{"role": "system", "content": system}] if system else []
    messages += render_user(stage, payload.get("input"))
    for m in payload.get("history") or []:
        # the tool role is not in every chat template: tool results go back as user messages
        messages.append({"role": "user", "content": m["content"]} if m["role"] == "tool" else m)
    return messages


def parse_answer(text: str, choices: list[str] | None, tools: list[dict]) -> dict:
    answer: dict = {"text": text}
    if choices:
        answer["choice"] = text.strip()
    match = re.search(r"\{.*\}", text, re.S)
    if match:
        try:
            doc = json.loads(match.group(0))
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            names = {t["name"] for t in tools}
            if doc.get("tool") in names:
                answer["tool_call"] = {"name": doc["tool"], "arguments": doc.get("arguments") or {}}
            for key, value in doc.items():
                answer.setdefault(key, value)
    return answer


def _engine_id(request_id: str) -> str:
    """vLLM needs a unique id per generation: an agent loop calls the engine several times per request."""
    return f"{request_id or 'req'}-{uuid.uuid4().hex[:8]}"


class LlmRuntime:
    def __init__(self, stage, base_dir: Path, tools: list[dict] | None = None):
        self.stage, self.tools = stage, tools or []
        self.engine = self.tokenizer = self.client = None
        if stage.vllm is not None:
            self._start_vllm(base_dir)
        else:
            from openai import AsyncOpenAI  # only endpoint stages need the client library

            ep = stage.endpoint
            key = os.environ.get(ep.api_key_env, "") if ep.api_key_env else ""
            self.client = AsyncOpenAI(base_url=ep.base_url, api_key=key or "EMPTY", timeout=ep.timeout_s, max_retries=1)

    def _start_vllm(self, base_dir: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM and transformers load only in replicas of vLLM stages: they are heavy, and optional elsewhere
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        spec = self.stage.vllm
        # A folder beside the pipeline file, else a model name (a missing folder is refused by deploy.check_servable)
        model = str((base_dir / spec.model).resolve()) if (base_dir / spec.model).exists() else spec.model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if spec.chat_template:
            self.tokenizer.chat_template = (base_dir / spec.chat_template).read_text()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **spec.engine_args))

    def _sampling(self, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s = self.stage.sampling
        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=StructuredOutputsParams(choice=self.stage.choices) if self.stage.choices else None,
        )

    def _prompt(self, messages: list[dict]):
        from vllm.inputs import TokensPrompt

        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return TokensPrompt(prompt_token_ids=list(ids))

    async def stream(self, payload: dict, request_id: str = "") -> AsyncIterator[str]:
        messages = build_messages(self.stage, payload, self.tools)
        if self.engine is not None:
            async for out in self.engine.generate(
                self._prompt(messages), self._sampling(stream=True), _engine_id(request_id)
            ):
                if out.outputs and out.outputs[0].text:
                    yield out.outputs[0].text
            return
        s = self.stage.sampling
        try:
            chunks = await self.client.chat.completions.create(
                model=self.stage.endpoint.model,
                messages=messages,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                stream=True,
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except Exception as err:  # noqa: BLE001 - the endpoint's failure is this stage's 502
            raise StageError(
                f"stage {self.stage.name}: endpoint {self.stage.endpoint.base_url}: {type(err).__name__}: {err}", 502
            ) from None

    async def __call__(self, payload: dict, request_id: str = "") -> dict:
        messages = build_messages(self.stage, payload, self.tools)
        if self.engine is not None:
            text = ""
            async for out in self.engine.generate(
                self._prompt(messages), self._sampling(stream=False), _engine_id(request_id)
            ):
                if out.finished and out.outputs:
                    text = out.outputs[0].text
        else:
            text = await self._complete(messages)
        if self.stage.choices and text.strip() not in self.stage.choices:
            raise StageError(
                f"stage {self.stage.name}: the model answered {text[:80]!r}, not one of {self.stage.choices}", 502
            )
        return parse_answer(text, self.stage.choices, self.tools)

    async def _complete(self, messages: list[dict]) -> str:
        s = self.stage.sampling
        try:
            reply = await self.client.chat.completions.create(
                model=self.stage.endpoint.model,
                messages=messages,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
            )
        except Exception as err:  # noqa: BLE001 - the endpoint's failure is this stage's 502
            raise StageError(
                f"stage {self.stage.name}: endpoint {self.stage.endpoint.base_url}: {type(err).__name__}: {err}"[:2000],
                502,
            ) from None
        message = reply.choices[0].message if reply.choices else None
        if message is not None and getattr(message, "tool_calls", None):  # a server with native tool calling
            call = message.tool_calls[0].function
            return json.dumps({"tool": call.name, "arguments": json.loads(call.arguments or "{}")})
        return (message.content if message is not None else "") or ""

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
