"""Stage failure policy and time limits in the pipeline walk, on plain coroutines: on_error (fail, skip, fallback
value or stage), retries, the circuit breaker on a fake clock, stage and pipeline timeouts, and every failure
reported once with its kind; then the spec's checks of these fields, located."""

from __future__ import annotations

import asyncio

import pytest

from hetforge.serving.dataflow import Breaker, PipelineError, PipelineRunner, StageError
from hetforge.spec import SpecError, load_bytes
from hetforge.spec.models import Pipeline


def _pipeline(stages: list[dict], flow: list[dict], output: str = "out", **top) -> Pipeline:
    return Pipeline.model_validate({"name": "p", "entry": "a", "output": output, "stages": stages, "flow": flow, **top})


def tool(name: str, **kw) -> dict:
    return {"name": name, "kind": "tool", "callable": "m:f", **kw}


def model(name: str, **kw) -> dict:
    return {
        "name": name,
        "kind": "model",
        "module": "m:M",
        "inputs": [{"name": "x", "shape": ["batch", 4]}],
        **kw,
    }


class Scripted:
    """Stage calls answered from per-stage scripts: a value, an exception to raise, or a number of seconds to hang."""

    def __init__(self, scripts: dict):
        self.scripts = {k: list(v) if isinstance(v, list) else v for k, v in scripts.items()}
        self.calls: list[str] = []

    async def __call__(self, stage, payload, request_id):
        self.calls.append(stage)
        script = self.scripts[stage]
        step = script.pop(0) if isinstance(script, list) else script
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, float):
            await asyncio.sleep(step)
        return step if not isinstance(step, float) else {"slept": step}

    async def stream(self, stage, payload, request_id):
        yield "x"


class Failures:
    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def __call__(self, stage: str, kind: str) -> None:
        self.seen.append((stage, kind))


def _runner(pipeline, scripts, clock=None):
    failures = Failures()
    caller = Scripted(scripts)
    kwargs = {"clock": clock} if clock else {}
    return PipelineRunner(pipeline, caller, on_failure=failures, **kwargs), caller, failures


def run(runner, request=None):
    return asyncio.run(runner.run(request if request is not None else {"q": 1}, "r1"))


BOOM = StageError("tool side: POST http://side.example/x failed: ConnectError", 500)
SIDE_FLOW = [{"from": "a", "to": "side"}, {"from": "a", "to": "out"}]


def test_a_skipped_side_branch_is_listed_with_its_error_and_its_dependants_see_a_branch_not_taken():
    pipeline = _pipeline(
        [tool("a"), tool("side", on_error="skip"), tool("after"), tool("out")],
        SIDE_FLOW + [{"from": "side", "to": "after"}],
    )
    runner, caller, failures = _runner(pipeline, {"a": {"v": 1}, "side": BOOM, "after": {"never": 1}, "out": {"ok": 1}})
    result = run(runner)
    assert result.output == {"ok": 1}
    assert set(result.skipped) == {"side", "after"} and "after" not in caller.calls
    assert result.failed == {"side": BOOM.message}
    assert failures.seen == [("side", "error")]


def test_fail_is_the_default_and_the_error_names_the_stage():
    pipeline = _pipeline([tool("a"), tool("side"), tool("out")], SIDE_FLOW)
    runner, _, failures = _runner(pipeline, {"a": {"v": 1}, "side": BOOM, "out": {"ok": 1}})
    with pytest.raises(PipelineError) as err:
        run(runner)
    assert err.value.status == 500 and err.value.stage == "side" and "http://side.example/x" in err.value.message
    assert failures.seen == [("side", "error")]


def test_a_fallback_value_or_stage_answers_for_a_failed_stage():
    value = _pipeline(
        [tool("a"), tool("out", on_error="fallback", fallback={"value": {"label": "unknown"}})],
        [{"from": "a", "to": "out"}],
    )
    runner, _, _ = _runner(value, {"a": {"v": 1}, "out": BOOM})
    result = run(runner)
    assert result.output == {"label": "unknown"} and "out" in result.failed

    stage = _pipeline(
        [tool("a"), tool("out", on_error="fallback", fallback={"stage": "spare"}), tool("spare")],
        [{"from": "a", "to": "out"}],
    )
    runner, caller, _ = _runner(stage, {"a": {"v": 1}, "out": BOOM, "spare": {"from": "spare"}})
    assert run(runner).output == {"from": "spare"} and caller.calls[-1] == "spare"


def test_retries_cover_a_model_stage_error_but_not_the_clients_error_and_tools_retry_in_their_replica():
    pipeline = _pipeline([tool("a"), model("out", retries=2)], [{"from": "a", "to": "out"}])
    runner, caller, failures = _runner(pipeline, {"a": {"x": [[0.0] * 4]}, "out": [BOOM, BOOM, {"ok": 1}]})
    assert run(runner).output == {"ok": 1} and caller.calls.count("out") == 3 and failures.seen == []

    runner, caller, failures = _runner(pipeline, {"a": {}, "out": [StageError("bad input", 422), {"ok": 1}]})
    with pytest.raises(PipelineError) as err:
        run(runner)
    assert err.value.status == 422 and caller.calls.count("out") == 1 and failures.seen == [("out", "client")]

    tools = _pipeline([tool("a"), tool("out", retries=3)], [{"from": "a", "to": "out"}])
    runner, caller, _ = _runner(tools, {"a": {}, "out": [BOOM, {"ok": 1}]})
    with pytest.raises(PipelineError):
        run(runner)
    assert caller.calls.count("out") == 1  # ToolRuntime makes the retries, each attempt with its own timeout


def test_the_circuit_opens_after_consecutive_failures_refuses_then_lets_one_trial_through():
    now = [0.0]
    pipeline = _pipeline(
        [tool("a"), tool("side", on_error="skip", circuit_breaker={"failures": 2, "reset_s": 30}), tool("out")],
        SIDE_FLOW,
        limits={"retry_after_s": 1},
    )
    runner, caller, failures = _runner(
        pipeline, {"a": {}, "out": {"ok": 1}, "side": [BOOM, BOOM, {"back": 1}, {"back": 2}]}, clock=lambda: now[0]
    )
    run(runner), run(runner)
    refused = run(runner)
    assert "circuit open" in refused.failed["side"] and caller.calls.count("side") == 2
    assert runner.breakers["side"].is_open
    now[0] = 31.0  # past reset_s: one trial call, which succeeds and closes the circuit
    assert run(runner).failed == {} and not runner.breakers["side"].is_open
    assert [k for s, k in failures.seen if s == "side"] == ["error", "error", "circuit_open"]


def test_a_failed_trial_reopens_the_circuit_and_an_open_one_answers_503_with_retry_after():
    now = [0.0]
    breaker = Breaker(failures=1, reset_s=10, clock=lambda: now[0])
    breaker.failed()
    assert not breaker.allow()
    now[0] = 10.5
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.failed()
    assert breaker.is_open and not breaker.allow() and breaker.retry_in_s() == 10

    pipeline = _pipeline(
        [tool("a"), tool("out", circuit_breaker={"failures": 1, "reset_s": 60})],
        [{"from": "a", "to": "out"}],
        limits={"retry_after_s": 3},
    )
    runner, _, _ = _runner(pipeline, {"a": {}, "out": BOOM}, clock=lambda: 0.0)
    with pytest.raises(PipelineError):
        run(runner)
    with pytest.raises(PipelineError) as err:
        run(runner)
    assert (err.value.status, err.value.kind, err.value.retry_after_s) == (503, "circuit_open", 60)


def test_an_argument_that_cannot_be_bound_is_counted_and_follows_the_policy_unless_the_request_lacks_it():
    pipeline = _pipeline(
        [
            tool("a"),
            tool("side", args={"v": "a.missing"}, on_error="fallback", fallback={"value": None}),
            tool("out", args={"q": "request.q"}),
        ],
        SIDE_FLOW,
    )
    runner, _, failures = _runner(pipeline, {"a": {"v": 1}, "side": {"never": 1}, "out": {"ok": 1}})
    result = run(runner)
    assert result.output == {"ok": 1} and "a has no field 'missing'" in result.failed["side"]
    with pytest.raises(PipelineError) as err:
        run(runner, {"other": 1})
    assert err.value.status == 400 and err.value.stage == "out"
    assert [f for f in failures.seen if f[1] == "binding"] == [
        ("side", "binding"),
        ("side", "binding"),
        ("out", "binding"),
    ]


def test_a_stage_past_its_timeout_is_504_and_so_is_a_pipeline_past_its_own():
    stage_limited = _pipeline(
        [tool("a"), tool("out", limits={"timeout_s": 0.2})], [{"from": "a", "to": "out"}], limits={"timeout_s": 60}
    )
    runner, _, failures = _runner(stage_limited, {"a": {}, "out": 30.0})
    with pytest.raises(PipelineError) as err:
        run(runner)
    assert err.value.status == 504 and err.value.stage == "out" and "limits.timeout_s" in err.value.message
    assert failures.seen == [("out", "timeout")]

    pipeline_limited = _pipeline([tool("a"), tool("out")], [{"from": "a", "to": "out"}], limits={"timeout_s": 0.2})
    runner, _, _ = _runner(pipeline_limited, {"a": {}, "out": 30.0})
    with pytest.raises(PipelineError) as err:
        run(runner)
    assert err.value.status == 504 and err.value.stage is None and "pipeline's limits.timeout_s" in err.value.message


def test_an_overloaded_stage_is_503_with_the_pipelines_retry_after_and_not_retried():
    pipeline = _pipeline(
        [tool("a"), model("out", retries=3)], [{"from": "a", "to": "out"}], limits={"retry_after_s": 7}
    )
    runner, caller, failures = _runner(pipeline, {"a": {}, "out": StageError("stage out is at capacity", 503)})
    with pytest.raises(PipelineError) as err:
        run(runner)
    assert (err.value.status, err.value.retry_after_s, err.value.kind) == (503, 7, "overload")
    assert caller.calls.count("out") == 1 and failures.seen == [("out", "overload")]


# ---------------------------------------------------------------------------------------------- the spec
BASE = """\
name: p
entry: a
output: b
stages:
  - name: a
    kind: tool
    callable: m:f
{a}
  - name: b
    kind: tool
    callable: m:f
{b}
flow:
  - {{from: a, to: b}}
"""


def _diagnostics(a: str = "", b: str = "", top: str = "") -> list[str]:
    with pytest.raises(SpecError) as err:
        load_bytes((top + BASE.format(a=a, b=b)).encode(), "p.yaml")
    return [str(d) for d in err.value.diagnostics]


@pytest.mark.parametrize(
    "a, b, top, expected",
    [
        ("    on_error: fallback", "", "", "p.yaml:5:5: "),  # no fallback given
        ("    fallback: {value: 1}", "", "", "`fallback` goes with `on_error: fallback`"),
        (
            "    on_error: fallback\n    fallback: {stage: zz}",
            "",
            "",
            'p.yaml:9:23: Got "zz" for stages[0].fallback.stage',
        ),
        ("    on_error: fallback\n    fallback: {stage: a}", "", "", "cannot be its own fallback"),
        ("", "    on_error: skip", "", 'p.yaml:12:15: Got "skip" for stages[1].on_error: fail or fallback'),
        ("    limits: {timeout_s: 500}", "", "", "at most the pipeline's limits.timeout_s (120)"),
        ("    limits: {max_tensor_elements: 5}", "", "", "applies to model stages only"),
        ("    limits: {max_queued: 0}", "", "", "limits.max_queued"),
        ("", "", "limits: {max_body_bytes: 10}\n", 'p.yaml:1:26: Got "10" for limits.max_body_bytes'),
        ("", "", "auth: {pipeline_routes: closed}\n", "auth.pipeline_routes"),
        ("    circuit_breaker: {failures: 0}", "", "", "circuit_breaker.failures"),
    ],
)
def test_failure_policy_and_limits_are_checked_with_located_errors(a, b, top, expected):
    found = _diagnostics(a, b, top)
    assert any(expected in d for d in found), found


def test_a_fallback_stage_outside_the_flow_is_reachable_and_the_defaults_are_bounded():
    text = BASE.format(a="    on_error: fallback\n    fallback: {stage: c}", b="")
    text = text.replace("flow:", "  - name: c\n    kind: tool\n    callable: m:f\nflow:")
    pipeline = load_bytes(text.encode(), "p.yaml")
    assert pipeline.stage("a").fallback.stage == "c"
    assert pipeline.limits.max_body_bytes == 16 << 20 and pipeline.limits.timeout_s == 120
    assert pipeline.stage("b").limits.max_queued == 64 and pipeline.auth.pipeline_routes == "open"


def test_a_trial_call_cut_short_by_the_requests_timeout_does_not_leave_the_circuit_stuck():
    now = [0.0]
    pipeline = _pipeline(
        [tool("a"), tool("out", circuit_breaker={"failures": 1, "reset_s": 10})],
        [{"from": "a", "to": "out"}],
        limits={"timeout_s": 0.3},
    )
    runner, caller, _ = _runner(pipeline, {"a": {}, "out": [BOOM, 30.0, {"ok": 1}]}, clock=lambda: now[0])
    with pytest.raises(PipelineError):
        run(runner)  # opens the circuit
    now[0] = 11.0
    with pytest.raises(PipelineError) as err:
        run(runner)  # the trial call hangs past the pipeline's timeout
    assert err.value.stage is None and err.value.status == 504
    assert run(runner).output == {"ok": 1} and caller.calls.count("out") == 3  # the next call is the new trial


class StreamScripted(Scripted):
    """Streamed calls from a script per attempt: ("fail", n) raises after n words, ("hang", n) hangs after n words,
    ("ok", n) yields n words."""

    def __init__(self, attempts: list[tuple[str, int]]):
        super().__init__({})
        self.attempts, self.streams = list(attempts), 0

    async def stream(self, stage, payload, request_id):
        self.streams += 1
        how, words = self.attempts.pop(0)
        for i in range(words):
            yield f"w{i} "
        if how == "fail":
            raise StageError(f"stage {stage}: engine died", 500)
        if how == "hang":
            await asyncio.sleep(60)


def _streaming(attempts, **llm_fields):
    stage = {"name": "out", "kind": "llm", "endpoint": {"base_url": "http://x/v1", "model": "m"}, **llm_fields}
    pipeline = _pipeline([tool("a"), stage], [{"from": "a", "to": "out"}])
    failures = Failures()
    caller = StreamScripted(attempts)
    caller.scripts["a"] = {"v": 1}
    return PipelineRunner(pipeline, caller, on_failure=failures), caller, failures


def _drain(runner) -> tuple[list, BaseException | None]:
    got: list = []

    async def main():
        async for event in runner.stream({"q": 1}, "r1"):
            got.append(event)

    try:
        asyncio.run(main())
    except PipelineError as err:
        return got, err
    return got, None


def test_a_streamed_call_is_retried_only_before_its_first_token():
    runner, caller, failures = _streaming([("fail", 0), ("ok", 2)], retries=2)
    got, err = _drain(runner)
    assert err is None and got == ["w0 ", "w1 "] and caller.streams == 2 and failures.seen == []

    runner, caller, failures = _streaming([("fail", 1), ("ok", 2)], retries=2)
    got, err = _drain(runner)
    assert got == ["w0 "] and caller.streams == 1  # the client had a token: no second answer
    assert (err.status, err.stage, failures.seen) == (500, "out", [("out", "error")])


def test_a_streamed_call_is_bounded_by_the_stages_timeout_and_opens_its_circuit():
    limits = {"timeout_s": 0.3}
    runner, caller, failures = _streaming([("hang", 1)], limits=limits, circuit_breaker={"failures": 1, "reset_s": 60})
    got, err = _drain(runner)
    assert got == ["w0 "] and err.status == 504 and "limits.timeout_s" in err.message
    got, err = _drain(runner)  # the timeout counted against the stage: its circuit is open now
    assert got == [] and (err.status, err.kind) == (503, "circuit_open") and caller.streams == 1
    assert failures.seen == [("out", "timeout"), ("out", "circuit_open")]
