"""The re-optimization controller on PostgreSQL: a database restart between and during its looks loses nothing."""

from __future__ import annotations

import threading

from hetforge.core.problem import Problem
from hetforge.serving.controller import Controller, StageInfo
from hetforge.serving.jobs import JobBoard
from hetforge.serving.swap_control import SwapBoard
from hetforge.spec import load_pipeline
from tests.serving.test_controller import PIPELINE, SCORER, Clock, FakeLauncher, _counters


def test_the_controller_survives_a_postgresql_restart_and_resumes_its_job(pg_server, tmp_path):
    url = pg_server.new_database()
    pipeline = load_pipeline(PIPELINE)
    problem = Problem(file=str(SCORER))
    stages = {
        "score": StageInfo("score", problem.load().fingerprint(), "cpu", "cpu", "strict", problem, {"num_cpus": 1})
    }
    counters = {"now": _counters(0, 1.0)}
    clock, launcher = Clock(), FakeLauncher()

    def controller() -> Controller:
        return Controller(
            pipeline,
            stages,
            url,
            metrics_source=lambda: counters["now"],
            launcher=launcher,
            swapper=lambda stage, variant: True,
            clock=clock,
            scratch=str(tmp_path / "jobs"),
        )

    first = controller()
    SwapBoard(url).heartbeat("reopt-test", "score", "r1", "reference", {"float32[2,16]": 0})
    first.tick()
    pg_server.stop()
    restart = threading.Timer(1.5, pg_server.start)
    restart.start()
    try:
        # written while the server is down: the store retries with backoff until it is back
        SwapBoard(url).heartbeat("reopt-test", "score", "r1", "reference", {"float32[2,16]": 40})
        counters["now"] = _counters(50, 4.0)  # score is hot: the next look queues and launches a job
        clock.t += 2
        first.tick()
    finally:
        restart.join(timeout=120)
    assert len(launcher.launched) == 1
    (job,) = JobBoard(url).list("reopt-test")
    assert job.trigger == "hot" and job.state == "running"
    pg_server.stop()
    pg_server.start()  # a second restart, then a new controller process: the running job is not started again
    again = controller()
    clock.t += 2
    again.tick()
    again.tick()
    assert len(launcher.launched) == 1 and [j.id for j in JobBoard(url).list("reopt-test")] == [job.id]


def test_a_job_silent_through_a_database_outage_is_not_lost_when_the_database_returns(pg_server):
    """Its heartbeat waited with the database; silence counts from the database's return, not from the last beat."""
    import time

    from hetforge.serving.jobs import LOST_AFTER_S

    url = pg_server.new_database()
    board = JobBoard(url)
    job = board.queue("reopt-test", "score", "hot", "busy", [])
    assert board.claim(job.id)
    # the last beat landed long ago, as after an outage longer than LOST_AFTER_S
    board.store.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (time.time() - 2 * LOST_AFTER_S, job.id))
    pg_server.stop()
    pg_server.start()
    assert board.mark_lost("reopt-test") == []  # the database just came back: the job gets LOST_AFTER_S to beat
    assert board.get(job.id).state == "running"
    later = board.store.recovered_at + LOST_AFTER_S + 1
    assert [j.id for j in board.mark_lost("reopt-test", now=later)] == [job.id]  # still silent after that: lost
    assert board.get(job.id).state == "failed"
