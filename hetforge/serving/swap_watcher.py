"""A model stage replica's thread that applies swap requests and follows rollouts.

It polls the registry's SQLite file: a swap request newer than the one it applied is checked on
the replica's own recent live inputs (`ModelStageRuntime.swap`) and its outcome written back
(`swap_control`); the stage's running rollout starts, steps and stops the replica's canary arm, and
the arm's numbers are written back (`rollout`). Every second it writes the replica's heartbeat with
its active variant and its histogram of input signatures.
"""

from __future__ import annotations

import threading
import time

from hetforge.serving.rollout import RolloutBoard, StepStats
from hetforge.serving.stage_runtime import SwapRefused
from hetforge.serving.swap_control import HEARTBEAT_S, SwapBoard, SwapReport


class SwapWatcher:
    """A replica's thread applying the newest swap request for its stage."""

    def __init__(self, runtime, board: SwapBoard, replica: str, interval_s: float = 0.2):
        self.runtime, self.board, self.replica, self.interval_s = runtime, board, replica, interval_s
        self.rollouts = RolloutBoard(board.path)
        self.failed_rollouts: set[int] = set()
        self.applied: int = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"swap-watcher-{replica}", daemon=True)

    def start(self) -> SwapWatcher:
        latest = self.board.latest(self.runtime.pipeline, self.runtime.stage)
        self.applied = latest[0] if latest else 0  # requests before start were decided by the registry lookup
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def poll_once(self) -> SwapReport | None:
        latest = self.board.latest(self.runtime.pipeline, self.runtime.stage)
        if latest is None or latest[0] <= self.applied:
            return None
        request_id, variant = latest
        try:
            self.runtime.swap(variant, self.runtime.live_inputs())
            outcome, reason = "swapped", ""
        except SwapRefused as err:
            outcome, reason = "refused", str(err)
        self.applied = request_id
        self.board.report(request_id, self.replica, outcome, reason[:500])
        return SwapReport(request_id, self.replica, outcome, reason)

    def poll_rollout(self) -> None:
        """Start, step or stop this replica's canary arm as the stage's running rollout says; report its numbers."""
        runtime = self.runtime
        running = self.rollouts.running(runtime.pipeline, runtime.stage)
        current = running[0] if running else None
        arm = runtime.arm
        if arm is not None and (current is None or current.id != arm.rollout_id):
            self.rollouts.write_stats(
                arm.rollout_id, arm.step, self.replica, arm.snapshot()
            )  # the last numbers of its last step
            runtime.stop_canary()
            arm = None
        if current is None or current.id in self.failed_rollouts:
            return
        if arm is None:
            try:
                arm = runtime.start_canary(current)
            except SwapRefused as err:  # this replica cannot run the variant: the controller rolls it back
                self.failed_rollouts.add(current.id)
                self.rollouts.write_stats(current.id, current.step, self.replica, StepStats(failures=[str(err)[:500]]))
                return
        if arm.step != current.step:
            self.rollouts.write_stats(arm.rollout_id, arm.step, self.replica, arm.snapshot())
            arm.set_step(current)
        self.rollouts.write_stats(arm.rollout_id, arm.step, self.replica, arm.snapshot())

    def _loop(self) -> None:
        last_beat = 0.0
        while not self._stop.wait(self.interval_s):
            try:
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    self.board.heartbeat(
                        self.runtime.pipeline,
                        self.runtime.stage,
                        self.replica,
                        self.runtime.active_variant,
                        self.runtime.signatures.snapshot(),
                    )
                    last_beat = time.monotonic()
                self.poll_once()
                self.poll_rollout()
            except Exception:  # noqa: BLE001 - a broken poll (locked file, ...) must not kill the replica; next poll retries
                continue
