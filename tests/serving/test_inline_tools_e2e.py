"""Tool hops on a real Ray Serve deployment (tests/data/serving/inline_tools.yaml): the inline tool has no deployment
of its own, answers from the ingress's process with its stage's latency metric and status, and its failure reads as
a separate tool's does."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from tests.conftest import REPO, serving  # noqa: E402

PIPELINE = REPO / "tests" / "data" / "serving" / "inline_tools.yaml"
RUN = "/v1/pipelines/inline-test/run"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with serving(PIPELINE, home, HETFORGE_RAY_TMP=f"/tmp/hf-ray-inl-{os.getpid()}") as record:
        yield record


def _run(url: str, fail_first: bool = False, fail_second: bool = False) -> httpx.Response:
    body = {"input": {"x": [[1.5, -2.0]], "fail_first": fail_first, "fail_second": fail_second}}
    return httpx.post(url + RUN, json=body, timeout=120)


def test_the_inline_tool_answers_without_a_deployment_and_exposes_its_metrics(served):
    from ray import serve

    assert served.placement["first"]["hop"] == "inline" and served.placement["second"]["hop"] == "separate"
    deployments = set(serve.status().applications["inline-test"].deployments)
    assert "stage-second" in deployments and "stage-first" not in deployments
    reply = _run(served.url)
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["output"] == {"x": [[1.5, -2.0]]} and set(doc["stages"]) == {"first", "second"}
    metrics = httpx.get(served.url + "/metrics", timeout=30).text
    counts = {
        stage: sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("hetforge_stage_latency_seconds_count{") and f'stage="{stage}"' in line
        )
        for stage in ("first", "second")
    }
    assert counts["first"] >= 1 and counts["second"] >= 1, counts
    status = httpx.get(served.url + "/v1/pipelines/inline-test/status", timeout=30).json()["stages"]
    assert status["first"]["placement"] == "inline" and status["first"]["attempts"] >= 1
    assert "placement" not in status["second"]


def test_a_failing_inline_tool_reads_as_a_failing_separate_one(served):
    inline, separate = _run(served.url, fail_first=True), _run(served.url, fail_second=True)
    assert inline.status_code == separate.status_code == 500
    a, b = inline.json()["error"], separate.json()["error"]
    assert (a["stage"], b["stage"]) == ("first", "second")
    assert a["message"].replace("first", "STAGE") == b["message"].replace("second", "STAGE")
    assert "asked to fail" in a["message"] and "1 attempt" in a["message"]
    assert _run(served.url).status_code == 200  # and the ingress keeps serving
