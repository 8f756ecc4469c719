"""The re-optimization loop, unattended, against the real parts: Ray Serve on a local instance, the
controller deployment, optimization jobs as Ray tasks, the verifier's confined workers, SQLite.

One deployment of tests/data/reoptimize/pipeline.yaml; a load thread sends requests the whole time
and checks every answer against the reference module computed here. In order: the controller
finds the hot stage, a job optimizes it, the variant goes through shadow and canary steps and is
promoted (the speedup shows in the metrics); a variant that is wrong on some inputs and one that is
slower are rolled back; a controller killed in the middle of a rollout resumes or rolls back cleanly.
Throughout, no request fails and none gets a wrong answer.

A real Prometheus server scrapes the deployment from the start; at the end every query of the Grafana
dashboard (panels, annotations, template variables) must return data from it, and the built-in
dashboard page must render in headless Chromium with its plots.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from tests.conftest import REPO  # noqa: E402

PIPELINE = REPO / "tests" / "data" / "reoptimize" / "pipeline.yaml"
SCORER = REPO / "tests" / "data" / "reoptimize" / "models" / "scorer.py"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ACCEPTED = {"verdict": "accepted", "needs_review": False, "speedup": 2.0, "reference_ms": 1.0, "candidate_ms": 0.5}

# Variants injected straight into the registry as `canary` (as if a job had found them): each subclasses the
# stage's own Model, so it takes the replica's weights.
_HEAD = f"""
import time
import torch
from hetforge.core.problem import load_module_file

_reference = load_module_file({str(SCORER)!r})
"""
WRONG_SOMETIMES = (
    _HEAD
    + """
class ModelNew(_reference.Model):
    def forward(self, x):
        out = self.head(self.body(x))
        return torch.where(x[:, :1] > 1.0, -out, out)  # wrong on rows whose first feature is above 1 (about 1 in 6)
"""
)
SLOWER = (
    _HEAD
    + """
class ModelNew(_reference.Model):
    def forward(self, x):
        time.sleep(0.01)
        return super().forward(x)
"""
)
SAME = (
    _HEAD
    + """
class ModelNew(_reference.Model):
    def forward(self, x):
        return self.head(self.body(x))
"""
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """Clients sending requests until stopped; every answer is checked against the reference."""

    def __init__(self, url: str, clients: int = 2):
        from hetforge.core.problem import Problem

        self.url = url
        self.reference = Problem(file=str(SCORER)).load().build(seed=0)
        self.sent = self.failed = self.wrong = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                x = torch.randn(1, 16, generator=gen)
                try:
                    reply = client.post(f"{self.url}/v1/pipelines/reopt-test/run", json={"input": {"x": x.tolist()}})
                except httpx.HTTPError as err:
                    self.failed += 1
                    self.problems.append(f"{type(err).__name__}: {err}")
                    continue
                self.sent += 1
                if reply.status_code != 200:
                    self.failed += 1
                    self.problems.append(reply.text[:300])
                    continue
                with torch.no_grad():
                    want = torch.softmax(self.reference(x), -1)[0]
                try:
                    got = torch.tensor(list(reply.json()["output"]["scores"].values()))
                except (KeyError, ValueError, AttributeError) as err:
                    self.wrong += 1
                    self.problems.append(f"malformed answer {reply.text[:200]}: {err}")
                    continue
                if not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
                    self.wrong += 1
                    self.problems.append(f"wrong answer for x[0,0]={x[0, 0]:.2f}: {got.tolist()} != {want.tolist()}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("HETFORGE_HOME", "HETFORGE_RAY_TMP", "PROMETHEUS_MULTIPROC_DIR")}
    os.environ["HETFORGE_HOME"] = str(home)
    os.environ["HETFORGE_RAY_TMP"] = f"/tmp/hf-ray-{os.getpid()}"
    from hetforge.serving import deploy as dep

    registry_path = str(home / "registry.sqlite")
    from tests.conftest import PrometheusServer

    record = dep.deploy(PIPELINE, port=_free_port(), registry_path=registry_path)
    load = prometheus = None
    try:
        dep.wait_until_running(record, timeout_s=600)
        prometheus = PrometheusServer(home / "prometheus", [record.url.removeprefix("http://")])
        load = Load(record.url)
        yield {
            "url": record.url,
            "registry": registry_path,
            "load": load,
            "prometheus": prometheus,
            "started": time.time(),
        }
    finally:
        if load is not None:
            load.stop()
        if prometheus is not None:
            prometheus.stop()
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _events(served, after: int = 0) -> list[dict]:
    from hetforge.serving.rollout import RolloutBoard

    return [e for e in RolloutBoard(served["registry"]).events("reopt-test", limit=1000) if e["id"] > after]


def _wait_for(served, decision: str, after: int, timeout_s: float, variant: str | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in _events(served, after):
            if e["decision"] == decision and (variant is None or e["variant"] == variant):
                return e
        time.sleep(0.5)
    raise AssertionError(
        f"no {decision} event within {timeout_s} s; events: "
        + "; ".join(f"{e['decision']} {e['variant']} {e['reason'][:120]}" for e in _events(served, after))
    )


def _inject(served, name: str, source: str) -> str:
    from hetforge.core.problem import Problem
    from hetforge.kernels.registry import Registry

    variant = Registry(served["registry"]).add(
        fingerprint=Problem(file=str(SCORER)).load().fingerprint(),
        device_class="cpu",
        precision="strict",
        name=name,
        agent="test",
        source=source,
        verdict=ACCEPTED,
        recipe={"kind": "module"},
        status="canary",
    )
    return str(variant.id)


def _last_event_id(served) -> int:
    events = _events(served)
    return events[-1]["id"] if events else 0


def _clean(served) -> None:
    load = served["load"]
    assert load.sent > 0
    assert load.failed == 0 and load.wrong == 0, load.problems[:5]


def test_hot_stage_is_found_optimized_canaried_and_promoted(served):
    job = _wait_for(served, "job", 0, 60)
    assert job["stage"] == "score" and job["numbers"]["trigger"] == "hot", job
    done = _wait_for(served, "job_done", 0, 300)
    assert done["numbers"]["outcome"] == "registered", done["numbers"]
    assert done["numbers"]["winner"].startswith("rewrites:dead_code")
    variant = str(done["numbers"]["variant_id"])
    start = _wait_for(served, "start", 0, 60, variant)
    promote = _wait_for(served, "promote", start["id"], 240, variant)
    assert promote["numbers"]["speedup_p50"] > 1.2, promote  # measured on live traffic, variant against running module
    advances = [e for e in _events(served, start["id"]) if e["decision"] == "advance" and e["variant"] == variant]
    assert [e["numbers"]["mode"] for e in advances] == ["shadow", "canary"]  # shadow, canary 50%, then promoted at 100%
    from hetforge.kernels.registry import Registry

    assert Registry(served["registry"]).get(int(variant)).status == "active"
    status = httpx.get(f"{served['url']}/v1/pipelines/reopt-test/status", timeout=30).json()
    assert status["stages"]["score"]["active_variant"] == f"variant:{variant}"
    metrics = httpx.get(f"{served['url']}/metrics", timeout=30).text
    assert 'hetforge_rollout_decisions_total{decision="promote",pipeline="reopt-test",stage="score"}' in metrics
    speedup = [
        line
        for line in metrics.splitlines()
        if line.startswith("hetforge_stage_speedup_ratio{") and 'stage="score"' in line
    ]
    assert speedup and float(speedup[0].rsplit(" ", 1)[1]) > 1.2, speedup
    assert f'variant="variant:{variant}"' in metrics  # per-stage latency by variant
    assert 'hetforge_optimizer_jobs_total{outcome="registered",pipeline="reopt-test",stage="score"}' in metrics
    # the job's winner over eager at the stage's policy (no compile figure: this job ran the rewrites agent only)
    assert 'hetforge_optimizer_speedup_ratio{baseline="eager",pipeline="reopt-test",stage="score"}' in metrics
    assert 'baseline="compile"' not in metrics
    _clean(served)


def test_a_variant_wrong_on_some_inputs_is_rolled_back_and_never_answers(served):
    mark = _last_event_id(served)
    variant = _inject(served, "wrong-sometimes", WRONG_SOMETIMES)
    _wait_for(served, "start", mark, 60, variant)
    rollback = _wait_for(served, "rollback", mark, 120, variant)
    # caught when the replica checks it on live inputs, or by the shadow step's comparisons
    assert "disagree" in rollback["reason"], rollback
    from hetforge.kernels.registry import Registry

    assert Registry(served["registry"]).get(int(variant)).status == "rejected"
    _clean(served)


def test_a_slower_variant_is_rolled_back(served):
    mark = _last_event_id(served)
    variant = _inject(served, "slower", SLOWER)
    rollback = _wait_for(served, "rollback", mark, 120, variant)
    assert "slower" in rollback["reason"], rollback
    assert rollback["numbers"]["canary_p50_ms"] > rollback["numbers"]["baseline_p50_ms"]
    _clean(served)


def test_a_controller_killed_mid_rollout_resumes_or_rolls_back(served):
    import ray

    mark = _last_event_id(served)
    variant = _inject(served, "same", SAME)
    _wait_for(served, "start", mark, 60, variant)
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "reoptimize-controller" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    killed_at = time.time()
    resumed = _wait_for(served, "resume", mark, 120, variant)  # Serve starts a new replica, which picks the rollout up
    assert resumed["at"] > killed_at
    deadline = time.monotonic() + 180
    from hetforge.serving.rollout import RolloutBoard

    board = RolloutBoard(served["registry"])
    while time.monotonic() < deadline and board.running("reopt-test"):
        time.sleep(0.5)
    rollout = board.recent("reopt-test", 1)[0]
    assert rollout.variant == variant and rollout.state in ("promoted", "rolled_back"), rollout
    status = httpx.get(f"{served['url']}/v1/pipelines/reopt-test/status", timeout=30).json()
    from hetforge.kernels.registry import Registry

    active = status["stages"]["score"]["active_variant"]
    if rollout.state == "promoted":
        assert active == f"variant:{variant}" and Registry(served["registry"]).get(int(variant)).status == "active"
    else:
        assert active != f"variant:{variant}" and Registry(served["registry"]).get(int(variant)).status == "rejected"
    _clean(served)


def test_every_dashboard_query_returns_data_from_prometheus(served):
    """Each panel, annotation and template variable of the Grafana dashboard, as Grafana would run it."""
    import re

    from hetforge.serving import dashboards

    prometheus = served["prometheus"]
    doc = dashboards.dashboard()
    found = dashboards.queries(doc)
    assert len(found) >= 15
    empty = []
    for where, expr in found:
        assert all(dashboards.known_metric(m) for m in dashboards.metric_names(expr)), (where, expr)
        variable = re.fullmatch(r"label_values\((.+), (\w+)\)", expr)
        if variable:  # a template variable: the label's values among the matching series
            match, label = dashboards.substitute(variable.group(1), {"pipeline": "reopt-test"}), variable.group(2)
            values = httpx.get(
                f"{prometheus.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=30
            ).json()["data"]
            if not {"reopt-test", "score"} & set(values):
                empty.append(f"{where}: {values}")
            continue
        query = dashboards.substitute(expr, {"pipeline": "reopt-test", "stage": ".*"})
        result = prometheus.query(query, start=served["started"], end=time.time(), step="5s")
        if not any(series["values"] for series in result):
            empty.append(f"{where}: {query}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    # and the numbers mean what the panels say: the promoted variant's speedup, the rollbacks of the injected ones
    speedup = prometheus.query(
        dashboards.substitute(
            'max by (stage) (hetforge_stage_speedup_ratio{pipeline="$pipeline"})', {"pipeline": "reopt-test"}
        )
    )
    assert float(speedup[0]["value"][1]) > 1.2, speedup
    rollbacks = prometheus.query('sum(hetforge_rollout_decisions_total{pipeline="reopt-test", decision="rollback"})')
    assert float(rollbacks[0]["value"][1]) >= 2, rollbacks
    placement = prometheus.query('hetforge_stage_placement_info{pipeline="reopt-test"}')
    assert {(r["metric"]["stage"], r["metric"]["device_class"]) for r in placement} == {
        ("prepare", "cpu"),
        ("score", "cpu"),
    }


def test_dashboard_page_renders_in_chromium(served, tmp_path):
    """The built-in page in headless Chromium: its plots are drawn (checked in the screenshot) and its tables list
    the stage, its speedup, the promotion's swap and the rollbacks."""
    import subprocess

    from PIL import Image

    from hetforge.serving.dashboard_page import PALETTE, SPEEDUP_BAR
    from tests.conftest import system_binary

    chromium = system_binary("chromium", "chromium")
    data = httpx.get(f"{served['url']}/v1/pipelines/reopt-test/dashboard", timeout=30).json()
    assert len(data["series"]) >= 5 and data["latest"]["speedup"]["score"] > 1.2, data["latest"]
    assert any(s["stage"] == "score" for s in data["swaps"]) and any(
        e["decision"] == "rollback" for e in data["rollout_events"]
    )
    shot = tmp_path / "dashboard.png"
    common = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1360,1400",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    subprocess.run(
        common + [f"--screenshot={shot}", f"{served['url']}/dashboard"], check=True, capture_output=True, timeout=120
    )
    dom = subprocess.run(
        common + ["--dump-dom", f"{served['url']}/dashboard"], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert "hetforge: reopt-test" in dom and "Speedup of the active variant over the reference" in dom
    assert "requests/s" in dom and "no requests in the last window" not in dom
    assert "score" in dom and "rollback" in dom and "promote" in dom
    image = Image.open(shot).convert("RGB")
    assert image.size == (1360, 1400)
    pixels = list(image.getdata())

    def count(colour: str) -> int:
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        return sum(1 for p in pixels if p == rgb)

    bar = count(SPEEDUP_BAR)
    assert bar > 1500, f"speedup bar: {bar} pixels"  # one bar per model stage, > 1.2x long and 22 px high
    lines = {c: count(c) for c in PALETTE[:2]}  # the first two series of each line plot (p50/p99, the stages)
    assert all(n > 200 for n in lines.values()), lines
    assert len(set(pixels)) > 50  # text and anti-aliasing: a rendered page, not a blank one
