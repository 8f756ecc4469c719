"""`hetforge serve | status | down`: deploy a pipeline on Ray Serve where the planner put its stages.

With no address, Ray starts locally in this process (the embedded default) and the deployment
lives as long as `hetforge serve` runs; `--address` deploys on a running cluster and returns.
Either way a state file, `$HETFORGE_HOME/serve/<pipeline>.json`, records where it runs (Ray's GCS
address, the HTTP address, the metrics folder, the serving process) for `status` and `down`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import ray
from ray import serve
from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
from ray.serve._private.constants import SERVE_CONTROLLER_NAME

from hetforge.config import home_dir
from hetforge.kernels.registry import Registry, default_path
from hetforge.planners import devices
from hetforge.planners.plan import build_plan
from hetforge.planners.profiles import ProfileCache
from hetforge.serving import cpu_cores, ray_instance, serve_config
from hetforge.serving.dataflow import PipelineRunner
from hetforge.serving.deployments import build_app
from hetforge.serving.ingress.auth import client_headers
from hetforge.serving.job_runner import JobLauncher
from hetforge.serving.swap_control import CONFIG_LOCK, SwapBoard, deployment_name
from hetforge.serving.tools import replica_loops
from hetforge.spec import load_pipeline
from hetforge.spec.models import LlmStage, Pipeline
from hetforge.spec.stages import import_stage_functions

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
    started: int = 0  # the serve process's start time (`ray_instance.start_ticks`): `down` checks the PID with it
    session_dir: str = ""  # Ray's session folder on this machine: its processes and its logs (`<session>/logs`)
    versions: dict = field(default_factory=dict)  # Serve deployment name -> the version deployed (`versions_of`)
    ray_processes: dict = field(default_factory=dict)  # PID -> start time of the processes of its Ray instance
    cores: dict = field(default_factory=dict)  # {"engines": [[core, ...], ...], "rest": [...]} (`cpu_cores.plan`)

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


class DeployError(RuntimeError):
    """A deployment cannot be made or changed, for a reason the user can act on (one line)."""


def serving_process_alive(record: Deployment) -> bool:
    """Whether the process that made the embedded deployment still runs: the same PID with the same start time
    (`deploy` may be called by a program other than `hetforge serve`, such as `hetforge demo` or a test)."""
    return record.embedded and record.started > 0 and ray_instance.start_ticks(record.pid) == record.started


def is_serve_command(record: Deployment) -> bool:
    """Whether the recorded process is still the `hetforge serve` process that was recorded: the only one `down`
    signals (same PID and start time, and `serve` an argument of a hetforge command line)."""
    args = ray_instance.cmdline(record.pid)
    hetforge = any(a == "hetforge.cli" or Path(a).name == "hetforge" for a in args)
    return serving_process_alive(record) and hetforge and "serve" in args


def live(record: Deployment) -> bool:
    """Whether the recorded deployment still runs: the process that made it (embedded), or its HTTP address
    answers (on a cluster)."""
    if record.embedded:
        return serving_process_alive(record)
    try:
        httpx.get(f"{record.url}/healthz", timeout=5)
    except httpx.HTTPError:
        return False
    return True


def port_in_use(host: str, port: int) -> bool:
    """Whether `host:port` cannot be bound (another process listens there), as the HTTP proxy would bind it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn sets it too: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def busy_port_message(host: str, port: int) -> str:
    """One line: who holds `host:port` when a recorded deployment does, and what to do."""
    holders = [r.pipeline for r in load_state() if r.url.endswith(f":{port}") and live(r)]
    who = f"by the deployment of {', '.join(holders)} (hetforge status)" if holders else "by another process"
    return f"{host}:{port} is already in use {who}; pass --port with a free port"


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
        if planned.hop:  # a tool stage: "inline" runs in the ingress's process (`planners/tool_hops.py`)
            placement[stage.name]["hop"] = planned.hop
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


def _engine_cores(pipeline: Pipeline, placement: dict) -> tuple[list[list[int]], list[int]] | None:
    """The core plan for the pipeline's vLLM CPU engines (`cpu_cores.plan`), or None when it has none to isolate or
    the node's cores do not fit one of their own per engine plus the rest."""
    engines = 0
    for stage in pipeline.stages:
        vllm = getattr(stage, "vllm", None)
        if vllm is None or not vllm.isolate_cores or placement[stage.name]["device"] != "cpu":
            continue
        engines += stage.replicas if isinstance(stage.replicas, int) else stage.replicas.max_replicas
    if not engines or os.environ.get(cpu_cores.OMP_BIND_ENV):  # the user's own binding wins
        return None
    return cpu_cores.plan(sorted(os.sched_getaffinity(0)), engines)


def _ray_init(
    address: str | None,
    metrics_dir: Path,
    cpus_wanted: float,
    cores: tuple[list[list[int]], list[int]] | None = None,
) -> None:
    """Connect to the cluster at `address`, or start Ray here; with `cores` (embedded only), Ray's processes start
    on the plan's other cores and the replicas learn the engine slots."""
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
    where = contextlib.nullcontext()
    if cores is not None:
        slots, rest = cores
        locks = metrics_dir.with_suffix(".cores")
        shutil.rmtree(locks, ignore_errors=True)
        env |= {cpu_cores.SLOTS_ENV: json.dumps(slots), cpu_cores.LOCKS_ENV: str(locks)}
        where = cpu_cores.pinned(rest)  # GCS, raylet and every worker they start inherit these cores
    with where:
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
    that cannot start); the returned record is saved for status/down.

    DeployError when the pipeline is already served (one deployment per pipeline: `reload` changes it) or, on the
    embedded default, when the port is taken."""
    pipeline = load_pipeline(pipeline_file)
    base_dir = pipeline_file.resolve().parent
    check_servable(pipeline, base_dir)
    running = running_deployment(pipeline.name)
    if running is not None:
        raise DeployError(already_served_message(running, pipeline_file))
    if address is None and port_in_use(host, port):
        raise DeployError(busy_port_message(host, port))
    if placement is None:
        placement, _ = placement_for(pipeline, base_dir, address=address)
    metrics_dir = home_dir() / "serve" / f"{pipeline.name}.metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters of an earlier deployment must not add up with these
    metrics_dir.mkdir(parents=True)
    registry_path = registry_path or str(default_path())
    Registry(registry_path)  # a missing, damaged or unreachable registry fails here, in one line, before Ray starts
    cores = _engine_cores(pipeline, placement) if address is None else None
    _ray_init(address, metrics_dir, _cpus_wanted(pipeline, placement), cores)
    versions = versions_of(pipeline, base_dir, placement, registry_path, str(metrics_dir))
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
        started=ray_instance.start_ticks(os.getpid()) or 0,
        session_dir=_session_dir(),
        versions=versions,
        cores={"engines": cores[0], "rest": cores[1]} if cores is not None else {},
    )
    record_processes(record)  # saves it before the replicas start: `status` and `down` reach one still coming up
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
        except ray.exceptions.RayTaskError as err:  # the proxy could not bind: taken between our check and its start
            if "Failed to bind" in str(err):
                raise DeployError(busy_port_message(host, port)) from None
            raise
        app = pin_versions(build_app(pipeline, base_dir, placement, registry_path, str(metrics_dir)), versions)
        # `_run(_blocking=False)` (stable in Serve's API) returns once the application is submitted; `serve.run` would
        # wait here and raise only "Failed to update the deployments" when a replica cannot start
        serve._run(app, name=pipeline.name, route_prefix="/", _blocking=False)
    except BaseException:
        state_path(pipeline.name).unlink(missing_ok=True)
        raise
    return record


def running_deployment(pipeline: str) -> Deployment | None:
    """The live recorded deployment of `pipeline`, or None. A record whose serve process is gone is cleaned up
    here (its leftover Ray processes ended, the record removed), so that serving again starts afresh."""
    for record in load_state(pipeline):
        if live(record):
            return record
        _clean_leftovers(record)
        state_path(record.pipeline).unlink(missing_ok=True)
    return None


def already_served_message(record: Deployment, pipeline_file: Path) -> str:
    """One line naming the running deployment and the two ways on."""
    where = f"by `hetforge serve` (pid {record.pid})" if record.embedded else f"on the Ray cluster {record.gcs_address}"
    return (
        f"{record.pipeline} is already served at {record.url} {where}; `hetforge reload {pipeline_file}` updates "
        f"it in place, `hetforge down {record.pipeline}` stops it"
    )


def reload(pipeline_file: Path, timeout_s: float = 600) -> tuple[Deployment, list[str], list[str]]:
    """Update the running deployment of the pipeline in `pipeline_file` in place: stages whose version changed are
    redeployed (Serve starts their new replicas before it stops the old ones), the others keep their replicas.

    Returns the new record and the Serve deployments (redeployed, kept). DeployError when the pipeline is not served;
    RuntimeError (as from `wait_until_running`) when the new replicas do not start (the old ones keep serving only
    for deployments whose replacements never became ready).
    """
    pipeline = load_pipeline(pipeline_file)
    base_dir = pipeline_file.resolve().parent
    check_servable(pipeline, base_dir)
    record = running_deployment(pipeline.name)
    if record is None:
        raise DeployError(
            f"{pipeline.name} is not served (hetforge status); `hetforge serve {pipeline_file}` starts it"
        )
    placement, _ = placement_for(pipeline, base_dir, address=None if record.embedded else record.gcs_address)
    _token_auth_like_local(record)
    _ray_init(record.gcs_address, Path(record.metrics_dir), 0)
    try:
        changed, kept = redeploy(record, pipeline, base_dir, placement)
        record.pipeline_file = str(pipeline_file.resolve())
        record.save()
        time.sleep(1.0)  # Serve reports the application as updating once its controller has taken the new targets
        wait_until_running(record, timeout_s)
    finally:
        ray.shutdown()  # this process's driver only: the instance belongs to the serve process or the cluster
    return record, changed, kept


def redeploy(record: Deployment, pipeline: Pipeline, base_dir: Path, placement: dict) -> tuple[list[str], list[str]]:
    """Submit the pipeline's application again on the connected Ray cluster: (deployments redeployed, kept).

    Each stage keeps its running stage config (its swap and rollout, `swap_control`): the new target carries the
    user_config Serve holds now, so an update neither reverts a swap nor restarts replicas for it."""
    versions = versions_of(pipeline, base_dir, placement, record.registry_path, record.metrics_dir)

    def submit(_tx) -> None:  # under the lock `swap_control.publish` takes: no swap lands between read and submit
        running = serve_config.user_configs(pipeline.name)
        configs = {s.name: running.get(deployment_name(s.name)) for s in pipeline.stages}
        configs = {name: config for name, config in configs.items() if isinstance(config, dict)}
        app = build_app(pipeline, base_dir, placement, record.registry_path, record.metrics_dir, configs)
        serve._run(pin_versions(app, versions), name=pipeline.name, route_prefix="/", _blocking=False)

    SwapBoard(record.registry_path).store.atomic(submit, lock=CONFIG_LOCK, rerun_safe=True)
    changed = sorted(n for n, v in versions.items() if record.versions.get(n) != v)
    kept = sorted(n for n in versions if n not in changed)
    record.placement, record.versions = placement, versions
    return changed, kept


def _token_auth_like_local(record: Deployment) -> None:
    """Ask for token authentication as the embedded instance uses it: a local `ray.init` turns it on by itself
    (with ~/.ray/auth_token), but a driver given an explicit address does not, and is then refused. Ray's own
    step for a local cluster found with address="auto"; RAY_AUTH_MODE, when set, wins."""
    if record.embedded:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def record_processes(record: Deployment) -> None:
    """Save the record with the processes of its embedded Ray instance (the serve process's descendants, with start
    times), so that `down` ends the ones a SIGKILL of the serve process orphans: Ray's agents name no session
    folder. Called once Ray runs and again once the replicas do."""
    if record.embedded:
        pids = ray_instance.descendants(record.pid)
        record.ray_processes = {str(p): t for p in pids if (t := ray_instance.start_ticks(p)) is not None}
    record.save()


def connect(record: Deployment) -> None:
    """This process as a driver of the deployment's Ray instance (Ray's own log lines below ERROR kept quiet: the
    commands that connect print their own)."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    _token_auth_like_local(record)
    ray.init(
        address=record.gcs_address,
        namespace="hetforge",
        log_to_driver=False,
        ignore_reinit_error=True,
        logging_level=logging.ERROR,
    )


def _session_dir() -> str:
    """Ray's session folder of the instance this process is connected to, on this machine."""
    node = ray._private.worker._global_node  # noqa: SLF001 - Ray exposes the session folder nowhere public
    return node.get_session_dir_path() if node is not None else ""


# ---------------------------------------------------------------------------------------------- versions
_NOT_IN_VERSION = {"replicas"}  # a replica count is Serve's lightweight config: it scales without restarting


def versions_of(
    pipeline: Pipeline, base_dir: Path, placement: dict, registry_path: str, metrics_dir: str
) -> dict[str, str]:
    """Serve deployment name -> version: a digest of what its replicas are built from (the stage's fields, its
    placement, the files it names, by content for Python and by size and time for checkpoints and model folders).

    Serve restarts a deployment's replicas only when its version changes; imperative `serve.run` otherwise
    draws a random one per call and restarts them all. A file a stage's module imports beside it is not followed.
    """
    common = [pipeline.name, str(base_dir), registry_path, metrics_dir]
    out = {}
    for stage in pipeline.stages:
        if placement[stage.name].get("hop") == "inline":  # no deployment of its own: part of the ingress's version
            continue
        fields = {k: v for k, v in stage.model_dump(mode="json", by_alias=True).items() if k not in _NOT_IN_VERSION}
        extra = []
        if isinstance(stage, LlmStage) and stage.agent_loop is not None:  # the tools' descriptions go into prompts
            extra = [pipeline.stage(t).description for t in stage.agent_loop.tools]
            if stage.name in replica_loops(pipeline, placement):  # its replicas run the loop's tools too
                tools = [pipeline.stage(t) for t in stage.agent_loop.tools]
                extra += [[t.model_dump(mode="json", by_alias=True), _files(t, base_dir)] for t in tools]
        out[f"stage-{stage.name}"] = _digest([*common, fields, placement[stage.name], extra, _files(stage, base_dir)])
    # inline tools run in the ingress: their code is part of what its replicas are built from
    inline = [_files(s, base_dir) for s in pipeline.stages if placement[s.name].get("hop") == "inline"]
    whole = _digest([*common, pipeline.model_dump(mode="json", by_alias=True), placement, *inline])
    out["PipelineIngress"] = whole
    if pipeline.reoptimize is not None:
        out["reoptimize-controller"] = whole
    return out


def _files(stage, base_dir: Path) -> list:
    """What the files a stage names hold: Python by content, checkpoints and model folders by size and time."""
    named = []
    for field_name in ("module", "problem_file", "preprocess", "postprocess", "callable", "weights"):
        value = getattr(stage, field_name, None)
        if value:
            named.append(value.partition(":")[0] if value.partition(":")[0].endswith(".py") else value)
    for source in (getattr(stage, "huggingface", None), getattr(stage, "vllm", None)):
        if source is not None:
            named.append(source.model)
    out = []
    for name in named:
        path = base_dir / name
        if path.is_file() and path.suffix == ".py":
            out.append([name, hashlib.sha256(path.read_bytes()).hexdigest()])
        elif path.is_file():
            st = path.stat()
            out.append([name, st.st_size, st.st_mtime_ns])
        elif path.is_dir():
            out.append(
                [
                    name,
                    sorted(
                        [str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                        for f in path.rglob("*")
                        if f.is_file()
                    ),
                ]
            )
    return out


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pin_versions(app, versions: dict[str, str]):
    """`app` with each deployment's version set from `versions`, and rolling updates that start the new replicas
    before stopping the old ones (`max_surge_percent=100`): a redeployed stage keeps answering throughout."""
    done: set[int] = set()

    def walk(value) -> None:
        if isinstance(value, serve.Application):
            if id(value) in done:
                return
            done.add(id(value))
            bound = value._bound_deployment  # noqa: SLF001 - the one way to re-option an already bound deployment
            for arg in (*bound.init_args, *bound.init_kwargs.values()):
                walk(arg)
            # `version` is refused from users' `.options` since Serve manages it; `_internal` is how Serve sets it
            value._bound_deployment = bound.options(
                version=versions.get(bound.name), max_surge_percent=100, _internal=True
            )
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(app)
    return app


def check_servable(pipeline: Pipeline, base_dir: Path) -> None:
    """ValueError listing what keeps the pipeline from being served (bad bindings, missing files)."""
    problems = import_stage_functions(pipeline, base_dir)
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
    """Deployments with every replica of every stage (from Serve's controller), the devices and active variants
    the replicas report, and whether the deployment is reachable (`reachable`)."""
    out = []
    for record in load_state(pipeline):
        doc = {"pipeline": record.pipeline, "url": record.url, "embedded": record.embedded, "pid": record.pid}
        doc["log_dir"] = str(Path(record.session_dir) / "logs") if record.session_dir else ""
        try:
            reply = httpx.get(
                # the token too: pipelines may protect their routes
                f"{record.url}/v1/pipelines/{record.pipeline}/status",
                headers=client_headers(),
                timeout=10,
            )
            doc["stages"] = reply.json().get("stages", {})
            doc["state"] = "RUNNING" if reply.status_code == 200 else f"HTTP {reply.status_code}"
            doc["reachable"] = reply.status_code == 200
        except (httpx.HTTPError, ValueError) as err:
            doc["state"], doc["stages"], doc["reachable"] = f"unreachable ({type(err).__name__})", {}, False
        if doc["reachable"] or live(record):
            replicas = _replicas(record)
            if replicas is None:
                doc["reachable"] = False
                doc["state"] += "; Serve's controller does not answer"
        else:
            replicas = {}
        alive = _heartbeats(record)
        for name, where in record.placement.items():
            stage = doc["stages"].setdefault(name, {})
            stage["planned"] = where["device_class"]
            stage["replicas"] = [
                {**r, "active_variant": _matching(alive.get(name, {}), r["replica"], stage.get("active_variant", ""))}
                for r in (replicas or {}).get(f"stage-{name}", [])
            ]
        out.append(doc)
    return out


def _replicas(record: Deployment) -> dict[str, list[dict]] | None:
    """Serve deployment name -> its replicas (id, state, pid, node), from Serve's controller; None if unreachable."""
    try:
        connect(record)
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace="serve")
        details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - any failure to reach Ray or Serve means: not reachable
        return None
    finally:
        if ray.is_initialized():
            ray.shutdown()
    app = (details.get("applications") or {}).get(record.pipeline) or {}
    return {
        name: [
            {
                "replica": r.get("replica_id", ""),
                "state": str(r.get("state", "")).rsplit(".", 1)[-1],
                "pid": r.get("pid"),
                "node_id": r.get("node_id", ""),
            }
            for r in d.get("replicas", [])
        ]
        for name, d in (app.get("deployments") or {}).items()
    }


def _heartbeats(record: Deployment) -> dict[str, dict[str, str]]:
    """stage -> {replica tag: active variant}, from the model stages' heartbeats in the registry."""
    try:
        board = SwapBoard(record.registry_path)
        return {name: board.alive(record.pipeline, name) for name in record.placement}
    except Exception:  # noqa: BLE001 - an unreadable registry: the variants shown come from the HTTP status only
        return {}


def _matching(tags: dict[str, str], replica_id: str, default: str) -> str:
    """The active variant a replica reported (its tag ends in Serve's replica id), else `default`."""
    for tag, variant in tags.items():
        if replica_id and tag.endswith(replica_id):
            return variant
    return default


def down(pipeline: str | None = None) -> list[tuple[str, str]]:
    """Stop deployments: (pipeline, what was done) each. An embedded deployment's serve process is sent SIGTERM
    only while it is still the recorded process; what its Ray instance left running (after a SIGKILL of the serve
    process, say) is ended too. The state files go."""
    stopped = []
    for record in load_state(pipeline):
        if record.embedded:
            if is_serve_command(record):
                os.kill(record.pid, signal.SIGTERM)  # `hetforge serve` shuts Serve and Ray down on SIGTERM
                if not ray_instance.wait_gone(record.pid, record.started, 120):
                    ray_instance.end_processes([record.pid], grace_s=0)
                what = f"serve process {record.pid} stopped"
            elif serving_process_alive(record):
                what = f"process {record.pid} is not a `hetforge serve` command line (not signalled; stop it yourself)"
            else:
                what = f"serve process {record.pid} was already gone (not signalled)"
            ended = _clean_leftovers(record)
            if ended:
                what += f"; {ended} leftover Ray process(es) of {record.session_dir} ended"
        else:
            connect(record)
            serve.delete(record.pipeline)
            JobLauncher(record.pipeline).stop()  # the detached actor owning its optimization jobs
            what = f"deleted from the Ray cluster {record.gcs_address}"
        state_path(record.pipeline).unlink(missing_ok=True)
        stopped.append((record.pipeline, what))
    return stopped


def _clean_leftovers(record: Deployment) -> int:
    """End the processes of the deployment's own Ray instance still running (embedded only); how many."""
    if not record.embedded or serving_process_alive(record):
        return 0
    recorded = [int(p) for p, t in record.ray_processes.items() if ray_instance.start_ticks(int(p)) == t]
    found = set(recorded) | set(ray_instance.instance_pids(record.session_dir))
    return len(ray_instance.end_processes(sorted(found)))
