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

from hetforge.serving.dashboard_page import DashboardSampler
from hetforge.serving.dataflow import PipelineError, PipelineRunner, RunResult
from hetforge.serving.metrics import Metrics
from hetforge.serving.swap_control import SwapBoard
from hetforge.spec.models import LlmStage, Pipeline

# The conversation a request belongs to (set by the OpenAI route): LLM deployments route on it
# (Ray Serve's ConsistentHashRouter reads the handle's session_id), so a conversation's turns meet
# the replica that holds their prefix in its KV cache. Tasks of the pipeline walk inherit it.
SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("hetforge_session", default="")


class HandleCaller:
    """The pipeline walk's stage calls, through Ray Serve deployment handles."""

    def __init__(self, handles: dict):
        self.handles = handles

    def _handle(self, stage: str):
        session = SESSION.get()
        return self.handles[stage].options(session_id=session) if session else self.handles[stage]

    async def __call__(self, stage: str, payload: Any, request_id: str) -> Any:
        return await self._handle(stage).remote(payload, request_id)

    async def stream(self, stage: str, payload: Any, request_id: str):
        async for delta in self._handle(stage).options(stream=True, method_name="stream").remote(payload, request_id):
            yield delta


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
        try:
            result = await self.runner.run(pipeline_input, request_id, options)
        except PipelineError:
            self.count(started, False)
            raise
        self.count(started, True)
        return result

    async def sse(self, pipeline_input: Any, request_id: str, started: float) -> AsyncIterator[str]:
        """The output stage's text deltas as server-sent events, then [DONE] (OpenAI chunks: `openai_compat`)."""
        ok = False
        try:
            async for delta in self.runner.stream(pipeline_input, request_id):
                if isinstance(delta, str) and delta:  # the closing dict (finish reason, usage) is OpenAI's
                    yield f"data: {json.dumps({'request_id': request_id, 'delta': delta})}\n\n"
            ok = True
            yield "data: [DONE]\n\n"
        except PipelineError as err:
            yield f"data: {json.dumps(err.to_json())}\n\n"
        finally:
            self.count(started, ok)

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
