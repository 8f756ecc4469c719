"""The registry and every board through the state store, each test on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from hetforge import state
from hetforge.kernels.registry import Registry, RegistryError
from hetforge.serving.jobs import JobBoard
from hetforge.serving.rollout import RolloutBoard, StepStats
from hetforge.serving.swap_control import SwapBoard

ACCEPTED = {"verdict": "accepted", "needs_review": False, "reference_ms": 2.0, "candidate_ms": 1.0, "speedup": 2.0}
PLAN = [{"mode": "shadow", "weight": 100.0}, {"mode": "canary", "weight": 50.0}]


def _add(reg: Registry, name: str, speedup: float | None = 2.0, review: bool = False, fingerprint: str = "fp"):
    verdict = {**ACCEPTED, "speedup": speedup, "needs_review": review}
    return reg.add(
        fingerprint=fingerprint,
        device_class="cpu",
        precision="strict",
        name=name,
        agent="test",
        source=f"# {name}\n",
        verdict=verdict,
        recipe={"compile": "default"},
        signature={"x": [[4, 8], "float32"]},
    )


def test_registry_round_trip(location):
    reg = Registry(location)
    assert reg.store.kind == ("postgresql" if isinstance(location, str) else "sqlite")
    _add(reg, "no-speedup", None)  # NULL speedup sorts last on both backends
    slow = _add(reg, "slow", 1.2)
    fast = _add(reg, "fast", 3.0)
    flagged = _add(reg, "flagged", 9.0, review=True)
    assert flagged.status == "pending_review"
    assert reg.best("fp", "cpu", "strict").id == fast.id
    assert reg.best("fp", "cpu", "tf32").id == fast.id  # strict serves tf32
    assert reg.best("other", "cpu", "strict") is None
    got = reg.get(slow.id)
    assert (got.recipe, got.signature, got.verdict["speedup"]) == (
        {"compile": "default"},
        {"x": [[4, 8], "float32"]},
        1.2,
    )
    assert got.created_at == pytest.approx(time.time(), abs=600)  # 8-byte floats: PostgreSQL REAL would round this
    assert got.created_at == got.updated_at
    reg.set_status(flagged.id, "active", approver="alice")
    assert reg.best("fp", "cpu", "strict").name == "flagged"
    assert reg.get(flagged.id).approver == "alice"
    assert [v.name for v in reg.list(status="pending_review")] == []
    assert [v.name for v in reg.list("fp")] == ["no-speedup", "slow", "fast", "flagged"]
    with pytest.raises(RegistryError, match="no variant with id 999"):
        reg.get(999)
    with pytest.raises(RegistryError, match="no variant with id 999"):
        reg.set_status(999, "retired")
    # a second handle (as another process would open) sees the same rows
    assert [v.id for v in Registry(location).list()] == [v.id for v in reg.list()]


def test_swap_board(location):
    board = SwapBoard(location)
    assert board.latest("p", "s") is None
    first = board.request("p", "s", "3", requested_by="cli")
    second = board.request("p", "s", "reference")
    assert second > first and board.latest("p", "s") == (second, "reference")
    board.report(second, "r1", "refused", "too slow")
    board.report(second, "r1", "swapped")  # the replica's later report replaces its earlier one
    board.report(second, "r2", "swapped")
    assert [(r.replica, r.outcome, r.reason) for r in board.reports(second)] == [
        ("r1", "swapped", ""),
        ("r2", "swapped", ""),
    ]
    assert board.wait(second, 2, timeout_s=5) == board.reports(second)
    board.heartbeat("p", "s", "r1", "3", {"x:[4]": 7})
    board.heartbeat("p", "s", "r1", "reference", {"x:[4]": 9})
    board.heartbeat("p", "s", "r2", "3")
    assert board.alive("p", "s") == {"r1": "reference", "r2": "3"}
    assert board.signatures("p", "s") == {"r1": {"x:[4]": 9}}
    assert board.alive("p", "s", within_s=-1) == {}
    recent = board.recent("p")
    assert [r["id"] for r in recent] == [second, first]
    assert [x["replica"] for x in recent[0]["reports"]] == ["r1", "r2"]


def test_job_board(location):
    jobs = JobBoard(location)
    job = jobs.queue("p", "s", "hot", "numbers", ["x:[4]"], hint="fuse it")
    assert job.state == "queued" and job.signatures == ["x:[4]"] and job.hint == "fuse it"
    assert jobs.queue("p", "s", "hot", "again", []) is None  # one queued or running job per stage
    assert jobs.queue("p", "other", "hot", "numbers", []) is not None
    assert jobs.claim(job.id) and not jobs.claim(job.id)
    jobs.beat(job.id)
    assert jobs.get(job.id).state == "running"
    assert jobs.finish(job.id, "done", variant_id=4, summary={"speedup": 2.5})
    assert not jobs.finish(job.id, "failed")  # finished once
    done = jobs.get(job.id)
    assert (done.state, done.variant_id, done.summary) == ("done", 4, {"speedup": 2.5})
    assert [j.stage for j in jobs.list("p")] == ["s", "other"]
    assert [j.stage for j in jobs.list("p", states=("queued",))] == ["other"]
    lost = jobs.queue("p", "s", "hot", "numbers", [])
    jobs.claim(lost.id)
    assert [j.id for j in jobs.mark_lost("p", now=time.time() + 3600)] == [lost.id]
    assert jobs.get(lost.id).error.startswith("lost: no heartbeat")
    with pytest.raises(KeyError):
        jobs.get(999)


def test_rollout_board(location):
    board = RolloutBoard(location)
    rollout = board.start("p", "s", "7", PLAN, guard=True, job_id=3)
    assert (rollout.step, rollout.mode, rollout.guard, rollout.job_id) == (0, "shadow", True, 3)
    assert board.start("p", "s", "8", PLAN, guard=True) is None  # one running rollout per stage
    board.write_stats(rollout.id, 0, "r1", StepStats(3, 4, 0, 0, [1.0, 2.0], [2.0], []))
    board.write_stats(rollout.id, 0, "r1", StepStats(5, 6, 1, 0, [1.0], [2.0, 3.0], ["boom"]))  # replaces
    board.write_stats(rollout.id, 0, "r2", StepStats(1, 1, 0, 1, [1.5], [2.5], []))
    total = board.step_stats(rollout.id, 0)
    assert (total.canary_calls, total.baseline_calls, total.canary_errors, total.disagreements) == (6, 7, 1, 1)
    assert sorted(total.canary_ms) == [1.0, 1.5] and total.failures == ["r1: boom"]
    advanced = board.advance(rollout)
    assert advanced.step == 1 and board.advance(rollout).step == 1  # only from the step it was at
    board.record("p", "s", "advance", rollout=advanced, numbers={"p50": 1.0}, reason="faster")
    board.record("p", "s", "job", numbers={"job_id": 3}, actor="alice")
    assert [e["decision"] for e in board.events("p")] == ["advance", "job"]
    assert board.events("p", decision="advance")[0]["numbers"] == {"p50": 1.0}
    assert [r.id for r in board.running("p", "s")] == [rollout.id]
    assert board.finish(advanced, "promoted", "done") and not board.finish(advanced, "rolled_back", "late")
    assert board.running("p") == [] and board.recent("p")[0].state == "promoted"
    assert board.start("p", "s", "8", PLAN, guard=False) is not None


def test_migrations_are_recorded_once_and_a_newer_schema_is_refused(location):
    Registry(location)
    store = state.open_store(location)
    migrations = [
        state.Migration(1, "t", "CREATE TABLE IF NOT EXISTS extra_t (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL)")
    ]
    store.migrate("extra", migrations)
    store.migrate("extra", migrations)  # applied already: nothing runs
    v2 = [*migrations, state.Migration(2, "column", "ALTER TABLE extra_t ADD COLUMN note TEXT")]
    store.migrate("extra", v2)
    store.execute("INSERT INTO extra_t (at, note) VALUES (?, ?)", (1.5, "x"))
    rows = store.execute("SELECT version, name FROM schema_migrations WHERE component = 'extra' ORDER BY version")
    assert [(r[0], r[1]) for r in rows] == [(1, "t"), (2, "column")]
    with pytest.raises(state.StoreSchemaError, match="extra schema is at version 2, this hetforge knows up to 1"):
        store.migrate("extra", migrations)


def _writer(location, worker: int, n: int, out) -> None:
    try:
        reg, jobs, swaps = Registry(location), JobBoard(location), SwapBoard(location)
        for i in range(n):
            _add(reg, f"w{worker}-{i}", 1.0 + i)
            swaps.request("p", "s", str(i), requested_by=f"w{worker}")
        queued = [stage for stage in ("a", "b", "c", "d") if jobs.queue("p", stage, "hot", f"w{worker}", [])]
        out.put((worker, queued, ""))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the test with it
        out.put((worker, [], repr(err)))


def test_concurrent_writers_from_several_processes_lose_nothing(location):
    Registry(location), JobBoard(location), SwapBoard(location)  # the schema first, as `hetforge serve` does
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers, n = 4, 15
    procs = [ctx.Process(target=_writer, args=(location, w, n, out)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[2] for r in results] == [""] * workers
    reg = Registry(location)
    names = sorted(v.name for v in reg.list())
    assert names == sorted(f"w{w}-{i}" for w in range(workers) for i in range(n))
    assert len({v.id for v in reg.list()}) == workers * n
    assert len(SwapBoard(location).recent("p", limit=1000)) == workers * n
    # each stage's job was queued by exactly one writer: the check and the insert are one transaction
    queued = sorted(stage for r in results for stage in r[1])
    assert queued == ["a", "b", "c", "d"]
    assert sorted(j.stage for j in JobBoard(location).list("p")) == ["a", "b", "c", "d"]


def test_postgresql_restarted_midway_the_store_reconnects(pg_server):
    url = pg_server.new_database()
    reg, jobs = Registry(url), JobBoard(url)
    before = _add(reg, "before")
    pg_server.stop()
    done: dict = {}

    def write_while_down() -> None:
        try:
            done["variant"] = _add(reg, "during")  # retries with backoff until the server is back
        except Exception as err:  # noqa: BLE001 - the assertion below shows it
            done["error"] = err

    writer = threading.Thread(target=write_while_down)
    writer.start()
    time.sleep(1.5)
    assert writer.is_alive() and not done  # still retrying: nothing lost, nothing failed yet
    pg_server.start()
    writer.join(timeout=120)
    assert "error" not in done, done.get("error")
    assert reg.store.retries >= 1
    job = jobs.queue("p", "s", "hot", "after restart", [])  # a transaction on a connection opened anew
    assert job is not None
    assert [v.name for v in reg.list()] == ["before", "during"] and reg.get(before.id).name == "before"


def test_postgresql_down_longer_than_the_retry_window_is_an_error_with_its_cause(pg_server):
    url = pg_server.new_database()
    store = state.PostgresStore(url, retry_s=1.0)
    store.execute("SELECT 1")
    pg_server.stop()
    try:
        with pytest.raises(state.StoreUnavailable, match=r"unreachable for 1 s \(\$HETFORGE_STATE_RETRY_S\)") as err:
            store.execute("SELECT 1")
        assert err.value.cause
    finally:
        pg_server.start()
    assert store.execute("SELECT 1").fetchone()[0] == 1
    store.close()


def test_a_password_never_shows_in_the_location():
    store = state.PostgresStore("postgresql://hetforge:s3cret@db:5432/hetforge")
    assert "s3cret" not in store.location and store.location == "postgresql://hetforge:***@db:5432/hetforge"
