"""Tool hops: the planner puts a light tool in its caller's process under `auto`, follows the YAML otherwise, and
keeps tools that need isolation (heavy imports, resources, long compute) in replicas of their own."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from hetforge.planners import devices
from hetforge.planners.plan import build_plan
from hetforge.planners.tool_hops import DEFAULT_HOP_MS, HopCost, calls_per_request, load_hop_cost, save_hop_cost
from hetforge.spec import SpecError, load_pipeline

MEASURED = HopCost(2.0, "measured", "test")
LIGHT = "def lookup(order_id: str) -> dict:\n    return {'order_id': order_id, 'status': 'shipped'}\n"
HEAVY = "import json\nfrom torch import nn\n\n" + LIGHT


def _pipeline(tmp_path: Path, tool: str, source: str = LIGHT) -> Path:
    """An agent (an endpoint LLM with a loop of 5 calls) that owns one tool stage; `tool` is its YAML fields."""
    (tmp_path / "tools.py").write_text(source)
    doc = f"""
name: hops
entry: agent
output: agent
stages:
  - name: agent
    kind: llm
    endpoint: {{base_url: "http://127.0.0.1:1/v1", model: x}}
    agent_loop: {{tools: [lookup], max_iterations: 5}}
  - name: lookup
    kind: tool
    callable: tools.py:lookup
{tool}
"""
    path = tmp_path / "pipeline.yaml"
    path.write_text(doc)
    return path


def _hop(tmp_path: Path, tool: str = "", source: str = LIGHT, hop: HopCost = MEASURED):
    path = _pipeline(tmp_path, tool, source)
    plan = build_plan(load_pipeline(path), tmp_path, devices.local_inventory(), hop=hop)
    return plan.stages["lookup"]


def test_a_light_tool_goes_inline_under_auto(tmp_path):
    stage = _hop(tmp_path)
    assert stage.hop == "inline"
    assert "4 x 2.00 ms hop (measured)" in stage.hop_reason  # 5 LLM calls: 4 tool rounds at most
    assert _hop(tmp_path, "    placement: auto").hop == "inline"
    plan = build_plan(load_pipeline(_pipeline(tmp_path, "")), tmp_path, devices.local_inventory(), hop=MEASURED)
    assert plan.to_json()["stages"]["lookup"]["hop"] == "inline"  # `hetforge plan --json` shows it


def test_the_yaml_wins_over_the_cost_model(tmp_path):
    separate = _hop(tmp_path, "    placement: separate")
    assert separate.hop == "separate" and "placement: separate in the YAML" in separate.hop_reason
    # inline as written even where auto would keep it apart
    inline = _hop(tmp_path, "    placement: inline\n    latency_budget_ms: 5000", HEAVY)
    assert inline.hop == "inline"


@pytest.mark.parametrize(
    ("fields", "source", "why"),
    [
        ("", HEAVY, "imports torch"),
        ("    replicas: 2", LIGHT, "its own replicas"),
        ("    limits: {max_queued: 1}", LIGHT, "limits.max_queued"),
        ("    device: cpu-big", LIGHT, "device cpu-big"),
        ("    latency_budget_ms: 500", LIGHT, "isolation kept"),
    ],
)
def test_a_tool_that_needs_isolation_stays_separate_under_auto(tmp_path, fields, source, why):
    if "cpu-big" in fields:  # the stage's decision is tested, not the inventory: decide() on the spec alone
        from hetforge.planners.tool_hops import decide

        pipeline = load_pipeline(_pipeline(tmp_path, fields, source))
        decision = decide(pipeline.stage("lookup"), pipeline, tmp_path, MEASURED, 1.0)
        assert decision.placement == "separate" and why in decision.reason
        return
    stage = _hop(tmp_path, fields, source)
    assert stage.hop == "separate" and why in stage.hop_reason


def test_a_faster_hop_keeps_more_tools_separate(tmp_path):
    # a 30 ms tool: worth inlining when the hop is 5 ms, not when it is 1 ms
    assert _hop(tmp_path, "    latency_budget_ms: 30", hop=HopCost(5.0, "measured", "")).hop == "inline"
    assert _hop(tmp_path, "    latency_budget_ms: 30", hop=HopCost(1.0, "measured", "")).hop == "separate"


def test_inline_with_replicas_is_refused_where_it_is_written(tmp_path):
    path = _pipeline(tmp_path, "    placement: inline\n    replicas: 3")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    text = str(info.value)
    assert f"{path}:" in text and "placement: inline" in text and "replicas" in text


def test_the_measured_hop_is_cached_per_host(tmp_path):
    cache = tmp_path / "hop_cost.json"
    assert load_hop_cost(cache) == HopCost(DEFAULT_HOP_MS, "estimated", load_hop_cost(cache).detail)
    save_hop_cost(1.25, 200, {"ray": "x"}, cache)
    got = load_hop_cost(cache)
    assert got.ms == 1.25 and got.source == "measured" and "200" in got.detail
    doc = json.loads(cache.read_text())
    cache.write_text(json.dumps({**doc, "host": socket.gethostname() + "-elsewhere"}))
    assert load_hop_cost(cache).source == "estimated"  # another machine's figure does not count here


def test_calls_per_request_counts_the_loop_rounds_and_the_flow(tmp_path):
    pipeline = load_pipeline(_pipeline(tmp_path, ""))
    assert calls_per_request(pipeline, "lookup") == 4


def test_a_separate_tools_hops_count_in_the_predicted_latency(tmp_path):
    def predicted(fields: str) -> float:
        path = _pipeline(tmp_path, fields)
        return build_plan(load_pipeline(path), tmp_path, devices.local_inventory(), hop=MEASURED).predicted_latency_ms

    # the loop's 4 tool rounds each pay the 2 ms hop when the tool is separate
    assert predicted("    placement: separate") - predicted("    placement: inline") == pytest.approx(4 * 2.0)


def test_hetforge_plan_prints_each_tools_hop(tmp_path):
    from tests.conftest import run_cli

    path = _pipeline(tmp_path, "    placement: separate")
    home = tmp_path / "home"
    save_hop_cost(3.0, 50, path=home / "planner" / "hop_cost.json")  # as `--measure-hops` leaves it
    result = run_cli("plan", str(path), env={"HETFORGE_HOME": str(home)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tool lookup: separate (placement: separate in the YAML)" in " ".join(result.stdout.split())
    light = run_cli("plan", str(_pipeline(tmp_path, "")), "--json", env={"HETFORGE_HOME": str(home)}, timeout=300)
    stage = json.loads(light.stdout.strip().splitlines()[-1])["stages"]["lookup"]
    assert stage["hop"] == "inline" and "3.00 ms hop (measured)" in stage["hop_reason"]
