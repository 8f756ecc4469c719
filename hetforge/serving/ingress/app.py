"""The FastAPI app of one served pipeline: the routers per concern, the error handlers, the state.

POST /v1/pipelines/{name}/run                     pipelines.py: JSON in, JSON out (or text/event-stream
                                                  when asked and the output stage is an LLM)
GET  /v1/pipelines/{name}/status, GET /healthz    pipelines.py: replicas, devices, active variants; readiness
GET /v1/models, POST /v1/chat/completions        openai_compat.py: the OpenAI API, for pipelines ending in an LLM
POST /v1/pipelines/{name}/stages/{stage}/swap     kernels.py: hot-swap a model stage's variant
GET  /v1/pipelines/{name}/approvals[/{id}], POST .../approvals/{id}/{approve|reject},
POST /v1/pipelines/{name}/stages/{stage}/optimize approvals.py: variants waiting for a human, hint jobs
GET  /v1/pipelines/{name}/rollouts                rollouts.py: rollouts and their audit log
GET  /dashboard, /v1/pipelines/{name}/dashboard, /metrics   dashboard.py
GET  /openapi.json, /docs, /redoc                 docs.py: the API docs, behind the API token

Who may call what (`deps`, `auth`): swap, approvals and optimize need the API token (and a same-origin
JSON request); so do the docs; the pipeline routes need it when the pipeline sets
`auth: {pipeline_routes: token}`; /healthz and /metrics are always open. Bodies over
limits.max_body_bytes are refused with 413 before a route reads them (`limits.BodyLimit`).
"""

from __future__ import annotations

from fastapi import FastAPI

from hetforge.serving.ingress import (
    approvals,
    dashboard,
    docs,
    errors,
    kernels,
    openai_compat,
    pipelines,
    rollouts,
)
from hetforge.serving.ingress.limits import BodyLimit
from hetforge.serving.ingress.state import IngressState


def create_app(state: IngressState | None = None) -> FastAPI:
    """The app serving `state`'s pipeline (without a state: the routes alone, for their listing)."""
    app = FastAPI(
        title="hetforge",
        description="Pipelines served by hetforge on Ray Serve.",
        docs_url=None,  # served by `docs.router`, behind the API token
        redoc_url=None,
        openapi_url=None,
    )
    app.state.ingress = state
    errors.install(app)
    app.add_middleware(BodyLimit)
    for module in (pipelines, openai_compat, kernels, approvals, rollouts, dashboard, docs):
        app.include_router(module.router)
    for module in (pipelines, dashboard):
        app.include_router(module.open_router)
    return app
