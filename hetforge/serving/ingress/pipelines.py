"""Pipeline requests: run (JSON, or server-sent events from an LLM output stage), status, readiness."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from hetforge.serving.ingress.deps import JsonBodyRoute, Named, RequestId, Served
from hetforge.serving.ingress.errors import ApiError
from hetforge.serving.ingress.models import ErrorBody, Health, PipelineStatus, RunRequest, RunResponse

router = APIRouter(
    route_class=JsonBodyRoute, responses={code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 503, 504)}
)
open_router = APIRouter()  # never behind a token: probes call it


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


@open_router.get(
    "/healthz", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}}
)
async def healthz(state: Served):
    """Ready when every stage answers (an LLM replica may still load); degraded when an outside dependency fails
    its check (an endpoint unreachable, an API-key variable unset) or a stage's circuit is open."""

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
    failing = [c for c in await _dependency_checks(state) if not c["ok"]]
    open_circuits = sorted(name for name, breaker in state.runner.breakers.items() if breaker.is_open)
    if failing or open_circuits:
        return Health(
            status="degraded",
            pipeline=state.pipeline.name,
            dependencies=failing or None,
            open_circuits=open_circuits or None,
        )
    return Health(status="ok", pipeline=state.pipeline.name)


async def _dependency_checks(state) -> list[dict]:
    """Every tool and LLM stage's dependency checks, made in one of its replicas (`deployments.dependency_checks`)."""
    names = [s.name for s in state.pipeline.stages if s.kind in ("tool", "llm") and s.name in state.handles]

    async def checks(name: str) -> list[dict]:
        try:
            return await asyncio.wait_for(state.handles[name].dependencies.remote(), timeout=5.0)
        except Exception as err:  # noqa: BLE001 - a replica that cannot tell is itself a failed check
            return [
                {"stage": name, "dependency": "replica", "ok": False, "detail": f"{type(err).__name__}: {err}"[:300]}
            ]

    return [c for found in await asyncio.gather(*(checks(n) for n in names)) for c in found]
