"""Swaps and rollout steps through Ray Serve's user_config on a real local Ray Serve instance: they reach every
replica without restarting it, a replica started later comes up on the current variant, and replicas keep
answering with the store gone (their reports wait for it). One deployment serves every test of this module, in order."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from hetforge.serving.ingress.auth import client_headers  # noqa: E402
from tests.conftest import REPO, serving  # noqa: E402

DATA = REPO / "tests" / "data" / "serving"
PIPELINE = DATA / "swap_pipeline.yaml"
APP, STAGE, DEPLOYMENT = "swap-test", "classify", "stage-classify"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SAME = (REPO / "tests" / "data" / "serving" / "models" / "classifier_addmm.py").read_text()
ACCEPTED = {"verdict": "accepted", "needs_review": False, "speedup": 1.4, "reference_ms": 1.0, "candidate_ms": 0.71}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    from hetforge.core.problem import source_fingerprint
    from hetforge.kernels.registry import Registry

    registry = Registry(home / "registry.sqlite")
    fingerprint = source_fingerprint((DATA / "models" / "classifier.py").read_text())
    ids = {
        name: registry.add(
            fingerprint=fingerprint,
            device_class="cpu",
            precision="strict",
            name=name,
            agent="test",
            source=SAME,
            verdict=ACCEPTED,
            recipe={"kind": "module"},
        ).id
        for name in ("swapped", "rolled-out")
    }
    with serving(PIPELINE, home, HETFORGE_RAY_TMP=f"/tmp/hf-ray-{os.getpid()}") as record:
        yield {"url": record.url, "home": home, "registry": str(home / "registry.sqlite"), "ids": ids, "record": record}


def _replicas(deployment: str = DEPLOYMENT) -> dict[str, int]:
    """Replica id -> PID of a deployment's RUNNING replicas (the stage's by default), from Serve's controller."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace="serve")
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=60)
    found = details["applications"][APP]["deployments"][deployment]["replicas"]
    return {r["replica_id"]: r["pid"] for r in found if str(r["state"]).endswith("RUNNING")}


def _owner(tag: str, ids) -> str:
    """The Serve replica id a replica's report names (its tag ends with the id)."""
    matches = [i for i in ids if tag.endswith(i)]
    assert len(matches) == 1, (tag, list(ids))
    return matches[0]


@contextlib.contextmanager
def _load(url: str, clients: int = 3):
    """Concurrent pipeline requests for the block's duration: yields {"ok": [...], "failed": [...]}."""
    seen: dict[str, list] = {"ok": [], "failed": []}
    stop = threading.Event()

    def run(k: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                x = [[(k + i) / 16.0 for i in range(16)]]
                try:
                    r = client.post(f"{url}/v1/pipelines/{APP}/run", json={"input": {"x": x}})
                    (seen["ok"] if r.status_code == 200 else seen["failed"]).append(r.status_code)
                except httpx.HTTPError as err:
                    seen["failed"].append(type(err).__name__)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def _wait(what, timeout_s: float = 180, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll_s)


def test_swap_reaches_every_replica_without_restarting_it(served):
    before, ingress = _replicas(), _replicas("PipelineIngress")
    assert len(before) == 2
    with _load(served["url"]) as seen:
        time.sleep(2)
        reply = httpx.post(
            f"{served['url']}/v1/pipelines/{APP}/stages/{STAGE}/swap",
            json={"variant": served["ids"]["swapped"], "wait_s": 120},
            headers=client_headers(),
            timeout=180,
        )
        time.sleep(1)
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert isinstance(doc["request_id"], int)
    assert sorted(_owner(r["replica"], before) for r in doc["reports"]) == sorted(before)  # each replica, once
    assert {r["outcome"] for r in doc["reports"]} == {"swapped"}
    assert _replicas() == before  # the same replicas, the same processes
    assert _replicas("PipelineIngress") == ingress  # the application was submitted again: nothing else restarted
    assert seen["failed"] == [] and len(seen["ok"]) > 0
    served["swap_request"] = doc["request_id"]


def test_a_replica_started_later_comes_up_on_the_current_variant(served):
    from hetforge.serving import deploy
    from hetforge.serving.swap_control import SwapBoard
    from hetforge.spec.load import load_bytes

    before = _replicas()
    bigger = load_bytes(PIPELINE.read_bytes().replace(b"min_replicas: 2", b"min_replicas: 3"), str(PIPELINE), DATA)
    record = served["record"]
    with _load(served["url"]) as seen:
        changed, _ = deploy.redeploy(record, bigger, DATA, record.placement)
        after = _wait(lambda: (lambda r: r if len(r) == 3 else None)(_replicas()))
    assert DEPLOYMENT not in changed and after, "the third replica did not start"
    assert {k: after[k] for k in before} == before  # scaling up restarted none
    (new,) = set(after) - set(before)
    board = SwapBoard(served["registry"])
    reports = _wait(lambda: [r for r in board.reports(served["swap_request"]) if r.replica.endswith(new)])
    assert [r.outcome for r in reports] == ["swapped"]  # it applied the stage's current swap before serving
    alive = _wait(lambda: {t: v for t, v in board.alive(APP, STAGE).items() if t.endswith(new)})
    assert list(alive.values()) == [f"variant:{served['ids']['swapped']}"]
    assert seen["failed"] == []


def test_a_rollout_step_reaches_every_replica(served):
    from hetforge.serving.rollout import RolloutBoard
    from hetforge.serving.swap_control import publish

    board = RolloutBoard(served["registry"])
    plan = [{"mode": "shadow", "weight": 100.0}, {"mode": "canary", "weight": 50.0}]
    rollout = board.start(APP, STAGE, str(served["ids"]["rolled-out"]), plan, guard=True)
    replicas = _replicas()

    def reporting(step: int) -> list[str]:
        rows = board.store.execute(
            "SELECT replica FROM rollout_stats WHERE rollout_id = ? AND step = ?", (rollout.id, step)
        ).fetchall()
        found = sorted(_owner(r[0], replicas) for r in rows)
        return found if found == sorted(replicas) else []

    with _load(served["url"]) as seen:
        publish(served["registry"], APP, STAGE, "rollout", rollout.to_config())
        assert _wait(lambda: reporting(0)), "not every replica runs the rollout's first step"
        rollout = board.advance(rollout)
        publish(served["registry"], APP, STAGE, "rollout", rollout.to_config())
        assert _wait(lambda: reporting(1)), "not every replica moved to the second step"
        board.finish(rollout, "rolled_back", "test over")
        publish(served["registry"], APP, STAGE, "rollout", None)
    stats = board.step_stats(rollout.id, 0)
    assert stats.failures == [] and stats.disagreements == 0
    assert _replicas() == replicas and seen["failed"] == []


def test_replicas_keep_serving_with_the_store_gone(served, tmp_path):
    from hetforge.serving import serve_config
    from hetforge.serving.swap_control import SwapBoard, deployment_name

    board = SwapBoard(served["registry"])
    request_id = board.request(APP, STAGE, "reference", requested_by="test")
    replicas = _replicas()
    files = [Path(served["registry"] + suffix) for suffix in ("", "-wal", "-shm")]
    with _load(served["url"]) as seen:
        time.sleep(1)
        for f in files:  # every statement on the store now fails (StoreMissing): the store is down
            if f.exists():
                shutil.move(f, tmp_path / f.name)
        try:
            # a change published while the store is down: replicas apply it, their reports wait
            serve_config.update_user_config(
                APP, deployment_name(STAGE), lambda c: {**c, "swap": {"id": request_id, "variant": "reference"}}
            )
            time.sleep(8)  # several report rounds fail meanwhile
            during = len(seen["ok"])
        finally:
            for f in files:
                if (tmp_path / f.name).exists():
                    shutil.move(tmp_path / f.name, f)
        reports = _wait(lambda: (lambda r: r if len(r) == len(replicas) else None)(board.reports(request_id)))
    assert seen["failed"] == [] and during > 0
    assert reports and {r.outcome for r in reports} == {"swapped"}, reports  # written once the store was back
    assert _replicas() == replicas
