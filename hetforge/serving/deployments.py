"""The Ray Serve application of one pipeline: a deployment per stage, the controller, and the ingress.

    PipelineIngress (FastAPI: `ingress.create_app`)  --handles-->  one deployment per stage
                                                      --handle-->   ReoptimizeController (with a `reoptimize:` block)

Each stage deployment gets its `ray_actor_options` (CPUs, GPUs, accelerator type) from the plan,
its replicas or autoscaling from the spec, `max_ongoing_requests` from its `limits.max_concurrency`
(else its batching or tool concurrency) and `max_queued_requests` from `limits.max_queued`, so that
an overloaded stage refuses calls (503 with Retry-After at the ingress) instead of queueing them
without bound. A model replica refuses an input over `limits.max_tensor_elements` and a vLLM
replica a prompt over its context (422) before any compute. Tool and LLM replicas report their
outside dependencies (`dependency_checks`) for /healthz. Model stages batch with `serve.batch`; swaps and rollout
steps reach their replicas as the deployment's `user_config` (`reconfigure`, `replica_control`), so no replica
restarts, and a replica started later comes up with the stage's current config (`stage_configs` of `build_app`).

Metrics: replicas write prometheus_client's multiprocess files into one folder per deployment
(`PROMETHEUS_MULTIPROC_DIR`, set through the runtime environment), and the ingress's /metrics
aggregates them: the names stay exactly those of `metrics.SPEC` (Ray's own metric export would
prefix them with `ray_`). This covers the replicas of one node; see the README for clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from hetforge.kernels.registry import Registry
from hetforge.serving import llm_settings
from hetforge.serving.controller import build_controller
from hetforge.serving.dashboard_page import DashboardSampler
from hetforge.serving.dataflow import NoLoopHere, PipelineRunner, StageError
from hetforge.serving.ingress import create_app
from hetforge.serving.ingress.auth import Tokens, resolve_tokens
from hetforge.serving.ingress.state import HandleCaller, IngressState
from hetforge.serving.llm import LlmRuntime, loop_tools
from hetforge.serving.metrics import default_metrics
from hetforge.serving.model_io import ModelIO
from hetforge.serving.replica_control import ReplicaControl
from hetforge.serving.stage_runtime import ModelStageRuntime
from hetforge.serving.swap_control import deployment_name
from hetforge.serving.tools import InlineCaller, InlineTool, ToolRuntime, replica_loops
from hetforge.spec.models import LlmStage, ModelStage, Pipeline, ToolStage
from hetforge.spec.stages import stage_code_error, stage_problem

# Ray Serve's consistent hashing over the handle's session_id: the same session, the same replica; when
# that replica is at max_ongoing_requests, the next ones on the ring (a request without a session: any).
SESSION_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


def _pipeline(doc: dict, stage_lines: dict | None = None) -> Pipeline:
    """The pipeline in a replica; `stage_lines` (`Pipeline.where` of each stage, from the file the driver loaded)
    lets errors raised here name the YAML line, as `hetforge.spec.load` sets them."""
    return Pipeline.model_validate(doc).set_stage_lines(stage_lines or {})


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica (tests calling the class directly)
        return f"{socket.gethostname()}-{os.getpid()}"


def _node_id() -> str:
    """The Ray node this replica runs on ("" outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _inline_tools(pipeline: Pipeline, names, base_dir: Path, metrics) -> dict[str, InlineTool]:
    """Tool stages run in this process (`tools.InlineTool`): no deployment, no hop."""
    return {
        name: InlineTool(pipeline.name, pipeline.stage(name), base_dir, metrics, dependency_checks) for name in names
    }


def _failure_counter(metrics, pipeline: str):
    """A runner's `on_failure`: each failed stage call counted once, by kind, in this process's metrics."""

    def failed(stage: str, kind: str) -> None:
        metrics.stage_errors.labels(pipeline, stage, kind).inc()

    return failed


@contextlib.contextmanager
def _observed(metrics, pipeline: str, stage: str, device: str):
    """A tool or LLM stage call's latency when it answers (the ingress counts the calls that fail, by kind)."""
    start = time.perf_counter()
    yield
    metrics.stage_latency.labels(pipeline, stage, "reference", device).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- input limits
def check_tensor_elements(stage: ModelStage, tensors: list, limit: int) -> None:
    """422 naming the input whose element count exceeds `limit` (limits.max_tensor_elements), before any compute."""
    for i, tensor in enumerate(tensors):
        count = tensor.numel() if hasattr(tensor, "numel") else 0
        if count > limit:
            name = stage.inputs[i].name if i < len(stage.inputs) else f"#{i}"
            raise StageError(
                f"stage {stage.name}: input {name} has {count} elements; limits.max_tensor_elements is {limit}", 422
            )


def prompt_token_limit(stage: LlmStage, context_tokens: int | None) -> int | None:
    """Most prompt tokens the stage takes: limits.max_prompt_tokens, else the model's context less
    sampling.max_tokens (the answer must fit too); None when neither is known (an endpoint checks its own)."""
    room = None if context_tokens is None else max(1, context_tokens - stage.sampling.max_tokens)
    cap = stage.limits.max_prompt_tokens
    if cap is None:
        return room
    return cap if room is None else min(cap, room)


def check_prompt_tokens(stage: LlmStage, count: int, limit: int | None, context_tokens: int | None) -> None:
    """422 when the prompt has more than `limit` tokens (`prompt_token_limit`), before the engine does any work."""
    if limit is None or count <= limit:
        return
    context = f"the model's context is {context_tokens} tokens, " if context_tokens else ""
    raise StageError(
        f"stage {stage.name}: the prompt is {count} tokens; {context}sampling.max_tokens reserves "
        f"{stage.sampling.max_tokens}, so at most {limit} prompt tokens fit",
        422,
    )


# ---------------------------------------------------------------------------------------------- dependencies
async def _connects(url: str, timeout_s: float = 2.0) -> str | None:
    """None when a TCP connection to the URL's host and port opens within `timeout_s`, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), timeout_s)
    except (OSError, TimeoutError) as err:
        return f"{type(err).__name__}: {err}"[:300] if str(err) else f"{type(err).__name__} after {timeout_s:g} s"
    writer.close()
    return None


async def dependency_checks(stage: LlmStage | ToolStage) -> list[dict]:
    """What a stage needs from outside hetforge: its endpoint's host reachable, its API-key variables set (in the
    replica's environment, where the calls are made)."""
    url, variables = None, []
    if isinstance(stage, LlmStage) and stage.endpoint is not None:
        url, variables = stage.endpoint.base_url, [stage.endpoint.api_key_env] if stage.endpoint.api_key_env else []
    elif isinstance(stage, ToolStage) and stage.http is not None:
        url, variables = stage.http.url, sorted(set(stage.http.headers_env.values()))
    checks = [
        {
            "stage": stage.name,
            "dependency": f"${name}",
            "ok": bool(os.environ.get(name)),
            "detail": "set" if os.environ.get(name) else "not set in the replica's environment",
        }
        for name in variables
    ]
    if url is not None:
        why = await _connects(url)
        checks.append({"stage": stage.name, "dependency": url, "ok": why is None, "detail": why or "reachable"})
    return checks


# ---------------------------------------------------------------------------------------------- stages
@serve.deployment
class ModelStageDeployment:
    """A model stage replica: batched calls on the active variant; swaps and rollouts from its user_config."""

    def __init__(
        self,
        pipeline_doc: dict,
        base_dir: str,
        stage_name: str,
        device: str,
        registry_path: str,
        device_class: str | None = None,
        stage_lines: dict | None = None,
    ):
        pipeline = _pipeline(pipeline_doc, stage_lines)
        stage: ModelStage = pipeline.stage(stage_name)
        base = Path(base_dir)
        self.stage, self.device = stage, device
        self.max_elements = stage.limits.max_tensor_elements or pipeline.limits.max_tensor_elements
        try:  # the stage's own code (import, constructor, checkpoint, processor): one located line, never a traceback
            problem = stage_problem(stage, base)
            self.runtime = ModelStageRuntime(
                pipeline.name,
                stage.name,
                problem,
                device=device,
                precision=stage.precision,
                seed=stage.seed,
                registry=Registry(registry_path),
                max_batch_rows=stage.batching.max_batch_size if stage.batching else 1,
                device_class=device_class,
            )
            self.io = ModelIO(stage, problem, base, len(self.runtime.example_inputs()))
        except Exception as err:  # noqa: BLE001 - whatever the user's code raised; `deploy.startup_failure` reads it back
            raise stage_code_error(pipeline, stage.name, err) from None
        batching = stage.batching
        self.run_batch.set_max_batch_size(batching.max_batch_size if batching else 1)
        self.run_batch.set_batch_wait_timeout_s((batching.wait_ms if batching else 0.0) / 1e3)
        self.control = ReplicaControl(self.runtime, registry_path, _replica_name()).start()

    async def reconfigure(self, config: dict) -> None:
        """Serve's call with the stage config (`swap_control`), on every replica, and before a new one takes traffic:
        the swap check and a canary's build run on a thread, requests keep being served meanwhile."""
        await asyncio.to_thread(self.control.apply, config)

    def __del__(self):
        control = getattr(self, "control", None)
        if control is not None:
            control.stop()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def run_batch(self, items: list[list]) -> list[Any]:
        try:
            return await asyncio.to_thread(self.io.run, self.runtime, items)
        except Exception as err:  # noqa: BLE001 - one failure answers every request of the batch, as an error value
            return [StageError(f"stage {self.stage.name}: {type(err).__name__}: {err}"[:2000], 500)] * len(items)

    async def __call__(self, payload: Any, request_id: str = "") -> Any:
        decoded = self.io.decode(payload)
        check_tensor_elements(self.stage, decoded, self.max_elements)
        tensors = [t.to(self.device) for t in decoded]
        out = await self.run_batch(tensors)
        if isinstance(out, Exception):
            raise out
        return self.io.encode(out, payload)

    def status(self) -> dict:
        r = self.runtime
        return {
            "replica": _replica_name(),
            "node_id": _node_id(),
            "stage": self.stage.name,
            "device": self.device,
            "device_class": r.device_class,
            "active_variant": r.active_variant,
            "swaps": [vars(h) for h in r.history[-10:]],
            "control": self.control.status(),
        }


@serve.deployment
class ToolStageDeployment:
    """A tool stage replica: a callable or an HTTP endpoint, with its timeout, retries and concurrency."""

    def __init__(self, pipeline_doc: dict, base_dir: str, stage_name: str):
        pipeline = _pipeline(pipeline_doc)
        self.pipeline, self.stage = pipeline.name, pipeline.stage(stage_name)
        self.runtime = ToolRuntime(self.stage, Path(base_dir))
        self.metrics = default_metrics()

    async def __call__(self, payload: Any, request_id: str = "") -> Any:
        with _observed(self.metrics, self.pipeline, self.stage.name, "cpu"):
            return await self.runtime(payload)

    async def dependencies(self) -> list[dict]:
        return await dependency_checks(self.stage)

    def status(self) -> dict:
        return {
            "replica": _replica_name(),
            "node_id": _node_id(),
            "stage": self.stage.name,
            "device": "cpu",
            "active_variant": "reference",
            "attempts": self.runtime.attempts,
        }


@serve.deployment
class LlmStageDeployment:
    """An LLM stage replica: vLLM's engine in the replica, or a client of an OpenAI-compatible endpoint."""

    def __init__(
        self,
        pipeline_doc: dict,
        base_dir: str,
        stage_name: str,
        device: str,
        registry_path: str | None = None,
        device_class: str | None = None,
        runs_loop: bool = False,
    ):
        pipeline = _pipeline(pipeline_doc)
        stage: LlmStage = pipeline.stage(stage_name)
        self.pipeline, self.stage, self.device = pipeline.name, stage, device
        labels = (pipeline.name, stage.name, _replica_name())
        tools = loop_tools(pipeline, stage, Path(base_dir))
        self.target = self.control = None
        if stage.vllm is not None and registry_path:  # engine settings are variants: recorded, rolled out, swapped
            self.target = llm_settings.serve_target(
                pipeline.name, stage, Path(base_dir), tools, labels, registry_path, device_class or device
            )
            self.runtime = self.target.runtime
            self.control = ReplicaControl(self.target, registry_path, _replica_name()).start()
        else:
            self.runtime = LlmRuntime(stage, Path(base_dir), tools, labels)
        self.metrics = default_metrics()
        engine_config = getattr(self.runtime.engine, "model_config", None)  # vLLM's; an endpoint has none here
        self.context_tokens = getattr(engine_config, "max_model_len", None)
        self.prompt_limit = prompt_token_limit(stage, self.context_tokens)
        self.runtime.check_prompt = self._check_prompt  # on the ids the runtime renders for the engine, before it runs
        self.loop_runner = self._loop_runner(pipeline, Path(base_dir)) if runs_loop else None

    def _loop_runner(self, pipeline: Pipeline, base_dir: Path) -> PipelineRunner:
        """The stage's agent loop in this replica (`tools.replica_loops`): its turns are this replica's calls, its
        tools `InlineTool`s here, with their latency and errors in this replica's metrics."""
        tools = _inline_tools(pipeline, self.stage.agent_loop.tools, base_dir, self.metrics)

        async def turn(stage: str, payload: dict, request_id: str) -> dict:
            return await self._turn(payload, request_id)

        failed = _failure_counter(self.metrics, pipeline.name)
        return PipelineRunner(pipeline, InlineCaller(turn, tools), on_failure=failed)

    async def reconfigure(self, config: dict) -> None:
        """Serve's call with the stage config (`swap_control`): engine-settings swaps and rollouts, on a thread (an
        engine build takes seconds); requests keep being served by the running engine meanwhile."""
        if self.control is None:  # an endpoint-backed stage, or no registry: nothing to swap
            return
        # the engine's calls run on this event loop: a replica that has served no call yet learns it here
        self.runtime.loop = self.runtime.loop or asyncio.get_running_loop()
        await asyncio.to_thread(self.control.apply, config)

    def _check_prompt(self, count: int) -> None:
        """422 for a prompt the model cannot take: `count` tokens, as the engine's tokenizer rendered it."""
        check_prompt_tokens(self.stage, count, self.prompt_limit, self.context_tokens)

    async def __call__(self, payload: dict, request_id: str = "") -> dict:
        """One LLM call."""
        return await self._turn(payload, request_id)

    async def loop(self, payload: dict, request_id: str = "") -> dict:
        """The stage's whole agent loop (`PipelineRunner._delegate`). It holds one of the replica's request slots
        (`max_ongoing_requests`) for the whole task, tool calls included."""
        if self.loop_runner is None:
            raise NoLoopHere(f"stage {self.stage.name}: this replica runs no agent loop (its tools are not all inline)")
        return await self.loop_runner.answer_loop(self.stage.name, payload, request_id)

    async def _turn(self, payload: dict, request_id: str) -> dict:
        with _observed(self.metrics, self.pipeline, self.stage.name, self.device):
            return await self.runtime(payload, request_id)

    async def stream(self, payload: dict, request_id: str = ""):
        with _observed(self.metrics, self.pipeline, self.stage.name, self.device):
            async for delta in self.runtime.stream(payload, request_id):
                yield delta

    async def dependencies(self) -> list[dict]:
        return await dependency_checks(self.stage)

    def status(self) -> dict:
        backend = "vllm" if self.stage.vllm else f"endpoint {self.stage.endpoint.base_url}"
        return {
            "replica": _replica_name(),
            "node_id": _node_id(),
            "stage": self.stage.name,
            "device": self.device,
            "active_variant": self.target.active_variant if self.target is not None else backend,
            "engine_settings": self.runtime.settings,
        }

    def __del__(self):
        control = getattr(self, "control", None)
        if control is not None:
            control.stop()
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.shutdown()


# ---------------------------------------------------------------------------------------------- re-optimization
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class ReoptimizeController:
    """The pipeline's re-optimization loop (`controller.Controller`) on a thread of one replica.

    Serve restarts the replica if it dies; the new one resumes from the registry file.
    """

    def __init__(self, pipeline_doc: dict, base_dir: str, placement: dict, registry_path: str, metrics_dir: str):
        self.pipeline = _pipeline(pipeline_doc)
        self.controller = build_controller(
            self.pipeline, Path(base_dir), placement, registry_path, metrics_dir, default_metrics()
        )
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
@serve.deployment(max_ongoing_requests=256)
@serve.ingress()
class PipelineIngress:
    """The pipeline's HTTP entry: sets its metrics' fixed series, then serves `ingress.create_app` on its state."""

    def __init__(
        self,
        pipeline_doc: dict,
        handles: dict,
        registry_path: str,
        metrics_dir: str,
        controller=None,
        base_dir: str = ".",
        placement: dict | None = None,
        token_digests: dict[str, str] | None = None,
    ):
        pipeline = _pipeline(pipeline_doc)
        placement = placement or {}
        metrics = default_metrics()
        for stage in pipeline.stages:  # for the dashboards' placement table and SLO line
            where = placement.get(stage.name, {})
            metrics.stage_placement.labels(
                pipeline.name, stage.name, stage.kind, where.get("device_class", "?"), where.get("device", "?")
            ).set(1)
        metrics.zero_serving_series(
            pipeline.name,
            [s.name for s in pipeline.stages],
            [s.name for s in pipeline.stages if isinstance(s, ModelStage)],
        )
        if pipeline.slo is not None:
            metrics.pipeline_slo.labels(pipeline.name, "0.99").set(pipeline.slo.p99_ms / 1e3)

        failed = _failure_counter(metrics, pipeline.name)
        placed_here = [name for name, where in placement.items() if where.get("hop") == "inline"]
        inline = _inline_tools(pipeline, placed_here, Path(base_dir), metrics)
        loops = replica_loops(pipeline, placement)
        for name in sorted(loops):
            for tool in pipeline.stage(name).agent_loop.tools:
                inline[tool].loop_stages.append(name)
        handles = {**handles, **inline}  # status and /healthz ask them as they ask replicas
        self.state = IngressState(
            pipeline=pipeline,
            runner=PipelineRunner(
                pipeline,
                InlineCaller(HandleCaller(handles), inline),
                on_failure=failed,
                delegated=loops,
            ),
            handles=handles,
            registry_path=registry_path,
            metrics_dir=metrics_dir,
            metrics=metrics,
            sampler=DashboardSampler(pipeline.name, metrics_dir).start(),  # the built-in page's time series
            base_dir=Path(base_dir),
            controller=controller,
            placement=placement,
            tokens=Tokens(dict(token_digests or {})),
        )

    def __serve_build_asgi_app__(self):
        """Serve calls this after `__init__`: the app of this replica's state."""
        return create_app(self.state)


def build_app(
    pipeline: Pipeline,
    base_dir: Path,
    placement: dict[str, dict],
    registry_path: str,
    metrics_dir: str,
    stage_configs: dict[str, dict] | None = None,
):
    """The bound application: `placement[stage]` = {"device": "cpu"|"cuda", "ray_actor_options": {...}}.

    `stage_configs[stage]`: the stage config its replicas start with (`hetforge reload` carries the running one
    over); every stage deployment class with a `reconfigure` gets one (empty: no swap, no rollout)."""
    stage_configs = stage_configs or {}
    doc = pipeline.model_dump(mode="json", by_alias=True)
    lines = {stage.name: pipeline.where(stage.name) for stage in pipeline.stages if pipeline.where(stage.name)}
    handles = {}
    loops = replica_loops(pipeline, placement)  # LLM stages whose replicas run their agent loop whole
    for stage in pipeline.stages:
        where = placement[stage.name]
        options: dict[str, Any] = {
            "name": deployment_name(stage.name),
            "ray_actor_options": where["ray_actor_options"],
        }
        if isinstance(stage.replicas, int):
            options["num_replicas"] = stage.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": stage.replicas.min_replicas,
                "max_replicas": stage.replicas.max_replicas,
                "target_ongoing_requests": stage.replicas.target_ongoing_requests,
            }
        # back-pressure: a caller holds at most limits.max_queued calls waiting; Serve refuses more (BackPressureError)
        options["max_queued_requests"] = stage.limits.max_queued
        kind = {ModelStage: ModelStageDeployment, ToolStage: ToolStageDeployment}.get(type(stage), LlmStageDeployment)
        if hasattr(kind.func_or_class, "reconfigure"):  # Serve refuses a user_config for a class without one
            options["user_config"] = dict(stage_configs.get(stage.name) or {})
        most = stage.limits.max_concurrency
        if isinstance(stage, ModelStage):
            batch = stage.batching.max_batch_size if stage.batching else 1
            options["max_ongoing_requests"] = most or max(16, 2 * batch)
            handles[stage.name] = ModelStageDeployment.options(**options).bind(
                doc, str(base_dir), stage.name, where["device"], registry_path, where.get("device_class"), lines
            )
        elif isinstance(stage, ToolStage):
            if where.get("hop") == "inline":  # runs in the ingress (`PipelineIngress`)
                continue
            options["max_ongoing_requests"] = most or max(16, stage.concurrency)
            handles[stage.name] = ToolStageDeployment.options(**options).bind(doc, str(base_dir), stage.name)
        else:
            options["max_ongoing_requests"] = most or 64
            options["health_check_timeout_s"] = 120
            if stage.session_routing:  # a conversation's turns to the replica holding its prefix (SESSION)
                options["request_router_config"] = RequestRouterConfig(
                    request_router_class=SESSION_ROUTER, request_router_kwargs={"num_fallback_replicas": 2}
                )
            handles[stage.name] = LlmStageDeployment.options(**options).bind(
                doc,
                str(base_dir),
                stage.name,
                where["device"],
                registry_path,
                where.get("device_class"),
                stage.name in loops,
            )
    controller = None
    if pipeline.reoptimize is not None:
        controller = ReoptimizeController.options(name="reoptimize-controller").bind(
            doc, str(base_dir), placement, registry_path, metrics_dir
        )
    tokens = resolve_tokens()  # here, in the process that deploys: a token generated now is printed to its user
    # The ingress admits limits.max_concurrent_requests pipeline requests itself (503 beyond); the headroom keeps
    # /healthz, /metrics and the admin routes answering while it is full.
    ingress_options = {
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": pipeline.limits.max_concurrent_requests + 32,
    }
    return PipelineIngress.options(**ingress_options).bind(
        doc, handles, registry_path, metrics_dir, controller, str(base_dir), placement, tokens.digests
    )
