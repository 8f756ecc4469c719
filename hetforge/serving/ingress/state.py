"""What the routes of one served pipeline share: the pipeline, its stage handles, its boards and metrics."""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.serve.exceptions import BackPressureError

from hetforge.serving.dashboard_page import DashboardSampler
from hetforge.serving.dataflow import PipelineError, PipelineRunner, RunResult, StageError
from hetforge.serving.ingress.auth import Tokens
from hetforge.serving.ingress.errors import ApiError
from hetforge.serving.metrics import Metrics
from hetforge.serving.swap_control import SwapBoard
from hetforge.spec.models import LlmStage, Pipeline

# The conversation a request belongs to (set by the OpenAI route): LLM deployments route on it
# (Ray Serve's ConsistentHashRouter reads the handle's session_id), so a conversation's turns meet
# the replica that holds their prefix in its KV cache. Tasks of the pipeline walk inherit it.
SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("hetforge_session", default="")


def _overloaded(stage: str, err: BackPressureError) -> StageError:
    """Ray Serve refused the call: the stage's queue (limits.max_queued) is full. The client should retry later."""
    return StageError(f"stage {stage} is at capacity: {err.message} (limits.max_queued); retry later", 503)


class HandleCaller:
    """The pipeline walk's stage calls, through Ray Serve deployment handles."""

    def __init__(self, handles: dict):
        self.handles = handles

    def _handle(self, stage: str):
        session = SESSION.get()
        return self.handles[stage].options(session_id=session) if session else self.handles[stage]

    async def __call__(self, stage: str, payload: Any, request_id: str) -> Any:
        return await self._answer(stage, self._handle(stage), payload, request_id)

    async def loop(self, stage: str, payload: Any, request_id: str) -> Any:
        return await self._answer(stage, self._handle(stage).options(method_name="loop"), payload, request_id)

    async def _answer(self, stage: str, handle, payload: Any, request_id: str) -> Any:
        """The call's answer; a call given up here (a timeout, a failed sibling) is cancelled in the replica too."""
        response = handle.remote(payload, request_id)
        try:
            return await response
        except BackPressureError as err:
            raise _overloaded(stage, err) from None
        except asyncio.CancelledError:
            response.cancel()
            raise

    async def stream(self, stage: str, payload: Any, request_id: str):
        try:
            async for delta in (
                self._handle(stage).options(stream=True, method_name="stream").remote(payload, request_id)
            ):
                yield delta
        except BackPressureError as err:
            raise _overloaded(stage, err) from None


@dataclass
class IngressState:
    """One served pipeline, as its routes see it. `handles` and `controller` are Ray Serve handles (fakes in tests)."""

    pipeline: Pipeline
    runner: PipelineRunner
    handles: dict[str, Any]
    registry_path: str
    metrics_dir: str
    metrics: Metrics
    sampler: DashboardSampler
    base_dir: Path = Path(".")
    controller: Any = None  # the ReoptimizeController's handle, when the pipeline has a `reoptimize:` block
    placement: dict[str, dict] = field(default_factory=dict)
    tokens: Tokens = field(default_factory=Tokens)  # none: every route that needs a token is refused
    in_flight: int = 0  # pipeline requests running now (limits.max_concurrent_requests)

    def admit(self) -> None:
        """Take one of the pipeline's request slots (`release` gives it back); 503 with Retry-After when all are
        taken: no queue here."""
        limits = self.pipeline.limits
        if self.in_flight >= limits.max_concurrent_requests:
            self.metrics.pipeline_requests.labels(self.pipeline.name, "error").inc()
            raise ApiError(
                503,
                f"pipeline {self.pipeline.name} is at capacity ({limits.max_concurrent_requests} requests in flight, "
                "limits.max_concurrent_requests); retry later",
                headers={"Retry-After": str(limits.retry_after_s)},
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def stage_failed(self, stage: str, kind: str) -> None:
        """A failed stage call, in hetforge_stage_errors_total (the runner's `on_failure`)."""
        self.metrics.stage_errors.labels(self.pipeline.name, stage, kind).inc()

    @property
    def ends_in_llm(self) -> bool:
        return isinstance(self.pipeline.stage(self.pipeline.output), LlmStage)

    def count(self, started: float, ok: bool) -> None:
        """One pipeline request in the request metrics (latency only for the ones that succeeded)."""
        self.metrics.pipeline_requests.labels(self.pipeline.name, "ok" if ok else "error").inc()
        if ok:
            self.metrics.pipeline_latency.labels(self.pipeline.name).observe(time.perf_counter() - started)

    async def run_counted(
        self, pipeline_input: Any, request_id: str, started: float, options: dict | None = None
    ) -> RunResult:
        """The pipeline's RunResult (a PipelineError propagates); counted in the request metrics either way."""
        self.admit()
        try:
            result = await self.runner.run(pipeline_input, request_id, options)
        except PipelineError:
            self.count(started, False)
            raise
        finally:
            self.release()
        self.count(started, True)
        return result

    def sse(self, pipeline_input: Any, request_id: str, started: float) -> AsyncIterator[str]:
        """The output stage's text deltas as server-sent events, then [DONE] (OpenAI chunks: `openai_compat`).

        The request slot is taken here, before the response starts, so that a full pipeline is a plain 503."""
        self.admit()
        return self._sse_counted(pipeline_input, request_id, started)

    async def _sse_counted(self, pipeline_input: Any, request_id: str, started: float) -> AsyncIterator[str]:
        ok = False
        try:
            async for event in self._sse(pipeline_input, request_id):
                yield event
                ok = ok or event == "data: [DONE]\n\n"
        finally:
            self.release()
            self.count(started, ok)

    async def _sse(self, pipeline_input: Any, request_id: str) -> AsyncIterator[str]:
        try:
            async for delta in self.runner.stream(pipeline_input, request_id):
                if isinstance(delta, str) and delta:  # the closing dict (finish reason, usage) is OpenAI's
                    yield f"data: {json.dumps({'request_id': request_id, 'delta': delta})}\n\n"
            yield "data: [DONE]\n\n"
        except PipelineError as err:
            yield f"data: {json.dumps(err.to_json())}\n\n"

    async def replicas(self, stage: str) -> int:
        """Replicas of the stage alive now, from their heartbeats in the registry file (at least 1)."""
        return max(1, len(await asyncio.to_thread(SwapBoard(self.registry_path).alive, self.pipeline.name, stage)))

    async def controller_status(self, timeout_s: float | None = None) -> dict | None:
        """The controller's status, or {"error": ...} when it does not answer; None without a controller."""
        if self.controller is None:
            return None
        try:
            return await asyncio.wait_for(self.controller.status.remote(), timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - the caller still shows the rest
            return {"error": f"{type(err).__name__}: {err}"[:300]}
