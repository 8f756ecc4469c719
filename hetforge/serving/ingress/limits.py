"""The request body limit: a body larger than the pipeline's limits.max_body_bytes is refused with 413.

An ASGI middleware, so that the check comes before any route reads or parses the body: a declared
Content-Length over the limit is refused at once; a body without one (chunked) is counted as it
arrives and refused when the count passes the limit, before the rest is read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hetforge.serving.ingress.errors import ApiError


def _too_large(limit: int, size: str) -> ApiError:
    return ApiError(413, f"the request body is {size}; limits.max_body_bytes is {limit} bytes")


class BodyLimit:
    """Refuse request bodies over the served pipeline's limits.max_body_bytes (413, in the one error shape)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state.ingress if scope["type"] == "http" and "app" in scope else None
        if state is None:
            await self.app(scope, receive, send)
            return
        limit = state.pipeline.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        received = 0

        async def counted() -> Message:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _too_large(limit, f"{int(declared)} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit, f"over {limit} bytes")
            return message

        await self.app(scope, counted, send)
