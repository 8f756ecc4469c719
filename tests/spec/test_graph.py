"""The pipeline graph: nodes, edge kinds, agent-loop cycles, critical paths, exports."""

from __future__ import annotations

import json

import networkx as nx
import pytest

from hetforge.spec import SpecError, load_bytes, load_pipeline
from hetforge.spec.graph import DATA, TOOL_CALL, TOOL_RETURN, PipelineGraph
from tests.conftest import EXAMPLES, run_cli


def _pipeline(body: str):
    return load_bytes(body.encode(), check_graph=True)


DIAMOND = """
name: diamond
entry: a
output: d
stages:
  - {name: a, kind: tool, callable: "os:getcwd"}
  - {name: b, kind: tool, callable: "os:getcwd"}
  - {name: c, kind: tool, callable: "os:getcwd"}
  - {name: d, kind: tool, callable: "os:getcwd"}
flow:
  - {from: a, to: b}
  - {from: a, to: c}
  - {from: b, to: d}
  - {from: c, to: d}
"""


def test_critical_path_takes_the_slower_branch():
    g = PipelineGraph(_pipeline(DIAMOND))
    assert g.critical_path({"a": 1, "b": 5, "c": 2, "d": 1}).stages == ("a", "b", "d")
    assert g.critical_path({"a": 1, "b": 5, "c": 2, "d": 1}).length == 7
    slow_c = g.critical_path({"a": 1, "b": 5, "c": 9, "d": 1})
    assert slow_c.stages == ("a", "c", "d") and slow_c.length == 11


def test_critical_path_counts_transfer_costs():
    g = PipelineGraph(_pipeline(DIAMOND))
    path = g.critical_path({"a": 1, "b": 5, "c": 2, "d": 1}, edge_costs={("a", "c"): 10})
    assert path.stages == ("a", "c", "d") and path.length == 14


def test_agent_loop_is_the_only_allowed_cycle_and_costs_its_rounds():
    pipeline = load_pipeline(EXAMPLES / "voice_agent.yaml")
    g = PipelineGraph(pipeline)
    kinds = {(u, v): d["kind"] for u, v, d in g.graph.edges(data=True)}
    assert kinds[("listen", "agent")] == DATA
    assert kinds[("agent", "calculator")] == TOOL_CALL and kinds[("calculator", "agent")] == TOOL_RETURN
    assert not nx.is_directed_acyclic_graph(g.graph)
    assert nx.is_directed_acyclic_graph(g.data_dag())
    # 4 LLM rounds with 3 rounds of the slowest tool (clock) between them, after the encoder.
    path = g.critical_path({"listen": 30, "agent": 100, "calculator": 1, "clock": 2})
    assert path.length == 30 + 4 * 100 + 3 * 2
    assert path.stages == ("listen", "agent", "clock")


def test_conditional_branches_are_edges_with_conditions():
    g = PipelineGraph(load_pipeline(EXAMPLES / "retrieval_agent.yaml"))
    when = g.graph.edges["router", "search"]["when"]
    assert (when.field, when.equals) == ("choice", "search")
    assert g.graph.edges["search", "embed"]["when"] is None
    costs = {"router": 50, "search": 5, "embed": 20, "rerank": 40, "answer": 300}
    assert g.critical_path(costs).stages == ("router", "search", "embed", "rerank", "answer")


def test_tool_used_only_in_a_loop_is_reachable():
    pipeline = load_pipeline(EXAMPLES / "voice_agent.yaml")
    assert PipelineGraph(pipeline).reachable() == {"listen", "agent", "calculator", "clock"}


def test_cycle_through_two_stages_is_named():
    body = DIAMOND + "  - {from: d, to: b}\n"
    with pytest.raises(SpecError) as info:
        _pipeline(body)
    [diagnostic] = info.value.diagnostics
    assert "closes the cycle" in diagnostic.message and "b -> d -> b" in diagnostic.message
    assert (diagnostic.line, diagnostic.col) == (15, 5)  # the appended edge


def test_json_export_round_trips_structure():
    g = PipelineGraph(load_pipeline(EXAMPLES / "retrieval_agent.yaml"))
    doc = json.loads(g.to_json())
    assert doc["entry"] == "router" and doc["output"] == "answer"
    assert {n["name"] for n in doc["nodes"]} == {"router", "search", "embed", "rerank", "answer"}
    rerank = next(n for n in doc["nodes"] if n["name"] == "rerank")
    assert rerank["replicas"]["max_replicas"] == 4
    edge = next(e for e in doc["edges"] if e["to"] == "search")
    assert edge["when"] == {"field": "choice", "equals": "search"}


@pytest.mark.parametrize("fmt,marker", [("mermaid", "flowchart LR"), ("dot", "digraph"), ("json", '"nodes"')])
def test_cli_graph_formats(fmt, marker):
    result = run_cli("graph", str(EXAMPLES / "voice_agent.yaml"), "--format", fmt)
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert "calculator" in result.stdout


def test_cli_graph_critical_path_and_bad_costs():
    ok = run_cli("graph", str(EXAMPLES / "voice_agent.yaml"), "--cost", "listen=30", "--cost", "agent=100")
    assert ok.returncode == 0 and "critical path: listen -> agent" in ok.stderr
    bad = run_cli("graph", str(EXAMPLES / "voice_agent.yaml"), "--cost", "ghost=1")
    assert bad.returncode == 2 and 'Got "ghost=1" for --cost' in bad.stderr


def test_cli_schema_and_version():
    schema = run_cli("schema")
    assert schema.returncode == 0
    doc = json.loads(schema.stdout)
    assert doc["title"] == "hetforge pipeline"
    assert doc["additionalProperties"] is False
    assert set(doc["required"]) == {"name", "entry", "output", "stages"}
    assert all("description" in prop for prop in doc["$defs"]["ModelStage"]["properties"].values())
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("hetforge ")
