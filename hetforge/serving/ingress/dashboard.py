"""What people and Prometheus look at: the built-in dashboard page (and its JSON), and /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from hetforge.serving import approvals
from hetforge.serving.dashboard_page import page_data, render
from hetforge.serving.ingress.deps import JsonBodyRoute, Named, Served
from hetforge.serving.ingress.models import ErrorBody
from hetforge.serving.ingress.state import IngressState
from hetforge.serving.rollout import RolloutBoard
from hetforge.serving.swap_control import SwapBoard

router = APIRouter(route_class=JsonBodyRoute, responses={404: {"model": ErrorBody}})
open_router = APIRouter()  # never behind a token: Prometheus scrapes it


async def dashboard_data(state: IngressState) -> dict:
    """Everything the page shows: the sampler's series, placement, recent swaps and decisions, pending approvals."""

    def read() -> tuple:
        return (
            SwapBoard(state.registry_path).recent(state.pipeline.name, 10),
            RolloutBoard(state.registry_path).events(state.pipeline.name, limit=50),
            approvals.pending(state.registry_path, state.pipeline),
        )

    swaps, events, pending = await asyncio.to_thread(read)
    reoptimize = await state.controller_status(timeout_s=5)
    return page_data(state.pipeline, state.sampler, state.placement, swaps, events, pending, reoptimize)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(state: Served) -> HTMLResponse:
    """The built-in dashboard page (plots and tables, refreshed every few seconds)."""
    return HTMLResponse(render(await dashboard_data(state)))


@router.get("/v1/pipelines/{name}/dashboard")
async def dashboard_json(state: Named) -> dict:
    return await dashboard_data(state)


@open_router.get("/metrics", response_class=PlainTextResponse)
async def metrics_page(state: Served) -> PlainTextResponse:
    """Every replica's metrics on this node, under the names of `metrics.SPEC` (the multiprocess files aggregated)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=state.metrics_dir)
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
