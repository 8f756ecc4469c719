"""Tool hops: whether a tool stage runs in its caller's process (inline) or behind a Ray Serve hop (separate).

The caller of every tool is the ingress: it walks the pipeline and runs the agent loops, so an inline
tool saves one Ray Serve round trip per call (handle, router, the replica's queue, the answer back).
What a separate replica buys is isolation: the tool's own memory and imports, its own CPU and
scaling, and a process of its own for code that can hang or crash. The decision, per tool:

- `placement: inline` or `separate` in the YAML is followed as written;
- under `auto`, a tool stays separate when it needs isolation: it declares resources (a device
  other than auto/cpu, more than one replica or autoscaling, `limits.max_concurrency` or
  `limits.max_queued`: those are a replica's to have and Ray Serve's to enforce), or its
  module imports a heavy library (`HEAVY_MODULES`: hundreds of MB and seconds of start-up in the
  process every request passes through);
- otherwise it goes inline when the hop costs at least `HOP_SHARE` of the call: its compute (the
  stage's `latency_budget_ms`, else the default estimate) at most `hop_ms / HOP_SHARE`. Beyond that the
  hop is a small part of the call, and the compute it would bring into the ingress (contending with
  every other request for its CPU) is worth keeping out.

`hop_ms` is measured on this machine by `hetforge plan --measure-hops` (`serving/hop_probe.py`: the
median round trip of a Ray Serve handle call to an echo replica, less the same call made in process)
and cached in `$HETFORGE_HOME/planner/hop_cost.json`; without a measurement the default below is used
and the plan says so.
"""

from __future__ import annotations

import ast
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hetforge.config import home_dir
from hetforge.spec.code_refs import find_module_source
from hetforge.spec.models import LlmStage, Pipeline, ToolStage

# Default Ray Serve hop when none was measured here: two composed deployments answered in about 25 ms per HTTP
# request on the development machine (SETUP-NOTES); a handle call is a part of that. Marked estimated in the plan.
DEFAULT_HOP_MS = 5.0
# Inline when the hop is at least this share of the call's compute: a tool of up to 10 hops' compute.
HOP_SHARE = 0.1
# Libraries whose import makes a process heavy (memory, start-up time, native threads): such a tool keeps its own.
HEAVY_MODULES = frozenset(
    {
        "torch",
        "tensorflow",
        "jax",
        "transformers",
        "vllm",
        "sklearn",
        "scipy",
        "pandas",
        "polars",
        "cv2",
        "onnxruntime",
        "xgboost",
        "lightgbm",
        "spacy",
    }
)


@dataclass(frozen=True)
class HopCost:
    """The per-call cost of a Ray Serve hop on this machine."""

    ms: float
    source: str  # "measured" or "estimated"
    detail: str


@dataclass(frozen=True)
class ToolHop:
    """Where one tool stage runs, and why."""

    placement: str  # "inline" or "separate"
    reason: str


def cache_path() -> Path:
    return home_dir() / "planner" / "hop_cost.json"


def load_hop_cost(path: Path | None = None) -> HopCost:
    """The hop cost measured on this host (the cache written by the probe), else the default estimate."""
    path = path or cache_path()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = None
    if isinstance(doc, dict) and doc.get("host") == socket.gethostname() and isinstance(doc.get("hop_ms"), int | float):
        detail = f"measured {doc.get('measured_at', '?')}: median of {doc.get('samples', '?')} handle round trips"
        return HopCost(float(doc["hop_ms"]), "measured", detail)
    return HopCost(DEFAULT_HOP_MS, "estimated", "default; `hetforge plan --measure-hops` measures it here")


def save_hop_cost(hop_ms: float, samples: int, extra: dict | None = None, path: Path | None = None) -> Path:
    """Cache a measured hop cost for this host."""
    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "host": socket.gethostname(),
        "hop_ms": round(hop_ms, 4),
        "samples": samples,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def heavy_imports(stage: ToolStage, base_dir: Path) -> list[str]:
    """The heavy libraries (`HEAVY_MODULES`) the tool's module imports anywhere in its file, read with `ast`."""
    if stage.callable is None:
        return []
    module, _, _ = stage.callable.rpartition(":")
    source = base_dir / module if module.endswith(".py") else find_module_source(module, base_dir)
    if not isinstance(source, Path) or not source.is_file():
        return []
    try:
        tree = ast.parse(source.read_bytes(), str(source))
    except (SyntaxError, ValueError, OSError):
        return []
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {n.split(".")[0] for n in names} & HEAVY_MODULES
    return sorted(found)


def calls_per_request(pipeline: Pipeline, name: str) -> int:
    """Most calls of the tool in one request: once in the flow, plus max_iterations - 1 per agent loop owning it."""
    calls = 1 if pipeline.entry == name or any(e.target == name for e in pipeline.flow) else 0
    for stage in pipeline.stages:
        if isinstance(stage, LlmStage) and stage.agent_loop and name in stage.agent_loop.tools:
            calls += stage.agent_loop.max_iterations - 1
    return max(calls, 1)


def decide(stage: ToolStage, pipeline: Pipeline, base_dir: Path, hop: HopCost, compute_ms: float) -> ToolHop:
    """Inline or separate for one tool stage (the module docstring's rules)."""
    if stage.placement != "auto":
        return ToolHop(stage.placement, f"placement: {stage.placement} in the YAML")
    if stage.device not in ("auto", "cpu"):
        return ToolHop("separate", f"declares device {stage.device}: a replica of its own holds it")
    if stage.replicas != 1:
        return ToolHop("separate", "declares its own replicas or autoscaling: it scales apart from the ingress")
    declared = sorted({"max_concurrency", "max_queued"} & stage.limits.model_fields_set)
    if declared:  # Ray Serve enforces them on a deployment's replicas (back-pressure: 503 when its queue is full)
        return ToolHop("separate", f"declares limits.{', limits.'.join(declared)}: a replica's queue enforces them")
    heavy = heavy_imports(stage, base_dir)
    if heavy:
        return ToolHop("separate", f"imports {', '.join(heavy)}: too heavy for the caller's process")
    calls = calls_per_request(pipeline, stage.name)
    saved = f"saves {calls} x {hop.ms:.2f} ms hop ({hop.source}) per request"
    if compute_ms * HOP_SHARE <= hop.ms:
        return ToolHop("inline", f"light ({compute_ms:g} ms a call): {saved}")
    return ToolHop(
        "separate",
        f"its {compute_ms:g} ms a call outweighs the {hop.ms:.2f} ms hop ({hop.source}) by more than "
        f"{1 / HOP_SHARE:g}x: isolation kept",
    )
