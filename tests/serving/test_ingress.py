"""The ingress's routes without Ray: the pipeline dependency, the one error shape, request bodies, and the job spec
that crosses into a Ray task."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from hetforge.serving.dashboard_page import DashboardSampler
from hetforge.serving.dataflow import PipelineRunner
from hetforge.serving.ingress import create_app
from hetforge.serving.ingress.auth import Tokens, digest
from hetforge.serving.ingress.errors import ApiError
from hetforge.serving.ingress.state import IngressState
from hetforge.serving.jobs import JobSpec
from hetforge.serving.metrics import Metrics
from hetforge.serving.tools import ToolRuntime
from hetforge.spec import load_pipeline
from tests.conftest import REPO

DATA = REPO / "tests" / "data" / "serving"
TOKEN = "test-token-0123456789"


class ToolCaller:
    """Stage calls straight to the tool runtimes (what the stage deployments do behind their handles)."""

    def __init__(self, pipeline):
        self.tools = {s.name: ToolRuntime(s, DATA) for s in pipeline.stages}

    async def __call__(self, stage, payload, request_id):
        return await self.tools[stage](payload)

    async def stream(self, stage, payload, request_id):
        raise NotImplementedError
        yield


@pytest.fixture()
def client(tmp_path):
    pipeline = load_pipeline(DATA / "tools_only.yaml")
    state = IngressState(
        pipeline=pipeline,
        runner=PipelineRunner(pipeline, ToolCaller(pipeline)),
        handles={},
        registry_path=str(tmp_path / "registry.sqlite"),
        metrics_dir=str(tmp_path),
        metrics=Metrics(CollectorRegistry()),
        sampler=DashboardSampler(pipeline.name, str(tmp_path)),
        base_dir=DATA,
        tokens=Tokens({digest(TOKEN): "tester"}),
    )
    app = create_app(state)

    @app.get("/raise/{status}")
    async def raising(status: int):
        raise ApiError(status, "refused for the test", stage="prepare")

    return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})


def _error(reply, status: int) -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "stage", "request_id", "status"}
    assert body["error"]["status"] == status and body["error"]["request_id"]
    return body["error"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/pipelines/nope/run"),
        ("GET", "/v1/pipelines/nope/status"),
        ("GET", "/v1/pipelines/nope/approvals"),
        ("GET", "/v1/pipelines/nope/approvals/1"),
        ("POST", "/v1/pipelines/nope/approvals/1/approve"),
        ("POST", "/v1/pipelines/nope/stages/prepare/swap"),
        ("POST", "/v1/pipelines/nope/stages/prepare/optimize"),
        ("GET", "/v1/pipelines/nope/rollouts"),
        ("GET", "/v1/pipelines/nope/dashboard"),
    ],
)
def test_a_pipeline_not_served_here_is_a_404_naming_the_one_that_is(client, method, path):
    reply = client.request(method, path, json={}, headers={"x-request-id": "req-7"})
    err = _error(reply, 404)
    assert (
        "no pipeline 'nope' here" in err["message"]
        and "'tools-only'" in err["message"]
        and err["request_id"] == "req-7"
    )


def test_api_error_answers_in_the_one_error_shape(client):
    err = _error(client.get("/raise/409", headers={"x-request-id": "mine"}), 409)
    assert err == {"message": "refused for the test", "stage": "prepare", "request_id": "mine", "status": 409}


def test_bodies_are_checked_against_their_models(client):
    run = "/v1/pipelines/tools-only/run"
    assert "not JSON" in _error(client.post(run, content=b"{not json"), 400)["message"]
    assert "JSON object" in _error(client.post(run, json=[1, 2]), 400)["message"]
    err = _error(client.post(run, json={"inptu": {}}), 400)
    assert "`input`" in err["message"] and "inptu" in err["message"]
    assert (
        "wait_s"
        in _error(
            client.post("/v1/pipelines/tools-only/stages/prepare/swap", json={"variant": "reference", "wait_s": -1}),
            400,
        )["message"]
    )
    assert (
        "no action 'merge'"
        in _error(client.post("/v1/pipelines/tools-only/approvals/1/merge", json={}), 404)["message"]
    )


def test_a_run_answers_json_whatever_the_content_type_says(client):
    # `curl -d` sends application/x-www-form-urlencoded: the body is still read as JSON
    reply = client.post(
        "/v1/pipelines/tools-only/run",
        content=json.dumps({"input": {"x": [[1.0]]}}),
        headers={"content-type": "application/x-www-form-urlencoded", "x-request-id": "r1"},
    )
    assert reply.status_code == 200, reply.text
    assert (
        reply.json()["output"] == {"x": [[1.0]]}
        and reply.json()["request_id"] == "r1"
        and set(reply.json()["stages"]) == {"prepare"}
    )


def test_stage_and_control_errors_keep_their_status_and_stage(client):
    failed = _error(client.post("/v1/pipelines/tools-only/run", json={"input": {"fail": True}}), 500)
    assert failed["stage"] == "prepare" and "asked to fail" in failed["message"]
    assert (
        _error(client.post("/v1/pipelines/tools-only/run", json={"input": {"x": [[1.0]]}, "stream": True}), 400)[
            "stage"
        ]
        is None
    )
    swap = _error(client.post("/v1/pipelines/tools-only/stages/prepare/swap", json={"variant": "reference"}), 400)
    assert swap["stage"] == "prepare" and "only model and vLLM stages" in swap["message"]
    assert (
        _error(client.post("/v1/pipelines/tools-only/stages/ghost/optimize", json={"hint": "x"}), 404)["stage"]
        == "ghost"
    )
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "not_an_llm"  # OpenAI's error format


def test_status_and_health_bodies(client):
    assert client.get("/healthz").json() == {"status": "ok", "pipeline": "tools-only"}
    assert client.get("/v1/pipelines/tools-only/status").json() == {"pipeline": "tools-only", "stages": {}}
    assert client.get("/v1/pipelines/tools-only/approvals").json() == {"pending": []}


def test_job_spec_round_trips_through_json():
    spec = JobSpec(
        registry_path="/r.sqlite",
        job_id=3,
        pipeline="p",
        stage="s",
        problem={"file": "/m.py", "init_args": [4, 8], "init_kwargs": {"k": 1}},
        device="cpu",
        device_class="cpu",
        precision="strict",
        budget_s=30.0,
        scratch="/tmp/jobs",
        agents=("recipes",),
        hint="fuse",
        approval="manual",
        signatures=("float32[2,16]", "float32[1,16]"),
        threads=2,
    )
    doc = json.loads(json.dumps(spec.to_json()))
    assert JobSpec.from_json(doc) == spec
    with pytest.raises(TypeError):
        JobSpec.from_json({**doc, "unknown": 1})
