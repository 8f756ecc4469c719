"""The three model sources end to end, against the real parts: examples/team_models.yaml (a HuggingFace
embedder and cross-encoder built offline from configs, the team's module with a safetensors checkpoint)
validated and planned by the CLI, then served on a local Ray Serve instance answering real requests (text
in, embeddings and scores out; the module stage answering its declared inputs), and the module stage
optimized by the background re-optimization controller and hot-swapped under traffic with no failed or
wrong request. A replica whose module constructor raises is reported as one located line.

The served copy of the example differs only in its paths (absolute, so it can live in a temporary folder)
and a `reoptimize:` block with test timings; the job is queued through the API (a hint), because on these
tiny models no stage dominates the critical path enough to be found hot.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("ray.serve")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

from hetforge.serving.ingress.auth import client_headers  # noqa: E402
from tests.conftest import EXAMPLES, REPO, free_port, run_cli  # noqa: E402

EXAMPLE = EXAMPLES / "team_models.yaml"
BROKEN = REPO / "tests" / "data" / "serving" / "broken_module.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
TEXTS = ["what does hetforge do", "turn off the lights in the kitchen please"]
QUERY = "what does hetforge do"
DOCUMENTS = ["hetforge plans optimizes and serves agent pipelines", "paris is the capital of france", "hello"]
REOPTIMIZE = {
    "interval_s": 1,
    "window_s": 4,
    "min_calls": 10,
    "hot_share": 1.0,  # never: the job comes from the API, and no other may start meanwhile
    "regression": 100,
    "new_shape_share": 1.0,
    "budget_s": 120,
    "agents": ["rewrites"],
    "job_cpus": 1,
    "canary": {
        "shadow": True,
        "steps": [50, 100],
        "min_calls": 15,
        "step_timeout_s": 90,
        # this test checks the mechanism (job, registration, rollout, promotion), not the speed: on a 2-core CI
        # host a sub-millisecond stage's p50 moves by more than the dead-code variant saves
        "max_latency_ratio": 2.0,
        "max_p99_ratio": 5,
    },
}


def _build_models() -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_models.py")], check=True, capture_output=True, timeout=300
    )


def _served_copy(folder: Path) -> Path:
    """The example with absolute paths and a fast `reoptimize:` block, written into `folder`."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    for stage in doc["stages"]:
        if "huggingface" in stage:
            stage["huggingface"]["model"] = str(EXAMPLES / stage["huggingface"]["model"])
        for field in ("module", "callable"):
            if field in stage:
                stage[field] = str(EXAMPLES / stage[field])
        if "weights" in stage:
            stage["weights"] = str(EXAMPLES / stage["weights"])
    doc["reoptimize"] = REOPTIMIZE
    path = folder / "team_models.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Reference:
    """The three stages' references, built here from the example's own spec (`stage_problem`)."""

    def __init__(self):
        import transformers

        from hetforge.spec import load_pipeline
        from hetforge.spec.stages import stage_problem

        pipeline = load_pipeline(EXAMPLE)
        self.modules = {
            name: stage_problem(pipeline.stage(name), EXAMPLES).load().build() for name in ("embed", "rerank", "intent")
        }
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(EXAMPLES / "models" / "tiny-embedder"), local_files_only=True
        )

    @torch.inference_mode()
    def answer(self, texts: list[str], query: str, documents: list[str]) -> dict:
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        embeddings = self.modules["embed"](enc["input_ids"], enc["attention_mask"])
        pairs = self.tokenizer([query] * len(documents), documents, padding=True, return_tensors="pt")
        scores = self.modules["rerank"](pairs["input_ids"], pairs["attention_mask"])[:, 0]
        return {"embeddings": embeddings, "scores": scores, "intent": self.modules["intent"](embeddings)}


def _close(got, want: torch.Tensor) -> bool:
    return torch.allclose(torch.tensor(got, dtype=torch.float32), want.float(), atol=1e-4, rtol=1e-3)


def _check(reply: httpx.Response, want: dict) -> str:
    """ "" when the pipeline's answer matches the local references, else what differs."""
    if reply.status_code != 200:
        return f"HTTP {reply.status_code}: {reply.text[:300]}"
    out = reply.json()["output"]
    if not isinstance(out.get("intent"), dict):
        return f"malformed answer: {reply.text[:500]}"
    for field, got in (
        ("embeddings", out["embeddings"]),
        ("scores", out["scores"]),
        ("intent", out["intent"]["output"]),
    ):
        if not _close(got, want[field]):
            return f"{field} differs: {str(got)[:200]}"
    return ""


class Load:
    """Clients sending requests until stopped; every answer is checked against the references."""

    def __init__(self, url: str, reference: Reference, clients: int = 2):
        self.url, self.reference = url, reference
        self.sent = self.failed = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, seed: int) -> None:
        words = " ".join(DOCUMENTS + TEXTS).split()
        gen = torch.Generator().manual_seed(seed)
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                pick = torch.randint(0, len(words), (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
                texts = [" ".join(words[i] for i in pick)]
                body = {"texts": texts, "query": QUERY, "documents": DOCUMENTS[: 1 + seed % 3]}
                want = self.reference.answer(body["texts"], QUERY, body["documents"])
                try:
                    reply = client.post(f"{self.url}/v1/pipelines/team-models/run", json={"input": body})
                    problem = _check(reply, want)
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                self.sent += 1
                if problem:
                    self.failed += 1
                    self.problems.append(problem)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def _shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HETFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HETFORGE_RAY_TMP", f"/tmp/hf-ray-{os.getpid()}")
    return tmp_path / "home"


def test_a_failing_module_constructor_is_reported_located(home):
    """The replica's own exception, on one line naming the stage and its YAML line, not Serve's summary."""
    from hetforge.serving import deploy as dep

    placement = {"head": {"device": "cpu", "device_class": "cpu", "ray_actor_options": {"num_cpus": 0.5}}}
    record = dep.deploy(BROKEN, port=free_port(), registry_path=str(home / "registry.sqlite"), placement=placement)
    try:
        with pytest.raises(RuntimeError) as failed:
            dep.wait_until_running(record, timeout_s=300)
    finally:
        _shutdown()
    message = str(failed.value)
    assert message.count("\n") == 0, message
    assert message.startswith(f"{BROKEN}:6: "), message  # the stage's line in the YAML
    assert 'stage "head": ValueError: hidden (30) must be divisible by heads (4)' in message, message


def test_example_validates_and_plans():
    _build_models()
    validated = run_cli("validate", str(EXAMPLE))
    assert validated.returncode == 0, validated.stderr
    planned = run_cli("plan", str(EXAMPLE), timeout=300)
    assert planned.returncode == 0, planned.stderr
    for stage in ("embed", "rerank", "intent", "answer"):
        assert stage in planned.stdout


def test_served_answers_then_the_module_stage_is_optimized_and_swapped_under_traffic(home, tmp_path):
    _build_models()
    from hetforge.kernels.registry import Registry
    from hetforge.serving import deploy as dep
    from hetforge.serving.rollout import RolloutBoard

    pipeline_file = _served_copy(tmp_path)
    registry_path = str(home / "registry.sqlite")
    record = dep.deploy(pipeline_file, port=free_port(), registry_path=registry_path)
    load = None
    try:
        dep.wait_until_running(record, timeout_s=600)
        url = f"{record.url}/v1/pipelines/team-models"
        reference = Reference()

        # text in, embeddings and scores out; the module stage on its declared input (the embeddings)
        body = {"texts": TEXTS, "query": QUERY, "documents": DOCUMENTS}
        reply = httpx.post(f"{url}/run", json={"input": body}, timeout=120)
        assert _check(reply, reference.answer(TEXTS, QUERY, DOCUMENTS)) == ""
        out = reply.json()["output"]
        assert len(out["embeddings"]) == 2 and len(out["embeddings"][0]) == 32
        assert abs(sum(v * v for v in out["embeddings"][0]) - 1.0) < 1e-4  # normalized
        assert len(out["scores"]) == 3 and sorted(out["ranking"]) == [0, 1, 2]
        assert set(out["intent"]["label"]) <= {"question", "command", "chit-chat"}

        # the client's mistakes: 422s naming the stage, the field and the limit
        too_many = httpx.post(f"{url}/run", json={"input": {**body, "texts": TEXTS * 3}}, timeout=60)
        assert too_many.status_code == 422, too_many.text
        assert "embed" in too_many.text and "texts" in too_many.text and "batch 4" in too_many.text
        not_text = httpx.post(f"{url}/run", json={"input": {**body, "query": 7}}, timeout=60)
        assert not_text.status_code == 422 and "rerank" in not_text.text and "query" in not_text.text

        # under traffic: a job for the team's module, launched by the controller, registered, rolled out, promoted
        load = Load(record.url, reference)
        time.sleep(3)
        queued = httpx.post(
            f"{url}/stages/intent/optimize",
            json={"hint": "drop work whose result is unused"},
            headers=client_headers(),  # the token `deploy` generated under the test's HETFORGE_HOME
            timeout=30,
        )
        assert queued.status_code == 202, queued.text
        board = RolloutBoard(registry_path)

        def wait_for(decision: str, timeout_s: float) -> dict:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for event in board.events("team-models", limit=1000):
                    if event["decision"] == decision and event["stage"] == "intent":
                        return event
                time.sleep(0.5)
            events = board.events("team-models", limit=1000)
            raise AssertionError(
                f"no {decision} within {timeout_s} s: "
                + "; ".join(f"{e['decision']} {e['variant']} {e['reason'][:200]}" for e in events)
            )

        done = wait_for("job_done", 400)
        assert done["numbers"]["outcome"] == "registered", done
        assert done["numbers"]["winner"].startswith("rewrites:dead_code"), done
        variant = str(done["numbers"]["variant_id"])
        promoted = wait_for("promote", 300)
        assert promoted["variant"] == variant, promoted
        assert Registry(registry_path).get(int(variant)).status == "active"
        status = httpx.get(f"{url}/status", timeout=30).json()
        assert status["stages"]["intent"]["active_variant"] == f"variant:{variant}", status
        time.sleep(2)  # requests on the swapped variant
        load.stop()
        assert load.sent > 20 and load.failed == 0, (load.sent, load.problems[:5])
    finally:
        if load is not None:
            load.stop()
        _shutdown()
