"""The re-optimization controller: watches a served pipeline and keeps its model stages fast.

Every `reoptimize.interval_s` one `tick()`:

1. reads the window's numbers: per-stage calls, mean and p50 latency and errors from hetforge's own
   metrics (`replica_metrics`: the multiprocess files every replica on this node writes, or a
   Prometheus server that scrapes every node when HETFORGE_PROMETHEUS_URL is set), and per-stage
   input signatures from the replicas' heartbeats;
2. ranks stages by their share of the measured critical path (the planner's pipeline graph with the
   measured mean latencies as stage costs) and queues a job for a model stage that is hot, has
   regressed against its p50 after the last rollout, or now sees a frequent signature no job has
   optimized for (thresholds from the pipeline's `reoptimize:` block);
3. launches queued jobs (its own, the API's, a human's hint) up to `concurrency`, as Ray tasks;
4. starts a rollout for every verified variant waiting in status `canary` (a job's winner, or one a
   human approved) and judges each running rollout's step (`rollout.judge_step`): advance, promote
   (registry `active`, then a hot-swap on every replica), or roll back (registry `rejected`). Every
   start, step and end of a rollout is published to the stage's replicas as their Serve user_config
   (`publisher`: `swap_control.publish`); one that fails is published again on the next tick.

All state is in the registry's store, so a controller that restarts picks up where the last one
stopped: running jobs keep their rows (and are not started twice), running rollouts resume at their
step, or roll back when the step ran out of time meanwhile. Every decision goes into the audit log
with its numbers, and into `hetforge_rollout_decisions_total` / `hetforge_canary_weight_percent`.

The side effects go through small objects passed in (`metrics_source`, `launcher`, `swapper`, a
clock), so the decisions are unit-tested without Ray (`tests/serving/test_controller.py`);
`build_controller` wires the real ones for a served pipeline.

Over 450 lines: the tick (what is hot, which job, which rollout step) reads and writes one
shared state; jobs are `jobs.py`/`job_runner.py`, rollout analysis `rollout.py`, metrics reading `replica_metrics.py`.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetforge.core.problem import Problem
from hetforge.kernels.registry import Registry
from hetforge.planners.profiles import ProfileCache, llm_fingerprint
from hetforge.serving.job_runner import UNVERIFIED, JobLauncher
from hetforge.serving.jobs import JobBoard, JobSpec
from hetforge.serving.llm_metrics import measurement_of
from hetforge.serving.llm_settings import active_settings, traffic_dir
from hetforge.serving.metrics import Metrics, local_samples
from hetforge.serving.replica_metrics import StageWindow, stage_counters_source, window_of
from hetforge.serving.rollout import Rollout, RolloutBoard, judge_step, plan_for
from hetforge.serving.swap_control import SwapBoard, SwapError, publish, request_swap
from hetforge.spec.graph import PipelineGraph
from hetforge.spec.models import LlmStage, ModelStage, Pipeline
from hetforge.spec.stages import stage_problem
from hetforge.state import local_dir

LLM_PROFILE_EVERY_S = 30.0


# ---------------------------------------------------------------------------------------------- controller
@dataclass(frozen=True)
class StageInfo:
    """What the controller needs of a model stage it may optimize."""

    name: str
    fingerprint: str
    device: str  # cpu | cuda
    device_class: str
    precision: str
    problem: (
        Problem | None
    )  # the stage's reference (`stage_problem`): a problem file, the team's module, a HuggingFace model
    resources: dict  # the job's Ray task options
    kind: str = "model"  # model | llm (a vLLM stage: its job searches engine settings)
    llm: dict | None = None  # an LLM stage's job inputs (`JobSpec.llm`) but the running settings, read at launch


class Controller:
    """One pipeline's re-optimization loop: `tick()` observes, queues and launches jobs, and runs rollouts."""

    def __init__(
        self,
        pipeline,
        stages: dict[str, StageInfo],
        registry_path: str,
        *,
        metrics_source: Callable[[], dict],
        launcher,
        swapper: Callable[[str, str], bool],
        publisher: Callable[[str, dict | None], None] | None = None,
        metrics=None,
        scratch: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.pipeline, self.spec = pipeline, pipeline.reoptimize
        self.stages, self.registry_path = stages, registry_path
        self.graph = PipelineGraph(pipeline)
        self.registry, self.jobs, self.rollouts = (
            Registry(registry_path),
            JobBoard(registry_path),
            RolloutBoard(registry_path),
        )
        self.heartbeats = SwapBoard(registry_path)
        self.metrics_source, self.launcher, self.swapper = metrics_source, launcher, swapper
        self.publisher = publisher
        self.unpublished: set[str] = set()  # stages whose rollout change has not reached Serve yet
        self.metrics, self.clock = metrics, clock
        self.scratch = scratch or str(local_dir(registry_path) / "jobs")  # registry_path may be a postgresql:// URL
        self.snapshots: collections.deque = collections.deque()  # (time, stage counters, stage signatures)
        self.settled_at: dict[str, float] = {}  # stage -> when its last rollout ended
        self.baseline_p50: dict[str, float] = self._baselines_from_audit()
        self.last: dict[str, Any] = {}
        self._resumed = False

    # -- one round ------------------------------------------------------------------------------
    def tick(self) -> dict:
        """One look: returns what it saw and did (also kept as `self.last` for the status API)."""
        now = self.clock()
        done: list[str] = []
        if not self._resumed:
            done += self._resume(now)
            self._resumed = True
        for stage in sorted(self.unpublished):
            done += self._publish(stage)
        windows, signatures = self._observe(now)
        done += self._reap(now)
        done += self._rollouts(now)
        done += self._detect(windows, signatures, now)
        done += self._launch()
        self.last = {
            "at": now,
            "windows": {s: vars(w) for s, w in windows.items()},
            "signatures": signatures,
            "critical_path": self._shares(windows),
            "actions": done,
        }
        return self.last

    # -- observing ------------------------------------------------------------------------------
    def _observe(self, now: float) -> tuple[dict[str, StageWindow], dict[str, dict[str, float]]]:
        counters = self.metrics_source()
        sigs = {name: self._signature_totals(name) for name in self.stages}
        self.snapshots.append((now, counters, sigs))
        while len(self.snapshots) > 2 and self.snapshots[1][0] <= now - self.spec.window_s:
            self.snapshots.popleft()  # keep one snapshot at or before the window's start
        _, old_counters, old_sigs = self.snapshots[0]
        windows = {
            stage: window_of(c, old_counters.get(stage) if len(self.snapshots) > 1 else None)
            for stage, c in counters.items()
        }
        shares: dict[str, dict[str, float]] = {}
        for stage, totals in sigs.items():
            before = old_sigs.get(stage, {}) if len(self.snapshots) > 1 else {}
            delta = {k: v - before.get(k, 0) for k, v in totals.items()}
            if any(v < 0 for v in delta.values()):
                delta = dict(totals)  # a replica restarted: its counts began again
            calls = sum(delta.values())
            if calls > 0:
                shares[stage] = {
                    k: round(v / calls, 4) for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0
                }
        return windows, shares

    def _signature_totals(self, stage: str) -> dict[str, int]:
        total: dict[str, int] = collections.Counter()
        for counts in self.heartbeats.signatures(self.pipeline.name, stage, within_s=30).values():
            total.update(counts)
        return dict(total)

    def _shares(self, windows: dict[str, StageWindow]) -> dict[str, float]:
        """Each stage's share of the critical path measured over the window (the planner's graph, measured costs)."""
        costs = {s: w.mean_ms for s, w in windows.items() if w.calls > 0}
        if not costs:
            return {}
        path = self.graph.critical_path(costs)
        total = sum(costs.get(s, 0.0) for s in path.stages)
        return {s: round(costs.get(s, 0.0) / total, 4) for s in path.stages} if total > 0 else {}

    # -- jobs -----------------------------------------------------------------------------------
    def _busy(self, stage: str) -> str:
        """Why no new job may start for the stage now ("" when one may)."""
        if self.jobs.list(self.pipeline.name, stage, states=("queued", "running")):
            return "a job is queued or running"
        if self.rollouts.running(self.pipeline.name, stage):
            return "a rollout is running"
        info = self.stages[stage]
        waiting = [
            v
            for v in self.registry.list(fingerprint=info.fingerprint, device_class=info.device_class)
            if v.status in ("pending_review", "canary")
        ]
        return f"variant {waiting[0].id} is {waiting[0].status}" if waiting else ""

    def _detect(
        self, windows: dict[str, StageWindow], signatures: dict[str, dict[str, float]], now: float
    ) -> list[str]:
        actions = []
        shares = self._shares(windows)
        for stage in self.stages:
            w = windows.get(stage)
            if w is None or w.calls < self.spec.min_calls or self._busy(stage):
                continue
            sigs = signatures.get(stage, {})
            if not sigs:
                # The job optimizes for the signatures the replicas saw (an LLM job replays their recorded calls):
                # wait for heartbeats that show some; a job queued without would be followed by a new-shape one
                continue
            history = self.jobs.list(self.pipeline.name, stage)
            seen = {s for job in history for s in job.signatures}
            frequent = [s for s, share in sigs.items() if share >= 0.05 and s != "other"][:4]
            new = [s for s in frequent if s not in seen and sigs[s] >= self.spec.new_shape_share]
            trigger = reason = ""
            share = shares.get(stage, 0.0)
            if not history and share >= self.spec.hot_share:
                trigger, reason = (
                    "hot",
                    f"{share:.0%} of the critical path (threshold {self.spec.hot_share:.0%}), p50 {w.p50_ms or 0:.2f} ms",
                )
            elif history and new:
                trigger, reason = (
                    "new_shape",
                    f"signature {new[0]} is {sigs[new[0]]:.0%} of calls and no job optimized for it",
                )
            elif (
                stage in self.baseline_p50 and w.p50_ms and w.p50_ms >= self.spec.regression * self.baseline_p50[stage]
            ):
                recent = [j for j in history if (j.finished_at or now) > now - self.spec.window_s]
                # a window that still holds calls from before the last rollout's end is not judged (it mixes variants)
                if not recent and now - self.settled_at.get(stage, 0.0) > self.spec.window_s:
                    trigger, reason = (
                        "regression",
                        (
                            f"p50 {w.p50_ms:.2f} ms, {w.p50_ms / self.baseline_p50[stage]:.2f}x its "
                            f"{self.baseline_p50[stage]:.2f} ms after the last rollout"
                        ),
                    )
            if stage not in self.baseline_p50 and w.p50_ms:
                self.baseline_p50[stage] = w.p50_ms  # the first full window is the reference point for regressions
            if trigger:
                job = self.jobs.queue(self.pipeline.name, stage, trigger, reason, frequent or list(sigs)[:1])
                if job is not None:
                    self.rollouts.record(
                        self.pipeline.name,
                        stage,
                        "job",
                        numbers={"job_id": job.id, "trigger": trigger, "calls": w.calls, "share": share},
                        reason=reason,
                    )
                    actions.append(f"queued job {job.id} for {stage}: {trigger} ({reason})")
        return actions

    def _launch(self) -> list[str]:
        actions = []
        running = len(self.jobs.list(self.pipeline.name, states=("running",)))
        for job in self.jobs.list(self.pipeline.name, states=("queued",)):
            if running >= self.spec.concurrency:
                break
            if job.stage not in self.stages or not self.jobs.claim(job.id):
                continue
            info = self.stages[job.stage]
            spec = JobSpec(
                registry_path=self.registry_path,
                job_id=job.id,
                pipeline=self.pipeline.name,
                stage=job.stage,
                problem=info.problem.to_json() if info.problem is not None else {},
                device=info.device,
                device_class=info.device_class,
                precision=info.precision,
                budget_s=float(self.spec.budget_s),
                scratch=self.scratch,
                agents=tuple(self.spec.agents),
                hint=job.hint,
                approval=self.spec.approval,
                signatures=tuple(job.signatures),
                threads=max(1, math.floor(self.spec.job_cpus)),
                kind=info.kind,
                llm=self._llm_job(info),
            )
            try:
                self.launcher.launch(spec, info.resources)
            except Exception as err:  # noqa: BLE001 - a launch that fails fails the job, never the controller
                self.jobs.finish(job.id, "failed", error=f"launch: {type(err).__name__}: {err}")
                self._count_job(job.stage, "failed")
                actions.append(f"job {job.id} failed to launch: {err}")
                continue
            running += 1
            self._count_job(job.stage, "started")
            actions.append(f"launched job {job.id} for {job.stage} ({job.trigger})")
        return actions

    def _llm_job(self, info: StageInfo) -> dict | None:
        """An LLM job's inputs, with the settings its replicas run now (the best active engine-settings variant)."""
        if info.kind != "llm":
            return None
        _, settings = active_settings(self.registry, info.fingerprint, info.device_class, info.precision)
        return {**info.llm, "settings": settings}

    def _reap(self, now: float) -> list[str]:
        """Jobs that ended since the last look: count them (once) and say what they found."""
        actions = []
        for job_id, error in self.launcher.failures():
            if self.jobs.finish(job_id, "failed", error=error):
                actions.append(f"job {job_id} died: {error}")
        for job in self.jobs.mark_lost(self.pipeline.name, now):
            actions.append(f"job {job.id} lost (no heartbeat)")
        reported = {
            e["numbers"].get("job_id")
            for e in self.rollouts.events(self.pipeline.name, limit=1_000_000, decision="job_done")
        }
        for job in self.jobs.list(self.pipeline.name, states=("done", "failed")):
            if job.id in reported:
                continue
            outcome = "failed" if job.state == "failed" else "registered" if job.variant_id else "no_gain"
            self._count_job(job.stage, outcome)
            summary = job.summary or {}
            if self.metrics is not None:
                for baseline in ("eager", "compile"):
                    value = summary.get(f"speedup_vs_{baseline}")
                    if value:
                        self.metrics.optimizer_speedup.labels(self.pipeline.name, job.stage, baseline).set(value)
                m = self.metrics.optimizer_candidates
                for row in summary.get("leaderboard", []):
                    status = "accepted" if row["status"] in ("winner", "accepted") else row["status"]
                    if status == "rejected":
                        status = "rejected:" + (row.get("reject_kind") or UNVERIFIED)
                    m.labels(self.pipeline.name, job.stage, status).inc()
            numbers = {
                "job_id": job.id,
                "outcome": outcome,
                "variant_id": job.variant_id,
                **{
                    k: summary.get(k)
                    for k in (
                        "winner",
                        "speedup_vs_eager",
                        "speedup_vs_compile",
                        "compile_baseline",
                        "claim",
                        "not_registered",
                        "elapsed_s",
                        "candidates",
                    )
                },
            }
            self.rollouts.record(
                self.pipeline.name,
                job.stage,
                "job_done",
                variant=str(job.variant_id) if job.variant_id else None,
                numbers=numbers,
                reason=job.error or summary.get("not_registered") or "",
            )
            actions.append(f"job {job.id} for {job.stage}: {outcome}")
        return actions

    def _count_job(self, stage: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.optimizer_jobs.labels(self.pipeline.name, stage, outcome).inc()

    # -- rollouts -------------------------------------------------------------------------------
    def _publish(self, stage: str) -> list[str]:
        """Send the stage's running rollout (or none) to its replicas; kept for the next tick when Serve refuses."""
        if self.publisher is None:
            return []
        running = self.rollouts.running(self.pipeline.name, stage)
        try:
            self.publisher(stage, running[0].to_config() if running else None)
        except Exception as err:  # noqa: BLE001 - Serve or the store unreachable: the next tick publishes again
            self.unpublished.add(stage)
            return [f"rollout of {stage} not yet published: {type(err).__name__}: {err}"[:500]]
        self.unpublished.discard(stage)
        return []

    def _resume(self, now: float) -> list[str]:
        """After a (re)start: running rollouts continue at their step, or roll back if their step timed out meanwhile."""
        actions = []
        for rollout in self.rollouts.running(self.pipeline.name):
            if now - rollout.step_started_at > self.spec.canary.step_timeout_s:
                self._rollback(
                    rollout,
                    f"timeout: step {rollout.step} started {now - rollout.step_started_at:.0f} s ago, "
                    "before the controller restarted",
                    {},
                )
                actions.append(f"rolled back rollout {rollout.id} on restart")
            else:
                self._decide(rollout, "resume", f"controller restarted: continuing at step {rollout.step}", {})
                actions.append(f"resumed rollout {rollout.id} at step {rollout.step}")
            actions += self._publish(rollout.stage)
        return actions

    def _rollouts(self, now: float) -> list[str]:
        actions = []
        for stage, info in self.stages.items():
            if self.rollouts.running(self.pipeline.name, stage):
                continue
            waiting = [
                v
                for v in self.registry.list(
                    fingerprint=info.fingerprint, device_class=info.device_class, status="canary"
                )
            ]
            if waiting:
                variant = waiting[0]
                job = next((j for j in self.jobs.list(self.pipeline.name, stage) if j.variant_id == variant.id), None)
                rollout = self.rollouts.start(
                    self.pipeline.name,
                    stage,
                    str(variant.id),
                    plan_for(self.spec.canary),
                    self.spec.canary.guard,
                    job.id if job else None,
                )
                if rollout is not None:
                    self._decide(
                        rollout,
                        "start",
                        f"variant {variant.id} ({variant.name}, verified {variant.speedup or 0:.2f}x)",
                        {
                            "verified_speedup": variant.speedup,
                            "plan": rollout.plan,
                            "replicas": self.heartbeats.alive(self.pipeline.name, stage),
                        },
                    )
                    actions.append(f"started rollout {rollout.id} of variant {variant.id} on {stage}")
                    actions += self._publish(stage)
        for rollout in self.rollouts.running(self.pipeline.name):
            decision = judge_step(rollout, self.rollouts.step_stats(rollout.id, rollout.step), self.spec.canary, now)
            if decision.decision == "wait":
                continue
            if decision.decision == "rollback":
                self._rollback(rollout, decision.reason, decision.numbers)
                actions.append(f"rolled back rollout {rollout.id}: {decision.reason}")
            elif decision.decision == "advance":
                self._decide(rollout, "advance", decision.reason, decision.numbers)
                nxt = self.rollouts.advance(rollout)
                self._weight(nxt)
                actions += self._publish(rollout.stage)
                actions.append(f"rollout {rollout.id} advanced to step {nxt.step} ({nxt.mode} {nxt.weight:g}%)")
            else:
                actions.append(self._promote(rollout, decision.reason, decision.numbers))
        return actions

    def _promote(self, rollout: Rollout, reason: str, numbers: dict) -> str:
        self.registry.set_status(int(rollout.variant), "active", approver="controller (canary)")
        if not self.swapper(rollout.stage, rollout.variant):
            self.registry.set_status(int(rollout.variant), "rejected", approver="controller (canary)")
            self._rollback(rollout, "the promotion's hot-swap was refused by a replica", numbers)
            return f"rolled back rollout {rollout.id}: swap refused"
        if self.rollouts.finish(rollout, "promoted", reason):
            self._decide(rollout, "promote", reason, numbers)
            self._weight(None, rollout.stage)
            self._publish(rollout.stage)
            if numbers.get("canary_p50_ms"):
                self.baseline_p50[rollout.stage] = numbers["canary_p50_ms"]
            self.settled_at[rollout.stage] = self.clock()
        return f"promoted variant {rollout.variant} on {rollout.stage}: {reason}"

    def _rollback(self, rollout: Rollout, reason: str, numbers: dict) -> None:
        if self.rollouts.finish(rollout, "rolled_back", reason):
            try:
                self.registry.set_status(int(rollout.variant), "rejected", approver="controller (canary)")
            except Exception:  # noqa: BLE001 - the variant row is gone: nothing to mark
                pass
            self._decide(rollout, "rollback", reason, numbers)
            self._weight(None, rollout.stage)
            self._publish(rollout.stage)
            self.settled_at[rollout.stage] = self.clock()

    def _decide(self, rollout: Rollout, decision: str, reason: str, numbers: dict) -> None:
        self.rollouts.record(
            self.pipeline.name, rollout.stage, decision, rollout=rollout, numbers=numbers, reason=reason
        )
        if self.metrics is not None:
            self.metrics.rollout_decisions.labels(self.pipeline.name, rollout.stage, decision).inc()
        if decision in ("start", "resume"):
            self._weight(rollout)

    def _weight(self, rollout: Rollout | None, stage: str | None = None) -> None:
        if self.metrics is not None:
            weight = 0.0 if rollout is None or rollout.mode == "shadow" else rollout.weight
            self.metrics.canary_weight.labels(self.pipeline.name, rollout.stage if rollout else stage).set(weight)

    def _baselines_from_audit(self) -> dict[str, float]:
        out = {}
        for event in self.rollouts.events(self.pipeline.name, limit=1000):
            if event["decision"] == "promote" and event["numbers"].get("canary_p50_ms"):
                out[event["stage"]] = float(event["numbers"]["canary_p50_ms"])
            if event["decision"] in ("promote", "rollback"):
                self.settled_at[event["stage"]] = float(event["at"])
        return out

    def status(self) -> dict:
        name = self.pipeline.name
        return {
            "pipeline": name,
            "last": self.last,
            "baseline_p50_ms": self.baseline_p50,
            "jobs": [j.to_json() | {"summary": None} for j in self.jobs.list(name, limit=20)],
            "rollouts": [vars(r) for r in self.rollouts.recent(name, 10)],
            "events": self.rollouts.events(name, limit=50),
        }


# ---------------------------------------------------------------------------------------------- set-up
def llm_stage_info(pipeline: Pipeline, stage: LlmStage, base_dir: Path, where: dict, registry_path: str) -> StageInfo:
    """A vLLM stage the controller may tune: its job replays the calls its replicas record (`llm_settings`)."""
    fingerprint = llm_fingerprint(stage, base_dir)
    llm = {
        "stage": stage.model_dump(mode="json"),
        "base_dir": str(base_dir.resolve()),
        "fingerprint": fingerprint,
        "traffic": str(traffic_dir(registry_path, pipeline.name, stage.name)),
    }
    resources: dict[str, Any] = {"num_cpus": pipeline.reoptimize.job_cpus}
    if where["ray_actor_options"].get("resources"):  # a named CPU class: the job runs on one of its nodes
        resources["resources"] = dict(where["ray_actor_options"]["resources"])
    return StageInfo(
        stage.name,
        fingerprint,
        where["device"],
        where["device_class"],
        str(stage.precision),
        None,
        resources,
        kind="llm",
        llm=llm,
    )


def controller_stages(
    pipeline: Pipeline, base_dir: Path, placement: dict[str, dict], registry_path: str = ""
) -> dict[str, StageInfo]:
    """The model and vLLM stages the controller may optimize, with their fingerprints and their jobs' Ray options."""
    spec = pipeline.reoptimize
    out = {}
    for stage in pipeline.stages:
        if isinstance(stage, LlmStage) and stage.vllm is not None and stage.optimize:
            out[stage.name] = llm_stage_info(pipeline, stage, base_dir, placement[stage.name], registry_path)
            continue
        if not isinstance(stage, ModelStage) or not stage.optimize:
            continue
        where = placement[stage.name]
        problem = stage_problem(stage, base_dir)
        resources: dict[str, Any] = {"num_cpus": spec.job_cpus}
        if where["ray_actor_options"].get("resources"):  # a named CPU class: the job runs on one of its nodes
            resources["resources"] = dict(where["ray_actor_options"]["resources"])
        if where["device"] == "cuda":
            # the job shares the stage's GPU (its nice level and thread count keep it behind serving): Ray must not
            # hide the device from a task that reserves no GPU, and the accelerator type puts it on a node that has one
            resources["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
            if where["ray_actor_options"].get("accelerator_type"):
                resources["accelerator_type"] = where["ray_actor_options"]["accelerator_type"]
        out[stage.name] = StageInfo(
            stage.name,
            problem.load().fingerprint(),
            where["device"],
            where["device_class"],
            str(stage.precision),
            problem,
            resources,
        )
    return out


def with_llm_profiles(source: Callable[[], dict], metrics_dir: str, pipeline: Pipeline, stages: dict[str, StageInfo]):
    """`source`, also writing each vLLM stage's figures from its replicas' metrics into the planner's profile cache
    (at most every LLM_PROFILE_EVERY_S: the planner's measured LLM profile, `llm_metrics.measurement_of`)."""
    llm = {name: info for name, info in stages.items() if info.kind == "llm"}
    last = [0.0]

    def read() -> dict:
        out = source()
        if llm and time.monotonic() - last[0] >= LLM_PROFILE_EVERY_S:
            last[0] = time.monotonic()
            samples = list(local_samples(metrics_dir, pipeline.name))
            cache = ProfileCache()
            for name, info in llm.items():
                measured = measurement_of(samples, name)
                if measured is not None and measured.requests >= pipeline.reoptimize.min_calls:
                    cache.put_llm(info.fingerprint, info.device_class, measured)
        return out

    return read


def build_controller(
    pipeline: Pipeline,
    base_dir: Path,
    placement: dict[str, dict],
    registry_path: str,
    metrics_dir: str,
    metrics: Metrics,
) -> Controller:
    """The controller of a served pipeline: its stage metrics, Ray jobs, and promotions as hot-swaps on every replica."""

    def swapper(stage: str, variant: str) -> bool:
        replicas = max(1, len(SwapBoard(registry_path).alive(pipeline.name, stage)))
        try:
            return request_swap(registry_path, pipeline, stage, variant, replicas, 60)["ok"]
        except SwapError:
            return False

    def publisher(stage: str, rollout: dict | None) -> None:
        publish(registry_path, pipeline.name, stage, "rollout", rollout)

    stages = controller_stages(pipeline, base_dir, placement, registry_path)
    controller = Controller(
        pipeline,
        stages,
        registry_path,
        metrics_source=with_llm_profiles(
            stage_counters_source(metrics_dir, pipeline.name), metrics_dir, pipeline, stages
        ),
        launcher=JobLauncher(pipeline.name),
        swapper=swapper,
        publisher=publisher,
        metrics=metrics,
    )
    metrics.zero_control_series(pipeline.name, list(controller.stages))
    return controller
