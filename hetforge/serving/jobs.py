"""Optimization jobs started by the controller: their records, their body, and how they reach Ray.

A job optimizes one model stage for the input signatures production sends it. Its record lives in
the registry's SQLite file (`jobs`): queued (by the controller, the API or `hetforge approvals
guide`), running (with a heartbeat the job itself writes), then done or failed. At most one job per
stage is queued or running; the check and the insert are one transaction, so two controllers (or a
restarted one) never start a stage's job twice, and a running job whose heartbeat stops is marked
lost and may be started again.

The body (`run_job`) runs in a Ray task with the resources of the stage's device class, so it lands
on a node with that device; `JobRunner`, a detached actor, owns those tasks so that they outlive a
controller restart. The body lowers its own priority (nice 10, `job_cpus` threads): serving on the
same cores comes first.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetforge.serving.boards import SqliteBoard

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
HEARTBEAT_S = 2.0
LOST_AFTER_S = 60.0  # a running job silent this long is counted lost (its process died with its node)


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


class JobBoard(SqliteBoard):
    SCHEMA = _SCHEMA

    def queue(self, pipeline: str, stage: str, trigger: str, reason: str, signatures: list[str], hint: str = "") -> Job | None:
        """A queued job, or None when the stage already has one queued or running."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            busy = db.execute("SELECT 1 FROM jobs WHERE pipeline = ? AND stage = ? AND state IN ('queued', 'running')",
                              (pipeline, stage)).fetchone()
            if busy:
                db.execute("ROLLBACK")
                return None
            job_id = db.execute("INSERT INTO jobs (pipeline, stage, trigger, reason, hint, signatures, state, created_at)"
                                " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                                (pipeline, stage, trigger, reason[:2000], hint[:4000], json.dumps(signatures), time.time())).lastrowid
            db.execute("COMMIT")
        finally:
            db.close()
        return self.get(job_id)

    def claim(self, job_id: int) -> bool:
        """queued -> running; False when someone else took it (the launch that wins runs it)."""
        now = time.time()
        with self._db() as db:
            cur = db.execute("UPDATE jobs SET state = 'running', started_at = ?, heartbeat_at = ? WHERE id = ? AND state = 'queued'",
                             (now, now, job_id))
        return cur.rowcount == 1

    def beat(self, job_id: int) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND state = 'running'", (time.time(), job_id))

    def finish(self, job_id: int, state: str, variant_id: int | None = None, summary: dict | None = None, error: str | None = None) -> bool:
        with self._db() as db:
            cur = db.execute("UPDATE jobs SET state = ?, variant_id = ?, summary = ?, error = ?, finished_at = ? WHERE id = ?"
                             " AND state IN ('queued', 'running')",
                             (state, variant_id, json.dumps(summary, default=str) if summary is not None else None,
                              (error or "")[:4000] or None, time.time(), job_id))
        return cur.rowcount == 1

    def get(self, job_id: int) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        return _job(row)

    def list(self, pipeline: str, stage: str | None = None, states: tuple[str, ...] = (), limit: int = 100) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE pipeline = ?", [pipeline]
        if stage is not None:
            query, args = query + " AND stage = ?", args + [stage]
        if states:
            query, args = query + f" AND state IN ({','.join('?' * len(states))})", args + list(states)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", args + [limit]).fetchall()
        return [_job(r) for r in reversed(rows)]

    def mark_lost(self, pipeline: str, now: float | None = None) -> list[Job]:
        """Running jobs whose heartbeat stopped more than LOST_AFTER_S ago become failed (so the stage may run another)."""
        now = now or time.time()
        lost = [j for j in self.list(pipeline, states=("running",)) if (j.heartbeat_at or 0) < now - LOST_AFTER_S]
        for job in lost:
            self.finish(job.id, "failed", error=f"lost: no heartbeat for {now - (job.heartbeat_at or now):.0f} s")
        return lost


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["signatures"] = json.loads(d["signatures"])
    d["summary"] = json.loads(d["summary"]) if d["summary"] else None
    return Job(**d)


# ---------------------------------------------------------------------------------------------- production problem
def parse_signature(signature: str) -> list[tuple[str, list[int]]]:
    """`float32[8,16];int64[8]` -> [("float32", [8, 16]), ("int64", [8])]."""
    out = []
    for part in signature.split(";"):
        dtype, _, dims = part.partition("[")
        if not dims.endswith("]"):
            raise ValueError(f"not a tensor signature: {part!r}")
        out.append((dtype, [int(d) for d in dims[:-1].split(",") if d]))
    return out


_PROBLEM_TEMPLATE = '''"""Generated by hetforge for job {job_id}: stage {stage} of pipeline {pipeline}, with the input
signatures production sent it ({share}). Model and constructor arguments are the stage's own."""

import torch

from hetforge.core.problem import load_module_file

_reference = load_module_file({path!r})
Model = _reference.Model
_INIT = {init!r}
_SIGNATURES = {signatures!r}  # most frequent first: [(dtype, shape), ...] per call
_RANGES = {ranges!r}  # per input: ("int", lo, hi) or ("float", mean, std), from the stage's own get_inputs()


def _make(signature):
    out = []
    for (dtype, shape), (kind, a, b) in zip(signature, _RANGES):
        dt = getattr(torch, dtype)
        if kind == "int":
            out.append(torch.randint(int(a), int(b) + 1, shape).to(dt))
        else:
            out.append((torch.randn(shape) * b + a).to(dt))
    return out


def get_init_inputs():
    return list(_INIT)


def get_inputs():
    return _make(_SIGNATURES[0])


def get_input_variants():
    return [_make(s) for s in _SIGNATURES[1:]]
'''


def write_production_problem(out: Path, job_id: int, pipeline: str, stage: str, problem_file: str, init_args: list,
                             signatures: list[str], share: str = "") -> Path:
    """A problem file whose inputs have production's signatures and the value ranges of the stage's own inputs."""
    import torch

    from hetforge.core.problem import load_module_file

    example = load_module_file(problem_file).get_inputs()
    ranges = []
    for x in example:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"stage {stage}: get_inputs() returns a {type(x).__name__}; production problems need tensors")
        if x.dtype.is_floating_point:
            ranges.append(("float", round(float(x.float().mean()), 6), round(float(x.float().std()) or 1.0, 6)))
        else:
            ranges.append(("int", int(x.min()), int(x.max())))
    parsed = [[(d, shape) for d, shape in parse_signature(sig)] for sig in signatures]
    parsed = [p for p in parsed if len(p) == len(ranges)] or [[(str(x.dtype).removeprefix("torch."), list(x.shape)) for x in example]]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"job_{job_id}_{stage}.py"
    path.write_text(_PROBLEM_TEMPLATE.format(job_id=job_id, stage=stage, pipeline=pipeline, share=share or "as recorded",
                                             path=str(Path(problem_file).resolve()), init=list(init_args), signatures=parsed, ranges=ranges))
    return path


# ---------------------------------------------------------------------------------------------- the job body
REGISTER_MIN_GAIN = 1.02  # as `hetforge optimize`: a winner within noise of the reference is not worth a rollout


def run_job(doc: dict) -> dict:
    """Optimize one stage for production's signatures and register the winner as a `canary` (or
    `pending_review`) variant. Runs in a Ray task (or any process); writes its outcome into the job row."""
    from hetforge.kernels.registry import Registry
    from hetforge.core.problem import Problem
    from hetforge.optimizer.supervisor import OptimizeTask, optimize

    board = JobBoard(doc["registry_path"])
    job_id = int(doc["job_id"])
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                board.beat(job_id)
            except sqlite3.Error:
                continue

    threading.Thread(target=beat, daemon=True, name=f"job-{job_id}-heartbeat").start()
    try:
        try:
            os.nice(10)  # serving on the same cores comes first
        except OSError:
            pass
        import torch

        threads = max(1, int(doc.get("threads", 1)))
        torch.set_num_threads(threads)
        scratch = Path(doc["scratch"]) / f"job-{job_id}"
        reference = Problem(file=doc["problem_file"], init_args=tuple(doc.get("init_args") or ()), init_kwargs=dict(doc.get("init_kwargs") or {}))
        loaded = reference.load()
        problem = write_production_problem(scratch, job_id, doc["pipeline"], doc["stage"], doc["problem_file"], list(loaded.init_args),
                                           doc["signatures"])
        task = OptimizeTask(str(problem), doc["device"], doc["precision"], float(doc["budget_s"]), tuple(doc["agents"]), doc.get("hint", ""),
                            trials=2, rounds=3, threads=threads)
        report = optimize(task, scratch / "candidates")
        summary = {**_summary(report), **_where()}
        winner = report.winner
        variant_id = None
        if winner is None or winner.name == "recipe:eager" or winner.speedup < REGISTER_MIN_GAIN:
            summary["not_registered"] = ("no accepted candidate" if winner is None else
                                         f"{winner.name} is {winner.speedup:.3f}x over the reference (at least {REGISTER_MIN_GAIN}x needed)")
        else:
            recipe = winner.spec or {"kind": "module", "weights": "reference state_dict"}
            status = "pending_review" if doc.get("approval") == "manual" else "canary"
            variant = Registry(doc["registry_path"]).add(
                fingerprint=loaded.fingerprint(), device_class=doc["device_class"], precision=doc["precision"], name=winner.name,
                agent=winner.agent, source=winner.source, verdict=winner.verdict, recipe=recipe,
                signature={"signatures": doc["signatures"]}, status=status)
            variant_id = variant.id
        board.finish(job_id, "done", variant_id, summary)
        return {"job_id": job_id, "variant_id": variant_id, "summary": summary}
    except BaseException as err:
        board.finish(job_id, "failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        stop.set()


def _where() -> dict:
    """The host and Ray node a job ran on (the node's devices are what it measured)."""
    import socket

    out = {"host": socket.gethostname()}
    try:
        import ray

        if ray.is_initialized():
            out["node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return out


def _summary(report) -> dict:
    """What the controller exports and the approvals show: the winner, the speedups, every candidate's outcome."""
    rejected: dict[str, int] = {}
    for c in report.candidates:
        if c.status == "rejected":
            kind = (c.note.split(":", 1)[0] or "rejected").strip()
            rejected[kind] = rejected.get(kind, 0) + 1
    return {"winner": report.winner.name if report.winner else None, "winner_agent": report.winner.agent if report.winner else None,
            "speedup_vs_eager": report.speedup_vs_eager, "speedup_vs_compile": report.speedup_vs_compile,
            "elapsed_s": round(report.elapsed_s, 2), "candidates": len(report.candidates),
            "accepted": sum(c.status in ("accepted", "winner") for c in report.candidates), "rejected": rejected,
            "leaderboard": [{"name": c.name, "agent": c.agent, "status": c.status, "speedup": c.speedup, "note": c.note[:200]}
                            for c in report.candidates]}


# ---------------------------------------------------------------------------------------------- Ray
class JobLauncher:
    """Starts job bodies as Ray tasks through the pipeline's detached `JobRunner` (the one Ray wrapper here)."""

    def __init__(self, pipeline: str):
        self.name = f"hetforge-jobs-{pipeline}"
        self._runner = None

    def _get(self):
        if self._runner is None:
            self._runner = _runner_class().options(name=self.name, namespace="hetforge", lifetime="detached", get_if_exists=True,
                                                   num_cpus=0).remote()
        return self._runner

    def launch(self, doc: dict, resources: dict[str, Any]) -> None:
        import ray

        ray.get(self._get().submit.remote(doc, resources), timeout=60)

    def failures(self) -> list[tuple[int, str]]:
        """(job id, error) of tasks that died without writing their outcome (the process was killed)."""
        import ray

        return ray.get(self._get().reap.remote(), timeout=60)

    def stop(self) -> None:
        import ray

        try:
            ray.kill(ray.get_actor(self.name, namespace="hetforge"))
        except ValueError:
            pass


_RUNNER = None


def _runner_class():
    """The JobRunner actor class, made on first use (this module imports without Ray)."""
    global _RUNNER
    if _RUNNER is None:
        import ray

        @ray.remote
        class JobRunner:
            def __init__(self):
                self.refs: dict[int, Any] = {}

            def submit(self, doc: dict, resources: dict) -> None:
                task = ray.remote(run_job).options(name=f"hetforge-job-{doc['job_id']}-{doc['stage']}", max_retries=0, **resources)
                self.refs[int(doc["job_id"])] = task.remote(doc)

            def reap(self) -> list[tuple[int, str]]:
                finished = [j for j, ref in self.refs.items() if ray.wait([ref], timeout=0)[0]]
                out = []
                for job_id in finished:
                    try:
                        ray.get(self.refs.pop(job_id))
                    except Exception as err:  # noqa: BLE001 - the task's failure is the job's, reported
                        out.append((job_id, f"{type(err).__name__}: {str(err)[:1000]}"))
                return out

        _RUNNER = JobRunner
    return _RUNNER
