"""The re-optimization loop with its state on PostgreSQL, and the database restarted twice while it works.

One deployment of tests/data/reoptimize/pipeline.yaml on a local Ray Serve instance, its registry
and boards in a database of the test's PostgreSQL server (`tests/postgres.py`), a load thread
checking every answer against the reference module (`test_reoptimize_e2e.Load`). The server is
stopped (`pg_ctl stop -m fast`: every session ends) and started again twice: while the
optimization job runs (the controller, the job's heartbeat and the replicas all lose their
connections), and after the variant's rollout started. Checked: no request fails or gets a wrong
answer, requests are answered while the database is down, the controller goes on (the job
finishes and registers its variant, the rollout is decided), every row written before a restart
is still there, and the stage has exactly one job and its variant one rollout.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("psycopg")

from tests.postgres import pg_server  # noqa: E402,F401 - the fixture
from tests.serving.test_reoptimize_e2e import PIPELINE, Load, _events, _wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
DOWN_S = 6  # how long the server stays down each time: several looks of the controller (interval_s: 1)

# rows that never change once written (statuses and heartbeats do), to compare before and after each restart
IMMUTABLE = {
    "variants": "SELECT id, name, fingerprint, source, created_at FROM variants",
    "jobs": "SELECT id, pipeline, stage, trigger, created_at FROM jobs",
    "rollouts": "SELECT id, stage, variant, created_at FROM rollouts",
    "rollout_events": "SELECT id, decision, variant, reason, at FROM rollout_events",
    "swap_requests": "SELECT id, stage, variant, requested_at FROM swap_requests",
}


def _rows(url: str) -> dict[str, set[tuple]]:
    from hetforge import state

    store = state.open_store(url)
    return {table: {tuple(r) for r in store.execute(sql)} for table, sql in IMMUTABLE.items()}


def _restart(server, url: str, load: Load) -> tuple[dict[str, set[tuple]], int]:
    """Stop the server, keep it down DOWN_S, start it again; the rows before, and the answers served meanwhile."""
    before = _rows(url)
    answered = load.sent
    server.stop("fast")
    try:
        time.sleep(DOWN_S)
        during = load.sent - answered
    finally:
        server.start()
    return before, during


@pytest.fixture(scope="module")
def served(pg_server, tmp_path_factory):  # noqa: F811 - the fixture imported above
    import os

    from tests.conftest import serving

    url = pg_server.new_database()
    home = tmp_path_factory.mktemp("home")
    with serving(
        PIPELINE, home, registry=url, HETFORGE_STATE_URL=url, HETFORGE_RAY_TMP=f"/tmp/hf-rpg-{os.getpid()}"
    ) as r:
        load = Load(r.url)
        try:
            yield {"url": r.url, "registry": url, "load": load, "server": pg_server}
        finally:
            load.stop()


def test_postgresql_restarted_during_a_job_and_a_rollout_loses_nothing_and_fails_no_request(served):
    from hetforge.kernels.registry import Registry
    from hetforge.serving.jobs import JobBoard
    from hetforge.serving.rollout import RolloutBoard

    url, load, server = served["registry"], served["load"], served["server"]
    assert Registry(url).store.kind == "postgresql"
    queued = _wait_for(served, "job", 0, 120)
    job_id = queued["numbers"]["job_id"]
    board = JobBoard(url)
    deadline = time.monotonic() + 120
    while board.get(job_id).state == "queued":  # launched: the controller and the job's task are both at work
        assert time.monotonic() < deadline, board.get(job_id)
        time.sleep(0.5)
    assert board.get(job_id).state == "running", board.get(job_id)

    before_job, during_job = _restart(server, url, load)
    done = _wait_for(served, "job_done", 0, 400)
    assert done["numbers"]["job_id"] == job_id and done["numbers"]["outcome"] == "registered", done["numbers"]
    variant = str(done["numbers"]["variant_id"])
    start = _wait_for(served, "start", 0, 120, variant)

    before_rollout, during_rollout = _restart(server, url, load)
    deadline = time.monotonic() + 400
    rollouts = RolloutBoard(url)
    while rollouts.running("reopt-test"):
        assert time.monotonic() < deadline, rollouts.running("reopt-test")
        time.sleep(0.5)
    decided = [e for e in _events(served, start["id"]) if e["variant"] == variant]
    assert any(e["decision"] in ("promote", "rollback") for e in decided), decided

    print(  # the figures docs/deployment.md quotes (pytest -rP shows them)
        f"answered while down: {during_job} (job), {during_rollout} (rollout); answered in all: {load.sent}; "
        f"rollout: {[e['decision'] for e in decided]}"
    )
    # serving went on while the database was down, and nothing failed or was wrong at any time
    assert during_job > 0 and during_rollout > 0, (during_job, during_rollout)
    assert load.sent > 0 and load.failed == 0 and load.wrong == 0, load.problems[:5]
    # nothing written before either restart is lost or changed
    after = _rows(url)
    for before in (before_job, before_rollout):
        for table, rows in before.items():
            assert rows <= after[table], (table, rows - after[table])
    # one job for the stage (the one queued before the first restart), finished once; one rollout for its variant
    jobs = board.list("reopt-test")
    assert [(j.id, j.stage, j.state) for j in jobs] == [(job_id, "score", "done")], jobs
    events = _events(served)
    assert [e["numbers"]["job_id"] for e in events if e["decision"] == "job"] == [job_id]
    assert [e["numbers"]["job_id"] for e in events if e["decision"] == "job_done"] == [job_id]
    mine = [r for r in rollouts.recent("reopt-test", 100) if r.variant == variant]
    assert len(mine) == 1 and mine[0].state in ("promoted", "rolled_back"), mine
    assert [e["decision"] for e in events if e["decision"] == "start" and e["variant"] == variant] == ["start"]
    status = Registry(url).get(int(variant)).status
    assert status == ("active" if mine[0].state == "promoted" else "rejected"), (status, mine[0])
    # the controller's looks all went through: the store waited out each restart instead of failing a look
    doc = httpx.get(f"{served['url']}/v1/pipelines/reopt-test/status", timeout=30).json()
    assert doc.get("reoptimize") is not None, doc  # the controller answered
    assert doc["reoptimize"]["errors"] == [], doc["reoptimize"]["errors"]
