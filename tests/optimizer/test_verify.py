"""The verifier against an adversarial suite (each candidate exploits a weakness of a naive judge)
and against legitimate rewrites (the same math re-expressed), which must be accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetforge.core.problem import Problem
from hetforge.optimizer import verdict as V
from hetforge.optimizer.correctness import BEYOND_THE_DRAW
from hetforge.optimizer.judge import ReferenceSide, Verification, VerifyOptions, verify
from tests.conftest import run_cli

HERE = Path(__file__).resolve().parent
PROBLEMS, CANDIDATES = HERE / "problems", HERE / "candidates"
FAST = dict(trials=2, rounds=2, calls_per_round=3, warmup=1, threads=1)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def judge(problem: str, candidate: str, device: str = "cpu", **overrides) -> V.Verdict:
    options = VerifyOptions(device=device, **{**FAST, **overrides})
    return verify(Problem(file=str(PROBLEMS / f"{problem}.py")), CANDIDATES / f"{candidate}.py", options)


# candidate -> (problem, expected rejection kind, a fragment of its message, extra options)
ADVERSARIAL = {
    "raises": ("linear_relu", V.RejectKind.EXCEPTION, "kernel launch failed", {}),
    "exits": ("linear_relu", V.RejectKind.EXITED, "exited with code 0", {}),
    "segfault": ("linear_relu", V.RejectKind.CRASHED, "SIGSEGV", {}),
    "hangs": ("linear_relu", V.RejectKind.TIMEOUT, "within 3 s", {"timeout_s": 3}),
    "runaway_alloc": ("linear_relu", V.RejectKind.OUT_OF_MEMORY, "", {"memory_mb": 4096}),
    "caches_result": ("linear_relu", V.RejectKind.MISMATCH, "trial 2", {}),
    "partial_work": ("linear_relu", V.RejectKind.MISMATCH, "elements outside", {}),
    "lower_precision": ("linear_relu", V.RejectKind.MISMATCH, "atol=0.0001", {}),
    "modifies_input": ("linear_relu", V.RejectKind.MODIFIES_INPUTS, "modified input(s) [0]", {}),
    "wrong_shape": ("linear_relu", V.RejectKind.SHAPE, "shape (1, 512) != (64, 512)", {}),
    "wrong_dtype": ("linear_relu", V.RejectKind.DTYPE, "torch.float64 != torch.float32", {}),
    "tampers_with_judge": ("linear_relu", V.RejectKind.MISMATCH, "elements outside", {}),
    "tampers_with_inputs": ("linear_relu", V.RejectKind.MISMATCH, "trial 1", {}),
    "tensor_subclass": ("linear_relu", V.RejectKind.NOT_PLAIN, "Lazy", {}),
    "hardcoded_seed": ("linear_relu", V.RejectKind.MISMATCH, "re-initialized under seed 1", {}),
    "forges_reply": ("linear_relu", V.RejectKind.PROTOCOL, "", {}),
    "nan_to_num": ("log_scale", V.RejectKind.NAN_INF, "NaN at different places", {}),
    # more calls per round: the judge's noise allowance is per call, so the 10 ms sleep stands out under load
    "fakes_clock": (
        "linear_relu",
        V.RejectKind.NOT_FASTER,
        "below the required 1x",
        {"min_speedup": 1.0, "calls_per_round": 10},
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("candidate", sorted(ADVERSARIAL))
def test_adversarial_candidate_is_rejected_with_its_reason(candidate, device):
    problem, kind, fragment, extra = ADVERSARIAL[candidate]
    if device == "cuda" and candidate in ("runaway_alloc",):
        pytest.skip("the address-space limit applies to CPU workers; CUDA memory is bounded by the allocator")
    result = judge(problem, candidate, device, **extra)
    assert result.verdict == "rejected", result
    assert result.reasons and result.reasons[0].kind == kind, result.reasons
    assert fragment in result.reasons[0].message, result.reasons[0].message
    assert not result.needs_review


def test_a_shared_reference_serves_a_batch_on_the_same_seeds():
    """A supervisor's checks share one reference worker: the batch's candidates get the same correctness
    seeds and each reference output is computed once; a candidate that crashes leaves the reference up
    for the next one; a new batch gets new seeds."""
    problem = Problem(file=str(PROBLEMS / "linear_relu.py"))
    options = VerifyOptions(**FAST)
    side = ReferenceSide(problem, options)
    runs: list[dict] = []
    request = side._request
    side._request = lambda message, timeout: (
        runs.append(message) or request(message, timeout)
    )  # what reaches the worker

    def judge_shared(candidate: str) -> V.Verdict:
        return Verification(problem, CANDIDATES / f"{candidate}.py", options, shared=side).finish()

    try:
        first, crashed, second = (
            judge_shared("legit_addmm_folded_scale"),
            judge_shared("segfault"),
            judge_shared("legit_addmm_folded_scale"),
        )
        assert first.accepted and second.accepted, (first.reasons, second.reasons)
        assert crashed.reasons[0].kind == V.RejectKind.CRASHED, crashed.reasons
        assert [t.seed for t in first.trials] == [t.seed for t in second.trials]
        reference_calls = [m for m in runs if m["cmd"] == "run"]
        # trials x 2 input sets + the moves beyond the draw + the re-initialized model's
        assert len(reference_calls) == FAST["trials"] * 2 + len(BEYOND_THE_DRAW) + 1, reference_calls
        assert sum(m["cmd"] == "init" for m in runs) == 1
        side.new_batch()
        third = judge_shared("legit_addmm_folded_scale")
        assert third.accepted and {t.seed for t in third.trials}.isdisjoint(t.seed for t in first.trials)
        assert side.worker.alive()
        side.worker.kill()  # a reference that died (out of memory, say) is replaced at the next batch
        dead = side.worker
        side.new_batch()
        assert judge_shared("legit_addmm_folded_scale").accepted and side.worker is not dead and side.worker.alive()
    finally:
        side.close()
    assert not side.worker.alive()


def test_sampled_timed_outputs_still_catch_wrong_timed_calls():
    """Trusted candidates' timed outputs come back at 64 drawn positions instead of whole: a candidate
    right in the checks but wrong in 1 of 7 rows when timed is caught all the same."""
    result = judge("linear_relu", "wrong_when_timed", fetch_sample=64)
    assert result.verdict == "rejected" and result.reasons[0].kind == V.RejectKind.MISMATCH, result.reasons
    assert "timed call" in result.reasons[0].message and "of 64 elements" in result.reasons[0].message
    assert judge("linear_relu", "legit_addmm_folded_scale", fetch_sample=64).verdict == "accepted"


def test_large_inputs_get_fewer_timed_calls_per_round_and_timed_calls_are_still_checked():
    from hetforge.optimizer.timing import call_bytes as _call_bytes

    per_call = _call_bytes(json.dumps(Problem(file=str(PROBLEMS / "linear_relu.py")).to_json(), sort_keys=True))
    assert per_call == (64 * 256 + 64 * 512) * 4  # [64, 256] in, [64, 512] out, on the meta device
    accepted = judge("linear_relu", "legit_addmm_folded_scale", calls_per_round=10, timing_bytes=3 * per_call)
    assert accepted.verdict == "accepted" and accepted.spread["calls_per_round"] == 3, accepted.reasons
    floor = judge("linear_relu", "legit_addmm_folded_scale", calls_per_round=10, timing_bytes=1)
    assert floor.verdict == "accepted" and floor.spread["calls_per_round"] == 2  # never fewer than two
    wrong = judge("linear_relu", "wrong_when_timed", calls_per_round=10, timing_bytes=1)
    assert wrong.verdict == "rejected" and "timed call" in wrong.reasons[0].message, wrong.reasons


def test_large_outputs_of_trusted_candidates_are_checked_at_drawn_positions():
    """fetch_sample (hetforge's own candidates) with outputs over check_sample_above: correctness compares
    drawn positions, so a wrong output is still caught, and a right one passes."""
    wrong = judge("linear_relu", "caches_result", fetch_sample=64, check_sample_above=0)
    assert wrong.verdict == "rejected" and wrong.reasons[0].kind == V.RejectKind.MISMATCH, wrong.reasons
    assert "trial 2" in wrong.reasons[0].message and "of 64 elements" in wrong.reasons[0].message
    right = judge("linear_relu", "legit_addmm_folded_scale", fetch_sample=64, check_sample_above=0)
    assert right.verdict == "accepted", right.reasons


def test_more_exact_than_the_float32_reference_is_accepted_and_wrong_stays_wrong():
    """A mismatch with the float32 reference is settled by the reference in float64: a candidate within
    tolerance of the exact result passes (with a note, no review), one farther off is still rejected."""
    exact = judge("cancels", "legit_exact_cancellation")
    assert exact.verdict == "accepted" and not exact.needs_review, exact.reasons
    assert any(n.startswith("more exact than the float32 reference") for n in exact.notes)
    wrong = judge("cancels", "wrong_by_rounding")
    assert wrong.verdict == "rejected" and wrong.reasons[0].kind == V.RejectKind.MISMATCH, wrong.reasons


def test_fake_clock_is_caught_by_the_judges_clock():
    result = judge("linear_relu", "fakes_clock", min_speedup=1.0, calls_per_round=10)
    assert any(flag.startswith(V.Flag.HIDDEN_WORK) for flag in result.flags), result.flags
    assert result.candidate_ms >= 10.0  # it sleeps 10 ms a call, whatever its own clock says
    assert result.speedup < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_stream_work_cannot_hide_from_the_timer():
    result = judge("linear_relu", "side_stream", "cuda", rounds=3, calls_per_round=10)
    assert result.accepted and result.needs_review
    assert any(flag.startswith(V.Flag.HIDDEN_WORK) for flag in result.flags), result.flags


# candidate -> (problem, options)
LEGITIMATE = {
    "legit_addmm_folded_scale": ("linear_relu", {}),
    "legit_log_scale": ("log_scale", {}),
    "legit_pool_as_conv": ("avg_pool", {}),
    "legit_softmax_explicit": ("softmax", {}),
    "legit_drop_dead_code": ("wasteful", {}),
    "lower_precision": ("linear_relu", {"precision": "bf16"}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("candidate", sorted(LEGITIMATE))
def test_legitimate_rewrite_is_accepted(candidate, device):
    problem, extra = LEGITIMATE[candidate]
    result = judge(problem, candidate, device, **extra)
    assert result.accepted, result.reasons
    assert not result.reasons
    assert len(result.trials) == FAST["trials"] and all(t.ok for t in result.trials)
    assert len({t.seed for t in result.trials}) == len(result.trials)  # fresh inputs every trial
    assert result.speedup is not None and result.speedup > 0
    assert result.reference_ms > 0 and result.candidate_ms > 0


@pytest.mark.parametrize(
    "candidate,flag", [("calls_reference", "static:calls_reference"), ("try_fallback", "static:try_except_fallback")]
)
def test_reward_hacking_patterns_need_review(candidate, flag):
    result = judge("linear_relu", candidate)
    assert result.accepted, result.reasons
    assert result.needs_review
    assert any(f.startswith(flag) for f in result.flags), result.flags


def test_implausible_speedup_needs_review():
    # A threshold of 0 makes any measured speedup "implausible": the rule is tested, not a timing.
    result = judge("wasteful", "legit_drop_dead_code", review_speedup=0.0)
    assert result.accepted and result.needs_review
    assert any(f.startswith(V.Flag.SPEEDUP) for f in result.flags)
    unflagged = judge("wasteful", "legit_drop_dead_code", review_speedup=1e9)
    assert not any(f.startswith(V.Flag.SPEEDUP) for f in unflagged.flags)


def test_missing_model_new_is_a_load_error(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("import torch\n")
    result = verify(Problem(file=str(PROBLEMS / "linear_relu.py")), empty, VerifyOptions(**FAST))
    assert result.verdict == "rejected" and result.reasons[0].kind == V.RejectKind.LOAD_ERROR
    assert "ModelNew" in result.reasons[0].message


def test_syntax_error_is_a_load_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("class ModelNew(:\n")
    result = verify(Problem(file=str(PROBLEMS / "linear_relu.py")), broken, VerifyOptions(**FAST))
    assert result.reasons[0].kind == V.RejectKind.LOAD_ERROR and "SyntaxError" in result.reasons[0].message


def test_cli_contract_accepted_json_last_line():
    result = run_cli(
        "verify",
        str(PROBLEMS / "softmax.py"),
        str(CANDIDATES / "legit_softmax_explicit.py"),
        "--trials",
        "2",
        "--rounds",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "verdict",
        "reasons",
        "flags",
        "needs_review",
        "trials",
        "reference_ms",
        "candidate_ms",
        "speedup",
        "spread",
        "device",
        "versions",
    ):
        assert key in doc
    assert doc["verdict"] == "accepted" and doc["versions"]["torch"] == torch.__version__
    assert {"max_abs_err", "max_rel_err"} <= set(doc["trials"][0])


def test_cli_contract_rejected_and_usage():
    rejected = run_cli(
        "verify", str(PROBLEMS / "linear_relu.py"), str(CANDIDATES / "wrong_shape.py"), "--no-timing", "--json"
    )
    assert rejected.returncode == 1
    doc = json.loads(rejected.stdout.strip().splitlines()[-1])
    assert doc["verdict"] == "rejected" and doc["reasons"][0]["kind"] == V.RejectKind.SHAPE
    missing = run_cli("verify", str(PROBLEMS / "linear_relu.py"), "/nonexistent/candidate.py")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_option = run_cli(
        "verify", str(PROBLEMS / "linear_relu.py"), str(CANDIDATES / "wrong_shape.py"), "--precision", "fp8"
    )
    assert bad_option.returncode == 2


def test_spare_workers_are_fresh_processes_and_gone_afterwards():
    """Within spare_workers, verifications take pre-started workers: never one a candidate ran in before,
    still accepting good and rejecting bad candidates, and no spare outlives the block."""
    from hetforge.optimizer import sandbox

    handed: list[int] = []
    original = sandbox.SparePool.take

    def recording_take(self, name, trusted):
        worker = original(self, name, trusted)
        handed.append(worker.proc.pid)
        return worker

    sandbox.SparePool.take = recording_take
    try:
        with sandbox.spare_workers(size=2, memory_mb=VerifyOptions.memory_mb, device="cpu") as pool:
            good = verify(
                Problem(file=str(PROBLEMS / "linear_relu.py")),
                CANDIDATES / "legit_addmm_folded_scale.py",
                VerifyOptions(**FAST),
            )
            bad = verify(
                Problem(file=str(PROBLEMS / "linear_relu.py")), CANDIDATES / "caches_result.py", VerifyOptions(**FAST)
            )
            spares = list(pool.idle)
            assert pool.taken == 4  # both verifications ran on spares
    finally:
        sandbox.SparePool.take = original
    assert good.accepted and not bad.accepted
    assert len(handed) == 4 and len(set(handed)) == 4  # four different processes
    assert spares and all(not w.alive() for w in spares)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timing_rounds_keep_device_memory_cached_and_a_release_waits_for_the_driver(monkeypatch):
    """Memory handed back to the driver is scrubbed in the background, slowing memory-bound kernels timed
    meanwhile: rounds reuse the allocator's cached blocks, and only a release hands memory back, answering
    once the scrub should be over."""
    import time

    from hetforge.optimizer import worker as W

    emptied = []
    real_empty_cache = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (emptied.append(1), real_empty_cache()))
    w = W.Worker()
    problem = Problem(file=str(PROBLEMS / "linear_relu.py")).to_json()
    assert "error" not in w.init({"device": "cuda", "role": "reference", "problem": problem, "seed": 0, "threads": 1})
    for seeds in ([1, 2, 3], [4, 5, 6]):
        assert w.prepare_timing({"seeds": seeds, "warmup": 1, "flush_bytes": 64 << 20}) == {"ok": True}
        assert len(w.time({})["times_ms"]) == 3
    assert emptied == []  # two rounds, nothing handed back
    started = time.perf_counter()
    reply = w.release({})
    took = time.perf_counter() - started
    assert emptied == [1] and reply["freed_bytes"] >= 64 << 20, reply  # the flush buffer at least
    assert took >= reply["freed_bytes"] / W.SCRUB_BYTES_PER_S
