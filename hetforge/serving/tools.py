"""Tool stages: a Python callable or an HTTP endpoint, with a timeout, retries and a concurrency limit.

The stage's input is the call's arguments: a JSON object is passed as keyword arguments (checked
against the function's signature first, so a mismatch is the client's 422, not a retried error),
anything else as the one positional argument. Each attempt has `timeout_s`; a failed or timed-out
attempt is retried `retries` times; then the stage answers 504 (timeouts) or 500 (errors). At most
`concurrency` calls run at once per replica; the others wait their turn.

A synchronous callable runs in a worker thread. A thread cannot be killed: an attempt that times
out is abandoned, not stopped, and keeps its thread until it returns. Tools that may hang should
be `async def` (cancelled on timeout) or HTTP endpoints.

An inline tool (`placement: inline`, or the planner's choice under `auto`: `planners/tool_hops.py`)
is the same `ToolRuntime` in the caller's process, the ingress: `InlineTool` answers what a tool
replica answers (calls with the stage's latency metric, `status`, `dependencies`) and `InlineCaller`
sends that stage's calls to it instead of through a Ray Serve handle. Timeouts, retries, the
concurrency limit and the errors are the runtime's, so a failing tool reads the same either way;
`limits.max_concurrency` and `limits.max_queued` hold per process as Serve holds them per replica and
caller (503 beyond).

When every tool of an LLM stage's agent loop is inline, the loop's caller is the LLM stage's replica
(`replica_loops`): the replica runs the whole loop with the tools in its own process, and a task costs
one Ray Serve call from the ingress instead of one per turn. The tool's `concurrency` then holds per
process: in the ingress and in each LLM replica.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from hetforge.serving.dataflow import StageCaller, StageError
from hetforge.serving.model_io import resolve_function
from hetforge.spec.models import LlmStage


def replica_loops(pipeline, placement: dict[str, dict]) -> frozenset[str]:
    """The LLM stages whose agent loop runs whole in the stage's replica: every tool of the loop is placed inline.

    A streamed request's loop still runs in the ingress, a call per turn: each turn's tokens stream through it."""
    return frozenset(
        stage.name
        for stage in pipeline.stages
        if isinstance(stage, LlmStage)
        and stage.agent_loop is not None
        and all(placement.get(tool, {}).get("hop") == "inline" for tool in stage.agent_loop.tools)
    )


class ToolRuntime:
    def __init__(self, stage, base_dir: Path):
        self.stage = stage
        self.fn = resolve_function(stage.callable, base_dir) if stage.callable else None
        self._sem: asyncio.Semaphore | None = None
        self._client = None
        self.attempts = 0  # every attempt made, for tests and status

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # created inside the serving event loop
            self._sem = asyncio.Semaphore(self.stage.concurrency)
        return self._sem

    def _bind(self, payload: Any) -> tuple[tuple, dict]:
        args, kwargs = ((), dict(payload)) if isinstance(payload, dict) else ((payload,), {})
        try:
            inspect.signature(self.fn).bind(*args, **kwargs)
        except TypeError as err:
            shown = ", ".join(kwargs) if kwargs else type(payload).__name__
            raise StageError(
                f"tool {self.stage.name}: arguments ({shown}) do not fit {self.fn.__name__}{inspect.signature(self.fn)}: {err}",
                422,
            ) from None
        return args, kwargs

    async def _once(self, payload: Any) -> Any:
        if self.fn is not None:
            args, kwargs = self._bind(payload)
            if inspect.iscoroutinefunction(self.fn):
                return await self.fn(*args, **kwargs)
            return await asyncio.to_thread(self.fn, *args, **kwargs)
        return await self._http(payload)

    async def _http(self, payload: Any) -> Any:
        http = self.stage.http
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.stage.timeout_s)
        headers = {name: os.environ.get(env, "") for name, env in http.headers_env.items()}
        if http.method == "GET":
            response = await self._client.get(
                http.url, params=payload if isinstance(payload, dict) else {"input": payload}, headers=headers
            )
        else:
            response = await self._client.post(http.url, json=payload, headers=headers)
        if 400 <= response.status_code < 500:
            raise StageError(
                f"tool {self.stage.name}: {http.method} {http.url} answered {response.status_code}: "
                f"{response.text[:300]}",
                422,
            )
        response.raise_for_status()
        return response.json()

    async def __call__(self, payload: Any) -> Any:
        timeout, tries = self.stage.timeout_s, self.stage.retries + 1
        timeouts, last = 0, None
        async with self._semaphore():
            for _ in range(tries):
                self.attempts += 1
                try:
                    return await asyncio.wait_for(self._once(payload), timeout)
                except StageError as err:
                    if err.status < 500:
                        raise  # the arguments are wrong: another attempt would fail the same way
                    last = err
                except TimeoutError:
                    timeouts += 1
                except Exception as err:  # noqa: BLE001 - the tool's own failure: retried, then reported
                    last = err
        if timeouts == tries:
            raise StageError(
                f"tool {self.stage.name}{self._target()}: timed out after {timeout:g} s on all {tries} attempt(s)", 504
            )
        detail = f"{type(last).__name__}: {last}" if last is not None else "timed out"
        raise StageError(
            f"tool {self.stage.name}{self._target()}: failed on all {tries} attempt(s) ({timeouts} timed out); "
            f"last: {detail}"[:2000],
            500,
        )

    def _target(self) -> str:
        """` (METHOD URL)` for an HTTP tool, so that its errors say what was called; "" for a callable."""
        http = self.stage.http
        return f" ({http.method} {http.url})" if http is not None else ""


class _Method:
    """`handle.method.remote(...)` for an in-process object: the ingress's routes call every stage so."""

    def __init__(self, fn: Callable[..., Awaitable[Any]]):
        self.fn = fn

    async def remote(self, *args, **kwargs) -> Any:
        return await self.fn(*args, **kwargs)


class InlineTool:
    """A tool stage run in the caller's process, with the surface of its replica (calls, status, dependencies)."""

    def __init__(self, pipeline: str, stage, base_dir: Path, metrics, checks: Callable[[Any], Awaitable[list]]):
        self.pipeline, self.stage, self.metrics = pipeline, stage, metrics
        self.runtime = ToolRuntime(stage, base_dir)
        self.status = _Method(self._status)
        self.dependencies = _Method(lambda: checks(stage))
        self.loop_stages: list[str] = []  # LLM stages whose replicas run this tool in their loop (`replica_loops`)
        # the limits Ray Serve holds a separate tool's calls to, here per process: calls in flight (max_ongoing_requests,
        # as `deployments.build_app` sets it) and calls waiting for one of those (max_queued_requests)
        self.ongoing = stage.limits.max_concurrency or max(16, stage.concurrency)
        self.admits = self.ongoing + stage.limits.max_queued
        self.admitted = 0  # calls in flight or waiting
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, payload: Any, request_id: str = "") -> Any:
        """One call; its latency, when it answers, in hetforge_stage_latency_seconds under the tool's stage name.
        Beyond `admits` calls in flight or waiting in this process, 503: the client retries later."""
        if self.admitted >= self.admits:
            raise StageError(
                f"stage {self.stage.name} is at capacity: {self.admitted} calls in flight or waiting in this process "
                f"(limits.max_concurrency {self.ongoing} + limits.max_queued {self.stage.limits.max_queued}); "
                "retry later",
                503,
            )
        if self._slots is None:  # created inside the serving event loop
            self._slots = asyncio.Semaphore(self.ongoing)
        self.admitted += 1
        try:
            async with self._slots:
                start = time.perf_counter()
                out = await self.runtime(payload)
        finally:
            self.admitted -= 1
        self.metrics.stage_latency.labels(self.pipeline, self.stage.name, "reference", "cpu").observe(
            time.perf_counter() - start
        )
        return out

    async def _status(self) -> dict:
        return {
            "replica": f"inline-{os.getpid()}",
            "node_id": "",
            "stage": self.stage.name,
            "device": "cpu",
            "placement": "inline",
            "active_variant": "reference",
            "attempts": self.runtime.attempts,  # this process's; the loops' calls count in the replicas' metrics
            "also_in_replicas_of": self.loop_stages,
        }


class InlineCaller:
    """The pipeline walk's stage calls: inline tools in this process, every other stage through `inner`."""

    def __init__(self, inner: StageCaller, inline: dict[str, InlineTool]):
        self.inner, self.inline = inner, inline

    async def __call__(self, stage: str, payload: Any, request_id: str) -> Any:
        tool = self.inline.get(stage)
        if tool is not None:
            return await tool(payload, request_id)
        return await self.inner(stage, payload, request_id)

    def stream(self, stage: str, payload: Any, request_id: str) -> AsyncIterator[str]:
        return self.inner.stream(stage, payload, request_id)

    async def loop(self, stage: str, payload: Any, request_id: str) -> Any:
        return await self.inner.loop(stage, payload, request_id)
