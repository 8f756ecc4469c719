"""The real parts, started here: Ray Serve on a local instance, vLLM's CPU engine on the tiny model,
and a Prometheus server scraping the ingress. One deployment serves every test of this module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve")
pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from hetforge.serving.ingress.auth import client_headers  # noqa: E402
from tests.conftest import REPO, serving  # noqa: E402

PIPELINE = REPO / "tests" / "data" / "serving" / "pipeline.yaml"
CLASSIFIER = REPO / "tests" / "data" / "serving" / "models" / "classifier.py"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SAME = (REPO / "tests" / "data" / "serving" / "models" / "classifier_addmm.py").read_text()
WRONG = SAME.replace(
    "return torch.addmm(self.out.bias, h, self.out.weight.t())",
    "return torch.addmm(self.out.bias, h, self.out.weight.t()) * 1.5",
)
ACCEPTED = {"verdict": "accepted", "needs_review": False, "speedup": 1.4, "reference_ms": 1.0, "candidate_ms": 0.71}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Deploy tests/data/serving/pipeline.yaml; yield (url, home, registry)."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_llm.py")], check=True, capture_output=True, timeout=300
    )
    home = tmp_path_factory.mktemp("home")
    from hetforge.core.problem import source_fingerprint
    from hetforge.kernels.registry import Registry

    registry = Registry(home / "registry.sqlite")
    fingerprint = source_fingerprint(CLASSIFIER.read_text())
    ids = {
        name: registry.add(
            fingerprint=fingerprint,
            device_class="cpu",
            precision="strict",
            name=name,
            agent="test",
            source=src,
            verdict=ACCEPTED,
            recipe={"kind": "module"},
        ).id
        for name, src in (("addmm", SAME), ("wrong", WRONG))
    }
    ids["pending"] = registry.add(
        fingerprint=fingerprint,
        device_class="cpu",
        precision="strict",
        name="pending",
        agent="test",
        source=SAME,
        verdict={**ACCEPTED, "needs_review": True},
        recipe={"kind": "module"},
    ).id
    with serving(PIPELINE, home, HETFORGE_RAY_TMP=f"/tmp/hf-ray-{os.getpid()}") as record:
        yield {"url": record.url, "home": home, "ids": ids, "record": record}


def _run(url: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/pipelines/serve-test/run", json=body, timeout=timeout)


def _x(seed: int = 0) -> list:
    return torch.randn(1, 16, generator=torch.Generator().manual_seed(seed)).tolist()


def test_request_runs_every_stage_with_a_request_id(served):
    reply = _run(served["url"], {"input": {"x": _x()}})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert set(doc["stages"]) == {"prepare", "classify", "reply"}
    assert isinstance(doc["output"]["text"], str) and doc["request_id"] == reply.headers["x-request-id"]
    again = httpx.post(
        f"{served['url']}/v1/pipelines/serve-test/run",
        json={"input": {"x": _x()}},
        headers={"x-request-id": "mine-1"},
        timeout=60,
    )
    assert again.json()["request_id"] == "mine-1"
    assert httpx.get(f"{served['url']}/healthz").json() == {"status": "ok", "pipeline": "serve-test"}


def test_streaming_and_openai_chat_completions(served):
    with httpx.stream(
        "POST", f"{served['url']}/v1/pipelines/serve-test/run", json={"input": {"x": _x(1)}, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 2
    assert all("delta" in json.loads(e) for e in events[:-1])
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused")
    # the chat messages are the entry stage's input: prepare turns the last message into features
    reply = client.chat.completions.create(model="serve-test", messages=[{"role": "user", "content": "hello there"}])
    assert reply.object == "chat.completion" and isinstance(reply.choices[0].message.content, str)
    chunks = list(
        client.chat.completions.create(model="serve-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")  # max_tokens 8: usually length
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with pytest.raises(Exception) as caught:  # a malformed chat request is the client's error
        client.chat.completions.create(model="serve-test", messages=[])
    assert getattr(caught.value, "status_code", 0) == 400


def test_malformed_requests_get_4xx_with_the_reason(served):
    url = served["url"]
    bad_json = httpx.post(f"{url}/v1/pipelines/serve-test/run", content=b"{not json", timeout=30)
    assert bad_json.status_code == 400 and "not JSON" in bad_json.json()["error"]["message"]
    assert _run(url, {"inptu": {}}).status_code == 400
    wrong_shape = _run(url, {"input": {"x": [[1.0, 2.0]]}})
    assert wrong_shape.status_code == 422
    err = wrong_shape.json()["error"]
    assert err["stage"] == "classify" and "dimension 1 must be 16" in err["message"] and err["request_id"]
    missing_arg = _run(url, {"input": {"y": 1}})
    assert missing_arg.status_code == 422 and missing_arg.json()["error"]["stage"] == "prepare"
    assert httpx.post(f"{url}/v1/pipelines/nope/run", json={"input": {}}, timeout=30).status_code == 404


def test_stage_that_raises_is_a_located_5xx_and_the_replica_keeps_serving(served):
    url = served["url"]
    failed = _run(url, {"input": {"x": _x(), "fail": True}})
    assert failed.status_code == 500
    err = failed.json()["error"]
    assert (
        err["stage"] == "prepare"
        and "asked to fail" in err["message"]
        and err["request_id"] == failed.headers["x-request-id"]
    )
    assert "2 attempt" in err["message"]  # retried once, then reported
    assert _run(url, {"input": {"x": _x()}}).status_code == 200  # same replicas, still serving


def test_tool_timeout_is_retried_then_reported_504(served):
    start = time.monotonic()
    slow = _run(served["url"], {"input": {"x": _x(), "sleep_s": 5}})
    assert slow.status_code == 504
    assert "timed out after 0.5 s on all 2 attempt(s)" in slow.json()["error"]["message"]
    assert time.monotonic() - start < 4  # two 0.5 s attempts, not the tool's 5 s


def test_swap_refusals_name_the_reason(served):
    url, ids = served["url"], served["ids"]

    def swap(stage, variant):
        return httpx.post(
            f"{url}/v1/pipelines/serve-test/stages/{stage}/swap",
            json={"variant": variant, "wait_s": 30},
            headers=client_headers(),  # the token `deploy` generated under the test's HETFORGE_HOME
            timeout=60,
        )

    missing = swap("classify", 999)
    assert missing.status_code == 404 and "no variant 999" in missing.json()["error"]["message"]
    pending = swap("classify", ids["pending"])
    assert pending.status_code == 409 and "pending_review" in pending.json()["error"]["message"]
    assert swap("prepare", ids["addmm"]).status_code == 400
    wrong = swap("classify", ids["wrong"])  # verified once, but disagrees with the running module on live inputs
    assert wrong.status_code == 409
    reports = wrong.json()["reports"]
    assert len(reports) == 2 and all(r["outcome"] == "refused" and "disagrees" in r["reason"] for r in reports)


def test_hot_swap_under_load_drops_nothing(served):
    url, ids = served["url"], served["ids"]
    failures, done, stop = [], [], threading.Event()

    def load(seed: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                r = client.post(f"{url}/v1/pipelines/serve-test/run", json={"input": {"x": _x(seed * 1000 + i)}})
                (done if r.status_code == 200 else failures).append(r.status_code)
                i += 1

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    before = len(done)
    swapped = httpx.post(
        f"{url}/v1/pipelines/serve-test/stages/classify/swap",
        json={"variant": ids["addmm"], "wait_s": 60},
        headers=client_headers(),
        timeout=90,
    )
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert swapped.status_code == 200, swapped.text
    assert [r["outcome"] for r in swapped.json()["reports"]] == ["swapped", "swapped"]  # both replicas, none restarted
    assert failures == [] and before > 0 and len(done) > before
    stages = httpx.get(f"{url}/v1/pipelines/serve-test/status", timeout=30).json()["stages"]
    assert stages["classify"]["active_variant"] == f"variant:{ids['addmm']}"


def test_cli_status_and_swap_go_through_the_api(served):
    env = {**os.environ, "HETFORGE_HOME": str(served["home"])}
    status = subprocess.run(
        [sys.executable, "-m", "hetforge.cli", "status", "--json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout.strip().splitlines()[-1])["deployments"][0]
    assert doc["pipeline"] == "serve-test" and doc["state"] == "RUNNING"
    assert doc["stages"]["reply"]["active_variant"] == "reference" and doc["stages"]["classify"]["planned"] == "cpu"
    swap = subprocess.run(
        [sys.executable, "-m", "hetforge.cli", "swap", "serve-test", "classify", "reference", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert swap.returncode == 0, swap.stdout + swap.stderr
    assert [r["outcome"] for r in json.loads(swap.stdout.strip().splitlines()[-1])["reports"]] == ["swapped", "swapped"]


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    from tests.conftest import PrometheusServer

    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [served["url"].removeprefix("http://")])
    try:
        yield server.url
    finally:
        server.stop()


def test_prometheus_scrapes_every_hetforge_metric(served, prometheus):
    from hetforge.serving.metrics import SPEC

    url = served["url"]
    for i in range(5):
        _run(url, {"input": {"x": _x(i)}})
    _run(url, {"input": {"x": _x(), "fail": True}})
    httpx.post(
        f"{url}/v1/pipelines/serve-test/stages/classify/swap",
        json={"variant": "reference", "wait_s": 30},
        headers=client_headers(),
        timeout=60,
    )
    queries = {name: (f"{name}_count" if kind == "histogram" else name) for name, (kind, _, _) in SPEC.items()}
    deadline, missing = time.monotonic() + 90, dict(queries)
    while missing and time.monotonic() < deadline:
        for name, query in list(missing.items()):
            try:
                result = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10).json()["data"][
                    "result"
                ]
            except (httpx.HTTPError, KeyError, ValueError):
                continue
            if result:
                labels = set(result[0]["metric"]) - {"__name__", "instance", "job"}
                assert labels == set(SPEC[name][2]), (name, labels)
                del missing[name]
        time.sleep(1)
    assert not missing, f"Prometheus has no data for {sorted(missing)}"
    stage = httpx.get(
        f"{prometheus}/api/v1/query", params={"query": 'hetforge_stage_latency_seconds_count{stage="classify"}'}
    ).json()
    assert sum(float(r["value"][1]) for r in stage["data"]["result"]) >= 5


def _processes_with(env_entry: str) -> dict[int, bytes]:
    """PID -> command line of the live processes whose environment holds `env_entry` (NAME=value)."""
    out = {}
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            with open(f"/proc/{proc}/environ", "rb") as f:
                if env_entry.encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{proc}/cmdline", "rb") as f:
                out[int(proc)] = f.read()
        except OSError:
            continue
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the engine gets cores of its own from 2 cores up")
def test_the_vllm_engine_runs_on_cores_of_its_own_and_ray_on_the_others(served):
    from hetforge.serving import cpu_cores

    record = served["record"]
    (slot,), rest = cpu_cores.plan(sorted(os.sched_getaffinity(0)), 1)  # one CPU engine in this pipeline
    assert record.cores == {"engines": [slot], "rest": rest}
    locks = f"{cpu_cores.LOCKS_ENV}={Path(record.metrics_dir).with_suffix('.cores')}"
    mine = _processes_with(locks)  # every process Ray started for this deployment carries the plan
    engine = {pid: cmd for pid, cmd in mine.items() if cmd.startswith((b"VLLM::EngineCore", b"VLLM::Worker"))}
    assert len(engine) == 2, mine
    assert all(os.sched_getaffinity(pid) == set(slot) for pid in engine), engine
    replicas = {pid: cmd for pid, cmd in mine.items() if cmd.startswith(b"ray::ServeReplica")}
    assert any(b"PipelineIngress" in cmd for cmd in replicas.values()) and any(
        b"stage-reply" in c for c in replicas.values()
    )
    assert all(os.sched_getaffinity(pid) == set(rest) for pid in replicas), replicas
    raylet = [pid for pid, cmd in _processes_with(f"HETFORGE_RAY_TMP={os.environ['HETFORGE_RAY_TMP']}").items()
              if b"/raylet" in cmd.split(b"\0")[0]]  # fmt: skip
    assert raylet and all(os.sched_getaffinity(pid) == set(rest) for pid in raylet)
    assert os.sched_getaffinity(0) == set(slot) | set(rest)  # the process that deployed keeps every core
