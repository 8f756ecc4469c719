"""The OpenAI-compatible chat completions route, for pipelines whose output stage is an LLM."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from hetforge.serving.ingress.deps import JsonBodyRoute, RequestId, llm_pipeline
from hetforge.serving.ingress.models import ChatChoice, ChatCompletion, ChatMessage, ChatRequest, ErrorBody
from hetforge.serving.ingress.state import IngressState

router = APIRouter(route_class=JsonBodyRoute, responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}})


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatRequest, state: Annotated[IngressState, Depends(llm_pipeline)], request_id: RequestId
):
    """The chat messages are the entry stage's input; the answer is the output stage's text."""
    started = time.perf_counter()
    model = body.model or state.pipeline.name
    pipeline_input = {"messages": body.messages}
    if body.stream:
        return StreamingResponse(state.sse(pipeline_input, request_id, started, model), media_type="text/event-stream")
    result = await state.run_counted(pipeline_input, request_id, started)
    text = result.output.get("text", "") if isinstance(result.output, dict) else str(result.output)
    return ChatCompletion(
        id=request_id, created=int(time.time()), model=model, choices=[ChatChoice(message=ChatMessage(content=text))]
    )
