"""An LLM stage's engine settings re-optimized unattended, against the real parts: Ray Serve on a local instance,
one vLLM CPU replica of the tiny model (tests/data/reoptimize_llm/pipeline.yaml), the controller, its job as a
Ray task, SQLite.

Outcomes are forced by mechanisms, never by timings: the stage's engine runs one sequence at a time
(`max_num_seqs: 1`) while four clients call it, so calls queue behind each other and the job's replay of the
recorded traffic finds a batch limit that lets them run together (its interval must claim it faster, as for
kernel variants); the rollout's latency ratios are set loose, so it judges answers and failures. The injected
variant that must be rolled back cannot take the recorded prompts (`max_model_len: 16`), so the replica's
check on recorded calls fails. Throughout, every call answers 200, and each prompt always gets the same text
(temperature 0; a canary's differing answer would be replaced by the running engine's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from tests.conftest import REPO, serving  # noqa: E402

PIPELINE = REPO / "tests" / "data" / "reoptimize_llm" / "pipeline.yaml"
NAME, STAGE = "llm-reopt", "chat"
PROMPTS = [f"Where is parcel {n}? It left the depot on day {n % 7} and the carrier is late." for n in range(8)]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


class Load:
    """Clients calling the pipeline until stopped; every answer must be 200 and, per prompt, always the same."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.sent, self.failed = url, 0, 0
        self.problems: list[str] = []
        self.answers: dict[str, set[str]] = {p: set() for p in PROMPTS}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=300) as client:
            n = i
            while not self._stop.is_set():
                prompt = PROMPTS[n % len(PROMPTS)]
                n += 1
                try:
                    reply = client.post(f"{self.url}/v1/pipelines/{NAME}/run", json={"input": prompt})
                except httpx.HTTPError as err:
                    self.failed += 1
                    self.problems.append(f"{type(err).__name__}: {err}")
                    continue
                self.sent += 1
                if reply.status_code != 200:
                    self.failed += 1
                    self.problems.append(reply.text[:300])
                    continue
                self.answers[prompt].add(reply.json()["output"]["text"])

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def check(self) -> None:
        assert self.sent > 0
        assert self.failed == 0, self.problems[:5]
        differing = {p: a for p, a in self.answers.items() if len(a) > 1}
        assert not differing, differing


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_llm.py")], check=True, capture_output=True, timeout=300
    )
    home = tmp_path_factory.mktemp("home")
    with serving(PIPELINE, home, HETFORGE_RAY_TMP=f"/tmp/hf-ray-llmre-{os.getpid()}") as record:
        load = Load(record.url)
        try:
            yield {"url": record.url, "registry": str(home / "registry.sqlite"), "load": load}
        finally:
            load.stop()


def _events(served, after: int = 0) -> list[dict]:
    from hetforge.serving.rollout import RolloutBoard

    return [e for e in RolloutBoard(served["registry"]).events(NAME, limit=1000) if e["id"] > after]


def _wait_for(served, decision: str, after: int, timeout_s: float, variant: str | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in _events(served, after):
            if e["decision"] == decision and (variant is None or e["variant"] == variant):
                return e
        time.sleep(1)
    raise AssertionError(
        f"no {decision} event within {timeout_s} s; events: "
        + "; ".join(f"{e['decision']} {e['variant']} {e['reason'][:200]}" for e in _events(served, after))
    )


def _settle(served, timeout_s: float = 900) -> None:
    """Until the stage has no job queued or running, no rollout running and no variant waiting for one (a job
    the controller queued on its own, for a prompt-length bucket it had not seen, runs its course first)."""
    from hetforge.kernels.registry import Registry
    from hetforge.serving.jobs import JobBoard
    from hetforge.serving.rollout import RolloutBoard

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = JobBoard(served["registry"]).list(NAME, STAGE, states=("queued", "running"))
        rolling = RolloutBoard(served["registry"]).running(NAME, STAGE)
        waiting = Registry(served["registry"]).list(status="canary")
        if not busy and not rolling and not waiting:
            return
        time.sleep(2)
    raise AssertionError(f"the stage did not settle within {timeout_s} s")


def _stage_status(served) -> dict:
    return httpx.get(f"{served['url']}/v1/pipelines/{NAME}/status", timeout=60).json()["stages"][STAGE]


def test_the_engine_settings_job_finds_a_batch_limit_and_the_rollout_promotes_it(served):
    job = _wait_for(served, "job", 0, 180)
    assert job["stage"] == STAGE and job["numbers"]["trigger"] == "hot", job
    done = _wait_for(served, "job_done", 0, 600)
    assert done["numbers"]["outcome"] == "registered", json.dumps(done, default=str)[:4000]
    assert done["numbers"]["winner"].startswith("max_num_seqs="), done["numbers"]
    assert done["numbers"]["claim"] == "faster"
    variant = str(done["numbers"]["variant_id"])
    from hetforge.kernels.registry import Registry

    registered = Registry(served["registry"]).get(int(variant))
    assert registered.recipe["kind"] == "engine_settings" and registered.recipe["settings"]["max_num_seqs"] >= 4
    start = _wait_for(served, "start", 0, 60, variant)
    promote = _wait_for(served, "promote", start["id"], 600, variant)
    advances = [e for e in _events(served, start["id"]) if e["decision"] == "advance" and e["variant"] == variant]
    assert [e["numbers"]["mode"] for e in advances] == ["shadow", "canary"]
    assert promote["numbers"]["disagreements"] == 0
    assert Registry(served["registry"]).get(int(variant)).status == "active"
    status = _stage_status(served)
    assert status["active_variant"] == f"variant:{variant}", status
    assert status["engine_settings"]["max_num_seqs"] == registered.recipe["settings"]["max_num_seqs"]
    # the job's baseline replay, or since then the replicas' metrics, is the stage's LLM profile for the planner
    from hetforge.planners.devices import local_inventory
    from hetforge.planners.plan import build_plan
    from hetforge.planners.profiles import ProfileCache
    from hetforge.spec.load import load_pipeline

    plan = build_plan(load_pipeline(PIPELINE), PIPELINE.parent, local_inventory(), "latency", ProfileCache())
    chat = plan.stages[STAGE]
    assert chat.source == "measured" and "TTFT" in chat.detail, chat
    assert "replay of" in chat.detail or "metrics of the replicas" in chat.detail, chat
    served["promoted"] = variant
    served["load"].check()


def test_settings_that_fail_on_recorded_calls_are_rolled_back_and_the_promoted_ones_stay(served):
    from hetforge.kernels.registry import Registry
    from hetforge.planners.profiles import llm_fingerprint
    from hetforge.spec.load import load_pipeline

    promoted = served.get("promoted")
    if promoted is None:
        pytest.skip("needs the promotion of the test before")
    registry = Registry(served["registry"])
    _settle(served)
    before = _stage_status(served)  # the promoted settings, or a later job's if one was promoted meanwhile
    settings = before["engine_settings"]
    mark = _events(served)[-1]["id"]
    pipeline = load_pipeline(PIPELINE)
    bad = registry.add(
        fingerprint=llm_fingerprint(pipeline.stage(STAGE), PIPELINE.parent),
        device_class="cpu",
        precision="strict",
        name="engine:too-short-context",
        agent="test",
        source="engine settings that cannot take the recorded prompts",
        verdict={"verdict": "accepted", "needs_review": False, "speedup": 2.0},
        recipe={"kind": "engine_settings", "settings": {**settings, "max_model_len": 16}, "exact": True},
        status="canary",
    )
    rollback = _wait_for(served, "rollback", mark, 400, str(bad.id))
    assert "failed on a replica" in rollback["reason"] and "recorded calls" in rollback["reason"], rollback
    assert registry.get(bad.id).status == "rejected"
    status = _stage_status(served)
    assert before["active_variant"].startswith("variant:"), before
    assert status["active_variant"] == before["active_variant"] and status["engine_settings"] == settings, status
    served["load"].check()


def test_a_swap_to_the_reference_restores_the_specs_settings(served):
    from hetforge.serving.swap_control import request_swap
    from hetforge.spec.load import load_pipeline

    if served.get("promoted") is None:
        pytest.skip("needs the promotion of the first test")
    _settle(served)
    result = request_swap(served["registry"], load_pipeline(PIPELINE), STAGE, "reference", 1, 300)
    assert result["ok"], result
    status = _stage_status(served)
    assert status["active_variant"] == "reference" and status["engine_settings"] == {}, status
    served["load"].check()
