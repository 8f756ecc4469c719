"""`hetforge plan`: inventory + profiles + placement + hot stages for one pipeline."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from hetforge.planners import profiles as prof
from hetforge.planners.devices import DeviceClass, Inventory
from hetforge.planners.placement import SMALL_MESSAGE_BYTES, PlacementProblem, evaluate, place
from hetforge.planners.tool_hops import HopCost, decide, load_hop_cost
from hetforge.spec.models import LlmStage, ModelStage, Pipeline, ToolStage
from hetforge.spec.stages import stage_code_error, stage_problem

GIB = 1 << 30
# Figures for stages hetforge has not measured (tools are measured in serving; a vLLM stage by its
# engine-settings job's replay of recorded traffic, `profiles.LlmMeasurement`); each is marked estimated and a
# stage's latency_budget_ms replaces it.
LLM_MS_PER_TOKEN = {"gpu": 2.0, "cpu": 20.0, "endpoint": 10.0}
LLM_MEMORY_BYTES = 2 * GIB
TOOL_MS, TOOL_MEMORY_BYTES = 5.0, 64 << 20


class PlanError(Exception):
    """The pipeline cannot be placed on this inventory; each message names the stage and the constraint."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


@dataclass
class StagePlan:
    device: str
    latency_ms: float
    source: str
    memory_gib: float
    replicas: int
    ray_actor_options: dict
    detail: str = ""
    hop: str = ""  # tool stages: "inline" (in the caller's process) or "separate" (`tool_hops`)
    hop_reason: str = ""


@dataclass
class Plan:
    pipeline: str
    objective: str
    inventory: dict
    stages: dict[str, StagePlan]
    critical_path: list[str]
    predicted_latency_ms: float
    throughput_rps: float
    hot_stages: list[str]
    hot_stage_savings_ms: dict[str, float]
    exact: bool
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "objective": self.objective,
            "inventory": self.inventory,
            "stages": {k: vars(v) for k, v in self.stages.items()},
            "critical_path": self.critical_path,
            "predicted_latency_ms": round(self.predicted_latency_ms, 4),
            "throughput_rps": round(self.throughput_rps, 3),
            "hot_stages": self.hot_stages,
            "hot_stage_savings_ms": self.hot_stage_savings_ms,
            "exact": self.exact,
            "notes": self.notes,
        }


def allowed_classes(stage, inventory: Inventory) -> list[str]:
    """Device classes a stage may use under its `device` constraint; PlanError if none."""
    have = sorted(inventory.classes)
    gpus = [c for c in have if inventory.classes[c].kind == "gpu"]
    cpus = [c for c in have if inventory.classes[c].kind == "cpu"]
    compute = isinstance(stage, ModelStage) or (isinstance(stage, LlmStage) and stage.vllm is not None)
    device = stage.device
    if device == "auto":
        return have if compute else cpus
    if device == "cpu":
        return cpus
    if device == "cuda":
        if not gpus:
            raise PlanError(
                [f'stage "{stage.name}": device cuda, but the inventory has no GPU (have: {", ".join(have)})']
            )
        return gpus
    if device not in inventory.classes:
        raise PlanError([f'stage "{stage.name}": device {device} is not in the inventory (have: {", ".join(have)})'])
    return [device]


def _replicas(stage) -> int:
    return stage.replicas if isinstance(stage.replicas, int) else max(1, stage.replicas.min_replicas)


def profile_stage(
    stage, base_dir: Path, classes: list[DeviceClass], cache: prof.ProfileCache | None
) -> dict[str, prof.StageProfile]:
    """A profile of `stage` on each class: measured where the class is local, estimated elsewhere."""
    out: dict[str, prof.StageProfile] = {}
    if isinstance(stage, ModelStage):
        problem = stage_problem(stage, base_dir).load()
        fingerprint = prof.fingerprint(stage, base_dir)
        analysis = None
        for cls in classes:
            key = f"{cls.name}:{cls.facts.name}"
            if cls.local:
                cached = cache.get(fingerprint, key) if cache else None
                if cached is None:
                    cached = prof.measure(stage.name, problem, cls, seed=stage.seed)
                    if cache:
                        cache.put(fingerprint, prof.StageProfile(**{**vars(cached), "device": key}))
                out[cls.name] = prof.StageProfile(**{**vars(cached), "device": cls.name})
            else:
                analysis = analysis or prof.analyze(problem, seed=stage.seed)
                out[cls.name] = prof.estimate(stage.name, analysis, cls, stage.precision)
        return out
    measured = None
    if isinstance(stage, LlmStage) and stage.vllm is not None and cache is not None:
        fingerprint = prof.llm_fingerprint(stage, base_dir)
        measured = {cls.name: cache.get_llm(fingerprint, cls.name) for cls in classes}
    for cls in classes:
        if measured and measured.get(cls.name) is not None:  # the engine's own figures on this class
            out[cls.name] = prof.llm_profile(
                stage.name, cls.name, measured[cls.name], LLM_MEMORY_BYTES, SMALL_MESSAGE_BYTES
            )
            continue
        if isinstance(stage, LlmStage):
            per_token = LLM_MS_PER_TOKEN["endpoint" if stage.endpoint else cls.kind]
            ms = stage.latency_budget_ms or per_token * stage.sampling.max_tokens
            memory = LLM_MEMORY_BYTES if stage.vllm else TOOL_MEMORY_BYTES
            detail = (
                "latency budget from the spec"
                if stage.latency_budget_ms
                else f"{per_token} ms/token x {stage.sampling.max_tokens} tokens"
            )
        else:
            ms, memory = stage.latency_budget_ms or TOOL_MS, TOOL_MEMORY_BYTES
            detail = (
                "latency budget from the spec"
                if stage.latency_budget_ms
                else f"default {TOOL_MS} ms until serving observes it"
            )
        out[cls.name] = prof.StageProfile(
            stage.name, cls.name, float(ms), "estimated", memory, SMALL_MESSAGE_BYTES, {}, detail
        )
    return out


def build_plan(
    pipeline: Pipeline,
    base_dir: Path,
    inventory: Inventory,
    objective: str = "latency",
    cache: prof.ProfileCache | None = None,
    hop: HopCost | None = None,
) -> Plan:
    """Profile, place and rank one pipeline on an inventory; PlanError naming every unplaceable stage.

    `hop`: the Ray Serve hop cost tool placement weighs (default: the one measured on this host, `tool_hops`)."""
    errors: list[str] = []
    options: list[list[str]] = []
    for stage in pipeline.stages:
        try:
            options.append(allowed_classes(stage, inventory))
        except PlanError as err:
            errors.extend(err.messages)
            options.append([])
    if errors:
        raise PlanError(errors)

    index = {s.name: i for i, s in enumerate(pipeline.stages)}
    profiles = []
    for stage, opts in zip(pipeline.stages, options):
        try:
            profiles.append(profile_stage(stage, base_dir, [inventory.classes[c] for c in opts], cache))
        except Exception as err:  # noqa: BLE001 - the stage's own code (import, constructor, forward) failed
            errors.append(str(stage_code_error(pipeline, stage.name, err)))
    if errors:
        raise PlanError(errors)
    memory = [{c: p.memory_bytes * _replicas(s) for c, p in ps.items()} for s, ps in zip(pipeline.stages, profiles)]
    for i, stage in enumerate(pipeline.stages):
        fitting = [c for c in options[i] if memory[i][c] <= inventory.classes[c].facts.memory_gib * GIB]
        if not fitting:
            need = min(memory[i].values()) / GIB
            biggest = max(inventory.classes[c].facts.memory_gib for c in options[i])
            errors.append(
                f'stage "{stage.name}": needs {need:.2f} GiB for {_replicas(stage)} replica(s); '
                f"the largest allowed device ({', '.join(options[i])}) has {biggest:.0f} GiB"
            )
    if errors:
        raise PlanError(errors)

    hop_cost = hop or load_hop_cost()
    decisions = {
        s.name: decide(s, pipeline, base_dir, hop_cost, min(p.latency_ms for p in ps.values()))
        for s, ps in zip(pipeline.stages, profiles)
        if isinstance(s, ToolStage)
    }
    hops = {name: d.placement for name, d in decisions.items()}
    problem = PlacementProblem(
        stages=[s.name for s in pipeline.stages],
        preds=[[index[e.source] for e in pipeline.flow if e.target == s.name] for s in pipeline.stages],
        entry=index[pipeline.entry],
        output=index[pipeline.output],
        options=options,
        # a separate tool's call costs its Ray Serve hop on top of its compute; an inline one does not
        latency=[
            {c: p.latency_ms + (hop_cost.ms if hops.get(s.name, "") == "separate" else 0.0) for c, p in ps.items()}
            for s, ps in zip(pipeline.stages, profiles)
        ],
        memory=memory,
        out_bytes=[max(p.output_bytes for p in ps.values()) for ps in profiles],
        capacity={c: d.count * d.facts.memory_gib * GIB for c, d in inventory.classes.items()},
        device_memory={c: d.facts.memory_gib * GIB for c, d in inventory.classes.items()},
        count={c: d.count for c, d in inventory.classes.items()},
        transfer=lambda a, b, n: inventory.transfer_ms(a, b, n),
        loops={
            index[s.name]: (s.agent_loop.max_iterations, [index[t] for t in s.agent_loop.tools])
            for s in pipeline.stages
            if isinstance(s, LlmStage) and s.agent_loop
        },
        prefer=[s.prefer_device for s in pipeline.stages],
        slo_ms=pipeline.slo.p99_ms if pipeline.slo else None,
    )
    try:
        result = place(problem, objective)
    except ValueError as err:
        raise PlanError([f'pipeline "{pipeline.name}": {err}']) from None

    stages = {}
    for i, stage in enumerate(pipeline.stages):
        cls = result.assignment[i]
        p = profiles[i][cls]
        kind = inventory.classes[cls].kind
        actor = {"num_cpus": 1} if kind == "cpu" else {"num_cpus": 1, "num_gpus": 1, "accelerator_type": cls}
        if inventory.classes[cls].resource:  # a named CPU class: a sliver of its resource puts the replica on its nodes
            actor["resources"] = {inventory.classes[cls].resource: 0.001}
        stages[stage.name] = StagePlan(
            cls, round(p.latency_ms, 4), p.source, round(memory[i][cls] / GIB, 4), _replicas(stage), actor, p.detail
        )
        if stage.name in decisions:
            stages[stage.name].hop, stages[stage.name].hop_reason = hops[stage.name], decisions[stage.name].reason

    hot, savings = _hot_stages(pipeline, problem, list(result.assignment), result.latency_ms)
    notes = []
    if problem.slo_ms is not None and result.latency_ms > problem.slo_ms:
        notes.append(f"predicted latency {result.latency_ms:.1f} ms exceeds the p99 target {problem.slo_ms:.0f} ms")
    if not result.exact:
        notes.append(f"search stopped after {result.nodes_searched} nodes: best found, not proven optimal")
    return Plan(
        pipeline.name,
        objective,
        _inventory_json(inventory),
        stages,
        [pipeline.stages[i].name for i in result.critical_path],
        result.latency_ms,
        result.throughput_rps,
        hot,
        savings,
        result.exact,
        notes,
    )


def _hot_stages(
    pipeline: Pipeline, problem: PlacementProblem, assign: list[str], base_ms: float
) -> tuple[list[str], dict[str, float]]:
    """Model stages ranked by the end-to-end ms a 2x speedup of theirs would remove (branches weigh 1)."""
    savings: dict[str, float] = {}
    for i, stage in enumerate(pipeline.stages):
        if not isinstance(stage, ModelStage) or not stage.optimize:
            continue
        faster = copy.copy(problem)
        faster.latency = list(problem.latency)
        faster.latency[i] = {c: v / 2 for c, v in problem.latency[i].items()}
        saved = base_ms - evaluate(faster, assign)[0]
        if saved > 1e-9:
            savings[stage.name] = round(saved, 4)
    return sorted(savings, key=savings.get, reverse=True), savings


def _inventory_json(inventory: Inventory) -> dict:
    return {
        "source": inventory.source,
        "classes": {
            c: {
                "kind": d.kind,
                "count": d.count,
                "model": d.facts.name,
                "memory_gib": d.facts.memory_gib,
                "local": d.local,
            }
            for c, d in inventory.classes.items()
        },
    }
