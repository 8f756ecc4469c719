"""What the routes depend on: the served pipeline (`pipeline_named`), the request id, the caller's identity, bodies.

Routes take the pipeline through `Depends(pipeline_named)`: a name that is not the one this
deployment serves is a 404 before the route runs. Each router's route class guards it before
anything is read (`auth`): `AdminRoute` (swap, approvals, optimize) needs the API
token, a same-origin caller and a JSON body; `DocsRoute` (/docs, /redoc, /openapi.json) the token,
also as a browser's Basic password; `JsonBodyRoute` (the pipeline routes) the token only when the
pipeline says `auth: {pipeline_routes: token}`, and reads bodies as JSON whatever their
Content-Type says (`curl -d` sends form-urlencoded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute

from hetforge.serving.ingress import auth
from hetforge.serving.ingress.errors import ApiError, request_id
from hetforge.serving.ingress.state import IngressState


def ingress_state(request: Request) -> IngressState:
    """The state `create_app` was given."""
    return request.app.state.ingress


def pipeline_named(name: str, state: Annotated[IngressState, Depends(ingress_state)]) -> IngressState:
    """The pipeline named in the path: 404 unless it is the one this deployment serves."""
    if name != state.pipeline.name:
        raise ApiError(404, f"no pipeline {name!r} here; this deployment serves {state.pipeline.name!r}")
    return state


Served = Annotated[IngressState, Depends(ingress_state)]
Named = Annotated[IngressState, Depends(pipeline_named)]
RequestId = Annotated[str, Depends(request_id)]


def caller_identity(request: Request) -> str:
    """The holder of the API token the request was let in with ("anonymous" on an open pipeline route)."""
    return getattr(request.state, "identity", None) or "anonymous"


Identity = Annotated[str, Depends(caller_identity)]
_BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class AdminRoute(APIRoute):
    """A state-changing route: the API token (401), a same-origin caller (403) and a JSON body (415), in that order."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            request.state.identity = auth.authenticate(request, ingress_state(request).tokens)
            auth.check_same_origin(request)
            if request.method in _BODY_METHODS:
                auth.check_json_body(request)
            return await handler(request)

        return route


class DocsRoute(APIRoute):
    """The API docs: the API token as a bearer token, or as the password of a browser's Basic prompt."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            request.state.identity = auth.authenticate(request, ingress_state(request).tokens, allow_basic=True)
            return await handler(request)

        return route


class JsonBodyRoute(APIRoute):
    """A pipeline route: the API token when the pipeline asks for it; the body parsed as JSON whatever its Content-Type."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            state = ingress_state(request)
            if state is not None and state.pipeline.auth.pipeline_routes == "token":
                # a GET may come from a browser's Basic prompt (the dashboard page); bodies need the bearer token
                allow_basic = request.method == "GET"
                request.state.identity = auth.authenticate(request, state.tokens, allow_basic=allow_basic)
            if request.method in ("POST", "PUT", "PATCH"):
                request.scope.setdefault("state", {})  # shared with the copy: the error handlers see the request id
                scope = dict(request.scope)
                scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
                scope["headers"].append((b"content-type", b"application/json"))
                request = Request(scope, request.receive)
            return await handler(request)

        return route
