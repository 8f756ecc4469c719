"""The typed verdict and the optimization report: dicts only at the edge, and back to types from them."""

from __future__ import annotations

import json

import pytest
import torch

from hetforge.kernels.registry import Registry
from hetforge.optimizer import verdict as V
from hetforge.optimizer.correctness import compare_outputs
from hetforge.optimizer.registration import register_winner
from hetforge.optimizer.report import BASELINE, CandidateRecord, CandidateStatus, OptimizeReport
from hetforge.optimizer.static_checks import review_flags


def _rejected() -> V.Verdict:
    return V.Verdict(
        V.Status.REJECTED,
        reasons=[
            V.Reason(
                V.RejectKind.REFERENCE_FAILED,
                "reference worker failed during trial 1: timeout: no answer",
                cause=V.RejectKind.TIMEOUT,
            )
        ],
        trials=[V.TrialResult(7, float("inf"), float("inf"), False)],
        device="cpu",
        phases_s={"start": 1.5},
    )


def _accepted() -> V.Verdict:
    return V.Verdict(
        V.Status.ACCEPTED,
        flags=[f"{V.Flag.SPEEDUP}: 12.0x exceeds 10x", "static:side_stream: creates a side stream"],
        needs_review=True,
        trials=[V.TrialResult(3, 1e-6, 2e-6, True)],
        reference_ms=2.0,
        candidate_ms=0.1,
        speedup=20.0,
        spread={"rounds": 2},
        versions={"torch": "2"},
        notes=["more exact"],
        confinement={"net": True},
    )


@pytest.mark.parametrize("make", [_rejected, _accepted])
def test_a_verdict_comes_back_typed_from_its_dict_and_its_json(make):
    verdict = make()
    back = V.Verdict.from_dict(verdict.to_dict())
    assert back == verdict
    assert isinstance(back.verdict, V.Status) and all(isinstance(r.kind, V.RejectKind) for r in back.reasons)
    assert all(isinstance(t, V.TrialResult) for t in back.trials)
    assert (
        V.Verdict.from_dict(json.loads(verdict.to_json())) == verdict
    )  # an infinite error is null in JSON, inf again here


def test_a_stored_verdict_with_fewer_or_unknown_keys_still_reads():
    doc = {
        "verdict": "rejected",
        "reasons": [{"kind": "mismatch", "message": "trial 1: values differ"}],
        "future_field": 1,
    }
    verdict = V.Verdict.from_dict(doc)
    assert (
        verdict.reasons == [V.Reason(V.RejectKind.MISMATCH, "trial 1: values differ")]
        and verdict.reasons[0].cause is None
    )
    assert verdict.precision == "strict" and verdict.flags == []


def test_records_keep_the_verdict_and_the_report_json_has_it_as_a_dict():
    accepted = _accepted()
    accepted.needs_review = False
    winner = CandidateRecord("rewrites:fold_scale", "rewrites", 1, "source", accepted, status=CandidateStatus.WINNER)
    rejected = CandidateRecord(
        "llm:fuse:turn1",
        "llm",
        3,
        "prose",
        None,
        status=CandidateStatus.REJECTED,
        note="no_code: the answer has no Python code block",
        refusal=V.Reason(V.RejectKind.NO_CODE, "the answer has no Python code block"),
    )
    timed_out = CandidateRecord("recipe:compile", "recipes", 1, "src", _rejected(), status=CandidateStatus.REJECTED)
    assert winner.usable and winner.speedup == 20.0 and winner.reject_kind is None
    assert rejected.reject_kind == V.RejectKind.NO_CODE and not rejected.usable and rejected.speedup == 0.0
    assert (
        timed_out.reject_kind == V.RejectKind.REFERENCE_FAILED
        and timed_out.verdict.reasons[0].cause == V.RejectKind.TIMEOUT
    )
    report = OptimizeReport(
        task={"problem_file": "p.py"}, candidates=[winner, rejected], winner=winner, speedup_vs_eager=20.0
    )
    doc = json.loads(json.dumps(report.to_json()))
    [first, second] = doc["candidates"]
    assert set(first) == {"name", "agent", "round", "verdict", "status", "note", "spec", "speedup_vs_eager"}
    assert first["verdict"] == json.loads(json.dumps(accepted.to_dict())) and first["status"] == "winner"
    assert second["verdict"] is None and second["status"] == "rejected" and doc["winner"] == "rewrites:fold_scale"


@pytest.mark.parametrize(
    "cand, ref, kind",
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), V.RejectKind.SHAPE),
        (torch.zeros(2, dtype=torch.float64), torch.zeros(2), V.RejectKind.DTYPE),
        (torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]), V.RejectKind.NAN_INF),
        (torch.tensor([float("inf"), 1.0]), torch.tensor([0.0, 1.0]), V.RejectKind.NAN_INF),
        (torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]), V.RejectKind.MISMATCH),
        (torch.tensor([2, 1]), torch.tensor([0, 1]), V.RejectKind.MISMATCH),
    ],
)
def test_a_failed_comparison_has_the_kind_of_its_failure(cand, ref, kind):
    info = [{"plain": True, "layout": "torch.strided", "device": "cpu"}]
    reason = compare_outputs([cand], info, [ref], "trial 1", "cpu", "strict")
    assert isinstance(reason, V.Reason) and reason.kind == kind and reason.message.startswith("trial 1: output 0: "), (
        reason
    )
    assert compare_outputs([ref], info, [ref], "trial 1", "cpu", "strict") == (0.0, 0.0)


def test_static_flags_are_one_per_rule_the_first_reason_found():
    source = "import threading\nimport torch\ns = torch.cuda.Stream()\nt = torch.cuda.stream(s)\n"
    assert review_flags(source) == [
        "static:import_threading: runs work on threads the timer does not see",
        "static:side_stream: creates a side stream (work there can hide from events)",
    ]


def test_register_winner_stores_the_typed_verdict_as_a_dict_and_keeps_eager_out(tmp_path):
    registry = Registry(tmp_path / "registry.sqlite")
    verdict = _accepted()
    verdict.needs_review = False
    winner = CandidateRecord(
        "rewrites:fold_scale", "rewrites", 1, "class ModelNew: ...", verdict, status=CandidateStatus.WINNER
    )
    where = dict(fingerprint="f" * 16, device_class="cpu", precision="strict")
    stored = register_winner(OptimizeReport(task={}, candidates=[winner], winner=winner), registry, **where)
    assert stored.variant is not None and stored.variant.verdict == json.loads(json.dumps(verdict.to_dict()))
    assert V.Verdict.from_dict(stored.variant.verdict) == verdict
    eager = CandidateRecord(BASELINE, "recipes", 1, "", verdict, status=CandidateStatus.WINNER)
    kept_out = register_winner(OptimizeReport(task={}, candidates=[eager], winner=eager), registry, **where)
    assert kept_out.variant is None and "recipe:eager is" in kept_out.reason
