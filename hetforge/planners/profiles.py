"""Stage profiles: measured on devices that are here, estimated with a roofline model elsewhere.

A profile says how long one request takes on a device class, how much memory the stage needs and
how many bytes it hands to the next stage. Measurements are cached in SQLite, keyed by the stage's
fingerprint (its code, arguments and input signature) and the device class, and replace estimates.

An LLM stage on vLLM is profiled by its engine's measured figures per request (`LlmMeasurement`:
time to first token, time per output token after the first, queue time, prompt and output tokens),
from a replay of recorded traffic (the engine-settings job's baseline) or the replicas' exported
metrics; its latency is queue + TTFT + TPOT x (output tokens - 1) (`llm_profile`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hetforge import config
from hetforge.core.problem import LoadedProblem
from hetforge.planners.devices import DeviceClass


@dataclass(frozen=True)
class StageProfile:
    """One stage on one device class."""

    stage: str
    device: str
    latency_ms: float
    source: str  # measured | estimated
    memory_bytes: int
    output_bytes: int
    by_batch_ms: dict = field(default_factory=dict)  # batch size -> ms (measured profiles)
    detail: str = ""


@dataclass(frozen=True)
class StageAnalysis:
    """Device-independent facts of a model stage, from one forward pass."""

    flops: float
    bytes_moved: float  # parameters + inputs + every op's output: a lower bound on memory traffic
    ops: int  # aten ops launched: each costs a launch on a GPU
    param_bytes: int
    peak_activation_bytes: int
    output_bytes: int


class ProfileCache:
    """Measured profiles in SQLite (one row per fingerprint and device class); safe across processes."""

    def __init__(self, path: Path | None = None):
        self.path = path or config.home_dir() / "profiles.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS profiles (fingerprint TEXT, device TEXT, profile TEXT, measured_at REAL, "
                "PRIMARY KEY (fingerprint, device))"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def get(self, fingerprint: str, device: str) -> StageProfile | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT profile FROM profiles WHERE fingerprint=? AND device=?", (fingerprint, device)
            ).fetchone()
        return StageProfile(**json.loads(row[0])) if row else None

    def put_llm(self, fingerprint: str, device_class: str, m: LlmMeasurement) -> None:
        """An LLM stage's measured figures on a device class (the latest measurement wins)."""
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS llm_profiles (fingerprint TEXT, device_class TEXT, measurement TEXT, "
                "measured_at REAL, PRIMARY KEY (fingerprint, device_class))"
            )
            db.execute(
                "INSERT OR REPLACE INTO llm_profiles VALUES (?, ?, ?, ?)",
                (fingerprint, device_class, json.dumps(asdict(m)), time.time()),
            )

    def get_llm(self, fingerprint: str, device_class: str) -> LlmMeasurement | None:
        with self._connect() as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'llm_profiles'").fetchone():
                return None
            row = db.execute(
                "SELECT measurement FROM llm_profiles WHERE fingerprint=? AND device_class=?",
                (fingerprint, device_class),
            ).fetchone()
        return LlmMeasurement(**json.loads(row[0])) if row else None

    def put(self, fingerprint: str, profile: StageProfile) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?)",
                (fingerprint, profile.device, json.dumps(asdict(profile)), time.time()),
            )


def fingerprint(stage, base_dir: Path) -> str:
    """Changes when the stage's code, arguments, weights or input signature change."""
    h = hashlib.sha256()
    for rel in (stage.problem_file, stage.weights):
        if rel:
            h.update((base_dir / rel).read_bytes())
    h.update(
        json.dumps(
            [stage.module, stage.init_args, stage.init_kwargs, stage.seed, [i.model_dump() for i in stage.inputs]],
            default=str,
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------- LLM stages
@dataclass(frozen=True)
class LlmMeasurement:
    """An LLM stage's engine figures per request, means over `requests` generations."""

    ttft_ms: float  # time from a generation's arrival in the engine to its first token
    tpot_ms: float  # time per output token after the first
    queue_ms: float  # time waiting in the engine's queue (included in TTFT where the source cannot tell them apart)
    prompt_tokens: float
    output_tokens: float
    requests: int
    source: str  # where it was measured: "replay of N recorded requests (job 3)", "replica metrics", ...
    at: float = 0.0

    @property
    def latency_ms(self) -> float:
        return self.queue_ms + self.ttft_ms + self.tpot_ms * max(0.0, self.output_tokens - 1)


def llm_fingerprint(stage, base_dir: Path) -> str:
    """An LLM stage on vLLM: changes when its model (config, weight files' names and sizes), its engine arguments or
    its chat template change. Engine-settings variants and LLM profiles are keyed by it."""
    spec = stage.vllm
    h = hashlib.sha256()
    folder = base_dir / spec.model
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file():
                h.update(f.name.encode() + str(f.stat().st_size).encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    else:
        h.update(spec.model.encode())
    if spec.chat_template:
        h.update((base_dir / spec.chat_template).read_bytes())
    h.update(json.dumps([spec.engine_args, spec.prefix_caching], default=str, sort_keys=True).encode())
    return "llm-" + h.hexdigest()[:20]


def llm_profile(stage_name: str, device: str, m: LlmMeasurement, memory_bytes: int, output_bytes: int) -> StageProfile:
    """A measured profile of an LLM stage: queue + TTFT + TPOT x (output tokens - 1), from `m`."""
    detail = (
        f"queue {m.queue_ms:.2f} ms + TTFT {m.ttft_ms:.2f} ms + TPOT {m.tpot_ms:.3f} ms x "
        f"({m.output_tokens:.1f} - 1) output tokens; {m.prompt_tokens:.0f} prompt tokens; {m.source}"
    )
    return StageProfile(stage_name, device, round(m.latency_ms, 4), "measured", memory_bytes, output_bytes, {}, detail)


class _OpCounter(TorchDispatchMode):
    """Counts aten ops and the bytes they write, and tracks live activation bytes."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in ("detach", "view", "t", "_unsafe_view", "expand", "reshape", "alias"):
            self.ops += 1
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.written += t.numel() * t.element_size()
        return out


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def analyze(problem: LoadedProblem, seed: int = 0) -> StageAnalysis:
    """FLOPs, bytes and op count of one forward pass on the problem's main inputs (on the CPU)."""
    model = problem.build(seed=seed)
    inputs = problem.main_inputs(seed=0)
    params = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    counter, flops = _OpCounter(), FlopCounterMode(display=False)
    # The fused transformer fast path is one opaque op to both counters: count its parts instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), flops, counter:
            out = model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    written = counter.written
    return StageAnalysis(
        float(flops.get_total_flops()),
        float(params + _nbytes(inputs) + written),
        counter.ops,
        params,
        int(written),
        _nbytes(out),
    )


def estimate(stage_name: str, analysis: StageAnalysis, device: DeviceClass, precision: str) -> StageProfile:
    """Roofline: max(FLOPs / peak, bytes / bandwidth) plus a launch per op; memory = params + activations."""
    facts = device.facts
    compute_ms = analysis.flops / (facts.peak_tflops(precision) * 1e9)
    memory_ms = analysis.bytes_moved / (facts.bandwidth_gbs * 1e6)
    launch_ms = analysis.ops * facts.launch_us / 1e3
    latency = max(compute_ms, memory_ms) + launch_ms
    detail = f"roofline on {facts.name}: compute {compute_ms:.3f} ms, memory {memory_ms:.3f} ms, {analysis.ops} launches {launch_ms:.3f} ms"
    return StageProfile(
        stage_name,
        device.name,
        latency,
        "estimated",
        analysis.param_bytes + analysis.peak_activation_bytes,
        analysis.output_bytes,
        {},
        detail,
    )


def measure(
    stage_name: str, problem: LoadedProblem, device: DeviceClass, seed: int = 0, repeats: int = 5
) -> StageProfile:
    """Median latency on a local device class, at batch 1 and at the problem's batch; peak memory."""
    where = "cuda" if device.kind == "gpu" else "cpu"
    model = problem.build(seed=seed, device=where)
    inputs = problem.main_inputs(seed=0, device=where)
    batches = {1: [x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs]}
    main_batch = inputs[0].shape[0] if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() > 0 else 1
    batches[main_batch] = inputs
    by_batch: dict[int, float] = {}
    if where == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for batch, xs in sorted(batches.items()):
            out = model(*xs)  # warm-up
            times = []
            for _ in range(repeats):
                if where == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(*xs)
                if where == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            by_batch[batch] = round(statistics.median(times), 4)
    if where == "cuda":
        memory = int(torch.cuda.max_memory_allocated())
    else:
        memory = sum(_nbytes(p) for p in model.parameters()) + _nbytes(inputs) + 4 * _nbytes(out)
    return StageProfile(
        stage_name,
        device.name,
        by_batch[main_batch],
        "measured",
        memory,
        _nbytes(out),
        {str(k): v for k, v in by_batch.items()},
        f"median of {repeats} on this machine",
    )
