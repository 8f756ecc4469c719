"""The API docs, behind the API token: /openapi.json, /docs (Swagger UI) and /redoc.

FastAPI's own docs routes are turned off (`create_app`) and served here through `DocsRoute`, which
takes the token as a bearer token or as the password of a browser's Basic prompt (the pages then
fetch /openapi.json with the same credentials).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from hetforge.serving.ingress.deps import DocsRoute
from hetforge.serving.ingress.models import ErrorBody

router = APIRouter(route_class=DocsRoute, include_in_schema=False, responses={401: {"model": ErrorBody}})


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} API")
