"""Pipeline requests: run (JSON, or server-sent events from an LLM output stage), status, readiness."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from hetforge.serving.ingress.deps import JsonBodyRoute, Named, RequestId, Served
from hetforge.serving.ingress.errors import ApiError
from hetforge.serving.ingress.models import ErrorBody, Health, PipelineStatus, RunRequest, RunResponse

router = APIRouter(route_class=JsonBodyRoute, responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}})


@router.post("/v1/pipelines/{name}/run", response_model=RunResponse)
async def run(body: RunRequest, state: Named, request_id: RequestId):
    """One request through the pipeline: JSON in, JSON out, with a request id."""
    started = time.perf_counter()
    if body.stream:
        if not state.ends_in_llm:
            raise ApiError(400, f"stream needs a pipeline whose output stage is an LLM; {state.pipeline.output} is not")
        return StreamingResponse(state.sse(body.input, request_id, started), media_type="text/event-stream")
    result = await state.run_counted(body.input, request_id, started)
    return result.to_json()


@router.get("/v1/pipelines/{name}/status", response_model=PipelineStatus, response_model_exclude_unset=True)
async def status(state: Named) -> PipelineStatus:
    """Replicas, devices and active variants of every stage, and the re-optimization controller's state."""
    stages = {}
    for stage, handle in state.handles.items():
        try:
            stages[stage] = await handle.status.remote()
        except Exception as err:  # noqa: BLE001 - a stage that does not answer is shown as such
            stages[stage] = {"error": f"{type(err).__name__}: {err}"[:300]}
    doc = PipelineStatus(pipeline=state.pipeline.name, stages=stages)
    if state.controller is not None:
        doc.reoptimize = await state.controller_status()
    return doc


@router.get("/healthz", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}})
async def healthz(state: Served):
    """Ready when every stage answers: the ingress alone may be up while an LLM replica still loads."""

    async def answers(handle) -> bool:
        try:
            await asyncio.wait_for(handle.status.remote(), timeout=2.0)
            return True
        except Exception:  # noqa: BLE001 - not up yet (or not answering): not ready
            return False

    names = list(state.handles)
    up = await asyncio.gather(*(answers(state.handles[n]) for n in names))
    waiting = [n for n, ok in zip(names, up, strict=True) if not ok]
    if waiting:
        return JSONResponse(
            {"status": "starting", "pipeline": state.pipeline.name, "waiting_for": waiting}, status_code=503
        )
    return Health(status="ok", pipeline=state.pipeline.name)
