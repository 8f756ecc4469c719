"""The ingress's guards without Ray: API tokens (where they come from, who holds them), the admin routes' token,
origin and body checks, the docs, protected pipeline routes, the body limit, the pipeline's admission limit, the
degraded /healthz; then the replicas' input limits and dependency checks as plain functions."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import types

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from hetforge.serving.dashboard_page import DashboardSampler
from hetforge.serving.dataflow import Breaker, PipelineRunner, StageError
from hetforge.serving.deployments import (
    LlmStageDeployment,
    check_prompt_tokens,
    check_tensor_elements,
    dependency_checks,
    prompt_token_limit,
)
from hetforge.serving.ingress import create_app
from hetforge.serving.ingress.auth import Tokens, client_headers, digest, parse_tokens, resolve_tokens
from hetforge.serving.ingress.state import IngressState
from hetforge.serving.llm import LlmRuntime
from hetforge.serving.metrics import Metrics
from hetforge.serving.tools import ToolRuntime
from hetforge.spec import load_pipeline
from hetforge.spec.models import LlmStage, ModelStage, Pipeline, ToolStage
from tests.conftest import REPO

DATA = REPO / "tests" / "data" / "serving"
TOKEN = "guard-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
RUN = "/v1/pipelines/tools-only/run"
SWAP = "/v1/pipelines/tools-only/stages/prepare/swap"


class ToolCaller:
    def __init__(self, pipeline):
        self.tools = {s.name: ToolRuntime(s, DATA) for s in pipeline.stages}

    async def __call__(self, stage, payload, request_id):
        return await self.tools[stage](payload)

    async def stream(self, stage, payload, request_id):
        yield ""


class FakeHandle:
    """A stage deployment's handle: `status` answers, `dependencies` reports the given checks."""

    def __init__(self, checks: list[dict]):
        async def status():
            return {}

        async def dependencies():
            return checks

        self.status = types.SimpleNamespace(remote=status)
        self.dependencies = types.SimpleNamespace(remote=dependencies)


def _pipeline(**changes) -> Pipeline:
    doc = load_pipeline(DATA / "tools_only.yaml").model_dump(mode="json", by_alias=True)
    return Pipeline.model_validate({**doc, **changes})


def _state(tmp_path, pipeline: Pipeline, handles: dict | None = None) -> IngressState:
    return IngressState(
        pipeline=pipeline,
        runner=PipelineRunner(pipeline, ToolCaller(pipeline)),
        handles=handles or {},
        registry_path=str(tmp_path / "registry.sqlite"),
        metrics_dir=str(tmp_path),
        metrics=Metrics(CollectorRegistry()),
        sampler=DashboardSampler(pipeline.name, str(tmp_path)),
        base_dir=DATA,
        tokens=Tokens({digest(TOKEN): "carol"}),
    )


@pytest.fixture()
def client(tmp_path):
    return TestClient(create_app(_state(tmp_path, _pipeline())))


# ---------------------------------------------------------------------------------------------- tokens
def test_a_token_is_generated_once_into_a_private_file_and_printed_once(tmp_path, monkeypatch):
    monkeypatch.delenv("HETFORGE_API_TOKEN", raising=False)
    monkeypatch.delenv("HETFORGE_API_TOKEN_FILE", raising=False)
    monkeypatch.setenv("HETFORGE_HOME", str(tmp_path))
    printed: list[str] = []
    tokens = resolve_tokens(printed.append)
    path = tmp_path / "api-token"
    token = path.read_text().strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(token) >= 32
    assert len(printed) == 1 and token in printed[0] and str(path) in printed[0]
    assert tokens.identify(token) == "admin" and tokens.identify(token + "x") is None
    assert resolve_tokens(printed.append) == tokens and len(printed) == 1  # the second start reads it, silently
    assert client_headers() == {"Authorization": f"Bearer {token}"}


def test_tokens_from_the_environment_or_a_file_name_their_holders_and_short_ones_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HETFORGE_API_TOKEN", "alice:" + "a" * 20)
    assert resolve_tokens().identify("a" * 20) == "alice"
    monkeypatch.delenv("HETFORGE_API_TOKEN")
    path = tmp_path / "tokens"
    path.write_text("# team\nbob:" + "b" * 24 + "\n" + "c" * 24 + "\n")
    monkeypatch.setenv("HETFORGE_API_TOKEN_FILE", str(path))
    tokens = resolve_tokens()
    assert (tokens.identify("b" * 24), tokens.identify("c" * 24)) == ("bob", "admin")
    with pytest.raises(ValueError, match=r"tokens:2: an API token of at least 16 characters"):
        parse_tokens("x" * 20 + "\nshort\n", "tokens")
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no API token in the file"):
        resolve_tokens()


# ---------------------------------------------------------------------------------------------- admin routes
def test_admin_routes_need_a_valid_token(client):
    missing = client.post(SWAP, json={"variant": "reference"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    wrong = client.post(SWAP, json={"variant": "reference"}, headers={"Authorization": "Bearer " + "z" * 22})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "the API token is not valid"
    basic = base64.b64encode(f"u:{TOKEN}".encode()).decode()
    assert (
        client.post(SWAP, json={"variant": "reference"}, headers={"Authorization": f"Basic {basic}"}).status_code == 401
    )
    assert client.get("/v1/pipelines/tools-only/approvals").status_code == 401
    assert client.get("/v1/pipelines/tools-only/approvals", headers=BEARER).json() == {"pending": []}
    # with the token: the route itself answers (a tool stage cannot be swapped)
    assert client.post(SWAP, json={"variant": "reference"}, headers=BEARER).status_code == 400


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://testserver.evil.example"},
    ],
)
def test_admin_routes_refuse_cross_origin_requests(client, headers):
    reply = client.post(SWAP, json={"variant": "reference"}, headers={**BEARER, **headers})
    assert reply.status_code == 403 and "cross-origin" in reply.json()["error"]["message"]


def test_admin_routes_take_same_origin_json_only(client):
    same = client.post(SWAP, json={"variant": "reference"}, headers={**BEARER, "Origin": "http://testserver"})
    assert same.status_code == 400  # past the guards: the route's own answer
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        reply = client.post(SWAP, content=b'{"variant": "reference"}', headers={**BEARER, "Content-Type": kind})
        assert reply.status_code == 415, kind
        assert "application/json" in reply.json()["error"]["message"]
    json_suffix = client.post(
        SWAP, content=b'{"variant": "reference"}', headers={**BEARER, "Content-Type": "application/merge-patch+json"}
    )
    assert json_suffix.status_code == 400


def test_the_audit_identity_comes_from_the_token_never_from_the_body(client):
    for path, body in (
        ("/v1/pipelines/tools-only/approvals/1/approve", {"approver": "mallory"}),
        ("/v1/pipelines/tools-only/stages/prepare/optimize", {"hint": "x", "actor": "mallory"}),
    ):
        reply = client.post(path, json=body, headers=BEARER)
        assert reply.status_code == 400 and "unknown field" in reply.json()["error"]["message"], reply.text


def test_the_api_docs_need_the_token_as_bearer_or_basic_password(client):
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()}
    for path in ("/docs", "/redoc", "/openapi.json"):
        refused = client.get(path)
        assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"]
        assert client.get(path, headers=BEARER).status_code == 200
        assert client.get(path, headers=basic).status_code == 200
    paths = client.get("/openapi.json", headers=BEARER).json()["paths"]
    assert "/v1/pipelines/{name}/run" in paths and "/docs" not in paths


# ---------------------------------------------------------------------------------------------- pipeline routes
def test_pipeline_routes_are_open_by_default_and_protected_when_the_pipeline_says_so(client, tmp_path):
    assert client.post(RUN, json={"input": {"x": [[1.0]]}}).status_code == 200
    closed = TestClient(create_app(_state(tmp_path, _pipeline(auth={"pipeline_routes": "token"}))))
    assert closed.post(RUN, json={"input": {"x": [[1.0]]}}).status_code == 401
    assert closed.post(RUN, json={"input": {"x": [[1.0]]}}, headers=BEARER).status_code == 200
    assert closed.get("/v1/pipelines/tools-only/status").status_code == 401
    assert closed.get("/v1/pipelines/tools-only/rollouts").status_code == 401
    basic = {"Authorization": "Basic " + base64.b64encode(f"me:{TOKEN}".encode()).decode()}
    assert closed.get("/v1/pipelines/tools-only/status", headers=basic).status_code == 200
    assert closed.get("/healthz").status_code == 200 and closed.get("/metrics").status_code == 200


def test_a_body_over_the_limit_is_413_declared_or_streamed(tmp_path):
    client = TestClient(create_app(_state(tmp_path, _pipeline(limits={"max_body_bytes": 2048}))))
    small = client.post(RUN, json={"input": {"x": [[1.0]]}})
    assert small.status_code == 200
    declared = client.post(RUN, json={"input": {"x": [[1.0]], "pad": "p" * 4000}}, headers={"x-request-id": "big"})
    assert declared.status_code == 413
    assert declared.json()["error"] == {
        "message": f"the request body is {len(declared.request.content)} bytes; limits.max_body_bytes is 2048 bytes",
        "stage": None,
        "request_id": "big",
        "status": 413,
    }

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"input": {"pad": "'
        for _ in range(10):
            yield b"p" * 500
        yield b'"}}'

    streamed = client.post(RUN, content=chunks())
    assert streamed.status_code == 413 and "over 2048 bytes" in streamed.json()["error"]["message"]
    assert (
        client.post(SWAP, content=chunks(), headers={**BEARER, "Content-Type": "application/json"}).status_code == 413
    )


def test_requests_past_the_pipelines_concurrency_are_refused_at_once_with_retry_after(tmp_path):
    app = create_app(_state(tmp_path, _pipeline(limits={"max_concurrent_requests": 2, "retry_after_s": 5})))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
            slow = [
                asyncio.create_task(http.post(RUN, json={"input": {"x": [[1.0]], "sleep_s": 1.0}}, timeout=60))
                for _ in range(2)
            ]
            while app.state.ingress.in_flight < 2:
                await asyncio.sleep(0.01)
            refused = await http.post(RUN, json={"input": {"x": [[1.0]]}}, timeout=60)
            return refused, await asyncio.gather(*slow)

    refused, admitted = asyncio.run(main())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert "limits.max_concurrent_requests" in refused.json()["error"]["message"]
    assert [r.status_code for r in admitted] == [200, 200] and app.state.ingress.in_flight == 0


def test_healthz_is_degraded_by_a_failing_dependency_or_an_open_circuit(tmp_path):
    ok = {"stage": "prepare", "dependency": "$KEY", "ok": True, "detail": "set"}
    bad = {"stage": "prepare", "dependency": "http://10.0.0.1/x", "ok": False, "detail": "ConnectError"}
    healthy = TestClient(create_app(_state(tmp_path, _pipeline(), {"prepare": FakeHandle([ok])})))
    assert healthy.get("/healthz").json() == {"status": "ok", "pipeline": "tools-only"}
    degraded = TestClient(create_app(_state(tmp_path, _pipeline(), {"prepare": FakeHandle([ok, bad])})))
    reply = degraded.get("/healthz")
    assert reply.status_code == 200 and reply.json() == {
        "status": "degraded",
        "pipeline": "tools-only",
        "dependencies": [bad],
    }

    state = _state(tmp_path, _pipeline(), {"prepare": FakeHandle([ok])})
    state.runner.breakers["prepare"] = opened = Breaker(1, 60)
    opened.failed()
    assert TestClient(create_app(state)).get("/healthz").json()["open_circuits"] == ["prepare"]


# ---------------------------------------------------------------------------------------------- replicas
def _model_stage() -> ModelStage:
    return ModelStage.model_validate(
        {"name": "m", "kind": "model", "module": "x:M", "inputs": [{"name": "pixels", "shape": ["batch", 4]}]}
    )


def test_an_input_over_the_tensor_limit_is_422_naming_it():
    check_tensor_elements(_model_stage(), [torch.zeros(2, 4)], 8)
    with pytest.raises(StageError) as err:
        check_tensor_elements(_model_stage(), [torch.zeros(3, 4)], 8)
    assert err.value.status == 422 and "input pixels has 12 elements; limits.max_tensor_elements is 8" in str(err.value)


def _llm(**kw) -> LlmStage:
    doc = {"name": "chat", "kind": "llm", "vllm": {"model": "m"}, "sampling": {"max_tokens": 16}, **kw}
    return LlmStage.model_validate(doc)


def test_the_prompt_limit_is_the_context_less_the_answer_or_the_stages_own():
    assert prompt_token_limit(_llm(), 256) == 240
    assert prompt_token_limit(_llm(limits={"max_prompt_tokens": 100}), 256) == 100
    assert prompt_token_limit(_llm(limits={"max_prompt_tokens": 1000}), 256) == 240
    assert prompt_token_limit(_llm(), None) is None
    check_prompt_tokens(_llm(), 240, 240, 256)
    with pytest.raises(StageError) as err:
        check_prompt_tokens(_llm(), 241, 240, 256)
    assert err.value.status == 422 and "the prompt is 241 tokens; the model's context is 256 tokens" in str(err.value)


def test_an_llm_replica_counts_the_prompt_with_its_tokenizer_before_the_engine_runs():
    """The replica's check runs on the ids the runtime renders once for the engine: a prompt too long gets a 422 and
    the engine is never called; one that fits reaches it with those ids."""
    transformers = pytest.importorskip("transformers")
    folder = REPO / "examples" / "models" / "tiny-llm"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the tiny LLM is built by scripts/build_tiny_llm.py")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = (folder / "chat_template.jinja").read_text()
    replica = object.__new__(LlmStageDeployment.func_or_class)
    replica.stage = _llm()
    replica.context_tokens, replica.prompt_limit = 256, prompt_token_limit(replica.stage, 256)
    runtime = object.__new__(LlmRuntime)
    runtime.stage, runtime.tools, runtime.tokenizer, runtime.engine, runtime.inflight = (
        replica.stage,
        [],
        tokenizer,
        0,
        0,
    )
    runtime.check_prompt = replica._check_prompt
    sent: list[list[int]] = []

    async def engine_call(ids, doc, request_id=""):
        sent.append(ids)
        return "hello", "stop", {}

    runtime.complete_ids = engine_call
    answer = asyncio.run(runtime({"input": "def f(x): return x", "history": []}))
    assert answer["text"] == "hello" and len(sent) == 1 and 0 < len(sent[0]) <= 240
    with pytest.raises(StageError) as err:
        asyncio.run(runtime({"input": "def f(x): return x\n" * 200, "history": []}))
    assert err.value.status == 422 and "at most 240 prompt tokens fit" in str(err.value)
    assert len(sent) == 1 and runtime.inflight == 0


def test_dependency_checks_report_an_unreachable_endpoint_and_an_unset_key(monkeypatch):
    monkeypatch.delenv("HETFORGE_TEST_NO_KEY", raising=False)
    monkeypatch.setenv("HETFORGE_TEST_KEY", "k")
    llm = LlmStage.model_validate(
        {
            "name": "chat",
            "kind": "llm",
            "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "HETFORGE_TEST_NO_KEY"},
        }
    )
    checks = {c["dependency"]: c for c in asyncio.run(dependency_checks(llm))}
    assert not checks["$HETFORGE_TEST_NO_KEY"]["ok"] and "not set" in checks["$HETFORGE_TEST_NO_KEY"]["detail"]
    assert not checks["http://127.0.0.1:9/v1"]["ok"] and checks["http://127.0.0.1:9/v1"]["stage"] == "chat"
    tool = ToolStage.model_validate(
        {
            "name": "t",
            "kind": "tool",
            "http": {"url": "http://127.0.0.1:9/x", "headers_env": {"K": "HETFORGE_TEST_KEY"}},
        }
    )
    assert {c["dependency"]: c["ok"] for c in asyncio.run(dependency_checks(tool))} == {
        "$HETFORGE_TEST_KEY": True,
        "http://127.0.0.1:9/x": False,
    }


def test_an_http_tools_failure_names_its_method_and_url():
    stage = ToolStage.model_validate(
        {"name": "t", "kind": "tool", "http": {"url": "http://127.0.0.1:9/lookup"}, "timeout_s": 5, "retries": 1}
    )
    with pytest.raises(StageError) as err:
        asyncio.run(ToolRuntime(stage, DATA)({"q": 1}))
    assert err.value.status == 500 and "tool t (POST http://127.0.0.1:9/lookup): failed on all 2 attempt(s)" in str(
        err.value
    )
