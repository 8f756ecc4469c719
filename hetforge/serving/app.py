"""The Ray Serve application of one pipeline: a deployment per stage and a FastAPI ingress.

    ingress (FastAPI, serve.ingress)  --handles-->  one deployment per stage
      POST /v1/pipelines/{name}/run          JSON in, JSON out (or text/event-stream when asked
                                             and the output stage is an LLM), with a request id
      POST /v1/chat/completions              OpenAI-compatible, for pipelines ending in an LLM
      POST /v1/pipelines/{name}/stages/{stage}/swap   hot-swap a model stage's variant
      GET  /v1/pipelines/{name}/status       replicas, devices and active variants
      GET  /healthz, GET /metrics            readiness (every stage answers); every replica's metrics on this node

Each stage deployment gets its `ray_actor_options` (CPUs, GPUs, accelerator type) from the plan,
its replicas or autoscaling from the spec, and `max_ongoing_requests` from its batching or tool
concurrency. Model stages batch with `serve.batch`; a swap reaches their replicas through the
registry file (`swap_control`), so no replica restarts.

Metrics: replicas write prometheus_client's multiprocess files into one folder per deployment
(`PROMETHEUS_MULTIPROC_DIR`, set through the runtime environment), and the ingress's /metrics
aggregates them: the names stay exactly those of `metrics.SPEC` (Ray's own metric export would
prefix them with `ray_`). This covers the replicas of one node; see the README for clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from hetforge.serving.dataflow import PipelineError, PipelineRunner, StageError
from hetforge.spec.models import LlmStage, ModelStage, Pipeline, ToolStage


def _pipeline(doc: dict) -> Pipeline:
    return Pipeline.model_validate(doc)


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica (tests calling the class directly)
        return f"{socket.gethostname()}-{os.getpid()}"


def _node_id() -> str:
    """The Ray node this replica runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


@contextlib.contextmanager
def _observed(metrics, pipeline: str, stage: str, device: str):
    """A tool or LLM stage call: its latency, or an error count when it raises."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        metrics.stage_errors.labels(pipeline, stage).inc()
        raise
    metrics.stage_latency.labels(pipeline, stage, "reference", device).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- stages
@serve.deployment
class ModelStageDeployment:
    """A model stage replica: batched calls on the active variant, swaps from the registry file."""

    def __init__(self, pipeline_doc: dict, base_dir: str, stage_name: str, device: str, registry_path: str, device_class: str | None = None):
        from hetforge.kernels.registry import Registry
        from hetforge.serving.model_io import resolve_function
        from hetforge.serving.stage_runtime import ModelStageRuntime
        from hetforge.serving.swap_control import SwapBoard, SwapWatcher

        pipeline = _pipeline(pipeline_doc)
        stage: ModelStage = pipeline.stage(stage_name)
        base = Path(base_dir)
        self.stage, self.device = stage, device
        self.runtime = ModelStageRuntime(pipeline.name, stage.name, base / stage.problem_file, device=device, precision=stage.precision,
                                         weights=base / stage.weights if stage.weights else None, seed=stage.seed,
                                         init_args=stage.init_args, init_kwargs=stage.init_kwargs, registry=Registry(registry_path),
                                         max_batch_rows=stage.batching.max_batch_size if stage.batching else 1, device_class=device_class)
        self.pre = resolve_function(stage.preprocess, base)
        self.post = resolve_function(stage.postprocess, base)
        self.arity = len(self.runtime.example_inputs())
        batching = stage.batching
        self.run_batch.set_max_batch_size(batching.max_batch_size if batching else 1)
        self.run_batch.set_batch_wait_timeout_s((batching.wait_ms if batching else 0.0) / 1e3)
        self.watcher = SwapWatcher(self.runtime, SwapBoard(registry_path), _replica_name()).start()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def run_batch(self, items: list[list]) -> list[Any]:
        from hetforge.serving.model_io import run_batched

        try:
            return await asyncio.to_thread(run_batched, self.runtime, items)
        except Exception as err:  # noqa: BLE001 - one failure answers every request of the batch, as an error value
            return [StageError(f"stage {self.stage.name}: {type(err).__name__}: {err}"[:2000], 500)] * len(items)

    async def __call__(self, payload: Any, request_id: str = "") -> Any:
        from hetforge.serving.model_io import decode_inputs, encode_output

        tensors = [t.to(self.device) for t in decode_inputs(self.stage, payload, self.pre, self.arity)]
        out = await self.run_batch(tensors)
        if isinstance(out, Exception):
            raise out
        return encode_output(self.stage, out, payload, self.post)

    def status(self) -> dict:
        r = self.runtime
        return {"replica": _replica_name(), "node_id": _node_id(), "stage": self.stage.name, "device": self.device,
                "device_class": r.device_class, "active_variant": r.active_variant, "swaps": [vars(h) for h in r.history[-10:]]}


@serve.deployment
class ToolStageDeployment:
    def __init__(self, pipeline_doc: dict, base_dir: str, stage_name: str):
        from hetforge.serving.metrics import default_metrics
        from hetforge.serving.tools import ToolRuntime

        pipeline = _pipeline(pipeline_doc)
        self.pipeline, self.stage = pipeline.name, pipeline.stage(stage_name)
        self.runtime = ToolRuntime(self.stage, Path(base_dir))
        self.metrics = default_metrics()

    async def __call__(self, payload: Any, request_id: str = "") -> Any:
        with _observed(self.metrics, self.pipeline, self.stage.name, "cpu"):
            return await self.runtime(payload)

    def status(self) -> dict:
        return {"replica": _replica_name(), "node_id": _node_id(), "stage": self.stage.name, "device": "cpu", "active_variant": "reference",
                "attempts": self.runtime.attempts}


@serve.deployment
class LlmStageDeployment:
    def __init__(self, pipeline_doc: dict, base_dir: str, stage_name: str, device: str):
        from hetforge.serving.llm import LlmRuntime
        from hetforge.serving.metrics import default_metrics

        pipeline = _pipeline(pipeline_doc)
        stage: LlmStage = pipeline.stage(stage_name)
        tools = [{"name": t, "description": pipeline.stage(t).description} for t in (stage.agent_loop.tools if stage.agent_loop else [])]
        self.pipeline, self.stage, self.device = pipeline.name, stage, device
        self.runtime = LlmRuntime(stage, Path(base_dir), tools)
        self.metrics = default_metrics()

    async def __call__(self, payload: dict, request_id: str = "") -> dict:
        with _observed(self.metrics, self.pipeline, self.stage.name, self.device):
            return await self.runtime(payload, request_id)

    async def stream(self, payload: dict, request_id: str = ""):
        with _observed(self.metrics, self.pipeline, self.stage.name, self.device):
            async for delta in self.runtime.stream(payload, request_id):
                yield delta

    def status(self) -> dict:
        backend = "vllm" if self.stage.vllm else f"endpoint {self.stage.endpoint.base_url}"
        return {"replica": _replica_name(), "node_id": _node_id(), "stage": self.stage.name, "device": self.device, "active_variant": backend}

    def __del__(self):
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.shutdown()


# ---------------------------------------------------------------------------------------------- re-optimization
def controller_stages(pipeline: Pipeline, base_dir: Path, placement: dict[str, dict]) -> dict:
    """The model stages the controller may optimize, with their fingerprints and their jobs' Ray options."""
    from hetforge.core.problem import Problem
    from hetforge.serving.controller import StageInfo

    spec = pipeline.reoptimize
    out = {}
    for stage in pipeline.stages:
        if not isinstance(stage, ModelStage) or not stage.optimize or stage.problem_file is None:
            continue
        where = placement[stage.name]
        problem = Problem(file=str(base_dir / stage.problem_file), init_args=tuple(stage.init_args or ()), init_kwargs=dict(stage.init_kwargs))
        resources: dict[str, Any] = {"num_cpus": spec.job_cpus}
        if where["ray_actor_options"].get("resources"):  # a named CPU class: the job runs on one of its nodes
            resources["resources"] = dict(where["ray_actor_options"]["resources"])
        if where["device"] == "cuda":
            # the job shares the stage's GPU (its nice level and thread count keep it behind serving): Ray must not
            # hide the device from a task that reserves no GPU, and the accelerator type puts it on a node that has one
            resources["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
            if where["ray_actor_options"].get("accelerator_type"):
                resources["accelerator_type"] = where["ray_actor_options"]["accelerator_type"]
        out[stage.name] = StageInfo(stage.name, problem.load().fingerprint(), where["device"], where["device_class"], stage.precision,
                                    str(base_dir / stage.problem_file), list(stage.init_args or []), dict(stage.init_kwargs), resources)
    return out


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class ReoptimizeController:
    """The pipeline's re-optimization loop (`controller.Controller`) on a thread of one replica.

    Serve restarts the replica if it dies; the new one resumes from the registry file.
    """

    def __init__(self, pipeline_doc: dict, base_dir: str, placement: dict, registry_path: str, metrics_dir: str):
        import threading

        from hetforge.serving.controller import Controller, metrics_source
        from hetforge.serving.jobs import JobLauncher
        from hetforge.serving.metrics import default_metrics
        from hetforge.serving.swap_control import SwapBoard, SwapError, request_swap

        pipeline = _pipeline(pipeline_doc)
        self.pipeline = pipeline

        def swapper(stage: str, variant: str) -> bool:
            replicas = max(1, len(SwapBoard(registry_path).alive(pipeline.name, stage)))
            try:
                return request_swap(registry_path, pipeline, stage, variant, replicas, 60)["ok"]
            except SwapError:
                return False

        self.controller = Controller(pipeline, controller_stages(pipeline, Path(base_dir), placement), registry_path,
                                     metrics_source=metrics_source(metrics_dir, pipeline.name), launcher=JobLauncher(pipeline.name),
                                     swapper=swapper, metrics=default_metrics())
        default_metrics().zero_control_series(pipeline.name, list(self.controller.stages))
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hetforge-controller", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.pipeline.reoptimize.interval_s):
            self.tick()

    def tick(self) -> dict:
        with self._lock:
            try:
                return self.controller.tick()
            except Exception as err:  # noqa: BLE001 - a failed look is logged and retried on the next one, never fatal
                self.errors = (self.errors + [f"{time.strftime('%H:%M:%S')} {type(err).__name__}: {err}"[:500]])[-20:]
                return {"error": self.errors[-1]}

    def status(self) -> dict:
        return {**self.controller.status(), "errors": self.errors}

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


# ---------------------------------------------------------------------------------------------- ingress
class HandleCaller:
    """The pipeline walk's stage calls, through Ray Serve deployment handles."""

    def __init__(self, handles: dict):
        self.handles = handles

    async def __call__(self, stage: str, payload: Any, request_id: str) -> Any:
        return await self.handles[stage].remote(payload, request_id)

    async def stream(self, stage: str, payload: Any, request_id: str):
        async for delta in self.handles[stage].options(stream=True, method_name="stream").remote(payload, request_id):
            yield delta


api = FastAPI(title="hetforge", description="Pipelines served by hetforge on Ray Serve.")


def _request_id(request: Request) -> str:
    """Ray Serve's request id: the client's X-Request-ID when sent, else the proxy's; the proxy returns it as a header."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or request.headers.get("x-request-id") or uuid.uuid4().hex


def _error(status: int, message: str, request_id: str, stage: str | None = None) -> JSONResponse:
    return JSONResponse(PipelineError(status, message, request_id, stage).to_json(), status_code=status)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class PipelineIngress:
    def __init__(self, pipeline_doc: dict, handles: dict, registry_path: str, metrics_dir: str, controller=None, base_dir: str = ".",
                 placement: dict | None = None):
        from hetforge.serving.dashboard_page import DashboardSampler
        from hetforge.serving.metrics import default_metrics

        self.pipeline = _pipeline(pipeline_doc)
        self.base_dir = Path(base_dir)
        self.handles = handles
        self.controller = controller
        self.runner = PipelineRunner(self.pipeline, HandleCaller(handles))
        self.registry_path, self.metrics_dir = registry_path, metrics_dir
        self.placement = placement or {}
        self.metrics = default_metrics()
        self.ends_in_llm = isinstance(self.pipeline.stage(self.pipeline.output), LlmStage)
        for stage in self.pipeline.stages:  # for the dashboards' placement table and SLO line
            where = self.placement.get(stage.name, {})
            self.metrics.stage_placement.labels(self.pipeline.name, stage.name, stage.kind, where.get("device_class", "?"),
                                                where.get("device", "?")).set(1)
        self.metrics.zero_serving_series(self.pipeline.name, [s.name for s in self.pipeline.stages],
                                         [s.name for s in self.pipeline.stages if isinstance(s, ModelStage)])
        if self.pipeline.slo is not None:
            self.metrics.pipeline_slo.labels(self.pipeline.name, "0.99").set(self.pipeline.slo.p99_ms / 1e3)
        self.sampler = DashboardSampler(self.pipeline.name, metrics_dir).start()  # the built-in page's time series

    def _check_name(self, name: str, request_id: str) -> JSONResponse | None:
        if name != self.pipeline.name:
            return _error(404, f"no pipeline {name!r} here; this deployment serves {self.pipeline.name!r}", request_id)
        return None

    async def _body(self, request: Request, request_id: str) -> dict | JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw or b"null")
        except ValueError as err:
            return _error(400, f"the body is not JSON: {err}", request_id)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object, for example {\"input\": {...}}", request_id)
        return body

    def _count(self, started: float, ok: bool) -> None:
        self.metrics.pipeline_requests.labels(self.pipeline.name, "ok" if ok else "error").inc()
        if ok:
            self.metrics.pipeline_latency.labels(self.pipeline.name).observe(time.perf_counter() - started)

    @api.get("/healthz")
    async def healthz(self):
        """Ready when every stage answers: the ingress alone may be up while an LLM replica still loads."""

        async def answers(handle) -> bool:
            try:
                await asyncio.wait_for(handle.status.remote(), timeout=2.0)
                return True
            except Exception:  # noqa: BLE001 - not up yet (or not answering): not ready
                return False

        names = list(self.handles)
        up = await asyncio.gather(*(answers(self.handles[n]) for n in names))
        waiting = [n for n, ok in zip(names, up) if not ok]
        if waiting:
            return JSONResponse({"status": "starting", "pipeline": self.pipeline.name, "waiting_for": waiting}, status_code=503)
        return {"status": "ok", "pipeline": self.pipeline.name}

    @api.get("/metrics")
    async def metrics_page(self) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/pipelines/{name}/run")
    async def run(self, name: str, request: Request):
        request_id = _request_id(request)
        started = time.perf_counter()
        bad = self._check_name(name, request_id)
        if bad is not None:
            return bad
        body = await self._body(request, request_id)
        if isinstance(body, JSONResponse):
            return body
        if "input" not in body:
            return _error(400, "the body needs an `input` field (the entry stage's input)", request_id)
        unknown = sorted(set(body) - {"input", "stream"})
        if unknown:
            return _error(400, f"unknown field(s) {', '.join(unknown)}; the body takes `input` and `stream`", request_id)
        if body.get("stream"):
            if not self.ends_in_llm:
                return _error(400, f"stream needs a pipeline whose output stage is an LLM; {self.pipeline.output} is not", request_id)
            return StreamingResponse(self._sse(self.runner.stream(body["input"], request_id), request_id, started),
                                     media_type="text/event-stream")
        result = await self._run_counted(body["input"], request_id, started)
        return result if isinstance(result, JSONResponse) else JSONResponse(result.to_json())

    async def _run_counted(self, pipeline_input: Any, request_id: str, started: float):
        """The pipeline's RunResult, or the error response; counted in the request metrics either way."""
        try:
            result = await self.runner.run(pipeline_input, request_id)
        except PipelineError as err:
            self._count(started, False)
            return JSONResponse(err.to_json(), status_code=err.status)
        self._count(started, True)
        return result

    async def _sse(self, deltas, request_id: str, started: float, openai_model: str | None = None):
        ok = False
        try:
            async for delta in deltas:
                if openai_model:
                    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": openai_model,
                             "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
                else:
                    chunk = {"request_id": request_id, "delta": delta}
                yield f"data: {json.dumps(chunk)}\n\n"
            ok = True
            if openai_model:
                done = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": openai_model,
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                yield f"data: {json.dumps(done)}\n\n"
            yield "data: [DONE]\n\n"
        except PipelineError as err:
            yield f"data: {json.dumps(err.to_json())}\n\n"
        finally:
            self._count(started, ok)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        request_id = _request_id(request)
        started = time.perf_counter()
        if not self.ends_in_llm:
            return _error(404, f"pipeline {self.pipeline.name} does not end in an LLM stage; use /v1/pipelines/{self.pipeline.name}/run",
                          request_id)
        body = await self._body(request, request_id)
        if isinstance(body, JSONResponse):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "`messages` must be a non-empty list of {role, content}", request_id)
        model = str(body.get("model") or self.pipeline.name)
        pipeline_input = {"messages": messages}
        if body.get("stream"):
            return StreamingResponse(self._sse(self.runner.stream(pipeline_input, request_id), request_id, started, model),
                                     media_type="text/event-stream")
        result = await self._run_counted(pipeline_input, request_id, started)
        if isinstance(result, JSONResponse):
            return result
        text = result.output.get("text", "") if isinstance(result.output, dict) else str(result.output)
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                             "usage": None})

    @api.post("/v1/pipelines/{name}/stages/{stage}/swap")
    async def swap(self, name: str, stage: str, request: Request):
        request_id = _request_id(request)
        bad = self._check_name(name, request_id)
        if bad is not None:
            return bad
        body = await self._body(request, request_id)
        if isinstance(body, JSONResponse):
            return body
        from hetforge.serving.swap_control import SwapError, request_swap

        replicas = await self._replicas(stage)
        try:
            doc = await asyncio.to_thread(request_swap, self.registry_path, self.pipeline, stage, body.get("variant"), replicas,
                                          float(body.get("wait_s", 30)))
        except SwapError as err:
            return _error(err.status, str(err), request_id, stage)
        return JSONResponse(doc, status_code=200 if doc["ok"] else 409)

    async def _replicas(self, stage: str) -> int:
        """Replicas of the stage alive now, from their heartbeats in the registry file (at least 1)."""
        from hetforge.serving.swap_control import SwapBoard

        return max(1, len(await asyncio.to_thread(SwapBoard(self.registry_path).alive, self.pipeline.name, stage)))

    @api.get("/v1/pipelines/{name}/status")
    async def status(self, name: str):
        request_id = uuid.uuid4().hex
        bad = self._check_name(name, request_id)
        if bad is not None:
            return bad
        stages = {}
        for stage, handle in self.handles.items():
            try:
                stages[stage] = await handle.status.remote()
            except Exception as err:  # noqa: BLE001
                stages[stage] = {"error": f"{type(err).__name__}: {err}"[:300]}
        doc = {"pipeline": self.pipeline.name, "stages": stages}
        if self.controller is not None:
            try:
                doc["reoptimize"] = await self.controller.status.remote()
            except Exception as err:  # noqa: BLE001
                doc["reoptimize"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        return doc

    # -- re-optimization: approvals, hints, rollouts (the same operations as `hetforge approvals`)
    @api.get("/v1/pipelines/{name}/approvals")
    async def approvals(self, name: str):
        from hetforge.serving import approvals

        bad = self._check_name(name, uuid.uuid4().hex)
        if bad is not None:
            return bad
        return {"pending": await asyncio.to_thread(approvals.pending, self.registry_path, self.pipeline)}

    @api.get("/v1/pipelines/{name}/approvals/{variant_id}")
    async def approval(self, name: str, variant_id: int):
        return await self._approval_call(name, "show", variant_id, {})

    @api.post("/v1/pipelines/{name}/approvals/{variant_id}/{action}")
    async def approval_action(self, name: str, variant_id: int, action: str, request: Request):
        request_id = _request_id(request)
        if action not in ("approve", "reject"):
            return _error(404, f"no action {action!r}: approve or reject", request_id)
        body = await self._body(request, request_id)
        if isinstance(body, JSONResponse):
            return body
        return await self._approval_call(name, action, variant_id, body)

    async def _approval_call(self, name: str, action: str, variant_id: int, body: dict):
        from hetforge.serving import approvals
        from hetforge.serving.swap_control import SwapError

        request_id = uuid.uuid4().hex
        bad = self._check_name(name, request_id)
        if bad is not None:
            return bad
        try:
            if action == "show":
                return await asyncio.to_thread(approvals.show, self.registry_path, self.pipeline, self.base_dir, variant_id)
            fn = approvals.approve if action == "approve" else approvals.reject
            return await asyncio.to_thread(fn, self.registry_path, self.pipeline, variant_id, str(body.get("approver") or "api"),
                                           str(body.get("hint") or ""), str(body.get("note") or ""))
        except SwapError as err:
            return _error(err.status, str(err), request_id)

    @api.post("/v1/pipelines/{name}/stages/{stage}/optimize")
    async def optimize_stage(self, name: str, stage: str, request: Request):
        """Queue an optimization job for a stage with a human's hint (the controller launches it)."""
        from hetforge.serving.controller import queue_hint_job
        from hetforge.serving.swap_control import SwapError

        request_id = _request_id(request)
        bad = self._check_name(name, request_id)
        if bad is not None:
            return bad
        body = await self._body(request, request_id)
        if isinstance(body, JSONResponse):
            return body
        try:
            job = await asyncio.to_thread(queue_hint_job, self.registry_path, self.pipeline, stage, str(body.get("hint") or ""),
                                          str(body.get("actor") or "api"))
        except SwapError as err:
            return _error(err.status, str(err), request_id, stage)
        return JSONResponse({"queued": job.to_json()}, status_code=202)

    async def _dashboard_data(self) -> dict:
        from hetforge.serving import approvals
        from hetforge.serving.dashboard_page import page_data
        from hetforge.serving.rollout import RolloutBoard
        from hetforge.serving.swap_control import SwapBoard

        def read() -> tuple:
            return (SwapBoard(self.registry_path).recent(self.pipeline.name, 10), RolloutBoard(self.registry_path).events(self.pipeline.name, limit=50),
                    approvals.pending(self.registry_path, self.pipeline))

        swaps, events, pending = await asyncio.to_thread(read)
        reoptimize = None
        if self.controller is not None:
            try:
                reoptimize = await asyncio.wait_for(self.controller.status.remote(), timeout=5)
            except Exception as err:  # noqa: BLE001 - the page still shows the rest
                reoptimize = {"error": f"{type(err).__name__}: {err}"[:300]}
        return page_data(self.pipeline, self.sampler, self.placement, swaps, events, pending, reoptimize)

    @api.get("/dashboard")
    async def dashboard(self):
        """The built-in dashboard page (plots and tables, refreshed every few seconds)."""
        from fastapi.responses import HTMLResponse

        from hetforge.serving.dashboard_page import render

        return HTMLResponse(render(await self._dashboard_data()))

    @api.get("/v1/pipelines/{name}/dashboard")
    async def dashboard_json(self, name: str):
        bad = self._check_name(name, uuid.uuid4().hex)
        if bad is not None:
            return bad
        return await self._dashboard_data()

    @api.get("/v1/pipelines/{name}/rollouts")
    async def rollouts(self, name: str):
        from hetforge.serving.rollout import RolloutBoard

        bad = self._check_name(name, uuid.uuid4().hex)
        if bad is not None:
            return bad
        board = RolloutBoard(self.registry_path)
        return {"rollouts": [vars(r) for r in await asyncio.to_thread(board.recent, self.pipeline.name, 50)],
                "events": await asyncio.to_thread(board.events, self.pipeline.name)}


def _deployment_name(stage: str) -> str:
    return f"stage-{stage}"


def build_app(pipeline: Pipeline, base_dir: Path, placement: dict[str, dict], registry_path: str, metrics_dir: str):
    """The bound application: `placement[stage]` = {"device": "cpu"|"cuda", "ray_actor_options": {...}}."""
    doc = pipeline.model_dump(mode="json", by_alias=True)
    handles = {}
    for stage in pipeline.stages:
        where = placement[stage.name]
        options: dict[str, Any] = {"name": _deployment_name(stage.name), "ray_actor_options": where["ray_actor_options"]}
        if isinstance(stage.replicas, int):
            options["num_replicas"] = stage.replicas
        else:
            options["autoscaling_config"] = {"min_replicas": stage.replicas.min_replicas, "max_replicas": stage.replicas.max_replicas,
                                             "target_ongoing_requests": stage.replicas.target_ongoing_requests}
        if isinstance(stage, ModelStage):
            batch = stage.batching.max_batch_size if stage.batching else 1
            options["max_ongoing_requests"] = max(16, 2 * batch)
            handles[stage.name] = ModelStageDeployment.options(**options).bind(doc, str(base_dir), stage.name, where["device"], registry_path,
                                                                               where.get("device_class"))
        elif isinstance(stage, ToolStage):
            options["max_ongoing_requests"] = max(16, stage.concurrency)
            handles[stage.name] = ToolStageDeployment.options(**options).bind(doc, str(base_dir), stage.name)
        else:
            options["max_ongoing_requests"] = 64
            options["health_check_timeout_s"] = 120
            handles[stage.name] = LlmStageDeployment.options(**options).bind(doc, str(base_dir), stage.name, where["device"])
    controller = None
    if pipeline.reoptimize is not None:
        controller = ReoptimizeController.options(name="reoptimize-controller").bind(doc, str(base_dir), placement, registry_path, metrics_dir)
    return PipelineIngress.options(ray_actor_options={"num_cpus": 0.1}).bind(doc, handles, registry_path, metrics_dir, controller, str(base_dir),
                                                                          placement)
