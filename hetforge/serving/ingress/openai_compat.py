"""The OpenAI API that agents speak: GET /v1/models, POST /v1/chat/completions (plain and streamed).

The pipeline answers the `model` names its YAML declares (`openai: {models: [...]}`, else its own
name). The entry stage's input is {"messages": [...], "last_user_message": "..."}: bindings can take
`request.last_user_message`. The request's tools, tool_choice, response_format and sampling go to
the output LLM stage (`llm.py` holds decoding to the tools' schemas); its answer comes back in
OpenAI's format with `tool_calls`, `finish_reason` and `usage` (summed over an agent loop's calls,
with vLLM's prefix-cache hits as `prompt_tokens_details.cached_tokens`). A conversation's turns carry
a session (the `x-session-id` header, else a digest of its first messages) that routes them to the
replica holding their prefix (`state.SESSION`). Errors use OpenAI's format, with hetforge's stage
and request id beside it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from hetforge.serving.dataflow import PipelineError
from hetforge.serving.ingress.deps import JsonBodyRoute, RequestId, Served
from hetforge.serving.ingress.openai_models import ChatRequest, OpenAiError, usage_of
from hetforge.serving.ingress.state import SESSION, IngressState

router = APIRouter(route_class=JsonBodyRoute)  # the API token when the pipeline's routes need it
SESSION_HEADER = "x-session-id"


def served_models(state: IngressState) -> list[str]:
    return list(state.pipeline.openai.models) if state.pipeline.openai is not None else [state.pipeline.name]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def entry_input(messages: list[dict]) -> dict:
    """What the entry stage receives: the messages, and the last user message's text for bindings."""
    last = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    return {"messages": messages, "last_user_message": last}


def session_of(request: Request, messages: list[dict]) -> str:
    """The client's session id, else a digest of the conversation's opening (system and first user message):
    every turn of one conversation resends it, so its turns share the key."""
    given = request.headers.get(SESSION_HEADER)
    if given:
        return given[:256]
    opening = [m for m in messages if m.get("role") == "system"][:1]
    opening += [m for m in messages if m.get("role") == "user"][:1]
    return hashlib.sha256(json.dumps([_text(m.get("content")) for m in opening]).encode()).hexdigest()[:32]


def _refuse(err: OpenAiError, request_id: str, stage: str | None = None) -> JSONResponse:
    return JSONResponse(err.body(request_id, stage), status_code=err.status)


def _validation(err: ValidationError) -> OpenAiError:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    if first["type"] == "missing":
        return OpenAiError(400, f"the body needs a `{field}` field", param=field, code="missing_required_parameter")
    return OpenAiError(400, f"`{field}`: {first['msg']}", param=field or None, code="invalid_value")


@router.get("/v1/models")
async def models(state: Served) -> dict:
    """The model names this deployment answers."""
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "hetforge"} for m in served_models(state)],
    }


async def _read(request: Request, state: IngressState) -> ChatRequest:
    try:
        doc = json.loads(await request.body() or b"null")
    except ValueError as err:
        raise OpenAiError(400, f"the body is not JSON: {err}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise OpenAiError(400, "the body must be a JSON object with `model` and `messages`")
    try:
        body = ChatRequest.model_validate(doc)
    except ValidationError as err:
        raise _validation(err) from None
    names = served_models(state)
    if body.model is not None and body.model not in names:
        raise OpenAiError(
            404, f"The model `{body.model}` does not exist here; served: {', '.join(names)}", "model", "model_not_found"
        )
    if not state.ends_in_llm:
        raise OpenAiError(404, f"pipeline {state.pipeline.name} does not end in an LLM stage", code="not_an_llm")
    return body


@router.post(
    "/v1/chat/completions",
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": ChatRequest.model_json_schema()}}}},
)
async def chat_completions(request: Request, state: Served, request_id: RequestId):
    """One chat completion through the pipeline: tools, structured output, sampling and streaming as OpenAI's."""
    started = time.perf_counter()
    try:
        body = await _read(request, state)
    except OpenAiError as err:
        state.count(started, False)
        return _refuse(err, request_id)
    model = body.model or served_models(state)[0]
    pipeline_input, session = entry_input(body.messages), session_of(request, body.messages)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        state.admit()  # a full pipeline is a plain 503 before the stream starts; `_chunks` releases the slot
        chunks = _chunks(state, pipeline_input, body.options(), session, request_id, started, model, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    token = SESSION.set(session)
    try:
        result = await state.run_counted(pipeline_input, request_id, started, body.options())
    except PipelineError as err:
        return _refuse(OpenAiError(err.status, err.message), request_id, err.stage)
    finally:
        SESSION.reset(token)
    out = result.output if isinstance(result.output, dict) else {"text": str(result.output)}
    message: dict[str, Any] = {"role": "assistant", "content": out.get("text") or None}
    if out.get("tool_calls"):
        message["tool_calls"] = out["tool_calls"]
    elif message["content"] is None:
        message["content"] = ""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": out.get("finish_reason") or "stop"}],
        "usage": usage_of(out),
    }


async def _chunks(
    state: IngressState,
    pipeline_input: dict,
    options: dict,
    session: str,
    request_id: str,
    started: float,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """chat.completion.chunk events: the role, content deltas, tool calls, the finish reason, usage, [DONE]."""
    SESSION.set(session)  # this generator runs in the response's own context
    base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = model

    def chunk(delta: dict, finish: str | None = None) -> str:
        doc = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            doc["usage"] = None
        return f"data: {json.dumps(doc)}\n\n"

    ok, final = False, {}
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in state.runner.stream(pipeline_input, request_id, options):
            if isinstance(event, dict):
                final = event
            elif event:
                yield chunk({"content": event})
        calls = final.get("tool_calls") or []
        if calls:
            yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        yield chunk({}, final.get("finish_reason") or ("tool_calls" if calls else "stop"))
        if include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage_of(final)})}\n\n"
        yield "data: [DONE]\n\n"
        ok = True
    except PipelineError as err:
        yield f"data: {json.dumps(OpenAiError(err.status, err.message).body(request_id, err.stage))}\n\n"
    finally:
        state.release()
        state.count(started, ok)
