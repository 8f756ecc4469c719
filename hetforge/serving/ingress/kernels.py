"""Kernel variants of a model stage: the hot-swap on every replica (an admin route: `AdminRoute`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from hetforge.serving.ingress.deps import AdminRoute, Named
from hetforge.serving.ingress.models import ErrorBody, SwapRequest, SwapResult
from hetforge.serving.swap_control import request_swap

router = APIRouter(
    route_class=AdminRoute, responses={code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 415)}
)


@router.post(
    "/v1/pipelines/{name}/stages/{stage}/swap", response_model=SwapResult, responses={409: {"model": SwapResult}}
)
async def swap(stage: str, body: SwapRequest, state: Named):
    """Swap a model stage's variant on every replica: 200 when all swapped, 409 with their reports when one refused."""
    replicas = await state.replicas(stage)
    doc = await asyncio.to_thread(
        request_swap, state.registry_path, state.pipeline, stage, body.variant, replicas, body.wait_s
    )
    return doc if doc["ok"] else JSONResponse(doc, status_code=409)
