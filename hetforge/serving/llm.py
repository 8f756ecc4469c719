"""LLM stages: vLLM's engine in the replica, or an OpenAI-compatible endpoint, spoken to in OpenAI's terms.

A call's payload: `input` (the stage input), `history` (the agent loop's turns so far, OpenAI
messages: assistant turns with `tool_calls`, `tool` results with their `tool_call_id`) and
`options` (an OpenAI request's own settings: tools, tool_choice, parallel_tool_calls,
response_format, max_tokens, temperature, top_p, stop, seed; the stage's `sampling` otherwise).

The messages: the stage's system prompt, then the user message (`prompt_template` filled from the
input's fields, a string as is, a `messages` list as given, anything else as JSON), then the history.

Tool calls are decided by constrained decoding on vLLM (structured outputs), never found in free text:
- tool_choice `required` or a named function: vLLM's own schema for it
  (`vllm.tool_parsers.utils.get_json_schema_from_tools`: an array of {name, parameters}, or the named
  function's parameters); `required` with one tool and `parallel_tool_calls: false` is that tool named;
- `auto` (the default with tools): the answer is either {"tool_calls": <that array>} or
  {"content": "..."}, one JSON schema with both (vLLM's `auto` relies on a model-specific text parser
  instead; this works for any model, at the cost of the answer being JSON while it is generated);
- `none`: free text, or `response_format`'s JSON schema.
An endpoint stage passes tools and response_format to the endpoint and reads its native `tool_calls`.

The answer: {"text", "tool_calls" (OpenAI format, when any), "finish_reason", "usage"}; a JSON object
answer also has its fields added (a router can answer {"route": "search"} for a branch condition), and
`choices` adds `choice`. vLLM is imported only here, when a stage uses it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import os
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from hetforge.serving import cpu_cores
from hetforge.serving.dataflow import StageError
from hetforge.serving.llm_metrics import stat_logger_factory
from hetforge.serving.model_io import resolve_function

ROLES = ("system", "user", "assistant", "tool")
TOOL_LISTING = (
    'Tools you may call (answer with JSON: {{"tool_calls": [{{"name": ..., "parameters": {{...}}}}]}} '
    'to call, {{"content": "..."}} to answer):\n{tools}'
)
# Prefix caching is what makes an agent loop's turns cheap: each turn resends the conversation so far.
# Constrained JSON without whitespace between tokens: a model (a small one above all) may otherwise emit
# whitespace until max_tokens (an engine-wide setting in vLLM 0.32, of the xgrammar and guidance backends only).
ENGINE_DEFAULTS = {"enable_prefix_caching": True, "disable_log_stats": True}
STRUCTURED_DEFAULTS = {"backend": "xgrammar", "disable_any_whitespace": True}
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


# ---------------------------------------------------------------------------------------------- tools
def parameters_of(fn) -> dict:
    """A JSON schema of a Python tool's keyword arguments, from its signature and type hints."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: the arguments are still named
        hints = {}
    props, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(name)
        if typing.get_origin(hint) is typing.Literal:  # a closed set: decoding can only pick one of them
            props[name] = {"enum": list(typing.get_args(hint))}
        else:
            hint = typing.get_origin(hint) or hint
            props[name] = {"type": _JSON_TYPES[hint]} if hint in _JSON_TYPES else {}
        if param.default is param.empty:
            required.append(name)
    return {"type": "object", "properties": props, "required": required}


def loop_tools(pipeline, stage, base_dir: Path) -> list[dict]:
    """The agent loop's tool stages as OpenAI tools: a callable's parameters from its signature, an HTTP tool's
    as any object."""
    tools = []
    for name in stage.agent_loop.tools if stage.agent_loop else []:
        tool = pipeline.stage(name)
        fn = resolve_function(tool.callable, base_dir) if getattr(tool, "callable", None) else None
        params = parameters_of(fn) if fn is not None else {"type": "object"}
        tools.append(
            {"type": "function", "function": {"name": name, "description": tool.description, "parameters": params}}
        )
    return tools


def _tool_name(tool: dict) -> str:
    return tool["function"]["name"] if "function" in tool else tool["name"]


def decoding_schema(tools: list[dict], tool_choice: Any, parallel: bool | None) -> dict | None:
    """The JSON schema decoding is held to for these tools and tool_choice (None: free text)."""
    if not tools or tool_choice == "none":
        return None
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionToolsParam,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    params = [ChatCompletionToolsParam(**_openai_tool(t)) for t in tools]
    if isinstance(tool_choice, dict):
        return get_json_schema_from_tools(ChatCompletionNamedToolChoiceParam(**tool_choice), params)
    calls = get_json_schema_from_tools("required", params, parallel)
    if tool_choice == "required":
        return calls
    return {
        "anyOf": [
            {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]},
            {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"]},
        ]
    }


def _openai_tool(tool: dict) -> dict:
    if "function" in tool:
        return tool
    return {"type": "function", "function": {k: v for k, v in tool.items() if k in ("name", "description")}}


def _call(name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def read_decoded(text: str, tools: list[dict], tool_choice: Any) -> tuple[str, list[dict]]:
    """(content, tool calls) from a constrained answer; a truncated one (max_tokens) is content as generated."""
    if not tools or tool_choice == "none":
        return text, []
    try:
        doc = json.loads(text)
    except ValueError:
        return text, []
    if isinstance(tool_choice, dict):
        return "", [_call(tool_choice["function"]["name"], doc)]
    calls = doc if tool_choice == "required" else doc.get("tool_calls") if isinstance(doc, dict) else None
    if isinstance(calls, list):
        return "", [_call(c["name"], c.get("parameters")) for c in calls if isinstance(c, dict) and "name" in c]
    return (doc.get("content") or "") if isinstance(doc, dict) else text, []


CONTENT_OPENING = '{"content":"'  # how an `auto` answer starts under the schema above, whitespace disabled


def content_so_far(text: str) -> str | None:
    """The `content` an `auto` answer holds so far, decoded up to its last complete character; None while the
    text is not (yet) a content answer. A tool-call answer never is, so its JSON is never streamed as text."""
    if not text.startswith(CONTENT_OPENING):
        return None
    raw, i = text[len(CONTENT_OPENING) :], 0
    while i < len(raw) and raw[i] != '"':
        if raw[i] != "\\":
            i += 1
        elif raw[i + 1 : i + 2] == "u":  # \\uXXXX, and its low surrogate after a high one
            high = raw[i + 2 : i + 6].lower().startswith(("d8", "d9", "da", "db"))
            step = 12 if high else 6
            if i + step > len(raw):
                break
            i += step
        elif i + 1 < len(raw):
            i += 2
        else:
            break  # an escape cut in two: its second half comes with the next delta
    try:
        return json.loads('"' + raw[:i] + '"')
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- messages
def _content(stage, i: int, m: Any) -> str | None:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise StageError(f"stage {stage.name}: messages[{i}] needs a role (system, user, assistant or tool)", 422)
    content = m.get("content")
    if isinstance(content, list):  # OpenAI content parts: the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if content is not None and not isinstance(content, str):
        raise StageError(f"stage {stage.name}: messages[{i}].content must be a string or a list of text parts", 422)
    if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
        raise StageError(f"stage {stage.name}: messages[{i}] has no content", 422)
    return content


def render_user(stage, value: Any) -> list[dict]:
    """The conversation the stage input stands for (OpenAI messages)."""
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        out = []
        for i, m in enumerate(value["messages"]):
            message = {**m, "content": _content(stage, i, m)}
            out.append({k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "tool_call_id")})
        return out
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


def build_messages(stage, payload: dict) -> list[dict]:
    messages = [{"role": "system", "content": stage.system_prompt}] if stage.system_prompt else []
    return messages + render_user(stage, payload.get("input")) + list(payload.get("history") or [])


def for_template(messages: list[dict], tools: list[dict], template: str) -> list[dict]:
    """Messages a chat template that knows nothing of tools can render: tool calls as their JSON, tool results
    as user turns, the tool listing in the system message. A template that handles tools gets them as they are."""
    if "tool_calls" in template:
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "parameters": c["function"]["arguments"]} for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"Tool result ({m.get('tool_call_id', '')}): {m['content']}"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        listing = "\n".join(json.dumps(_openai_tool(t)["function"]) for t in tools)
        note = TOOL_LISTING.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + note}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def plan_call(stage, own_tools: list[dict], payload: dict) -> tuple[list[dict], list[dict], Any, dict]:
    """(messages, tools, tool_choice, options) of one call: the request's tools beside the stage's own (its loop's)."""
    options = dict(payload.get("options") or {})
    own = [_openai_tool(t) for t in own_tools]
    names = {_tool_name(t) for t in own}
    tools = own + [t for t in options.get("tools") or [] if _tool_name(t) not in names]
    loop = stage.agent_loop
    default = (loop.tool_choice if loop is not None and own else "auto") if tools else "none"
    choice = options.get("tool_choice") or default
    if choice == "required" and len(tools) == 1 and options.get("parallel_tool_calls") is False:
        # one call of the one tool: the same constraint as naming it, and its name and the array around the call
        # are not decoded token by token (bench/agents: 15 tokens a tool turn; the array form is 28)
        choice = {"type": "function", "function": {"name": _tool_name(tools[0])}}
    if isinstance(choice, dict) and choice.get("function", {}).get("name") not in {_tool_name(t) for t in tools}:
        raise StageError(f"stage {stage.name}: tool_choice names a tool not in `tools`", 400)
    return build_messages(stage, payload), tools, choice, options


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    """The prompt's token ids as the engine gets them: the chat template on the messages (and tools)."""
    template = tokenizer.chat_template or ""
    kwargs = {"tools": tools} if tools and "tool_calls" in template else {}
    rendered = for_template(messages, tools, template)
    ids = tokenizer.apply_chat_template(rendered, tokenize=True, add_generation_prompt=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _fields(answer: dict, text: str) -> None:
    """A JSON object answer's fields, added for branch conditions and bindings."""
    try:
        doc = json.loads(text)
    except ValueError:
        return
    if isinstance(doc, dict):
        for key, value in doc.items():
            answer.setdefault(key, value)


def _engine_id(request_id: str) -> str:
    """vLLM needs a unique id per generation: an agent loop calls the engine several times per request."""
    return f"{request_id or 'req'}-{uuid.uuid4().hex[:8]}"


def engine_arguments(stage, base_dir: Path, settings: dict | None = None) -> dict:
    """The vLLM engine arguments of an LLM stage: hetforge's defaults, the spec's, then `settings` (an engine-settings
    variant's) over them."""
    spec = stage.vllm
    # A folder beside the pipeline file, else a model name (a missing folder is refused by deploy.check_servable)
    model = str((base_dir / spec.model).resolve()) if (base_dir / spec.model).exists() else spec.model
    return {
        **ENGINE_DEFAULTS,
        "enable_prefix_caching": spec.prefix_caching,
        **spec.engine_args,
        **(settings or {}),
        "model": model,
    }


def load_tokenizer(stage, base_dir: Path):
    """The tokenizer the engine uses, with the stage's chat template."""
    from transformers import AutoTokenizer  # only LLM replicas and their jobs load transformers

    tokenizer = AutoTokenizer.from_pretrained(engine_arguments(stage, base_dir)["model"])
    if stage.vllm.chat_template:
        tokenizer.chat_template = (base_dir / stage.vllm.chat_template).read_text()
    return tokenizer


def build_engine(stage, base_dir: Path, settings: dict | None = None, stat_loggers: list | None = None):
    """A vLLM AsyncLLM for the stage with `settings` over its spec's engine arguments."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM loads only in replicas of vLLM stages and their jobs: it is heavy, and optional elsewhere
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = engine_arguments(stage, base_dir, settings)
    if isinstance(args.get("structured_outputs_config", {}), dict):
        from vllm.config import StructuredOutputsConfig

        given = args.get("structured_outputs_config", {})
        args["structured_outputs_config"] = StructuredOutputsConfig(**{**STRUCTURED_DEFAULTS, **given})
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=stat_loggers)


def sampling_doc(stage, tools: list[dict], choice: Any, options: dict) -> dict:
    """One call's sampling settings as JSON (recorded for replay by the engine-settings job): `sampling_params`
    turns it into vLLM's."""
    s = stage.sampling
    structured = None
    schema = decoding_schema(tools, choice, options.get("parallel_tool_calls"))
    fmt = options.get("response_format") or {}
    if schema is not None:
        structured = {"json": schema}
    elif fmt.get("type") == "json_schema":
        structured = {"json": fmt["json_schema"].get("schema") or {"type": "object"}}
    elif fmt.get("type") == "json_object":
        structured = {"json_object": True}
    elif stage.choices:
        structured = {"choice": list(stage.choices)}
    stop = options.get("stop")
    return {
        "max_tokens": options.get("max_tokens") or s.max_tokens,
        "temperature": s.temperature if options.get("temperature") is None else options["temperature"],
        "top_p": s.top_p if options.get("top_p") is None else options["top_p"],
        "stop": [stop] if isinstance(stop, str) else stop,
        "seed": options.get("seed"),
        "structured": structured,
    }


def sampling_params(doc: dict, stream: bool):
    """vLLM's SamplingParams of a `sampling_doc`."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = StructuredOutputsParams(**doc["structured"]) if doc.get("structured") else None
    return SamplingParams(
        max_tokens=doc["max_tokens"],
        temperature=doc["temperature"],
        top_p=doc["top_p"],
        stop=doc.get("stop"),
        seed=doc.get("seed"),
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        structured_outputs=structured,
    )


async def generate_text(engine, ids: list[int], doc: dict, request_id: str = "") -> tuple[str, str, dict]:
    """(text, finish reason, usage) of one generation on `engine`."""
    from vllm.inputs import TokensPrompt

    text, finish, usage = "", "stop", {}
    async for out in engine.generate(
        TokensPrompt(prompt_token_ids=list(ids)), sampling_params(doc, False), _engine_id(request_id)
    ):
        if out.finished and out.outputs:
            text, finish = out.outputs[0].text, out.outputs[0].finish_reason or "stop"
            usage = _usage(out, {})
    return text, finish, usage


def _claim_cores(stage) -> cpu_cores.Claim | None:
    """A slot of the deployment's engine cores (`cpu_cores`) for a vLLM CPU engine; None on other platforms, without
    a plan, with `isolate_cores: false`, or when the user binds vLLM's threads (VLLM_CPU_OMP_THREADS_BIND)."""
    if not stage.vllm.isolate_cores or os.environ.get(cpu_cores.OMP_BIND_ENV):
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    claim = cpu_cores.claim()
    if claim is not None:  # the engine's worker binds its OpenMP threads to the slot (read in the worker's process)
        os.environ[cpu_cores.OMP_BIND_ENV] = cpu_cores.omp_bind(claim.cores)
    return claim


class LlmRuntime:
    """One replica's LLM stage. With vLLM: the engine (`settings` over the spec's engine arguments), the calls it
    records for the engine-settings job (`recorder`), and the canary arm of a rollout of other settings (`arm`,
    `llm_settings.LlmCanaryArm`), both set by `llm_settings.LlmEngineTarget`."""

    def __init__(
        self,
        stage,
        base_dir: Path,
        tools: list[dict] | None = None,
        labels: tuple[str, str] = ("", ""),
        settings: dict | None = None,
    ):
        self.stage, self.tools = stage, [_openai_tool(t) for t in tools or []]
        self.base_dir, self.labels = base_dir, labels
        self.engine = self.tokenizer = self.client = None
        self.settings: dict = dict(settings or {})  # the active engine's settings over the spec's
        self.arm = self.recorder = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the replica's loop: the engines' calls run on it
        self.inflight = 0  # calls in progress (recorded with each call: the concurrency a replay reproduces)
        self.busy: collections.Counter = collections.Counter()  # id(engine) -> generations running on it
        # the replica's prompt-length check (422), run on the token ids the engine gets: the prompt is rendered once
        self.check_prompt: Callable[[int], None] | None = None
        self.cores: cpu_cores.Claim | None = None  # the deployment's engine cores this replica holds, if any
        if stage.vllm is not None:
            self.tokenizer = load_tokenizer(stage, base_dir)
            self.cores = _claim_cores(stage)
            self.engine = self.build_engine(self.settings)
        else:
            from openai import AsyncOpenAI  # only endpoint stages need the client library

            ep = stage.endpoint
            key = os.environ.get(ep.api_key_env, "") if ep.api_key_env else ""
            self.client = AsyncOpenAI(base_url=ep.base_url, api_key=key or "EMPTY", timeout=ep.timeout_s, max_retries=1)

    def build_engine(self, settings: dict):
        """An engine of this stage with `settings`, its statistics under the replica's labels; on the replica's engine
        cores when it holds some (its processes start from a thread pinned to them)."""
        where = cpu_cores.pinned(self.cores.cores) if self.cores is not None else contextlib.nullcontext()
        with where:
            return build_engine(self.stage, self.base_dir, settings, [stat_logger_factory(*self.labels)])

    async def generate_on(self, engine, ids: list[int], doc: dict, request_id: str = "") -> tuple[str, str, dict]:
        """One generation on `engine` (the active one or a canary's), counted while it runs."""
        self.busy[id(engine)] += 1
        try:
            return await generate_text(engine, ids, doc, request_id)
        finally:
            self.busy[id(engine)] -= 1

    async def complete_ids(self, ids: list[int], doc: dict, request_id: str = "") -> tuple[str, str, dict]:
        """One generation: recorded, then on the active engine or through a rollout's canary arm."""
        self.loop = asyncio.get_running_loop()
        if self.recorder is not None:
            self.recorder.add(ids, doc, self.inflight)
        arm = self.arm
        if arm is not None:
            return await arm.acall(self, ids, doc, request_id)
        return await self.generate_on(self.engine, ids, doc, request_id)

    # ------------------------------------------------------------------ one call's settings
    def _plan(self, payload: dict) -> tuple[list[dict], list[dict], Any, dict]:
        return plan_call(self.stage, self.tools, payload)

    def _answer(self, text: str, tools, choice, finish: str, usage: dict) -> dict:
        content, calls = read_decoded(text, tools, choice)
        answer: dict = {"text": content, "finish_reason": "tool_calls" if calls else finish, "usage": usage}
        if calls:
            answer["tool_calls"] = calls
        elif not tools or choice == "none":
            _fields(answer, text)
        if self.stage.choices and not tools:
            answer["choice"] = text.strip()
        return answer

    # ------------------------------------------------------------------ calls
    async def stream(self, payload: dict, request_id: str = "") -> AsyncIterator[str | dict]:
        """Text deltas, then one dict: {"tool_calls"?, "finish_reason", "usage"}. A constrained (JSON) answer is
        read whole first: its deltas are the content it holds."""
        from vllm.inputs import TokensPrompt

        messages, tools, choice, options = self._plan(payload)
        if self.engine is None:
            answer = await self._complete(messages, tools, choice, options)
            if answer["text"]:
                yield answer["text"]
            yield {k: v for k, v in answer.items() if k != "text"}
            return
        constrained = bool(tools) and choice != "none"
        text, sent, finish, usage = "", "", "stop", {}
        ids, doc = prompt_ids(self.tokenizer, messages, tools), sampling_doc(self.stage, tools, choice, options)
        if self.check_prompt is not None:
            self.check_prompt(len(ids))
        self.loop = asyncio.get_running_loop()
        if self.recorder is not None:  # recorded for the engine-settings job; a canary arm judges non-streamed calls
            self.recorder.add(ids, doc, self.inflight)
        engine = self.engine  # counted busy while it streams: a swap retires it only after its running calls
        self.busy[id(engine)] += 1
        self.inflight += 1
        try:
            async for out in engine.generate(
                TokensPrompt(prompt_token_ids=ids), sampling_params(doc, True), _engine_id(request_id)
            ):
                delta = out.outputs[0].text if out.outputs else ""
                text += delta
                if delta and not constrained:
                    yield delta
                elif delta and choice == "auto":  # an answer's content, decoded as its JSON string arrives
                    content = content_so_far(text)
                    if content is not None and len(content) > len(sent):
                        yield content[len(sent) :]
                        sent = content
                usage = _usage(out, usage)
                if out.finished and out.outputs:
                    finish = out.outputs[0].finish_reason or "stop"
        finally:
            self.busy[id(engine)] -= 1
            self.inflight -= 1
        answer = self._answer(text, tools, choice, finish, usage)
        if constrained and answer["text"].startswith(sent) and len(answer["text"]) > len(sent):
            yield answer["text"][len(sent) :]
        yield {k: v for k, v in answer.items() if k in ("tool_calls", "finish_reason", "usage")}

    async def __call__(self, payload: dict, request_id: str = "") -> dict:
        messages, tools, choice, options = self._plan(payload)
        if self.engine is None:
            return await self._complete(messages, tools, choice, options)
        self.inflight += 1
        try:
            ids = prompt_ids(self.tokenizer, messages, tools)
            if self.check_prompt is not None:
                self.check_prompt(len(ids))
            doc = sampling_doc(self.stage, tools, choice, options)
            text, finish, usage = await self.complete_ids(ids, doc, request_id)
        finally:
            self.inflight -= 1
        if self.stage.choices and not tools and text.strip() not in self.stage.choices:
            raise StageError(
                f"stage {self.stage.name}: the model answered {text[:80]!r}, not one of {self.stage.choices}", 502
            )
        return self._answer(text, tools, choice, finish, usage)

    async def _complete(self, messages: list[dict], tools: list[dict], choice: Any, options: dict) -> dict:
        s = self.stage.sampling
        extra = {k: options[k] for k in ("stop", "seed", "response_format", "parallel_tool_calls") if options.get(k)}
        if tools:
            extra.update(tools=tools, tool_choice=choice)
        try:
            reply = await self.client.chat.completions.create(
                model=self.stage.endpoint.model,
                messages=messages,
                max_tokens=options.get("max_tokens") or s.max_tokens,
                temperature=s.temperature if options.get("temperature") is None else options["temperature"],
                top_p=s.top_p if options.get("top_p") is None else options["top_p"],
                **extra,
            )
        except Exception as err:  # noqa: BLE001 - the endpoint's failure is this stage's 502
            raise StageError(
                f"stage {self.stage.name}: endpoint {self.stage.endpoint.base_url}: {type(err).__name__}: {err}"[:2000],
                502,
            ) from None
        choice0 = reply.choices[0] if reply.choices else None
        message = choice0.message if choice0 is not None else None
        usage = reply.usage.model_dump(exclude_none=True) if reply.usage is not None else {}
        answer: dict = {"text": (message.content if message is not None else "") or "", "usage": usage}
        answer["finish_reason"] = (choice0.finish_reason if choice0 is not None else None) or "stop"
        if message is not None and message.tool_calls:
            answer["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in message.tool_calls
            ]
        else:
            _fields(answer, answer["text"])
        return answer

    def shutdown(self) -> None:
        engines = {id(e): e for e in (self.engine, getattr(self.arm, "module", None)) if e is not None}
        for engine in engines.values():  # after a promotion the arm's engine is the running one: shut down once
            engine.shutdown()
        self.engine = self.arm = None
        if self.cores is not None:
            self.cores.release()


def _usage(out, seen: dict) -> dict:
    """OpenAI usage of one generation (cumulative over its delta outputs); cached tokens from vLLM's prefix cache."""
    prompt = len(out.prompt_token_ids or []) or seen.get("prompt_tokens", 0)
    completion = seen.get("completion_tokens", 0) + sum(len(o.token_ids) for o in out.outputs)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    cached = out.num_cached_tokens
    if cached is None:
        cached = seen.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage
