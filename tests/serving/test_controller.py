"""The re-optimization controller's decisions with fakes for Ray (launcher, swapper) and a fake clock:
thresholds, one job per stage across restarts, rollout steps, resume and rollback after a restart,
manual approval, and the canary arm's routing (a guarded canary never returns a wrong answer)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hetforge.kernels.registry import Registry
from hetforge.serving.controller import Controller, StageInfo
from hetforge.serving.job_runner import parse_signature, write_production_problem
from hetforge.serving.jobs import JobBoard, JobSpec, queue_hint_job
from hetforge.serving.replica_metrics import StageCounters, window_of
from hetforge.serving.rollout import CanaryArm, RolloutBoard, StepStats, judge_step, plan_for
from hetforge.serving.swap_control import SwapBoard, SwapError
from hetforge.spec import load_pipeline
from tests.conftest import REPO

PIPELINE = REPO / "tests" / "data" / "reoptimize" / "pipeline.yaml"
SCORER = REPO / "tests" / "data" / "reoptimize" / "models" / "scorer.py"
ACCEPTED = {"verdict": "accepted", "needs_review": False, "speedup": 2.0}


class FakeLauncher:
    def __init__(self):
        self.launched: list[JobSpec] = []
        self.dead: list[tuple[int, str]] = []

    def launch(self, spec: JobSpec, resources):
        self.launched.append(spec)

    def failures(self):
        out, self.dead = self.dead, []
        return out


class Clock:
    """Wall-clock time that moves only when a test moves it (the boards stamp rows with time.time())."""

    def __init__(self):
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def _counters(score_calls: float, score_ms: float, prepare_calls: float = 0, prepare_ms: float = 0.1) -> dict:
    def c(calls, ms):
        return StageCounters(calls, calls * ms / 1e3, {0.001: 0.0, 0.01: calls, float("inf"): calls})

    return {"score": c(score_calls, score_ms), "prepare": c(prepare_calls or score_calls, prepare_ms)}


@pytest.fixture()
def setup(tmp_path):
    pipeline = load_pipeline(PIPELINE)
    registry = str(tmp_path / "registry.sqlite")
    from hetforge.core.problem import Problem

    fingerprint = Problem(file=str(SCORER)).load().fingerprint()
    stages = {
        "score": StageInfo("score", fingerprint, "cpu", "cpu", "strict", Problem(file=str(SCORER)), {"num_cpus": 1})
    }
    state = {"counters": _counters(0, 1.0), "swaps": [], "swap_ok": True, "published": [], "publish_ok": True}

    def make(clock=None, launcher=None):
        def swapper(stage, variant):
            state["swaps"].append((stage, variant))
            return state["swap_ok"]

        def publisher(stage, rollout):
            if not state["publish_ok"]:
                raise ConnectionError("Serve's controller did not answer")
            state["published"].append((stage, None if rollout is None else rollout["step"]))

        return Controller(
            pipeline,
            stages,
            registry,
            metrics_source=lambda: state["counters"],
            launcher=launcher or FakeLauncher(),
            swapper=swapper,
            publisher=publisher,
            clock=clock or Clock(),
            scratch=str(tmp_path / "jobs"),
        )

    return {"pipeline": pipeline, "registry": registry, "fingerprint": fingerprint, "state": state, "make": make}


def _beat_signatures(setup, counts: dict[str, int]) -> None:
    SwapBoard(setup["registry"]).heartbeat("reopt-test", "score", "r1", "reference", counts)


def test_a_hot_stage_waits_for_its_replicas_input_signatures_before_its_job(setup):
    """A job queued before the heartbeats show which inputs the stage sees would optimize for none, and a new-shape
    job would follow at once: the controller waits for them."""
    clock, launcher = Clock(), FakeLauncher()
    c = setup["make"](clock, launcher)
    c.tick()
    setup["state"]["counters"] = _counters(50, 4.0)  # hot, but no replica has reported a signature yet
    clock.t += 2
    c.tick()
    assert launcher.launched == [] and JobBoard(setup["registry"]).list("reopt-test") == []
    _beat_signatures(setup, {"float32[2,16]": 0})
    clock.t += 2
    c.tick()  # counts so far: the window's delta is still empty
    _beat_signatures(setup, {"float32[2,16]": 30})
    setup["state"]["counters"] = _counters(100, 4.0)
    clock.t += 2
    c.tick()
    assert [d.signatures for d in launcher.launched] == [("float32[2,16]",)]


def test_a_hot_stage_gets_exactly_one_job_even_across_a_restart(setup):
    clock, launcher = Clock(), FakeLauncher()
    c = setup["make"](clock, launcher)
    _beat_signatures(setup, {"float32[2,16]": 0})
    c.tick()
    setup["state"]["counters"] = _counters(50, 4.0)  # score: 4 ms of a 4.1 ms path
    _beat_signatures(setup, {"float32[2,16]": 40, "float32[1,16]": 10})
    clock.t += 2
    seen = c.tick()
    assert seen["critical_path"]["score"] > 0.9
    assert len(launcher.launched) == 1 and launcher.launched[0].signatures == ("float32[2,16]", "float32[1,16]")
    job = JobBoard(setup["registry"]).list("reopt-test")[0]
    assert job.trigger == "hot" and job.state == "running"
    restarted = setup["make"](clock, launcher)  # a new controller process: the running job is not started again
    clock.t += 2
    restarted.tick()
    restarted.tick()
    assert len(launcher.launched) == 1


def test_a_cold_stage_and_a_quiet_window_start_nothing(setup):
    clock, launcher = Clock(), FakeLauncher()
    c = setup["make"](clock, launcher)
    c.tick()
    setup["state"]["counters"] = _counters(50, 0.1, prepare_ms=5.0)  # the tool dominates: score is 2% of the path
    clock.t += 2
    assert c.tick()["critical_path"]["score"] < 0.1
    setup["state"]["counters"] = _counters(55, 0.1, prepare_calls=55, prepare_ms=5.0)
    assert launcher.launched == []


def test_lost_and_crashed_jobs_free_the_stage(setup):
    clock, launcher = Clock(), FakeLauncher()
    jobs = JobBoard(setup["registry"])
    job = jobs.queue("reopt-test", "score", "hint", "test", [], hint="try fusing")
    assert jobs.queue("reopt-test", "score", "hint", "again", []) is None  # one per stage
    c = setup["make"](clock, launcher)
    c.tick()
    assert launcher.launched[0].hint == "try fusing"
    launcher.dead.append((job.id, "RayTaskError: killed"))
    c.tick()
    assert jobs.get(job.id).state == "failed" and "killed" in jobs.get(job.id).error
    second = jobs.queue("reopt-test", "score", "hint", "test", [], hint="x")
    assert second is not None and jobs.claim(second.id)
    lost = jobs.mark_lost("reopt-test", now=clock.t + 10_000)
    assert [j.id for j in lost] == [second.id]


def _stats(n_canary=30, canary_ms=1.0, baseline_ms=2.0, errors=0, disagreements=0, failures=()):
    return StepStats(
        n_canary, n_canary, errors, disagreements, [canary_ms] * n_canary, [baseline_ms] * n_canary, list(failures)
    )


def test_judge_step_thresholds(setup):
    canary = setup["pipeline"].reoptimize.canary
    board = RolloutBoard(setup["registry"])
    rollout = board.start("reopt-test", "score", "1", plan_for(canary), True)
    now = rollout.step_started_at + 1
    assert judge_step(rollout, _stats(), canary, now).decision == "advance"
    assert judge_step(rollout, _stats(n_canary=3), canary, now).decision == "wait"
    assert judge_step(rollout, _stats(n_canary=3), canary, now + 1000).decision == "rollback"  # step timeout
    assert "slower" in judge_step(rollout, _stats(canary_ms=3.0), canary, now).reason
    assert "disagreed" in judge_step(rollout, _stats(disagreements=1, failures=["disagrees: x"]), canary, now).reason
    assert "raised" in judge_step(rollout, _stats(errors=1), canary, now).reason
    assert (
        "failed on a replica"
        in judge_step(rollout, _stats(n_canary=0, failures=["r1: cannot build"]), canary, now).reason
    )
    last = board.advance(board.advance(rollout))
    assert last.weight == 100 and judge_step(last, _stats(), canary, now).decision == "promote"


def test_rollout_steps_to_promotion_with_an_audit_trail(setup):
    clock = Clock()
    c = setup["make"](clock)
    variant = Registry(setup["registry"]).add(
        fingerprint=setup["fingerprint"],
        device_class="cpu",
        precision="strict",
        name="v",
        agent="test",
        source="",
        verdict=ACCEPTED,
        status="canary",
    )
    c.tick()
    board = RolloutBoard(setup["registry"])
    rollout = board.running("reopt-test", "score")[0]
    for step in range(3):  # shadow, 50%, 100%
        board.write_stats(rollout.id, step, "r1", _stats())
        clock.t += 1
        c.tick()
    assert setup["state"]["swaps"] == [("score", str(variant.id))]
    assert setup["state"]["published"] == [("score", 0), ("score", 1), ("score", 2), ("score", None)]  # to replicas
    assert board.get(rollout.id).state == "promoted"
    assert Registry(setup["registry"]).get(variant.id).status == "active"
    decisions = [e["decision"] for e in board.events("reopt-test")]
    assert decisions == ["start", "advance", "advance", "promote"]
    assert board.events("reopt-test")[-1]["numbers"]["speedup_p50"] == 2.0


def test_a_refused_promotion_swap_rolls_back(setup):
    setup["state"]["swap_ok"] = False
    clock = Clock()
    c = setup["make"](clock)
    variant = Registry(setup["registry"]).add(
        fingerprint=setup["fingerprint"],
        device_class="cpu",
        precision="strict",
        name="v",
        agent="test",
        source="",
        verdict=ACCEPTED,
        status="canary",
    )
    c.tick()
    board = RolloutBoard(setup["registry"])
    rollout = board.running("reopt-test", "score")[0]
    for step in range(3):
        board.write_stats(rollout.id, step, "r1", _stats())
        c.tick()
    assert (
        board.get(rollout.id).state == "rolled_back"
        and Registry(setup["registry"]).get(variant.id).status == "rejected"
    )


def test_a_rollout_step_serve_did_not_take_is_published_again(setup):
    clock = Clock()
    c = setup["make"](clock)
    Registry(setup["registry"]).add(
        fingerprint=setup["fingerprint"],
        device_class="cpu",
        precision="strict",
        name="v",
        agent="test",
        source="",
        verdict=ACCEPTED,
        status="canary",
    )
    setup["state"]["publish_ok"] = False
    assert any("not yet published" in a for a in c.tick()["actions"]) and c.unpublished == {"score"}
    assert RolloutBoard(setup["registry"]).running("reopt-test", "score")  # the rollout itself started
    setup["state"]["publish_ok"] = True
    c.tick()
    assert setup["state"]["published"] == [("score", 0)] and c.unpublished == set()


def test_a_restarted_controller_resumes_or_rolls_back_a_timed_out_step(setup):
    clock = Clock()
    Registry(setup["registry"]).add(
        fingerprint=setup["fingerprint"],
        device_class="cpu",
        precision="strict",
        name="v",
        agent="t",
        source="",
        verdict=ACCEPTED,
        status="canary",
    )
    setup["make"](clock).tick()
    board = RolloutBoard(setup["registry"])
    rollout = board.running("reopt-test", "score")[0]
    clock.t += 5
    setup["make"](clock).tick()  # within the step's time: resumed
    assert board.get(rollout.id).state == "running" and board.events("reopt-test")[-1]["decision"] == "resume"
    clock.t += 10_000
    setup["make"](clock).tick()  # the step ran out while no controller watched: rolled back
    assert board.get(rollout.id).state == "rolled_back" and "restarted" in board.get(rollout.id).reason


def test_manual_approval_then_rollout_and_hints(setup, tmp_path):
    from hetforge.serving import approvals

    registry = Registry(setup["registry"])
    jobs = JobBoard(setup["registry"])
    job = jobs.queue("reopt-test", "score", "hot", "test", ["float32[2,16]"])
    variant = registry.add(
        fingerprint=setup["fingerprint"],
        device_class="cpu",
        precision="strict",
        name="v",
        agent="rewrites",
        source="class ModelNew: pass\n",
        verdict=ACCEPTED,
        status="pending_review",
    )
    jobs.finish(job.id, "done", variant.id, {"winner": "v"})
    pipeline = setup["pipeline"]
    assert [p["variant_id"] for p in approvals.pending(setup["registry"], pipeline)] == [variant.id]
    shown = approvals.show(setup["registry"], pipeline, PIPELINE.parent, variant.id)
    assert (
        shown["stage"] == "score"
        and "+class ModelNew: pass" in shown["diff"]
        and "-class Model(nn.Module):" in shown["diff"]
    )
    setup["make"]().tick()
    assert RolloutBoard(setup["registry"]).running("reopt-test") == []  # waits for a human
    out = approvals.approve(setup["registry"], pipeline, variant.id, "alice", hint="also try bf16")
    assert out["status"] == "canary" and out["queued_job"]
    assert jobs.get(out["queued_job"]).hint == "also try bf16"
    setup["make"]().tick()
    assert RolloutBoard(setup["registry"]).running("reopt-test")[0].variant == str(variant.id)
    with pytest.raises(SwapError) as caught:
        approvals.reject(setup["registry"], pipeline, variant.id, "bob")
    assert caught.value.status == 409
    with pytest.raises(SwapError):
        queue_hint_job(setup["registry"], pipeline, "prepare", "x")  # a tool stage has no kernels


def test_window_quantiles_and_restarted_counters():
    old = StageCounters(10, 0.01, {0.001: 10, 0.01: 10, float("inf"): 10})
    new = StageCounters(30, 0.01 + 20 * 0.005, {0.001: 10, 0.01: 30, float("inf"): 30})
    w = window_of(new, old)
    assert w.calls == 20 and w.mean_ms == pytest.approx(5.0) and 1.0 < w.p50_ms <= 10.0
    assert window_of(StageCounters(5, 0.005, {float("inf"): 5}), new).calls == 5  # the counters began again


def test_guarded_canary_never_returns_a_disagreeing_answer(setup):
    board = RolloutBoard(setup["registry"])
    rollout = board.advance(
        board.start(
            "reopt-test", "score", "1", [{"mode": "shadow", "weight": 100}, {"mode": "canary", "weight": 100}], True
        )
    )
    good = torch.nn.Linear(4, 2)
    bad = lambda x: good(x) + (x[:, :1] > 0).float()  # noqa: E731 - wrong on half the inputs

    def agree(got, want):
        return "" if torch.allclose(got, want) else "differs"

    arm = CanaryArm(rollout, "variant:1", bad, agree, seed=0)
    modules = {"running": good, "variant": bad}
    with torch.no_grad():
        for _ in range(50):
            x = torch.randn(3, 4)
            out, whose = arm.call([x], lambda which, inputs: (modules[which](*inputs), 0.1))
            assert torch.allclose(out, good(x))
    stats = arm.snapshot()
    assert stats.canary_calls == 50 and 0 < stats.disagreements < 50


def test_production_problem_has_production_shapes(tmp_path):
    assert parse_signature("float32[8,16];int64[8]") == [("float32", [8, 16]), ("int64", [8])]
    from hetforge.core.problem import Problem

    path = write_production_problem(
        tmp_path, 7, "p", "score", Problem(file=str(SCORER)), ["float32[3,16]", "float32[1,16]"]
    )
    loaded = Problem(file=str(path)).load()
    assert [list(x.shape) for x in loaded.get_inputs()] == [[3, 16]]
    assert [[list(x.shape) for x in v] for v in loaded.get_variants()] == [[[1, 16]]]
    assert loaded.model_class.__name__ == "Model"
    assert Path(path).read_text().count("load_module_file") == 2


def test_approvals_cli(setup):
    import json

    from tests.conftest import run_cli

    registry = Registry(setup["registry"])
    jobs = JobBoard(setup["registry"])
    job = jobs.queue("reopt-test", "score", "hot", "test", ["float32[2,16]"])
    variant = registry.add(
        fingerprint=setup["fingerprint"],
        device_class="cpu",
        precision="strict",
        name="v",
        agent="llm",
        source="class ModelNew: pass\n",
        verdict={**ACCEPTED, "flags": ["static:fork: forks"]},
        status="pending_review",
    )
    jobs.finish(job.id, "done", variant.id, {"winner": "v"})
    reg = ["--registry", setup["registry"]]
    listed = run_cli("approvals", "list", str(PIPELINE), "--json", *reg)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout.splitlines()[-1])[0]["flags"] == ["static:fork: forks"]
    shown = run_cli("approvals", "show", str(PIPELINE), str(variant.id), *reg)
    assert (
        shown.returncode == 0
        and "--- diff against the reference ---" in shown.stdout
        and "+class ModelNew: pass" in shown.stdout
    )
    missing = run_cli("approvals", "approve", str(PIPELINE), "999", *reg)
    assert missing.returncode == 1 and "no variant with id 999" in missing.stderr
    rejected = run_cli(
        "approvals", "reject", str(PIPELINE), str(variant.id), "--by", "carol", "--hint", "fuse the probe away", *reg
    )
    assert rejected.returncode == 0, rejected.stderr
    doc = json.loads(rejected.stdout.splitlines()[-1])
    assert doc["status"] == "rejected" and jobs.get(doc["queued_job"]).hint == "fuse the probe away"
    assert registry.get(variant.id).approver == "carol"
    busy = run_cli("approvals", "guide", str(PIPELINE), "score", "--hint", "again", *reg)
    assert busy.returncode == 1 and "already has a job" in busy.stderr


def test_regression_waits_for_a_window_after_the_rollout_then_starts_a_job(setup):
    clock, launcher = Clock(), FakeLauncher()
    c = setup["make"](clock, launcher)
    jobs = JobBoard(setup["registry"])
    first = jobs.queue("reopt-test", "score", "hot", "test", ["float32[2,16]"])
    jobs.finish(first.id, "done")
    c.baseline_p50["score"] = 2.0
    c.settled_at["score"] = clock.t  # a rollout just ended
    _beat_signatures(setup, {"float32[2,16]": 1})
    c.tick()
    setup["state"]["counters"] = _counters(
        50, 8.0
    )  # p50 in the 1-10 ms bucket, about 5 ms: 2.5x the 2 ms after the rollout
    c.spec = c.spec.model_copy(update={"regression": 1.5, "window_s": 4.0})
    clock.t += 2
    c.tick()
    assert launcher.launched == []  # the window still mixes calls from before the rollout's end
    clock.t += 10
    setup["state"]["counters"] = _counters(100, 8.0)
    _beat_signatures(setup, {"float32[2,16]": 60})
    c.tick()
    assert [d.signatures for d in launcher.launched] == [("float32[2,16]",)]
    assert jobs.list("reopt-test")[-1].trigger == "regression"


def test_job_summary_reads_reject_kinds_from_verdicts_not_notes():
    from hetforge.optimizer.report import CandidateRecord, OptimizeReport
    from hetforge.optimizer.verdict import Verdict
    from hetforge.serving.job_runner import UNVERIFIED, summarize

    def rejected(name, kind):
        verdict = {
            "verdict": "rejected",
            "needs_review": False,
            "reasons": [{"kind": kind, "message": "timeout: worded like another kind"}],
        }
        return CandidateRecord(
            name,
            "test",
            1,
            "",
            Verdict.from_dict(verdict),
            status="rejected",
            note="mismatch: not what the verdict says",
        )

    winner = CandidateRecord("w", "test", 1, "", Verdict.from_dict({**ACCEPTED, "reasons": []}), status="winner")
    refused = CandidateRecord(
        "llm:x", "llm", 2, "", None, status="rejected", note="no_code: the answer has no Python code block"
    )
    report = OptimizeReport(
        task={},
        candidates=[winner, rejected("a", "timeout"), rejected("b", "timeout"), rejected("c", "nan_inf"), refused],
        winner=winner,
        speedup_vs_eager=2.0,
    )
    summary = summarize(report)
    assert summary["rejected"] == {"timeout": 2, "nan_inf": 1, UNVERIFIED: 1} and summary["accepted"] == 1
    assert [row["reject_kind"] for row in summary["leaderboard"]] == [None, "timeout", "timeout", "nan_inf", UNVERIFIED]
