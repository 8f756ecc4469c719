"""The request body limit: a body larger than the pipeline's limits.max_body_bytes is refused with 413.

An ASGI middleware, so that the check comes before any route parses the body: a declared
Content-Length over the limit is refused before a byte of the body is read; a body without one
(chunked) is read, counted, up to the limit and refused as soon as it passes it. The body read
here is handed on to the route unchanged.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hetforge.serving.ingress.errors import error_body, request_id


class BodyLimit:
    """Refuse request bodies over the served pipeline's limits.max_body_bytes (413, in the one error shape)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state.ingress if scope["type"] == "http" and "app" in scope else None
        if state is None or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = state.pipeline.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit, f"{int(declared)} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks = None
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(scope, receive, send, limit, f"over {limit} bytes")
                return
            if not message.get("more_body", False):
                break
        if chunks is None:
            await self.app(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int, size: str) -> None:
        message = f"the request body is {size}; limits.max_body_bytes is {limit} bytes"
        response = JSONResponse(error_body(413, message, request_id(Request(scope))), status_code=413)
        await response(scope, receive, send)
