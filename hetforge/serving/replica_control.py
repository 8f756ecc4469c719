"""A stage replica's side of swaps and rollouts: apply its Serve user_config, report outcomes to the store.

Serve calls the deployment's `reconfigure(user_config)` on every running replica when the stage
config changes, and on a new replica before it takes traffic (`swap_control` says what the config
holds). `ReplicaControl.apply` does what the config asks:

- a swap request newer than the one applied here: `runtime.apply_variant(variant)` (a model stage
  checks the variant on its own recent live inputs first, `ModelStageRuntime.swap`);
- the running rollout: start, step or stop the replica's canary arm (`runtime.start_canary`,
  `arm.set_step`, `runtime.stop_canary`).

Nothing here waits on the store. Outcomes (swap reports, the arm's numbers per step) and the
heartbeat (active variant, input signatures) are written by one reporter thread, every
`REPORT_S` and right after each apply; a write that fails (store down, locked, unreachable) stays
queued and is retried on the next round, so a request never waits on or fails because of the store.

The runtime's side is small, so that another kind of stage can be controlled the same way (an LLM
stage's engine settings, say): `ControlledRuntime`.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Protocol

from hetforge.serving.rollout import CanaryArm, Rollout, RolloutBoard, StepStats
from hetforge.serving.stage_runtime import SwapRefused
from hetforge.serving.swap_control import HEARTBEAT_S, StageConfig, SwapBoard
from hetforge.state.store import StoreError

REPORT_S = HEARTBEAT_S  # the reporter thread's period
PENDING_KEPT = 1000  # queued reports while the store is down; older ones are dropped (and logged)
log = logging.getLogger(__name__)


class ControlledRuntime(Protocol):
    """What `ReplicaControl` needs of a stage runtime.

    `apply_variant` makes `variant` (a registry id as text, or "reference") the active one, or raises
    `SwapRefused` with the reason, leaving the active one serving. `start_canary(rollout)` builds the
    rollout's variant beside the active one and returns its `CanaryArm` (or raises `SwapRefused`);
    `stop_canary()` drops it. `signatures` (optional) has `snapshot() -> {signature: calls}`.
    """

    pipeline: str
    stage: str
    arm: CanaryArm | None

    @property
    def active_variant(self) -> str: ...

    def apply_variant(self, variant: str) -> object: ...

    def start_canary(self, rollout: Rollout) -> CanaryArm: ...

    def stop_canary(self) -> None: ...


class ReplicaControl:
    """One replica: applies stage configs, and reports outcomes, numbers and heartbeats to the store, best effort."""

    def __init__(self, runtime: ControlledRuntime, registry_path: str, replica: str, report_s: float = REPORT_S):
        self.runtime, self.registry_path, self.replica, self.report_s = runtime, registry_path, replica, report_s
        self.applied_swap: int | None = None
        self.failed_rollouts: set[int] = set()
        self.config_errors: list[str] = []
        self._unapplied: object = None  # a config whose apply met an unreachable store, re-applied by the reporter
        self._apply_lock = threading.Lock()  # one config at a time
        self._pending: collections.deque = collections.deque()  # ("swap" | "stats", args), oldest first
        self._pending_lock = threading.Lock()
        self._boards: tuple[SwapBoard, RolloutBoard] | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"replica-control-{replica}", daemon=True)

    def start(self) -> ReplicaControl:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the reporter thread: a replica shutting down stops beating (the store is the process's, left open)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # -- applying ---------------------------------------------------------------------------------
    def apply(self, user_config: object) -> None:
        """Do what the stage config asks; never raises (a bad config is logged and kept in `config_errors`)."""
        try:
            config = StageConfig.from_json(user_config)
        except ValueError as err:
            self.config_errors = (self.config_errors + [str(err)[:500]])[-10:]
            log.error("stage %s: config ignored: %s", self.runtime.stage, err)
            return
        with self._apply_lock:
            try:
                if config.swap_id is not None and config.swap_id != self.applied_swap:
                    self._swap(config.swap_id, config.swap_variant or "")
                self._rollout(config.rollout)
                self._unapplied = None
            except StoreError as err:  # the variant's record is out of reach: the reporter thread applies it later
                self._unapplied = user_config
                self.config_errors = (self.config_errors + [f"deferred, the store is unreachable: {err}"[:500]])[-10:]
                log.warning("stage %s: config deferred until the store answers: %s", self.runtime.stage, err)
        self._wake.set()  # report now, not at the next round

    def _swap(self, request_id: int, variant: str) -> None:
        try:
            self.runtime.apply_variant(variant)
            outcome, reason = "swapped", ""
        except SwapRefused as err:
            outcome, reason = "refused", str(err)
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - a variant that fails to build is refused; the replica serves on
            outcome, reason = "refused", f"swap to {variant} failed: {type(err).__name__}: {err}"
        self.applied_swap = request_id
        self._queue("swap", (request_id, self.replica, outcome, reason[:500]))

    def _rollout(self, doc: dict | None) -> None:
        runtime = self.runtime
        try:
            current = None if doc is None else Rollout.from_config(runtime.pipeline, runtime.stage, doc)
        except ValueError as err:
            self.config_errors = (self.config_errors + [str(err)[:500]])[-10:]
            current = None
        arm = runtime.arm
        if arm is not None and (current is None or current.id != arm.rollout_id):
            self._queue("stats", (arm.rollout_id, arm.step, self.replica, arm.snapshot()))  # its last step's numbers
            runtime.stop_canary()
            arm = None
        if current is None or current.id in self.failed_rollouts:
            return
        if arm is None:
            try:
                arm = runtime.start_canary(current)
            except StoreError:
                raise
            except Exception as err:  # noqa: BLE001 - this replica cannot run the variant: the controller rolls it back
                self.failed_rollouts.add(current.id)
                self._queue("stats", (current.id, current.step, self.replica, StepStats(failures=[str(err)[:500]])))
                return
        if arm.step != current.step:
            self._queue("stats", (arm.rollout_id, arm.step, self.replica, arm.snapshot()))
            arm.set_step(current)

    def status(self) -> dict:
        return {
            "applied_swap": self.applied_swap,
            "rollout": self.runtime.arm.rollout_id if self.runtime.arm else None,
            "reports_pending": len(self._pending),
            "config_errors": self.config_errors,
        }

    # -- reporting --------------------------------------------------------------------------------
    def _queue(self, kind: str, args: tuple) -> None:
        with self._pending_lock:
            self._pending.append((kind, args))
            while len(self._pending) > PENDING_KEPT:
                log.warning("stage %s: report dropped, the store has been unreachable too long: %s", *self._pending[0])
                self._pending.popleft()

    def report_once(self) -> bool:
        """Write the heartbeat, the queued reports and the arm's numbers; False when the store refused (kept queued)."""
        runtime = self.runtime
        try:
            if self._boards is None:  # opening a board migrates its tables: retried here while the store is down
                self._boards = (SwapBoard(self.registry_path), RolloutBoard(self.registry_path))
            swaps, rollouts = self._boards
            signatures = getattr(runtime, "signatures", None)
            swaps.heartbeat(
                runtime.pipeline,
                runtime.stage,
                self.replica,
                runtime.active_variant,
                signatures.snapshot() if signatures is not None else None,
            )
            while True:
                with self._pending_lock:
                    if not self._pending:
                        break
                    item = self._pending[0]
                kind, args = item
                (swaps.report if kind == "swap" else rollouts.write_stats)(*args)
                with self._pending_lock:
                    if self._pending and self._pending[0] is item:  # `_queue` may have dropped it meanwhile
                        self._pending.popleft()
            arm = runtime.arm
            if arm is not None:
                rollouts.write_stats(arm.rollout_id, arm.step, self.replica, arm.snapshot())
        except Exception as err:  # noqa: BLE001 - the store is down or refuses: serving goes on, the next round retries
            log.debug("stage %s: reports to the store deferred: %s", runtime.stage, err)
            return False
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.report_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.tick()

    def tick(self) -> None:
        """One round of the reporter thread: the reports, then a config deferred while the store was unreachable."""
        if self.report_once() and self._unapplied is not None:
            self.apply(self._unapplied)
