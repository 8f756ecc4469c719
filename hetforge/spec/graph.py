"""The pipeline graph: stages as nodes, data flow and agent-loop calls as edges (networkx).

Edges have a `kind`:
  data         a `flow` edge: the source's output feeds the target (maybe under a condition)
  tool_call    an agent-loop LLM calling one of its tools
  tool_return  the tool's result going back to the LLM

The only cycles allowed are LLM -> tool -> LLM through a declared agent loop. For latency, an agent
loop counts as one node of the data DAG whose cost is its worst case: `max_iterations` LLM calls
with a round of tool calls (the slowest tool) between consecutive ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import networkx as nx

from hetforge.spec.errors import Problem
from hetforge.spec.models import LlmStage, Pipeline

DATA, TOOL_CALL, TOOL_RETURN = "data", "tool_call", "tool_return"


@dataclass(frozen=True)
class CriticalPath:
    """The slowest chain of stages from entry to output, and its length under the given costs."""

    stages: tuple[str, ...]
    length: float


class PipelineGraph:
    """A validated pipeline as a networkx DiGraph, with critical-path and export helpers."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.graph = nx.DiGraph(name=pipeline.name)
        for i, stage in enumerate(pipeline.stages):
            self.graph.add_node(stage.name, kind=stage.kind, stage=stage, index=i)
        for i, edge in enumerate(pipeline.flow):
            self.graph.add_edge(edge.source, edge.target, kind=DATA, when=edge.when, index=i)
        for stage in pipeline.stages:
            if isinstance(stage, LlmStage) and stage.agent_loop is not None:
                for tool in stage.agent_loop.tools:
                    self.graph.add_edge(stage.name, tool, kind=TOOL_CALL, when=None, index=None)
                    self.graph.add_edge(tool, stage.name, kind=TOOL_RETURN, when=None, index=None)

    # -- structure -------------------------------------------------------------------------

    def data_dag(self) -> nx.DiGraph:
        """Only the data edges: acyclic for a valid pipeline."""
        dag = nx.DiGraph()
        dag.add_nodes_from(self.graph.nodes(data=True))
        dag.add_edges_from((u, v, d) for u, v, d in self.graph.edges(data=True) if d["kind"] == DATA)
        return dag

    def loop_tools(self, name: str) -> list[str]:
        """Tools an LLM stage may call in its agent loop (empty for other stages)."""
        stage = self.pipeline.stage(name)
        return list(stage.agent_loop.tools) if isinstance(stage, LlmStage) and stage.agent_loop else []

    def reachable(self) -> set[str]:
        """Stages a request can reach from the entry, through data flow and tool calls."""
        forward = nx.DiGraph()
        forward.add_nodes_from(self.graph)
        forward.add_edges_from((u, v) for u, v, d in self.graph.edges(data=True) if d["kind"] != TOOL_RETURN)
        # a fallback stage runs when the stage it stands in for fails
        forward.add_edges_from(
            (s.name, s.fallback.stage) for s in self.pipeline.stages if s.fallback is not None and s.fallback.stage
        )
        return {self.pipeline.entry} | nx.descendants(forward, self.pipeline.entry)

    # -- latency ---------------------------------------------------------------------------

    def stage_cost(self, name: str, costs: Mapping[str, float]) -> float:
        """A stage's worst-case time per request; an agent loop includes its tool rounds."""
        own = float(costs.get(name, 0.0))
        tools = self.loop_tools(name)
        if not tools:
            return own
        rounds = self.pipeline.stage(name).agent_loop.max_iterations  # type: ignore[union-attr]
        slowest_tool = max(float(costs.get(t, 0.0)) for t in tools)
        return rounds * own + (rounds - 1) * slowest_tool

    def critical_path(
        self, costs: Mapping[str, float], edge_costs: Mapping[tuple[str, str], float] | None = None
    ) -> CriticalPath:
        """Longest entry-to-output path with per-stage `costs` and optional per-edge transfer costs."""
        edge_costs = edge_costs or {}
        dag = self.data_dag()
        entry, output = self.pipeline.entry, self.pipeline.output
        best: dict[str, float] = {entry: self.stage_cost(entry, costs)}
        parent: dict[str, str] = {}
        for node in nx.topological_sort(dag):
            if node not in best:
                continue
            for succ in dag.successors(node):
                length = best[node] + float(edge_costs.get((node, succ), 0.0)) + self.stage_cost(succ, costs)
                if length > best.get(succ, float("-inf")):
                    best[succ], parent[succ] = length, node
        chain = [output]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
        stages: list[str] = []
        for name in reversed(chain):
            stages.append(name)
            tools = self.loop_tools(name)
            if tools:  # the slowest tool of a loop sits on the path too
                stages.append(max(tools, key=lambda t: float(costs.get(t, 0.0))))
        return CriticalPath(tuple(stages), best.get(output, 0.0))

    # -- export ----------------------------------------------------------------------------

    def to_json(self) -> str:
        """Nodes with their settings and edges with their kind and condition, as JSON."""
        nodes = []
        for name, data in self.graph.nodes(data=True):
            stage = data["stage"]
            nodes.append(
                {
                    "name": name,
                    "kind": stage.kind,
                    "device": stage.device,
                    "precision": stage.precision,
                    "optimize": stage.optimize,
                    "replicas": stage.replicas if isinstance(stage.replicas, int) else stage.replicas.model_dump(),
                    "latency_budget_ms": stage.latency_budget_ms,
                    "max_iterations": stage.agent_loop.max_iterations
                    if isinstance(stage, LlmStage) and stage.agent_loop
                    else None,
                }
            )
        edges = [
            {
                "from": u,
                "to": v,
                "kind": d["kind"],
                "when": d["when"].model_dump(exclude_none=True) if d["when"] else None,
            }
            for u, v, d in self.graph.edges(data=True)
        ]
        doc = {
            "name": self.pipeline.name,
            "entry": self.pipeline.entry,
            "output": self.pipeline.output,
            "nodes": nodes,
            "edges": edges,
        }
        return json.dumps(doc, indent=2)

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: models as boxes, LLMs as rounded boxes, tools as hexagons."""
        shapes = {"model": ("[", "]"), "llm": ("([", "])"), "tool": ("{{", "}}")}
        lines = ["flowchart LR"]
        for name, data in self.graph.nodes(data=True):
            stage = data["stage"]
            left, right = shapes[stage.kind]
            lines.append(f'    {_ident(name)}{left}"{name}<br/>{stage.kind} · {stage.device}"{right}')
        for u, v, d in self.graph.edges(data=True):
            if d["kind"] == TOOL_RETURN:
                continue
            if d["kind"] == TOOL_CALL:
                rounds = self.pipeline.stage(u).agent_loop.max_iterations  # type: ignore[union-attr]
                lines.append(f'    {_ident(u)} <-. "tool loop ≤{rounds}" .-> {_ident(v)}')
            elif d["when"] is not None:
                lines.append(f'    {_ident(u)} -- "{_condition(d["when"])}" --> {_ident(v)}')
            else:
                lines.append(f"    {_ident(u)} --> {_ident(v)}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz DOT source of the graph."""
        shapes = {"model": "box", "llm": "box, style=rounded", "tool": "hexagon"}
        lines = [f'digraph "{self.pipeline.name}" {{', "  rankdir=LR;"]
        for name, data in self.graph.nodes(data=True):
            stage = data["stage"]
            lines.append(f'  "{name}" [shape={shapes[stage.kind]}, label="{name}\\n{stage.kind} · {stage.device}"];')
        for u, v, d in self.graph.edges(data=True):
            if d["kind"] == DATA:
                label = f' [label="{_condition(d["when"])}"]' if d["when"] is not None else ""
                lines.append(f'  "{u}" -> "{v}"{label};')
            elif d["kind"] == TOOL_CALL:
                lines.append(f'  "{u}" -> "{v}" [style=dashed, dir=both, label="tool loop"];')
        lines.append("}")
        return "\n".join(lines)


def _ident(name: str) -> str:
    return "s_" + name.replace("-", "_")


def _condition(when: object) -> str:
    field = when.field
    equals, one_of = when.equals, when.one_of
    return f"{field} == {equals}" if one_of is None else f"{field} in {list(one_of)}"


def graph_problems(pipeline: Pipeline) -> list[Problem]:
    """Undeclared cycles and unreachable stages, located at the flow edge or stage concerned.

    Assumes `check_references` found nothing (every name resolves).
    """
    graph = PipelineGraph(pipeline)
    problems: list[Problem] = []
    dag = graph.data_dag()
    for component in nx.strongly_connected_components(dag):
        if len(component) < 2:
            continue
        cycle = nx.find_cycle(dag.subgraph(component))
        u, v = cycle[-1][0], cycle[-1][1]
        shown = " -> ".join([e[0] for e in cycle] + [cycle[0][0]])
        index = dag.edges[u, v]["index"]
        problems.append(
            Problem(
                ("flow", index),
                f"{u} -> {v}",
                f"an edge that closes the cycle {shown}; only an llm stage's agent_loop may repeat stages",
            )
        )
    reachable = graph.reachable()
    for i, stage in enumerate(pipeline.stages):
        if stage.name not in reachable:
            what = "the output stage" if stage.name == pipeline.output else "a stage"
            problems.append(
                Problem(
                    ("stages", i, "name"),
                    stage.name,
                    f"{what} that a request can reach from the entry ({pipeline.entry}); add a flow edge into it",
                )
            )
    return problems
