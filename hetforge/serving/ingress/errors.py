"""The one API error type and its handler: every refusal answers with the same JSON body.

    {"error": {"message": ..., "stage": ... | null, "request_id": ..., "status": ...}}

The pipeline walk's `PipelineError` and the control operations' `SwapError` carry an HTTP status
already and answer through the same handler; a body that does not fit its request model is the
client's 400 (a malformed path or query parameter stays FastAPI's 422), with the fields named.
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.context import _get_serve_request_context

from hetforge.serving.dataflow import PipelineError
from hetforge.serving.swap_control import SwapError


class ApiError(Exception):
    """A request refused: `status` is the HTTP status, `stage` the stage it concerns (if one)."""

    def __init__(self, status: int, message: str, stage: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, stage)
        self.status, self.message, self.stage, self.headers = status, message, stage, headers

    def __str__(self) -> str:
        return self.message


def request_id(request: Request) -> str:
    """Ray Serve's request id: the client's X-Request-ID when sent, else the proxy's; the proxy returns it as a header.

    Kept on the request, so an error answered later carries the id the route used.
    """
    known = getattr(request.state, "request_id", None)
    if known is None:
        known = _get_serve_request_context().request_id or request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = known
    return known


def error_body(status: int, message: str, request_id: str, stage: str | None = None) -> dict:
    return PipelineError(status, message, request_id, stage).to_json()


def _answer(
    request: Request, status: int, message: str, stage: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, request_id(request), stage), status_code=status, headers=headers)


async def handle_api_error(request: Request, err: ApiError) -> JSONResponse:
    return _answer(request, err.status, err.message, err.stage, err.headers)


async def handle_pipeline_error(request: Request, err: PipelineError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


async def handle_swap_error(request: Request, err: SwapError) -> JSONResponse:
    return _answer(request, err.status, err.message, request.path_params.get("stage"))


async def handle_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = [_describe(e) for e in err.errors()]
    in_body = all(e["loc"][:1] == ("body",) for e in err.errors())
    return _answer(request, 400 if in_body else 422, "; ".join(dict.fromkeys(problems)))


def _describe(error: dict) -> str:
    """One pydantic error as the client should read it."""
    loc, kind = tuple(error["loc"]), error["type"]
    field = ".".join(str(p) for p in loc[1:])
    if kind == "json_invalid":
        return f"the body is not JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    if len(loc) == 1 and loc[0] == "body":
        return 'the body must be a JSON object, for example {"input": {...}}'
    if kind == "missing":
        return f"the body needs a `{field}` field"
    if kind == "extra_forbidden":
        return f"unknown field {field}"
    return f"`{field}`: {error['msg']}"


def install(app: FastAPI) -> None:
    """Register the handlers: ApiError, and the domain errors that carry an HTTP status, answer in one shape."""
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(PipelineError, handle_pipeline_error)
    app.add_exception_handler(SwapError, handle_swap_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
