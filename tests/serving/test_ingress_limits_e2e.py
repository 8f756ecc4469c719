"""Limits, the API token and the stage failure policy on a real Ray Serve deployment of tests/data/serving/hardened.yaml
(one deployment for the module): what a large body, a large tensor, a full stage queue, a stranger, a cross-origin
page and a dead dependency get."""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from tests.conftest import REPO, serving  # noqa: E402

PIPELINE = REPO / "tests" / "data" / "serving" / "hardened.yaml"
RUN = "/v1/pipelines/hardened/run"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Deploy hardened.yaml with the API token `alice:<random>`; yield (url, token)."""
    home = tmp_path_factory.mktemp("home")
    token = secrets.token_urlsafe(24)
    with serving(
        PIPELINE, home, HETFORGE_RAY_TMP=f"/tmp/hf-ray-{os.getpid()}", HETFORGE_API_TOKEN=f"alice:{token}"
    ) as record:
        yield record.url, token


def _x(rows: int = 1) -> list:
    return [[float(i % 5) - 2.0 for i in range(16)] for _ in range(rows)]


def _run(url: str, body: dict, timeout: float = 90) -> httpx.Response:
    return httpx.post(url + RUN, json=body, timeout=timeout)


def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    return reply.json()["error"]


def test_an_optional_failing_branch_is_skipped_and_named_with_its_url_then_its_circuit_opens(served):
    url, _ = served
    first = _run(url, {"input": {"x": _x()}})
    assert first.status_code == 200, first.text
    doc = first.json()
    assert doc["output"]["label"] in ("low", "high")
    assert "enrich" in doc["skipped"] and "http://127.0.0.1:9/enrich" in doc["failed"]["enrich"]
    assert doc["output"] and doc["failed"]["slowpoke"].startswith("stage slowpoke: argument sleep_s")  # binding
    _run(url, {"input": {"x": _x()}})  # the second consecutive failure opens enrich's circuit (failures: 2)
    third = _run(url, {"input": {"x": _x()}}).json()
    assert "circuit open" in third["failed"]["enrich"] and "enrich" in third["skipped"]

    health = httpx.get(url + "/healthz", timeout=30).json()
    assert health["status"] == "degraded" and health["open_circuits"] == ["enrich"]
    failing = {c["dependency"]: c for c in health["dependencies"]}
    assert failing["http://127.0.0.1:9/enrich"]["stage"] == "enrich"
    assert "not set" in failing["$HETFORGE_TEST_UNSET_KEY"]["detail"]

    metrics = httpx.get(url + "/metrics", timeout=30).text

    def count(stage: str, kind: str) -> float:
        prefix = f'hetforge_stage_errors_total{{kind="{kind}",pipeline="hardened",stage="{stage}"}} '
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))

    assert count("enrich", "error") >= 2 and count("enrich", "circuit_open") >= 1
    assert count("slowpoke", "binding") >= 3 and count("classify", "error") == 0


def test_a_stage_past_its_timeout_takes_its_fallback(served):
    url, _ = served
    doc = _run(url, {"input": {"x": _x(), "side": 30}}).json()
    assert doc["output"]["label"] in ("low", "high")
    assert "no answer within 1 s" in doc["failed"]["slowpoke"]


def test_too_large_a_body_is_413_and_too_large_a_tensor_422(served):
    url, _ = served
    big = {"input": {"x": _x(), "pad": "x" * 100_000}}
    assert "limits.max_body_bytes" in _error(_run(url, big), 413)["message"]
    err = _error(_run(url, {"input": {"x": _x(3)}}), 422)  # 48 elements; classify takes 32
    assert err["stage"] == "classify" and "input x has 48 elements" in err["message"]


def test_a_full_stage_queue_is_503_with_retry_after_and_the_admitted_requests_finish(served):
    url, _ = served
    replies = []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        # prepare holds 2 calls (limits.max_concurrency) and queues 1 (limits.max_queued): these fill it. Serve may
        # refuse one of them too when they arrive together (its queue count is updated asynchronously).
        held = []
        for _ in range(3):
            held.append(pool.submit(_run, url, {"input": {"x": _x(), "sleep_s": 12}}))
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(f.done() for f in held):
            replies.append(_run(url, {"input": {"x": _x()}}))
            if replies[-1].status_code == 503:
                break
            time.sleep(0.3)
        replies += [f.result() for f in held]
    refused = [r for r in replies if r.status_code == 503]
    assert refused, f"no call was refused while prepare's queue was full: {[r.status_code for r in replies]}"
    assert refused[0].headers["retry-after"] == "2"
    err = refused[0].json()["error"]
    assert err["stage"] == "prepare" and "limits.max_queued" in err["message"]
    assert {r.status_code for r in replies} <= {200, 503}
    assert sum(f.result().status_code == 200 for f in held) >= 2  # the calls the stage took were all answered


def test_admin_routes_and_docs_need_the_token_a_same_origin_json_call_and_record_its_holder(served):
    url, token = served
    auth = {"Authorization": f"Bearer {token}"}
    optimize = url + "/v1/pipelines/hardened/stages/classify/optimize"
    assert httpx.post(optimize, json={"hint": "x"}, timeout=30).status_code == 401
    assert (
        httpx.post(optimize, json={"hint": "x"}, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code
        == 401
    )
    cross = httpx.post(optimize, json={"hint": "x"}, headers={**auth, "Origin": "http://evil.example"}, timeout=30)
    assert cross.status_code == 403
    plain = httpx.post(optimize, content=b'{"hint": "x"}', headers={**auth, "Content-Type": "text/plain"}, timeout=30)
    assert plain.status_code == 415
    claimed = httpx.post(optimize, json={"hint": "x", "actor": "mallory"}, headers=auth, timeout=30)
    assert claimed.status_code == 400 and "actor" in claimed.json()["error"]["message"]
    queued = httpx.post(optimize, json={"hint": "fuse the head"}, headers=auth, timeout=30)
    assert queued.status_code == 202, queued.text
    events = httpx.get(url + "/v1/pipelines/hardened/rollouts", timeout=30).json()["events"]
    assert [e["actor"] for e in events if e.get("reason") == "fuse the head"] == ["alice"]

    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(url + path, timeout=30).status_code == 401
        assert httpx.get(url + path, headers=auth, timeout=30).status_code == 200
    assert "/v1/pipelines/{name}/run" in httpx.get(url + "/openapi.json", headers=auth, timeout=30).json()["paths"]
    assert httpx.get(url + "/v1/pipelines/hardened/approvals", timeout=30).status_code == 401
    assert httpx.get(url + "/v1/pipelines/hardened/approvals", headers=auth, timeout=30).json() == {"pending": []}
