"""What the routes depend on: the served pipeline (`pipeline_named`), the request id, JSON bodies.

Routes take the pipeline through `Depends(pipeline_named)`: a name that is not the one this
deployment serves is a 404 before the route runs. Bodies are read as JSON whatever their
Content-Type says (`curl -d` sends form-urlencoded), as the API has always done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute

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


class JsonBodyRoute(APIRoute):
    """A route whose body is parsed as JSON whatever the request's Content-Type."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            if request.method in ("POST", "PUT", "PATCH"):
                request.scope.setdefault("state", {})  # shared with the copy: the error handlers see the request id
                scope = dict(request.scope)
                scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
                scope["headers"].append((b"content-type", b"application/json"))
                request = Request(scope, request.receive)
            return await handler(request)

        return route
