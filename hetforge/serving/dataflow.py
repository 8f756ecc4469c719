"""One request's walk through a pipeline: argument bindings, branches, joins and agent loops.

Plain asyncio over the spec; how a stage is called is injected (`StageCaller`: Ray Serve handles
in production, coroutines in tests), so the walk is the same code everywhere.

- Every stage reachable from the entry over data edges gets a task; a task waits for its upstream
  stages, then runs when at least one incoming edge was taken (its condition held on the upstream
  output) and is skipped otherwise (dead-path elimination). Independent branches run concurrently.
- A stage's input: its `args` bindings when declared; else the request (entry), the upstream
  output (one incoming edge), or {upstream: output} for the upstream stages that ran (a join: a
  stage with several incoming edges).
- An LLM stage with an agent loop is called with the conversation so far (OpenAI messages); when
  its answer has `tool_calls` of the loop's tools, those tool stages run (concurrently) with the
  given arguments and the LLM is called again with the results, up to `max_iterations` LLM calls
  (the last with tool_choice none). A call of a tool the loop does not own (an OpenAI client's own
  tool) ends the loop: the answer goes back to the client, which runs it. Streamed (`stream`), each
  LLM call of the loop is a streamed call: the answering turn's tokens go out as they are generated;
  each has its stage's breaker and timeout, and is retried only before its first token.
- Errors carry an HTTP status, the stage and the request id: 4xx for what the client sent, 5xx
  for a stage that failed or timed out.
- Each stage call is bounded by the stage's `limits.timeout_s` (retries included; 504 after), the
  whole request by the pipeline's `limits.timeout_s`. A failed call (5xx) is retried `retries`
  times (tools retry inside their replica instead, each attempt with its own timeout); a circuit
  breaker, when the stage has one, refuses calls for `reset_s` after `failures` consecutive failed
  calls (503 with Retry-After). A stage that still fails follows its `on_error`: fail the request,
  skip the stage (its dependants see a branch not taken), or take its `fallback` (a value, or
  another stage called with the same input); the answer lists such stages under `failed`.
- Every failure, argument binding included, is reported once to `on_failure(stage, kind)` with a
  kind of `FAILURE_KINDS` (the ingress counts them in hetforge_stage_errors_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import networkx as nx

from hetforge.spec.graph import PipelineGraph
from hetforge.spec.models import LlmStage, Pipeline

_SKIPPED = object()

# Why a stage call failed, the `kind` label of hetforge_stage_errors_total.
FAILURE_KINDS = ("binding", "client", "timeout", "overload", "circuit_open", "error")


def failure_kind(status: int) -> str:
    """The kind of a stage failure answered with `status`: the client's (4xx), a timeout, overload, or an error."""
    if status < 500:
        return "client"
    return {504: "timeout", 503: "overload"}.get(status, "error")


class StageError(Exception):
    """A stage could not answer: `status` is the HTTP status the request gets (400, 422, 500, 504)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message, status)  # both in args: the error survives pickling across Ray processes
        self.message, self.status = message, status

    def __str__(self) -> str:
        return self.message


class LoopError(StageError):
    """An agent loop run by its LLM stage's replica failed; the replica reported the failure where it happened.

    It keeps the failure's stage (a tool's, or the LLM's), kind and Retry-After; all are in args, so that it survives
    pickling across Ray processes."""

    def __init__(self, message: str, status: int, stage: str | None, kind: str, retry_after_s: int | None = None):
        Exception.__init__(self, message, status, stage, kind, retry_after_s)
        self.message, self.status = message, status
        self.stage, self.kind, self.retry_after_s = stage, kind, retry_after_s


class NoLoopHere(StageError):
    """This LLM replica was built without its stage's agent loop (its tools are not all inline in its version): the
    caller runs the loop itself."""


class PipelineError(Exception):
    """A request failed: the status, the stage that failed (if one did) and the request id.

    `kind` is one of `FAILURE_KINDS`; `retry_after_s` is sent as Retry-After (overload, an open circuit)."""

    def __init__(
        self,
        status: int,
        message: str,
        request_id: str,
        stage: str | None = None,
        kind: str | None = None,
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.request_id, self.stage = status, message, request_id, stage
        self.kind = kind or failure_kind(status)
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "stage": self.stage,
                "request_id": self.request_id,
                "status": self.status,
            }
        }


class StageCaller(Protocol):
    async def __call__(self, stage: str, payload: Any, request_id: str) -> Any: ...

    def stream(self, stage: str, payload: Any, request_id: str) -> AsyncIterator[str]: ...

    async def loop(self, stage: str, payload: Any, request_id: str) -> Any:
        """A whole agent loop, run by the LLM stage's replica (`PipelineRunner.answer_loop` there)."""
        ...


@dataclass
class RunResult:
    request_id: str
    output: Any
    stages: dict[str, float] = field(default_factory=dict)  # stage -> ms (stages that ran)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # stage -> its error, for stages skipped or replaced on error

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id,
            "output": self.output,
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
            "skipped": self.skipped,
            "failed": self.failed,
        }


class Breaker:
    """A stage's circuit breaker: open after `failures` consecutive failed calls; after `reset_s`, one trial call
    at a time (half-open) closes it on success or opens it again. Per ingress replica."""

    def __init__(self, failures: int, reset_s: float, clock=time.monotonic):
        self.failures, self.reset_s, self.clock = failures, reset_s, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.trial = False  # a half-open trial call is in flight

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at < self.reset_s or self.trial:
            return False
        self.trial = True
        return True

    def retry_in_s(self) -> float:
        return 0.0 if self.opened_at is None else max(0.0, self.reset_s - (self.clock() - self.opened_at))

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def succeeded(self) -> None:
        self.consecutive, self.opened_at, self.trial = 0, None, False

    def failed(self) -> None:
        self.consecutive += 1
        if self.trial or self.consecutive >= self.failures:
            self.opened_at, self.trial = self.clock(), False


def lookup(value: Any, path: list[str]) -> Any:
    """`value[a][b]...` for a dotted path; KeyError naming the missing part."""
    for i, part in enumerate(path):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(".".join(path[: i + 1]))
    return value


def condition_holds(when, output: Any) -> bool:
    try:
        value = lookup(output, when.field.split("."))
    except KeyError:
        return False
    if when.one_of is not None:
        return value in when.one_of
    return value == when.equals


class PipelineRunner:
    """Runs requests through one pipeline with a given stage caller."""

    def __init__(
        self,
        pipeline: Pipeline,
        caller: StageCaller,
        on_failure: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        delegated: frozenset[str] = frozenset(),
    ):
        self.pipeline, self.caller = pipeline, caller
        self.on_failure = on_failure or (lambda stage, kind: None)
        self.breakers = {
            s.name: Breaker(s.circuit_breaker.failures, s.circuit_breaker.reset_s, clock)
            for s in pipeline.stages
            if s.circuit_breaker is not None
        }
        self.preds: dict[str, list] = {s.name: [] for s in pipeline.stages}
        for edge in pipeline.flow:
            self.preds[edge.target].append(edge)
        data = PipelineGraph(pipeline).data_dag()
        reachable = nx.descendants(data, pipeline.entry) | {pipeline.entry}
        self.dag = [s.name for s in pipeline.stages if s.name in reachable]
        self.ancestors = {n: nx.ancestors(data, n) for n in self.dag}
        self.waits_for = {n: self._bound_stages(n) for n in self.dag}
        self.llms = {s.name for s in pipeline.stages if isinstance(s, LlmStage)}
        self.loops = {s.name: s.agent_loop for s in pipeline.stages if isinstance(s, LlmStage) and s.agent_loop}
        # agent loops run whole by their LLM stage's replica (`run_loop` there): one call a task, not one a turn
        self.delegated = frozenset(delegated) & set(self.loops)

    def _bound_stages(self, name: str) -> list[str]:
        """Stages whose output `name`'s args bind: they must be upstream of it (else ValueError naming both)."""
        stage = self.pipeline.stage(name)
        heads = {ref.split(".")[0] for ref in (stage.args or {}).values()} - {"request"}
        later = sorted(heads - self.ancestors[name])
        if later:
            raise ValueError(
                f"stage {name}: args bind {', '.join(later)}, which {'is' if len(later) == 1 else 'are'} not upstream of it "
                "in the flow; a stage can only take the output of a stage that runs before it"
            )
        return sorted(heads)

    # ------------------------------------------------------------------ inputs
    def stage_input(self, name: str, request: Any, outputs: dict[str, Any], taken: list[str], request_id: str) -> Any:
        stage = self.pipeline.stage(name)
        if stage.args:
            bound = {}
            for arg, ref in stage.args.items():
                head, *path = ref.split(".")
                if head == "request":
                    source = request
                elif outputs.get(head, _SKIPPED) is not _SKIPPED:
                    source = outputs[head]
                else:  # a branch not taken for this request: the argument is null
                    bound[arg] = None
                    continue
                try:
                    bound[arg] = lookup(source, path)
                except KeyError as err:
                    status = 400 if head == "request" else 500
                    raise PipelineError(
                        status,
                        f"stage {name}: argument {arg} = {ref}: {head} has no field {err.args[0]!r}",
                        request_id,
                        name,
                        kind="binding",
                    ) from None
            return bound
        if name == self.pipeline.entry:
            return request
        if len(self.preds[name]) == 1:
            return outputs[taken[0]]
        return {t: outputs[t] for t in taken}  # a join: the same shape whichever branches ran

    # ------------------------------------------------------------------ calls
    def _admit(self, name: str, request_id: str) -> Breaker | None:
        """The stage's circuit breaker, after it let this call through (503 `circuit_open`, reported, if not)."""
        breaker = self.breakers.get(name)
        if breaker is not None and not breaker.allow():
            err = PipelineError(
                503,
                f"stage {name}: circuit open after {breaker.failures} consecutive failed calls; "
                f"calls resume in {breaker.retry_in_s():.0f} s",
                request_id,
                name,
                kind="circuit_open",
                retry_after_s=max(1, round(breaker.retry_in_s())),
            )
            self.on_failure(name, err.kind)
            raise err
        return breaker

    def _failed(self, name: str, err: PipelineError, breaker: Breaker | None) -> PipelineError:
        """Report a failed call once, and tell its breaker: only the stage's own failures count against it."""
        self.on_failure(name, err.kind)
        _tell(breaker, err.kind in ("error", "timeout"))  # the stage's own failure; not the client's input or overload
        return err

    async def _call(self, name: str, payload: Any, request_id: str) -> Any:
        """One call of a stage: its circuit breaker, its retries and its timeout; a failure is reported once."""
        stage = self.pipeline.stage(name)
        breaker = self._admit(name, request_id)
        timeout = stage.limits.timeout_s
        try:
            out = await asyncio.wait_for(self._attempts(name, payload, request_id), timeout)
        except TimeoutError:
            err = PipelineError(
                504, f"stage {name}: no answer within {timeout:g} s (limits.timeout_s)", request_id, name
            )
        except PipelineError as failed:
            err = failed
        except asyncio.CancelledError:  # the request ended (its timeout, a failed sibling): the trial tested nothing
            if breaker is not None:
                breaker.trial = False
            raise
        else:
            if breaker is not None:
                breaker.succeeded()
            return out
        raise self._failed(name, err, breaker)

    async def _attempts(self, name: str, payload: Any, request_id: str) -> Any:
        stage = self.pipeline.stage(name)
        tries = 1 if stage.kind == "tool" else stage.retries + 1  # a tool retries inside its replica
        for attempt in range(tries):
            try:
                return await self.caller(name, payload, request_id)
            except PipelineError:
                raise
            except Exception as err:  # noqa: BLE001 - whatever a stage raised becomes a located 5xx (or its own status)
                located = _located(err, name, request_id, self.pipeline.limits.retry_after_s)
                if located.kind != "error" or attempt + 1 == tries:  # the last attempt returns or raises
                    raise located from None

    async def _recover(self, name: str, payload: Any, err: PipelineError, request_id: str) -> Any:
        """The output of a failed stage under its `on_error`: `_SKIPPED`, the fallback value or stage; or `err`."""
        stage = self.pipeline.stage(name)
        if stage.on_error == "fail" or (err.kind == "binding" and err.status < 500):
            raise err  # a request field that is missing is the client's error, whatever the policy
        if stage.on_error == "skip":
            return _SKIPPED
        if stage.fallback.stage is None:
            return copy.deepcopy(stage.fallback.value)
        return await self._run_stage(stage.fallback.stage, payload, request_id)

    async def _run_stage(self, name: str, payload: Any, request_id: str, options: dict | None = None) -> Any:
        """`options` (an OpenAI request's tools and sampling) go to the output LLM stage's calls."""
        loop = self.loops.get(name)
        if loop is None:
            if name in self.llms:
                payload = {"input": payload, "history": [], "options": options or {}}
            return await self._call(name, payload, request_id)
        if name in self.delegated:
            return await self._delegate(name, payload, request_id, options)
        return await self.run_loop(name, payload, request_id, options)

    async def run_loop(self, name: str, payload: Any, request_id: str, options: dict | None = None) -> Any:
        """Stage `name`'s agent loop on `payload`: its LLM calls and tool calls through this runner's caller."""
        loop = self.loops[name]
        history: list[dict] = []
        out: Any = None
        usage: dict = {}
        for turn in range(loop.max_iterations):
            last = turn == loop.max_iterations - 1
            # the last LLM call allowed answers: no tool could run after it
            turn_options = {**(options or {}), **({"tool_choice": "none"} if last else {})}
            out = await self._call(name, {"input": payload, "history": history, "options": turn_options}, request_id)
            usage = _add_usage(usage, out.get("usage") if isinstance(out, dict) else None)
            calls = tool_calls_of(out)
            if not calls or last or any(c["function"]["name"] not in loop.tools for c in calls):
                break  # an answer, or a call of the client's own tools: the client runs those
            history.append({"role": "assistant", "content": out.get("text") or None, "tool_calls": calls})
            results = await asyncio.gather(*(self._tool(c, request_id) for c in calls))
            for call, result in zip(calls, results, strict=True):
                content = json.dumps(result, default=str)[:20_000]
                history.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        if usage and isinstance(out, dict):
            out = {**out, "usage": usage}
        return out

    async def _delegate(self, name: str, payload: Any, request_id: str, options: dict | None) -> Any:
        """The whole agent loop in one call of the LLM stage's replica, which runs `run_loop` with its own runner:
        there each turn and tool call has its stage's breaker, timeout and retries, and is reported once. Here the
        call has the stage's breaker (told only of the LLM's own failures), is bounded by the pipeline's timeout,
        also sent to the replica, and is not retried (the loop's tools may have run). A replica without the loop
        (`NoLoopHere`: one of an earlier version, while a deployment changes) leaves it to `run_loop` here."""
        breaker = self._admit(name, request_id)
        doc = {"input": payload, "options": options or {}, "timeout_s": self.pipeline.limits.timeout_s}
        try:
            out = await self.caller.loop(name, doc, request_id)
        except PipelineError as err:
            raise self._failed(name, err, breaker) from None
        except asyncio.CancelledError:
            _tell(breaker, False)
            raise
        except Exception as err:  # noqa: BLE001 - whatever the call raised becomes a located error
            cause = getattr(err, "cause", None) or err  # Ray wraps a replica's exception; .cause is the original
            if isinstance(cause, NoLoopHere):
                _tell(breaker, False)
                return await self.run_loop(name, payload, request_id, options)
            if not isinstance(cause, LoopError):  # the call itself failed (overload, a dead replica)
                located = _located(err, name, request_id, self.pipeline.limits.retry_after_s)
                raise self._failed(name, located, breaker) from None
            # reported by the replica where it happened: here only the LLM's own failures count against its breaker
            _tell(breaker, cause.stage == name and cause.kind in ("error", "timeout"))
            raise PipelineError(
                cause.status, cause.message, request_id, cause.stage, cause.kind, cause.retry_after_s
            ) from None
        _tell(breaker, None)
        return out

    async def answer_loop(self, name: str, payload: dict, request_id: str) -> Any:
        """A delegated loop (`_delegate`'s call), in the LLM stage's replica, within the timeout it was sent; a
        failure is a `LoopError`."""
        limit = payload.get("timeout_s")
        try:
            return await asyncio.wait_for(
                self.run_loop(name, payload["input"], request_id, payload.get("options")), limit
            )
        except TimeoutError:
            message = f"the agent loop of stage {name} took longer than the pipeline's limits.timeout_s ({limit:g} s)"
            raise LoopError(message, 504, name, "timeout") from None
        except PipelineError as err:
            raise LoopError(err.message, err.status, err.stage, err.kind, err.retry_after_s) from None

    async def _tool(self, call: dict, request_id: str) -> Any:
        """One tool call of an agent loop; its error (a timeout aside) goes back to the LLM, which may try again."""
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
        except ValueError as err:
            return {"error": f"the arguments are not JSON: {err}"}
        try:
            return await self._call(call["function"]["name"], args if isinstance(args, dict) else {}, request_id)
        except PipelineError as err:
            if err.status == 504:
                raise
            return {"error": err.message}

    async def _walk(
        self, request: Any, request_id: str, stop_before: str | None = None, options: dict | None = None
    ) -> tuple[dict, dict[str, float], dict]:
        """Run the stages; `stop_before`'s input is computed and held (for streaming) instead of running it."""
        outputs: dict[str, Any] = {}
        held: dict[str, Any] = {}
        timings: dict[str, float] = {}
        failed: dict[str, str] = {}
        done: dict[str, asyncio.Future] = {n: asyncio.get_running_loop().create_future() for n in self.dag}

        async def node(name: str) -> None:
            try:
                for up in self.waits_for[name]:
                    if up in done:
                        await asyncio.shield(done[up])
                taken = []
                for edge in self.preds[name]:
                    if edge.source not in done:
                        continue
                    up = await done[edge.source]
                    if up is not _SKIPPED and (edge.when is None or condition_holds(edge.when, up)):
                        taken.append(edge.source)
                if name != self.pipeline.entry and not taken:
                    outputs[name] = _SKIPPED
                    done[name].set_result(_SKIPPED)
                    return
                payload = None
                try:
                    payload = self.stage_input(name, request, outputs, taken, request_id)
                    if name == stop_before:  # streaming: the caller runs this one
                        held[name] = payload
                        outputs[name] = _SKIPPED
                        done[name].set_result(_SKIPPED)
                        return
                    start = time.perf_counter()
                    mine = options if name == self.pipeline.output else None
                    outputs[name] = await self._run_stage(name, payload, request_id, mine)
                    timings[name] = (time.perf_counter() - start) * 1e3
                except PipelineError as err:
                    if err.kind == "binding":
                        self.on_failure(name, err.kind)
                    outputs[name] = await self._recover(name, payload, err, request_id)
                    failed[name] = err.message
                done[name].set_result(outputs[name])
            except BaseException as err:
                if not done[name].done():
                    done[name].set_exception(err)
                raise

        tasks = [asyncio.create_task(node(n)) for n in self.dag]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for f in done.values():  # an upstream failure: its dependants' futures hold it; retrieve it once
                if f.done() and not f.cancelled():
                    f.exception()
        return outputs, timings, held, failed

    async def _bounded_walk(
        self, request: Any, request_id: str, stop_before: str | None = None, options: dict | None = None
    ) -> tuple:
        """`_walk` within the pipeline's limits.timeout_s (504 after)."""
        limit = self.pipeline.limits.timeout_s
        try:
            return await asyncio.wait_for(self._walk(request, request_id, stop_before, options), limit)
        except TimeoutError:
            raise PipelineError(
                504, f"the request took longer than the pipeline's limits.timeout_s ({limit:g} s)", request_id
            ) from None

    async def run(self, request: Any, request_id: str, options: dict | None = None) -> RunResult:
        outputs, timings, _, failed = await self._bounded_walk(request, request_id, options=options)
        return self._result(outputs, timings, failed, request_id)

    def _result(self, outputs: dict, timings: dict, failed: dict, request_id: str) -> RunResult:
        out_name = self.pipeline.output
        value = outputs.get(out_name, _SKIPPED)
        if value is _SKIPPED:
            ran = ", ".join(timings) or "none"
            raise PipelineError(
                500, f"no branch reached the output stage {out_name} (stages that ran: {ran})", request_id, out_name
            )
        skipped = [n for n in self.dag if outputs.get(n) is _SKIPPED]
        return RunResult(request_id, value, timings, skipped, failed)

    async def stream(self, request: Any, request_id: str, options: dict | None = None) -> AsyncIterator[str | dict]:
        """Text deltas of the output LLM stage, after every stage before it ran, then one dict with its tool calls,
        finish reason and usage (from an LLM runtime). An agent loop streams every turn through the engine: its
        tool-call turns run their tools here as `run` does, and the answering turn's tokens arrive as generated;
        the closing dict has the usage summed over the loop's calls."""
        out_name = self.pipeline.output
        _, _, held, _ = await self._bounded_walk(request, request_id, stop_before=out_name)
        if out_name not in held:
            raise PipelineError(500, f"no branch reached the output stage {out_name}", request_id, out_name)
        loop = self.loops.get(out_name)
        if loop is None:
            payload = {"input": held[out_name], "history": [], "options": options or {}}
            async for event in self._stream_call(out_name, payload, request_id):
                yield event
            return
        history: list[dict] = []
        usage: dict = {}
        for turn in range(loop.max_iterations):
            last = turn == loop.max_iterations - 1
            turn_options = {**(options or {}), **({"tool_choice": "none"} if last else {})}
            payload = {"input": held[out_name], "history": history, "options": turn_options}
            text, final = "", {}
            async for event in self._stream_call(out_name, payload, request_id):
                if isinstance(event, dict):
                    final = event
                elif event:
                    text += event
                    yield event
            usage = _add_usage(usage, final.get("usage"))
            calls = tool_calls_of(final)
            if not calls or last or any(c["function"]["name"] not in loop.tools for c in calls):
                yield {**final, **({"usage": usage} if usage else {})}
                return
            history.append({"role": "assistant", "content": text or None, "tool_calls": calls})
            results = await asyncio.gather(*(self._tool(c, request_id) for c in calls))
            for call, result in zip(calls, results, strict=True):
                content = json.dumps(result, default=str)[:20_000]
                history.append({"role": "tool", "tool_call_id": call["id"], "content": content})

    async def _stream_call(self, name: str, payload: dict, request_id: str) -> AsyncIterator[str | dict]:
        """One streamed LLM call under the stage's policy, as `_call`: its circuit breaker; its `limits.timeout_s`
        on the whole stream (504 after); its retries, but only before the first event went out (a client that got
        tokens cannot be given another answer's). A failure is located at the stage and reported once."""
        stage = self.pipeline.stage(name)
        breaker = self._admit(name, request_id)
        loop = asyncio.get_running_loop()
        limit = stage.limits.timeout_s
        deadline = None if limit is None else loop.time() + limit
        tries = stage.retries + 1
        for attempt in range(tries):
            events = aiter(self.caller.stream(name, payload, request_id))
            started = False
            try:
                while True:
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError
                    try:
                        event = await asyncio.wait_for(anext(events), remaining)
                    except StopAsyncIteration:
                        break
                    started = True
                    yield event
            except TimeoutError:
                err = PipelineError(
                    504,
                    f"stage {name}: no answer within {limit:g} s (limits.timeout_s)",
                    request_id,
                    name,
                )
            except PipelineError as failed:
                err = failed
            except (asyncio.CancelledError, GeneratorExit):  # the request ended: the trial tested nothing
                if breaker is not None:
                    breaker.trial = False
                raise
            except Exception as raised:  # noqa: BLE001 - whatever a stage raised becomes a located 5xx
                err = _located(raised, name, request_id, self.pipeline.limits.retry_after_s)
            else:
                if breaker is not None:
                    breaker.succeeded()
                return
            finally:
                with contextlib.suppress(Exception):
                    await events.aclose()
            if err.kind == "error" and not started and attempt + 1 < tries:
                continue
            raise self._failed(name, err, breaker)


def tool_calls_of(out: Any) -> list[dict]:
    """An LLM answer's tool calls in OpenAI's format (`tool_calls`; a single `tool_call` {name, arguments} too)."""
    if not isinstance(out, dict):
        return []
    calls = [c for c in out.get("tool_calls") or [] if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    one = out.get("tool_call")
    if not calls and isinstance(one, dict) and isinstance(one.get("name"), str):
        args = one.get("arguments")
        text = args if isinstance(args, str) else json.dumps(args if isinstance(args, dict) else {})
        calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": one["name"], "arguments": text},
            }
        ]
    return calls


def _add_usage(total: dict, usage: dict | None) -> dict:
    """OpenAI usage summed over an agent loop's LLM calls."""
    if not usage:
        return total
    out = dict(total)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        out[key] = out.get(key, 0) + (usage.get(key) or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        out["prompt_tokens_details"] = {
            "cached_tokens": (out.get("prompt_tokens_details") or {}).get("cached_tokens", 0) + cached
        }
    return out


def _tell(breaker: Breaker | None, failed: bool | None) -> None:
    """Tell a breaker how its call ended: succeeded (None), the stage's own failure (True), or a failure that tested
    nothing (False: the client's input, overload, a cancelled call; a trial call lets the next one try)."""
    if breaker is None:
        return
    if failed is None:
        breaker.succeeded()
    elif failed:
        breaker.failed()
    elif breaker.trial:
        breaker.trial = False


def _located(err: Exception, stage: str, request_id: str, retry_after_s: int = 1) -> PipelineError:
    """A stage's exception as a PipelineError: a StageError keeps its status and message; others are 500s."""
    cause = getattr(err, "cause", None) or err  # Ray wraps a replica's exception; .cause is the original
    if isinstance(cause, StageError):
        retry = retry_after_s if cause.status == 503 else None
        return PipelineError(cause.status, cause.message[:2000], request_id, stage, retry_after_s=retry)
    return PipelineError(500, f"stage {stage} failed: {type(cause).__name__}: {cause}"[:2000], request_id, stage)
