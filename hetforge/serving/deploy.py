"""`hetforge serve | status | down`: deploy a pipeline on Ray Serve where the planner put its stages.

With no address, Ray starts locally in this process (the embedded default) and the deployment
lives as long as `hetforge serve` runs; `--address` deploys on a running cluster and returns.
Either way a state file, `$HETFORGE_HOME/serve/<pipeline>.json`, records where it runs (Ray's GCS
address, the HTTP address, the metrics folder, the serving process) for `status` and `down`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import ray
from ray import serve

from hetforge.config import home_dir
from hetforge.kernels.registry import Registry, default_path
from hetforge.planners import devices
from hetforge.planners.plan import build_plan
from hetforge.planners.profiles import ProfileCache
from hetforge.serving.dataflow import PipelineRunner
from hetforge.serving.deployments import build_app
from hetforge.serving.job_runner import JobLauncher
from hetforge.spec import load_pipeline
from hetforge.spec.models import LlmStage, Pipeline

# Logical CPU requests of a replica on the embedded default; Ray counts them, the OS shares the cores.
CPU_REQUEST = {"model": 1.0, "llm": 1.0, "tool": 0.1}


@dataclass
class Deployment:
    pipeline: str
    pipeline_file: str
    url: str
    gcs_address: str
    metrics_dir: str
    registry_path: str
    pid: int
    embedded: bool
    placement: dict

    def save(self) -> Path:
        path = state_path(self.pipeline)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


def state_path(pipeline: str) -> Path:
    return home_dir() / "serve" / f"{pipeline}.json"


def load_state(pipeline: str | None = None) -> list[Deployment]:
    folder = home_dir() / "serve"
    files = [state_path(pipeline)] if pipeline else sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [Deployment(**json.loads(f.read_text())) for f in files if f.is_file()]


def placement_for(
    pipeline: Pipeline, base_dir: Path, inventory=None, address: str | None = None
) -> tuple[dict[str, dict], list[str]]:
    """Per stage: device ("cpu" or "cuda"), device class and ray_actor_options, from the planner's plan.

    Planned on `inventory`, else on the devices of the Ray cluster at `address`, else on this
    machine's. LLM and tool stages keep the device the plan gives them; a stage with no profile is
    planned on its declared or estimated costs. Returns the placement and the plan's notes.
    """
    inventory = inventory or (devices.ray_inventory(address) if address else devices.local_inventory())
    plan = build_plan(pipeline, base_dir, inventory, "latency", ProfileCache())
    placement = {}
    for stage in pipeline.stages:
        planned = plan.stages[stage.name]
        options = dict(planned.ray_actor_options)
        on_gpu = options.get("num_gpus", 0) > 0
        if not on_gpu:
            options["num_cpus"] = CPU_REQUEST[stage.kind]
        elif isinstance(stage, LlmStage) and stage.vllm is None:
            options = {"num_cpus": CPU_REQUEST["tool"]}  # an endpoint client holds no device
            on_gpu = False
        placement[stage.name] = {
            "device": "cuda" if on_gpu else "cpu",
            "device_class": planned.device,
            "ray_actor_options": options,
        }
    return placement, plan.notes


def _cpus_wanted(pipeline: Pipeline, placement: dict) -> float:
    """Logical CPUs every replica at its most, plus the ingress and Serve's own actors."""
    total = 0.5
    for stage in pipeline.stages:
        count = stage.replicas if isinstance(stage.replicas, int) else stage.replicas.max_replicas
        total += count * placement[stage.name]["ray_actor_options"].get("num_cpus", 1)
    if pipeline.reoptimize is not None:  # background optimization jobs, as many as may run at once
        total += pipeline.reoptimize.concurrency * pipeline.reoptimize.job_cpus
    return total


def _ray_init(address: str | None, metrics_dir: Path, cpus_wanted: float) -> None:
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "HETFORGE_HOME": str(home_dir()),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if os.environ.get("HETFORGE_PROMETHEUS_URL"):  # the controller reads every node's metrics there
        env["HETFORGE_PROMETHEUS_URL"] = os.environ["HETFORGE_PROMETHEUS_URL"]
    kwargs: dict = {
        "namespace": "hetforge",
        "runtime_env": {"env_vars": env},
        "log_to_driver": os.environ.get("HETFORGE_RAY_LOGS") == "1",
    }
    if address:
        ray.init(address=address, **kwargs)
        return
    temp = Path(os.environ.get("HETFORGE_RAY_TMP", f"/tmp/hetforge-ray-{os.getuid()}"))
    if len(str(temp)) > 40:  # Ray puts sockets ~70 characters below it; AF_UNIX paths stop at 107 bytes
        temp = Path(f"/tmp/hf-ray-{hashlib.sha256(str(temp).encode()).hexdigest()[:10]}")
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_wanted)),
        include_dashboard=False,
        _temp_dir=str(temp),
        **kwargs,
    )


def deploy(
    pipeline_file: Path,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    registry_path: str | None = None,
    placement: dict | None = None,
) -> Deployment:
    """Deploy the pipeline and return while its replicas start (`wait_until_running` waits, and reports a replica
    that cannot start); the returned record is saved for status/down."""
    pipeline = load_pipeline(pipeline_file)
    base_dir = pipeline_file.resolve().parent
    check_servable(pipeline, base_dir)
    if placement is None:
        placement, _ = placement_for(pipeline, base_dir, address=address)
    metrics_dir = home_dir() / "serve" / f"{pipeline.name}.metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters of an earlier deployment must not add up with these
    metrics_dir.mkdir(parents=True)
    registry_path = registry_path or str(default_path())
    Registry(registry_path)  # a missing, damaged or unreachable registry fails here, in one line, before Ray starts
    _ray_init(address, metrics_dir, _cpus_wanted(pipeline, placement))
    record = Deployment(
        pipeline.name,
        str(pipeline_file.resolve()),
        f"http://{host}:{port}",
        ray.get_runtime_context().gcs_address,
        str(metrics_dir),
        registry_path,
        os.getpid(),
        address is None,
        placement,
    )
    record.save()  # before the replicas start: `status` and `down` reach a deployment that is still coming up
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(pipeline, base_dir, placement, registry_path, str(metrics_dir))
        # `_run(_blocking=False)` (stable in Serve's API) returns once the application is submitted; `serve.run` would
        # wait here and raise only "Failed to update the deployments" when a replica cannot start
        serve._run(app, name=pipeline.name, route_prefix="/", _blocking=False)
    except BaseException:
        state_path(pipeline.name).unlink(missing_ok=True)
        raise
    return record


def check_servable(pipeline: Pipeline, base_dir: Path) -> None:
    """ValueError listing what keeps the pipeline from being served (bad bindings, missing files)."""
    problems = []
    try:
        PipelineRunner(pipeline, caller=None)
    except ValueError as err:
        problems.append(str(err))
    for stage in pipeline.stages:
        if isinstance(stage, LlmStage) and stage.vllm is not None:
            folder = base_dir / stage.vllm.model
            if stage.vllm.model.startswith(("models/", "./", "../")) and not folder.is_dir():
                problems.append(
                    f"stage {stage.name}: model folder {folder} does not exist "
                    "(the examples' tiny model: `python scripts/build_tiny_llm.py`)"
                )
    if problems:
        raise ValueError("\n".join(problems))


def wait_until_running(record: Deployment, timeout_s: float = 600, poll_s: float = 1.0) -> None:
    """Block until the application is RUNNING; RuntimeError when it fails, naming the stage whose replicas could
    not start and the cause (`startup_failure`), else Serve's own message."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(record.pipeline)
        state = str(status.status) if status else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
            messages = {name: d.message for name, d in status.deployments.items() if d.message}
            causes = startup_failures(messages, _stage_lines(record))
            if causes:
                raise RuntimeError("\n".join(causes)[:4000])
            details = "; ".join(f"{n}: {m}" for n, m in messages.items())
            raise RuntimeError(f"deployment of {record.pipeline} failed: {status.message or details}"[:4000])
        if time.monotonic() > deadline:
            raise RuntimeError(f"deployment of {record.pipeline} not running after {timeout_s:g} s (state {state})")
        time.sleep(poll_s)


# Serve keeps a replica's start-up failure as text only: its deployment status message ends with the replica's
# traceback (`str()` of the RayTaskError of the replica's constructor), whose last line is the exception. A model
# stage's replica raises `StageCodeError` with the located line (`deployments.ModelStageDeployment`).
_STAGE_CODE_ERROR = "StageCodeError: "


def startup_failures(messages: dict[str, str], stage_lines: dict[str, str] | None = None) -> list[str]:
    """One line per deployment whose replicas failed to start: `FILE:LINE: stage "NAME": Error: cause`.

    `messages`: Serve's deployment status messages by deployment name (`stage-<name>` for stages);
    `stage_lines`: `Pipeline.where` by stage, for causes that do not carry their location.
    """
    out = []
    for deployment, message in messages.items():
        if "failed to start" not in message:  # Serve's words for a replica whose constructor raised
            continue
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        located = [line.split(_STAGE_CODE_ERROR, 1)[1] for line in lines if _STAGE_CODE_ERROR in line]
        if located:
            out.append(located[-1])
            continue
        stage = deployment.removeprefix("stage-")
        where = (stage_lines or {}).get(stage, "")
        what = f'stage "{stage}"' if deployment.startswith("stage-") else f"deployment {deployment}"
        out.append(f"{where + ': ' if where else ''}{what}: {_last_exception(lines)}")
    return out


def _last_exception(lines: list[str]) -> str:
    """The exception line of a traceback text (its last `module.Name: message` line, module dropped), else its
    last line."""
    for line in reversed(lines):
        match = re.match(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*): (.*)$", line)
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return lines[-1] if lines else "no message"


def _stage_lines(record: Deployment) -> dict[str, str]:
    try:
        pipeline = load_pipeline(Path(record.pipeline_file))
    except Exception:  # noqa: BLE001 - the file changed since it was deployed: report without lines
        return {}
    return {stage.name: pipeline.where(stage.name) for stage in pipeline.stages}


def status(pipeline: str | None = None) -> list[dict]:
    """Deployments, their replicas' devices and active variants, from Serve and the replicas themselves."""
    out = []
    for record in load_state(pipeline):
        doc = {"pipeline": record.pipeline, "url": record.url, "embedded": record.embedded, "pid": record.pid}
        try:
            reply = httpx.get(f"{record.url}/v1/pipelines/{record.pipeline}/status", timeout=10)
            doc["stages"] = reply.json().get("stages", {})
            doc["state"] = "RUNNING" if reply.status_code == 200 else f"HTTP {reply.status_code}"
        except httpx.HTTPError as err:
            doc["state"], doc["stages"] = f"unreachable ({type(err).__name__})", {}
        for name, where in record.placement.items():
            doc["stages"].setdefault(name, {})
            doc["stages"][name]["planned"] = where["device_class"]
        out.append(doc)
    return out


def down(pipeline: str | None = None) -> list[str]:
    """Delete the deployments (and stop the embedded serving process); the state files go."""
    stopped = []
    for record in load_state(pipeline):
        if record.embedded:
            try:
                os.kill(record.pid, signal.SIGTERM)  # `hetforge serve` shuts Serve and Ray down on SIGTERM
            except ProcessLookupError:
                pass
        else:
            ray.init(address=record.gcs_address, namespace="hetforge", log_to_driver=False, ignore_reinit_error=True)
            serve.delete(record.pipeline)
            JobLauncher(record.pipeline).stop()  # the detached actor owning its optimization jobs
        state_path(record.pipeline).unlink(missing_ok=True)
        stopped.append(record.pipeline)
    return stopped
