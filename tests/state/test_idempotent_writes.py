"""A write whose commit lands just before its connection drops runs once: the retry finds its record.

The drop is real: the commit goes through, then another connection ends the session with
`pg_terminate_backend`, and the client learns it on its next use of the connection, as it would
when a server restarts between the commit and its acknowledgement. (SQLite has no connection to
lose and retries nothing.)
"""

from __future__ import annotations

import contextlib
import time

import pytest

psycopg = pytest.importorskip("psycopg")

from hetforge.kernels.registry import Registry  # noqa: E402
from hetforge.serving.jobs import JobBoard  # noqa: E402
from hetforge.serving.rollout import RolloutBoard  # noqa: E402
from hetforge.serving.swap_control import SwapBoard  # noqa: E402

ACCEPTED = {"verdict": "accepted", "needs_review": False, "reference_ms": 2.0, "candidate_ms": 1.0, "speedup": 2.0}


class _DroppedAfterCommit:
    """The store's connection, but the next transaction's commit is followed by the end of its session."""

    def __init__(self, conn, admin_url: str, fired: list):
        self._conn, self._admin_url, self._fired = conn, admin_url, fired

    def __getattr__(self, name):
        return getattr(self._conn, name)

    @contextlib.contextmanager
    def transaction(self):
        with self._conn.transaction() as tx:
            yield tx
        # committed: the server ends this session before the client hears anything more
        pid = self._conn.info.backend_pid
        with psycopg.connect(self._admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        self._fired.append(pid)
        self._conn.execute("SELECT 1")  # raises: the connection is gone, as a lost acknowledgement shows


def _drop_after_next_commit(store, admin_url: str, monkeypatch) -> list:
    """Arm `store` so that its next transaction commits and then loses its connection; returns the list of drops."""
    fired: list = []
    original = store._conn

    def conn():
        real = original()
        return real if fired else _DroppedAfterCommit(real, admin_url, fired)

    monkeypatch.setattr(store, "_conn", conn)
    return fired


def _add(reg: Registry, name: str):
    return reg.add(
        fingerprint="fp",
        device_class="cpu",
        precision="strict",
        name=name,
        agent="test",
        source=f"# {name}\n",
        verdict=ACCEPTED,
        recipe={},
        signature={},
    )


def _count(store, sql: str, args=()) -> int:
    return int(store.execute(sql, args).fetchone()[0])


def test_an_insert_whose_acknowledgement_is_lost_leaves_one_row_and_returns_its_id(pg_server, monkeypatch):
    url = pg_server.new_database()
    reg = Registry(url)
    _add(reg, "before")
    fired = _drop_after_next_commit(reg.store, pg_server.url(), monkeypatch)
    retries, replayed = reg.store.retries, reg.store.replayed
    variant = _add(reg, "dropped")
    assert len(fired) == 1 and reg.store.retries == retries + 1  # the drop happened, after the commit
    assert reg.store.replayed == replayed + 1  # the retry found the commit's record instead of inserting again
    assert [v.name for v in reg.list()] == ["before", "dropped"]
    assert variant.id == reg.list()[-1].id and variant.name == "dropped"


def test_a_queued_job_whose_acknowledgement_is_lost_is_one_job_and_reported_as_queued(pg_server, monkeypatch):
    url = pg_server.new_database()
    board = JobBoard(url)
    fired = _drop_after_next_commit(board.store, pg_server.url(), monkeypatch)
    job = board.queue("p", "score", "hot", "busy", [])
    # run again, the check-and-insert would see its own job and answer None ("one is already queued")
    assert fired and job is not None
    assert [j.id for j in board.list("p")] == [job.id]


def test_a_claim_whose_acknowledgement_is_lost_still_says_claimed(pg_server, monkeypatch):
    url = pg_server.new_database()
    board = JobBoard(url)
    job = board.queue("p", "score", "hot", "busy", [])
    fired = _drop_after_next_commit(board.store, pg_server.url(), monkeypatch)
    # run again, `UPDATE ... WHERE state = 'queued'` would match no row: the claimer would think it lost the job
    assert board.claim(job.id) is True
    assert fired and board.get(job.id).state == "running"
    assert board.claim(job.id) is False  # a second, separate claim still loses


def test_a_swap_request_and_a_rollout_event_whose_acknowledgement_is_lost_are_one_row_each(pg_server, monkeypatch):
    url = pg_server.new_database()
    swaps, rollouts = SwapBoard(url), RolloutBoard(url)
    fired = _drop_after_next_commit(swaps.store, pg_server.url(), monkeypatch)
    request = swaps.request("p", "s", "3")
    assert len(fired) == 1 and swaps.latest("p", "s") == (request, "3")
    assert _count(swaps.store, "SELECT COUNT(*) FROM swap_requests") == 1
    monkeypatch.undo()
    fired = _drop_after_next_commit(rollouts.store, pg_server.url(), monkeypatch)
    rollouts.record("p", "s", "job", numbers={"job_id": 1}, reason="hot")
    assert len(fired) == 1 and [e["decision"] for e in rollouts.events("p")] == ["job"]


def test_a_write_dropped_before_its_commit_runs_again(pg_server, monkeypatch):
    """The other side: no record, so the transaction rolled back with its connection and the retry writes."""
    url = pg_server.new_database()
    reg = Registry(url)
    store = reg.store
    original = store._conn
    dropped: list = []

    class DroppedBeforeCommit(_DroppedAfterCommit):
        @contextlib.contextmanager
        def transaction(self):
            with self._conn.transaction() as tx:
                yield tx
                pid = self._conn.info.backend_pid
                with psycopg.connect(pg_server.url(), autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                dropped.append(pid)

    monkeypatch.setattr(store, "_conn", lambda: original() if dropped else DroppedBeforeCommit(original(), "", []))
    replayed = store.replayed
    variant = _add(reg, "retried")
    assert dropped and store.replayed == replayed  # nothing recorded: run again
    assert [v.id for v in reg.list()] == [variant.id]


def test_old_write_records_are_deleted(pg_server):
    from hetforge.state import postgres

    url = pg_server.new_database()
    reg = Registry(url)
    _add(reg, "first")
    reg.store.execute("UPDATE state_writes SET at = at - ?", (postgres.KEEP_KEYS_S + 60,))  # recorded too, as new
    old = "SELECT COUNT(*) FROM state_writes WHERE at < ?"
    assert _count(reg.store, old, (time.time() - postgres.KEEP_KEYS_S,)) == 1  # the first add's record, aged
    reg.store._recorded = 0  # the next recorded write is one that deletes old records
    _add(reg, "second")
    assert _count(reg.store, old, (time.time() - postgres.KEEP_KEYS_S,)) == 0
    assert _count(reg.store, "SELECT COUNT(*) FROM state_writes") == 2  # the UPDATE's and the second add's
