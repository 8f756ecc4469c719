"""Optimization jobs started by the controller: their records and the spec a job runs from.

A job optimizes one model stage for the input signatures production sends it. Its record lives in
the registry's store (`jobs`): queued (by the controller, the API or `hetforge approvals
guide`), running (with a heartbeat the job itself writes), then done or failed. At most one job per
stage is queued or running; the check and the insert are one transaction, so two controllers (or a
restarted one) never start a stage's job twice, and a running job whose heartbeat stops is marked
lost and may be started again.

The controller hands a running job a `JobSpec`; the body that runs it, and the Ray wrapper that
starts it, are in `job_runner.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

from hetforge import state
from hetforge.serving.boards import Board
from hetforge.serving.rollout import RolloutBoard
from hetforge.serving.swap_control import SwapError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL, stage TEXT NOT NULL,
    trigger TEXT NOT NULL,            -- hot | regression | new_shape | hint | manual
    reason TEXT NOT NULL,             -- the numbers that started it
    hint TEXT NOT NULL DEFAULT '',
    signatures TEXT NOT NULL,         -- JSON: the input signatures it optimizes for, most frequent first
    state TEXT NOT NULL,              -- queued | running | done | failed
    variant_id INTEGER,               -- the variant it registered, if any
    summary TEXT,                     -- JSON: the optimize report's summary
    error TEXT,
    created_at REAL NOT NULL, started_at REAL, heartbeat_at REAL, finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_stage ON jobs (pipeline, stage, state);
"""
MIGRATIONS = [state.Migration(1, "jobs", _SCHEMA)]
HEARTBEAT_S = 2.0
LOST_AFTER_S = 60.0  # a running job silent this long is counted lost (its process died with its node)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    id: int
    pipeline: str
    stage: str
    trigger: str
    reason: str
    hint: str
    signatures: list[str]
    state: str
    variant_id: int | None
    summary: dict | None
    error: str | None
    created_at: float
    started_at: float | None
    heartbeat_at: float | None
    finished_at: float | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs to run, from the controller: it crosses into a Ray task as JSON."""

    registry_path: str
    job_id: int
    pipeline: str
    stage: str
    problem: dict  # the stage's reference, `Problem.to_json()`
    device: str  # cpu | cuda
    device_class: str
    precision: str
    budget_s: float
    scratch: str  # a folder for the job's files (its production problem, candidates)
    agents: tuple[str, ...] = ()
    hint: str = ""
    approval: str = "auto"  # auto: the winner becomes `canary`; manual: `pending_review`
    signatures: tuple[str, ...] = ()  # the input signatures it optimizes for, most frequent first
    threads: int = 1
    kind: str = "model"  # model: the optimizer on the stage's module; llm: engine settings (`llm_job.py`)
    llm: dict | None = None  # an LLM job's stage spec, base_dir, fingerprint, recorded-traffic folder, running settings

    def to_json(self) -> dict:
        doc = asdict(self)
        for key in ("agents", "signatures"):
            doc[key] = list(doc[key])
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> JobSpec:
        return cls(
            **{
                **doc,
                "agents": tuple(doc.get("agents") or ()),
                "signatures": tuple(doc.get("signatures") or ()),
            }
        )


def lower_priority() -> None:
    """A job runs at nice 10 on the replicas' cores: serving comes first. A host that refuses says so in the log."""
    try:
        os.nice(10)
    except OSError as err:
        log.warning("job kept its priority: os.nice(10) refused (%s)", err)


@contextlib.contextmanager
def heartbeat(board: JobBoard, job_id: int):
    """Beat the job's row every HEARTBEAT_S while the block runs (a store that is away is tried again next beat)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                board.beat(job_id)
            except state.StoreError:
                continue

    threading.Thread(target=beat, daemon=True, name=f"job-{job_id}-heartbeat").start()
    try:
        yield
    finally:
        stop.set()


class JobBoard(Board):
    COMPONENT, MIGRATIONS = "jobs", MIGRATIONS

    def queue(
        self, pipeline: str, stage: str, trigger: str, reason: str, signatures: list[str], hint: str = ""
    ) -> Job | None:
        """A queued job, or None when the stage already has one queued or running."""

        def check_and_insert(tx: state.Tx) -> int | None:
            busy = tx.execute(
                "SELECT 1 FROM jobs WHERE pipeline = ? AND stage = ? AND state IN ('queued', 'running')",
                (pipeline, stage),
            ).fetchone()
            if busy:
                return None
            return tx.execute(
                "INSERT INTO jobs (pipeline, stage, trigger, reason, hint, signatures, state, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?) RETURNING id",
                (pipeline, stage, trigger, reason[:2000], hint[:4000], json.dumps(signatures), time.time()),
            ).fetchone()[0]

        job_id = self.store.atomic(check_and_insert, lock="hetforge-jobs")
        return None if job_id is None else self.get(job_id)

    def claim(self, job_id: int) -> bool:
        """queued -> running; False when someone else took it (the launch that wins runs it)."""
        now = time.time()
        cur = self.store.execute(
            "UPDATE jobs SET state = 'running', started_at = ?, heartbeat_at = ? WHERE id = ? AND state = 'queued'",
            (now, now, job_id),
        )
        return cur.rowcount == 1

    def beat(self, job_id: int) -> None:
        self.store.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND state = 'running'", (time.time(), job_id))

    def finish(
        self,
        job_id: int,
        state: str,
        variant_id: int | None = None,
        summary: dict | None = None,
        error: str | None = None,
    ) -> bool:
        cur = self.store.execute(
            "UPDATE jobs SET state = ?, variant_id = ?, summary = ?, error = ?, finished_at = ? WHERE id = ?"
            " AND state IN ('queued', 'running')",
            (
                state,
                variant_id,
                json.dumps(summary, default=str) if summary is not None else None,
                (error or "")[:4000] or None,
                time.time(),
                job_id,
            ),
        )
        return cur.rowcount == 1

    def get(self, job_id: int) -> Job:
        row = self.store.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        return _job(row)

    def list(
        self, pipeline: str, stage: str | None = None, states: tuple[str, ...] = (), limit: int = 100
    ) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE pipeline = ?", [pipeline]
        if stage is not None:
            query, args = query + " AND stage = ?", args + [stage]
        if states:
            query, args = query + f" AND state IN ({','.join('?' * len(states))})", args + list(states)
        rows = self.store.execute(query + " ORDER BY id DESC LIMIT ?", args + [limit]).fetchall()
        return [_job(r) for r in reversed(rows)]

    def mark_lost(self, pipeline: str, now: float | None = None) -> list[Job]:
        """Running jobs whose heartbeat stopped more than LOST_AFTER_S ago become failed (so the stage may run another)."""
        now = now or time.time()
        running = self.list(pipeline, states=("running",))
        # a heartbeat that waited out a database outage lands late: silence counts from the database's return
        recovered = getattr(self.store, "recovered_at", 0.0)  # read after `list`, which may be the return
        lost = [j for j in running if max(j.heartbeat_at or 0, recovered) < now - LOST_AFTER_S]
        for job in lost:
            self.finish(job.id, "failed", error=f"lost: no heartbeat for {now - (job.heartbeat_at or now):.0f} s")
        return lost


def _job(row) -> Job:
    d = dict(row)
    d["signatures"] = json.loads(d["signatures"])
    d["summary"] = json.loads(d["summary"]) if d["summary"] else None
    return Job(**d)


def queue_hint_job(registry_path: str, pipeline, stage: str, hint: str, actor: str = "human") -> Job:
    """A job for `stage` carrying a human's hint (the controller launches it on its next look)."""
    names = [s.name for s in pipeline.stages]
    if stage not in names:
        raise SwapError(f"pipeline {pipeline.name} has no stage {stage!r} (stages: {', '.join(names)})", 404)
    target = pipeline.stage(stage)
    optimizable = target.kind == "model" or (target.kind == "llm" and getattr(target, "vllm", None) is not None)
    if not optimizable or not target.optimize:
        raise SwapError(f"stage {stage} is not a model or vLLM stage hetforge may optimize", 400)
    if not hint.strip():
        raise SwapError("give a hint: the text that goes into every agent's prompt", 400)
    job = JobBoard(registry_path).queue(pipeline.name, stage, "hint", f"hint from {actor}", [], hint=hint)
    if job is None:
        raise SwapError(f"stage {stage} already has a job queued or running; try again when it ends", 409)
    RolloutBoard(registry_path).record(
        pipeline.name, stage, "job", numbers={"job_id": job.id, "trigger": "hint"}, reason=hint, actor=actor
    )
    return job
