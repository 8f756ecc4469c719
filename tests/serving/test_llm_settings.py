"""Engine-settings variants of LLM stages without an engine: the search space, agreement, recorded traffic, the
canary arm's routing with fake engines, the replica target's refusals, the controller's LLM jobs and the
planner's measured LLM profile. The real engine runs in tests/serving/test_reoptimize_llm.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from hetforge.kernels.registry import Registry
from hetforge.planners.devices import local_inventory
from hetforge.planners.plan import build_plan
from hetforge.planners.profiles import LlmMeasurement, ProfileCache, llm_fingerprint, llm_profile
from hetforge.serving.llm_settings import (
    ENGINE_SETTINGS,
    LlmCanaryArm,
    LlmEngineTarget,
    TrafficRecorder,
    disagreement,
    read_traffic,
    search_space,
)
from hetforge.serving.rollout import Rollout
from hetforge.serving.stage_runtime import SwapRefused
from hetforge.spec.load import load_pipeline
from tests.conftest import REPO

PIPELINE = REPO / "tests" / "data" / "reoptimize_llm" / "pipeline.yaml"
GREEDY = {"max_tokens": 8, "temperature": 0, "top_p": 1.0, "stop": None, "seed": None, "structured": None}
SAMPLED = {**GREEDY, "temperature": 0.8}


def _call(inflight: int = 1, structured=None) -> dict:
    return {"ids": [1, 2, 3], "sampling": {**GREEDY, "structured": structured}, "inflight": inflight, "at": 0.0}


def test_search_space_lifts_a_batch_limit_below_the_recorded_concurrency_first():
    space = search_space({"max_num_seqs": 1, "enable_prefix_caching": True}, "strict", [_call(4)])
    assert space[0].name == "max_num_seqs=16" and space[0].settings == {"max_num_seqs": 16} and space[0].exact
    assert all(c.precision == "strict" for c in space)  # no fp8 KV cache under a strict stage
    names = [c.name for c in search_space({"max_num_seqs": 64}, "strict", [_call(4)])]
    assert not any(n.startswith("max_num_seqs") for n in names) and "prefix_caching=on" in names


def test_search_space_tries_ngram_drafts_for_json_answers_and_fp8_kv_only_under_a_loose_policy():
    json_calls = [_call(1, {"json": {"type": "object"}})]
    assert "ngram_speculation" in [c.name for c in search_space({}, "strict", json_calls)]
    assert "ngram_speculation" not in [c.name for c in search_space({}, "strict", [_call()])]
    loose = {c.name: c for c in search_space({}, "bf16", [_call()])}
    assert not loose["kv_cache_dtype=fp8"].exact and loose["kv_cache_dtype=fp8"].precision == "bf16"


def test_disagreement_exact_and_loose():
    assert disagreement("a b c", "a b c", True) == ""
    assert "differs" in disagreement("a b d", "a b c", True)
    prefix = "x" * 16
    assert disagreement(prefix + "tail one", prefix + "tail two", False) == ""
    assert "differ" in disagreement("y" + prefix, prefix + "z", False)


def test_recorded_traffic_is_written_and_read_back(tmp_path):
    recorder = TrafficRecorder(tmp_path / "traffic", "replica-1")
    recorder.add([1, 2], GREEDY, 0)
    recorder.add([3, 4, 5], SAMPLED, 2)
    recorder.write()
    calls = read_traffic(tmp_path / "traffic")
    assert [c["ids"] for c in calls] == [[1, 2], [3, 4, 5]] and calls[1]["inflight"] == 3
    assert [c["ids"] for c in recorder.greedy()] == [[1, 2]]  # only greedy calls are compared between engines
    assert sum(recorder.snapshot().values()) == 2
    assert read_traffic(tmp_path / "nothing") == []


class _FakeRuntime:
    """generate_on answers from a table per engine; an engine named 'broken' raises."""

    def __init__(self, answers: dict[str, str]):
        self.engine, self.answers, self.calls = "running", answers, []

    async def generate_on(self, engine, ids, doc, request_id=""):
        self.calls.append(engine)
        if engine == "broken":
            raise RuntimeError("engine refused the prompt")
        return self.answers[engine], "stop", {}


def _rollout(mode: str, weight: float = 100.0, guard: bool = True) -> Rollout:
    plan = [{"mode": mode, "weight": weight}]
    return Rollout(1, "p", "chat", "7", None, plan, guard, 0, "running", None, time.time(), time.time())


def test_canary_arm_shadow_compares_and_answers_with_the_running_engine():
    runtime = _FakeRuntime({"running": "same", "variant": "other"})
    arm = LlmCanaryArm(_rollout("shadow"), "variant:7", "variant", exact=True)
    for _ in range(3):
        assert asyncio.run(arm.acall(runtime, [1], GREEDY, "r"))[0] == "same"
    stats = arm.snapshot()
    assert stats.disagreements == 3 and stats.canary_calls == 3 and "differs" in stats.failures[0]
    # sampled calls cannot be compared: timed, never counted as disagreements
    arm2 = LlmCanaryArm(_rollout("shadow"), "variant:7", "variant", exact=True)
    asyncio.run(arm2.acall(runtime, [1], SAMPLED, "r"))
    assert arm2.snapshot().disagreements == 0


def test_guarded_canary_serves_the_variant_only_when_it_agrees_and_counts_its_errors():
    agreeing = _FakeRuntime({"running": "same", "variant": "same"})
    arm = LlmCanaryArm(_rollout("canary"), "variant:7", "variant", exact=True)
    assert asyncio.run(arm.acall(agreeing, [1], GREEDY, "r"))[0] == "same"
    assert sorted(agreeing.calls) == ["running", "variant"]
    broken = _FakeRuntime({"running": "ok"})
    arm = LlmCanaryArm(_rollout("canary"), "variant:7", "broken", exact=True)
    assert asyncio.run(arm.acall(broken, [1], GREEDY, "r"))[0] == "ok"
    assert arm.snapshot().canary_errors == 1


def _target(tmp_path, precision: str = "strict") -> tuple[LlmEngineTarget, Registry]:
    registry = Registry(str(tmp_path / "registry.sqlite"))
    runtime = SimpleNamespace(stage=SimpleNamespace(name="chat"), arm=None, loop=None, recorder=None)
    return LlmEngineTarget(runtime, "p", registry, "llm-fp", "cpu", precision), registry


def _add(registry: Registry, recipe: dict, precision: str = "strict", status: str = "active", fingerprint="llm-fp"):
    return registry.add(
        fingerprint=fingerprint,
        device_class="cpu",
        precision=precision,
        name="v",
        agent="test",
        source="s",
        verdict={"verdict": "accepted", "needs_review": False, "speedup": 2.0},
        recipe=recipe,
        status=status,
    )


def test_the_replica_target_refuses_what_it_cannot_run(tmp_path):
    target, registry = _target(tmp_path)
    kernel = _add(registry, {"kind": "module"})
    with pytest.raises(SwapRefused, match="not engine settings"):
        target._settings(kernel.id, ("active",))
    fp8 = _add(registry, {"kind": ENGINE_SETTINGS, "settings": {"kv_cache_dtype": "fp8"}, "exact": False}, "bf16")
    with pytest.raises(SwapRefused, match="precision bf16"):
        target._settings(fp8.id, ("active",))
    other = _add(registry, {"kind": ENGINE_SETTINGS, "settings": {}}, fingerprint="llm-other")
    with pytest.raises(SwapRefused, match="another LLM stage"):
        target._settings(other.id, ("active",))
    waiting = _add(registry, {"kind": ENGINE_SETTINGS, "settings": {"max_num_seqs": 8}}, status="canary")
    with pytest.raises(SwapRefused, match="canary, not active"):
        target._settings(waiting.id, ("active",))
    assert target._settings(waiting.id, ("canary", "active")) == (f"variant:{waiting.id}", {"max_num_seqs": 8}, True)
    assert target._settings("reference", ("active",)) == ("reference", {}, True)
    # no call reached the replica: there is nothing to check new settings on
    with pytest.raises(SwapRefused, match="no call has reached"):
        target._on_loop(asyncio.sleep(0))


def test_the_controller_launches_an_engine_settings_job_for_a_hot_llm_stage(tmp_path):
    from hetforge.serving.controller import Controller, controller_stages

    pipeline = load_pipeline(PIPELINE)
    registry_path = str(tmp_path / "registry.sqlite")
    placement = {"chat": {"device": "cpu", "device_class": "cpu", "ray_actor_options": {}}}
    stages = controller_stages(pipeline, PIPELINE.parent, placement, registry_path)
    info = stages["chat"]
    assert info.kind == "llm" and info.fingerprint == llm_fingerprint(pipeline.stage("chat"), PIPELINE.parent)
    promoted = _add(Registry(registry_path), {"kind": ENGINE_SETTINGS, "settings": {"max_num_seqs": 8}})
    promoted_fp = Registry(registry_path)
    promoted_fp.store.execute("UPDATE variants SET fingerprint = ? WHERE id = ?", (info.fingerprint, promoted.id))
    launched = []
    launcher = SimpleNamespace(launch=lambda spec, resources: launched.append(spec), failures=lambda: [])
    from hetforge.serving.replica_metrics import StageCounters

    clock = [1000.0]
    calls = [0]

    def source():
        calls[0] += 50
        return {
            "chat": StageCounters(count=calls[0], sum_s=calls[0] * 0.5, buckets={1.0: calls[0], float("inf"): calls[0]})
        }

    controller = Controller(
        pipeline,
        stages,
        registry_path,
        metrics_source=source,
        launcher=launcher,
        swapper=lambda s, v: True,
        clock=lambda: clock[0],
    )
    controller.tick()
    controller.tick()
    assert not launched  # no recorded calls in the replicas' heartbeats yet: nothing for a job to replay
    from hetforge.serving.swap_control import SwapBoard

    SwapBoard(registry_path).heartbeat("llm-reopt", "chat", "r1", "reference", {"prompt_tokens<=64": 5})
    controller.tick()
    SwapBoard(registry_path).heartbeat("llm-reopt", "chat", "r1", "reference", {"prompt_tokens<=64": 60})
    for _ in range(3):
        controller.tick()
        clock[0] += 2
    assert len(launched) == 1, controller.last
    spec = launched[0]
    assert spec.kind == "llm" and spec.problem == {} and spec.llm["fingerprint"] == info.fingerprint
    assert spec.llm["settings"] == {"max_num_seqs": 8}  # the settings the replicas run now
    assert spec.llm["traffic"].endswith("traffic/llm-reopt/chat")
    assert spec.signatures == ("prompt_tokens<=64",)


def test_the_planner_counts_a_measured_llm_stage_by_ttft_tpot_and_tokens(tmp_path):
    m = LlmMeasurement(
        ttft_ms=30.0,
        tpot_ms=5.0,
        queue_ms=2.0,
        prompt_tokens=40,
        output_tokens=11,
        requests=8,
        source="replay of 8 recorded calls",
    )
    assert m.latency_ms == 2.0 + 30.0 + 5.0 * 10
    profile = llm_profile("chat", "cpu", m, 1, 1)
    assert profile.source == "measured" and profile.latency_ms == 82.0 and "replay of 8" in profile.detail
    pipeline = load_pipeline(PIPELINE)
    cache = ProfileCache(tmp_path / "profiles.sqlite")
    assert cache.get_llm("nothing", "cpu") is None
    before = build_plan(pipeline, PIPELINE.parent, local_inventory(), "latency", cache).stages["chat"]
    assert before.source == "estimated"
    cache.put_llm(llm_fingerprint(pipeline.stage("chat"), PIPELINE.parent), before.device, m)
    after = build_plan(pipeline, PIPELINE.parent, local_inventory(), "latency", cache).stages["chat"]
    assert after.source == "measured" and after.latency_ms == 82.0 and "TTFT 30.00 ms" in after.detail


def test_the_replicas_metrics_give_the_stage_a_measurement_with_the_queue_taken_out_of_ttft():
    from hetforge.serving.llm_metrics import measurement_of

    def sample(name, value, stage="chat"):
        return SimpleNamespace(name=name, value=value, labels={"pipeline": "p", "stage": stage, "replica": "r"})

    samples = [
        sample("hetforge_llm_time_to_first_token_seconds_count", 4),
        sample("hetforge_llm_time_to_first_token_seconds_sum", 0.4),  # 100 ms a call, from arrival
        sample("hetforge_llm_queue_time_seconds_count", 4),
        sample("hetforge_llm_queue_time_seconds_sum", 0.12),  # 30 ms of it queued
        sample("hetforge_llm_time_per_output_token_seconds_count", 4),
        sample("hetforge_llm_time_per_output_token_seconds_sum", 0.02),
        sample("hetforge_llm_generation_tokens_total", 40),
        sample("hetforge_llm_prefix_cache_queries_tokens_total", 200),
        sample("hetforge_llm_generation_tokens_total", 999, stage="other"),
    ]
    m = measurement_of(samples, "chat")
    assert (m.queue_ms, m.ttft_ms, m.tpot_ms) == (30.0, 70.0, 5.0)
    assert (m.output_tokens, m.prompt_tokens, m.requests) == (10.0, 50.0, 4)
    assert m.latency_ms == 30.0 + 70.0 + 5.0 * 9
    assert measurement_of(samples, "absent") is None
