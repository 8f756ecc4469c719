"""Canary rollouts of a new variant: the shared state, each replica's canary arm, and the analysis.

A rollout is a plan of steps (an optional shadow step, then canary weights up to 100%) kept in the
registry's store (`boards.py`) with the step it is at. The controller (`controller.py`) starts it, judges
each step and records every decision with its numbers in the audit log (`rollout_events`). Every
start, step and end is published to the stage's replicas as the `rollout` of their Serve
user_config (`Rollout.to_config`, `swap_control.publish`); each replica runs a `CanaryArm` beside
its active module (`replica_control.py`):

- shadow: every call also runs the variant on the same inputs; its answer is compared and discarded.
- canary: a share of calls (the step's weight) is answered by the variant. With `guard` (default)
  the running module runs too and a disagreement answers with the running module's output, so
  traffic never sees a wrong answer; without it the variant's answer is returned as is.

A replica adds its counts and forward times per (rollout, step) to `rollout_stats`; the controller
sums them over replicas. Nothing here imports Ray: the same classes run in tests with no cluster.

Over 450 lines: the rollout's stored state, the replica's canary arm and the step analysis are the
three views of one rollout and change together.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hetforge import state
from hetforge.serving.boards import Board

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL, stage TEXT NOT NULL,
    variant TEXT NOT NULL,                -- registry variant id
    job_id INTEGER,                       -- the optimization job that found it, if any
    plan TEXT NOT NULL,                   -- JSON: [{"mode": "shadow"|"canary", "weight": percent}, ...]
    guard INTEGER NOT NULL,
    step INTEGER NOT NULL,                -- index into plan
    state TEXT NOT NULL,                  -- running | promoted | rolled_back
    reason TEXT,
    step_started_at REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_stats (
    rollout_id INTEGER NOT NULL, step INTEGER NOT NULL, replica TEXT NOT NULL,
    canary_calls INTEGER NOT NULL, baseline_calls INTEGER NOT NULL,
    canary_errors INTEGER NOT NULL, disagreements INTEGER NOT NULL,
    canary_ms TEXT NOT NULL, baseline_ms TEXT NOT NULL,   -- JSON lists: the latest forward times
    failure TEXT,                                          -- the variant could not be built or checked here
    updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, step, replica)
);
CREATE TABLE IF NOT EXISTS rollout_events (  -- the audit log: every decision, with its numbers
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL, stage TEXT NOT NULL, rollout_id INTEGER, variant TEXT,
    decision TEXT NOT NULL,               -- start | advance | promote | rollback | resume | approve | reject | job
    step INTEGER, weight REAL, numbers TEXT NOT NULL, reason TEXT, actor TEXT NOT NULL, at REAL NOT NULL
);
"""
MIGRATIONS = [state.Migration(1, "rollouts, stats, audit log", _SCHEMA)]
SAMPLES_KEPT = 1000  # forward times per arm a replica keeps for one step


@dataclass(frozen=True)
class Rollout:
    id: int
    pipeline: str
    stage: str
    variant: str
    job_id: int | None
    plan: list[dict]
    guard: bool
    step: int
    state: str
    reason: str | None
    step_started_at: float
    created_at: float

    @property
    def mode(self) -> str:
        return self.plan[self.step]["mode"]

    @property
    def weight(self) -> float:
        return float(self.plan[self.step]["weight"])

    def to_config(self) -> dict:
        """What a replica needs of the rollout (the `rollout` of its stage config)."""
        return {"id": self.id, "variant": self.variant, "plan": self.plan, "guard": self.guard, "step": self.step}

    @classmethod
    def from_config(cls, pipeline: str, stage: str, doc: dict) -> Rollout:
        """The rollout a stage config names; ValueError naming the field when it is malformed."""
        try:
            rollout = cls(
                int(doc["id"]),
                pipeline,
                stage,
                str(doc["variant"]),
                None,
                list(doc["plan"]),
                bool(doc["guard"]),
                int(doc["step"]),
                "running",
                None,
                0.0,
                0.0,
            )
            _ = rollout.mode, rollout.weight
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f'Got "{doc}" for rollout: {type(err).__name__}: {err}') from None
        return rollout


def plan_for(canary) -> list[dict]:
    """The steps of a rollout under a spec `Canary` block."""
    steps = [{"mode": "shadow", "weight": 100.0}] if canary.shadow else []
    return steps + [{"mode": "canary", "weight": float(w)} for w in canary.steps]


@dataclass
class StepStats:
    """One step's numbers summed over replicas."""

    canary_calls: int = 0
    baseline_calls: int = 0
    canary_errors: int = 0
    disagreements: int = 0
    canary_ms: list[float] = field(default_factory=list)
    baseline_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "canary_calls": self.canary_calls,
            "baseline_calls": self.baseline_calls,
            "canary_errors": self.canary_errors,
            "disagreements": self.disagreements,
            "canary_p50_ms": _q(self.canary_ms, 0.5),
            "canary_p99_ms": _q(self.canary_ms, 0.99),
            "baseline_p50_ms": _q(self.baseline_ms, 0.5),
            "baseline_p99_ms": _q(self.baseline_ms, 0.99),
            "failures": self.failures[:3],
        }


def _q(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


class RolloutBoard(Board):
    """Rollouts, their per-replica stats and the audit log, in the registry's store."""

    COMPONENT, MIGRATIONS = "rollouts", MIGRATIONS

    # -- rollouts
    def start(
        self, pipeline: str, stage: str, variant: str, plan: list[dict], guard: bool, job_id: int | None = None
    ) -> Rollout | None:
        """A new running rollout, or None when the stage already has one (one rollout per stage at a time)."""
        now = time.time()

        def check_and_insert(tx: state.Tx) -> int | None:
            busy = tx.execute(
                "SELECT 1 FROM rollouts WHERE pipeline = ? AND stage = ? AND state = 'running'", (pipeline, stage)
            ).fetchone()
            if busy:
                return None
            return tx.execute(
                "INSERT INTO rollouts (pipeline, stage, variant, job_id, plan, guard, step, state, step_started_at, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, 'running', ?, ?, ?) RETURNING id",
                (pipeline, stage, str(variant), job_id, json.dumps(plan), int(guard), now, now, now),
            ).fetchone()[0]

        rid = self.store.atomic(check_and_insert, lock="hetforge-rollouts")
        return None if rid is None else self.get(rid)

    def get(self, rollout_id: int) -> Rollout:
        row = self.store.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise KeyError(f"no rollout {rollout_id}")
        return _rollout(row)

    def running(self, pipeline: str, stage: str | None = None) -> list[Rollout]:
        query, args = "SELECT * FROM rollouts WHERE pipeline = ? AND state = 'running'", [pipeline]
        if stage is not None:
            query, args = query + " AND stage = ?", args + [stage]
        return [_rollout(r) for r in self.store.execute(query + " ORDER BY id", args).fetchall()]

    def recent(self, pipeline: str, limit: int = 20) -> list[Rollout]:
        rows = self.store.execute(
            "SELECT * FROM rollouts WHERE pipeline = ? ORDER BY id DESC LIMIT ?", (pipeline, limit)
        ).fetchall()
        return [_rollout(r) for r in rows]

    def advance(self, rollout: Rollout) -> Rollout:
        """The next step (only from the step it is at: a second controller cannot skip one)."""
        now = time.time()
        self.store.execute(
            "UPDATE rollouts SET step = step + 1, step_started_at = ?, updated_at = ? WHERE id = ? AND step = ? AND state = 'running'",
            (now, now, rollout.id, rollout.step),
        )
        return self.get(rollout.id)

    def finish(self, rollout: Rollout, state: str, reason: str) -> bool:
        """promoted or rolled_back; False when it was no longer running."""
        cur = self.store.execute(
            "UPDATE rollouts SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state = 'running'",
            (state, reason[:1000], time.time(), rollout.id),
        )
        return cur.rowcount == 1

    # -- stats
    def write_stats(self, rollout_id: int, step: int, replica: str, s: StepStats) -> None:
        """This replica's numbers for one step (replacing what it wrote before)."""
        self.store.execute(
            "INSERT INTO rollout_stats (rollout_id, step, replica, canary_calls, baseline_calls, canary_errors,"
            " disagreements, canary_ms, baseline_ms, failure, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (rollout_id, step, replica) DO UPDATE SET canary_calls = excluded.canary_calls,"
            " baseline_calls = excluded.baseline_calls, canary_errors = excluded.canary_errors,"
            " disagreements = excluded.disagreements, canary_ms = excluded.canary_ms,"
            " baseline_ms = excluded.baseline_ms, failure = excluded.failure, updated_at = excluded.updated_at",
            (
                rollout_id,
                step,
                replica,
                s.canary_calls,
                s.baseline_calls,
                s.canary_errors,
                s.disagreements,
                json.dumps(s.canary_ms),
                json.dumps(s.baseline_ms),
                "; ".join(s.failures) or None,
                time.time(),
            ),
        )

    def step_stats(self, rollout_id: int, step: int) -> StepStats:
        rows = self.store.execute(
            "SELECT * FROM rollout_stats WHERE rollout_id = ? AND step = ?", (rollout_id, step)
        ).fetchall()
        total = StepStats()
        for r in rows:
            total.canary_calls += r["canary_calls"]
            total.baseline_calls += r["baseline_calls"]
            total.canary_errors += r["canary_errors"]
            total.disagreements += r["disagreements"]
            total.canary_ms += json.loads(r["canary_ms"])
            total.baseline_ms += json.loads(r["baseline_ms"])
            if r["failure"]:
                total.failures.append(f"{r['replica']}: {r['failure']}")
        return total

    # -- audit
    def record(
        self,
        pipeline: str,
        stage: str,
        decision: str,
        *,
        rollout: Rollout | None = None,
        variant: str | None = None,
        numbers: dict | None = None,
        reason: str = "",
        actor: str = "controller",
    ) -> None:
        self.store.execute(
            "INSERT INTO rollout_events (pipeline, stage, rollout_id, variant, decision, step, weight, numbers, reason, actor, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                pipeline,
                stage,
                rollout.id if rollout else None,
                variant or (rollout.variant if rollout else None),
                decision,
                rollout.step if rollout else None,
                rollout.weight if rollout else None,
                json.dumps(numbers or {}, default=str),
                reason[:2000],
                actor,
                time.time(),
            ),
        )

    def events(
        self, pipeline: str, stage: str | None = None, limit: int = 200, decision: str | None = None
    ) -> list[dict]:
        """The latest `limit` events (of one stage, of one decision), oldest first."""
        query, args = "SELECT * FROM rollout_events WHERE pipeline = ?", [pipeline]
        if stage is not None:
            query, args = query + " AND stage = ?", args + [stage]
        if decision is not None:
            query, args = query + " AND decision = ?", args + [decision]
        rows = self.store.execute(query + " ORDER BY id DESC LIMIT ?", args + [limit]).fetchall()
        return [{**dict(r), "numbers": json.loads(r["numbers"])} for r in reversed(rows)]


def _rollout(row) -> Rollout:
    d = dict(row)
    return Rollout(
        d["id"],
        d["pipeline"],
        d["stage"],
        d["variant"],
        d["job_id"],
        json.loads(d["plan"]),
        bool(d["guard"]),
        d["step"],
        d["state"],
        d["reason"],
        d["step_started_at"],
        d["created_at"],
    )


# ---------------------------------------------------------------------------------------------- replica side
class CanaryArm:
    """A replica's variant under rollout: routes calls by the step's mode and weight, keeps the step's numbers.

    `agree(got, want)` compares the variant's output with the running module's within the stage's
    tolerance and returns "" or the reason they differ.
    """

    def __init__(self, rollout: Rollout, name: str, module: Any, agree, seed: int | None = None):
        self.rollout_id, self.name, self.module, self.agree = rollout.id, name, module, agree
        self.guard = rollout.guard
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.set_step(rollout)

    def set_step(self, rollout: Rollout) -> None:
        with self._lock:
            self.step, self.mode, self.weight = rollout.step, rollout.mode, rollout.weight
            self._stats = StepStats()

    def fail(self, why: str) -> None:
        with self._lock:
            self._stats.failures.append(why[:500])

    def snapshot(self) -> StepStats:
        with self._lock:
            s = self._stats
            return StepStats(
                s.canary_calls,
                s.baseline_calls,
                s.canary_errors,
                s.disagreements,
                list(s.canary_ms[-SAMPLES_KEPT:]),
                list(s.baseline_ms[-SAMPLES_KEPT:]),
                list(s.failures),
            )

    def call(self, inputs: list, forward) -> tuple[Any, str]:
        """Answer one call: (output, "running" or "variant": whose output it is).

        `forward(which, inputs)` runs the running module or the variant and returns (output, ms); it
        raises what the module raises.
        """
        chosen = self.mode == "shadow" or self._rng.random() * 100.0 < self.weight
        if not chosen:
            out, ms = forward("running", inputs)
            self._add(baseline_ms=ms)
            return out, "running"
        if not (self.mode == "shadow" or self.guard):
            got, ms, err = _try(forward, "variant", inputs)
            if err is None:
                self._add(canary_ms=ms)
                return got, "variant"
            self._add(error=True)  # the variant failed: counted, and the running module answers
            out, ms = forward("running", inputs)
            self._add(baseline_ms=ms)
            return out, "running"
        # both arms on the same inputs, in random order (neither always gets the warm caches)
        first_variant = self._rng.random() < 0.5
        got = err = None
        cms = 0.0
        if first_variant:
            got, cms, err = _try(forward, "variant", inputs)
        want, bms = forward("running", inputs)
        if not first_variant:
            got, cms, err = _try(forward, "variant", inputs)
        if err is not None:
            self._add(baseline_ms=bms, error=True)
            return want, "running"
        reason = self.agree(got, want)
        self._add(baseline_ms=bms, canary_ms=cms, disagreement=reason)
        if self.mode == "shadow" or reason:
            return want, "running"
        return got, "variant"

    def _add(
        self,
        baseline_ms: float | None = None,
        canary_ms: float | None = None,
        error: bool = False,
        disagreement: str = "",
    ) -> None:
        with self._lock:
            s = self._stats
            if baseline_ms is not None:
                s.baseline_calls += 1
                s.baseline_ms.append(baseline_ms)
            if canary_ms is not None or error:
                s.canary_calls += 1
            if canary_ms is not None:
                s.canary_ms.append(canary_ms)
            if error:
                s.canary_errors += 1
            if disagreement:
                s.disagreements += 1
                if len(s.failures) < 3:
                    s.failures.append("disagrees: " + disagreement[:300])
            for samples in (s.baseline_ms, s.canary_ms):
                if len(samples) > 2 * SAMPLES_KEPT:
                    del samples[:-SAMPLES_KEPT]


def _try(forward, which: str, inputs) -> tuple[Any, float, Exception | None]:
    try:
        out, ms = forward(which, inputs)
        return out, ms, None
    except Exception as err:  # noqa: BLE001 - the variant's failure is a number of the step, never the caller's error
        return None, 0.0, err


# ---------------------------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class StepDecision:
    decision: str  # wait | advance | promote | rollback
    reason: str
    numbers: dict


def judge_step(rollout: Rollout, stats: StepStats, canary, now: float) -> StepDecision:
    """The controller's call on the step a rollout is at, under the spec's `Canary` thresholds."""
    numbers = stats.to_json() | {
        "step": rollout.step,
        "mode": rollout.mode,
        "weight": rollout.weight,
        "elapsed_s": round(now - rollout.step_started_at, 2),
    }
    if stats.failures and not stats.disagreements:
        return StepDecision("rollback", "the variant failed on a replica: " + stats.failures[0], numbers)
    if stats.disagreements:
        return StepDecision(
            "rollback",
            f"the variant disagreed with the running module on {stats.disagreements} of "
            f"{stats.canary_calls} calls ({stats.failures[0] if stats.failures else ''})",
            numbers,
        )
    if stats.canary_calls and stats.canary_errors / stats.canary_calls > canary.max_error_rate:
        return StepDecision(
            "rollback",
            f"the variant raised on {stats.canary_errors} of {stats.canary_calls} calls "
            f"(allowed share {canary.max_error_rate:g})",
            numbers,
        )
    if stats.canary_calls < canary.min_calls or len(stats.baseline_ms) < 5:
        if now - rollout.step_started_at > canary.step_timeout_s:
            return StepDecision(
                "rollback",
                f"timeout: {stats.canary_calls} variant calls in {now - rollout.step_started_at:.0f} s, "
                f"the step needs {canary.min_calls} within {canary.step_timeout_s:g} s",
                numbers,
            )
        return StepDecision("wait", f"{stats.canary_calls} of {canary.min_calls} variant calls", numbers)
    p50_c, p50_b = statistics.median(stats.canary_ms), statistics.median(stats.baseline_ms)
    # The tail is judged at p99 once each arm has 100 samples; before that p99 is just the maximum (one
    # hiccup of a 2-core host rolled a 2x variant back), so the tail is judged at p90.
    tail = 0.99 if min(len(stats.canary_ms), len(stats.baseline_ms)) >= 100 else 0.9
    p99_c, p99_b = _q(stats.canary_ms, tail), _q(stats.baseline_ms, tail)
    numbers["tail_quantile"] = tail
    numbers["speedup_p50"] = round(p50_b / p50_c, 4) if p50_c > 0 else None
    if p50_c > canary.max_latency_ratio * p50_b:
        return StepDecision(
            "rollback",
            f"slower: p50 {p50_c:.3f} ms against {p50_b:.3f} ms running (allowed ratio {canary.max_latency_ratio:g})",
            numbers,
        )
    if p99_c > canary.max_p99_ratio * p99_b:
        return StepDecision(
            "rollback",
            f"slower tail: p{round(tail * 100)} {p99_c:.3f} ms against {p99_b:.3f} ms running "
            f"(allowed ratio {canary.max_p99_ratio:g})",
            numbers,
        )
    last = rollout.step == len(rollout.plan) - 1
    why = f"p50 {p50_c:.3f} ms against {p50_b:.3f} ms running ({numbers['speedup_p50']}x), no disagreement, no error"
    return StepDecision("promote" if last else "advance", why, numbers)
