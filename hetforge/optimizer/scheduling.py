"""When a batch's correctness checks run: how many side by side, in which order, when a straggler is cut,
and how long round-2 checks should take judged by round 1.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable

from hetforge.optimizer.judge import Verification
from hetforge.optimizer.report import BASELINE, CandidateRecord, CandidateStatus

# Where checks run side by side, a batch's last check, once all others are done (in a batch of at least
# STRAGGLER_BATCH), gets this share of the batch's time so far (and at least a tenth of the budget), then is cut.
# On the H100, torch.compile's max-autotune never finished within the 60 s budget on any GEMM or convolution
# problem of the suite (28 times cut by the budget, after 20-44 s of its own checks); where it did finish (23
# times), its checks took at most 3.1 s (1.19x) longer than the slowest other check of its batch
# (`python bench/suite/report_spread.py bench/suite/raw/h100_s7_reports bench/suite/raw/h100_s8_*_reports`).
STRAGGLER_SHARE = 0.3
STRAGGLER_BATCH = 4

Proposal = tuple[str, str, str, dict | None]  # (name, agent, candidate source, variant spec)


def parallel_checks() -> int:
    """Correctness checks run side by side: up to 8 (each is two worker processes; compiling uses a core
    or more); one on a small machine, where they would only contend."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def check_priority(record: CandidateRecord, matched: str = "recipe:compile") -> int:
    """The order checks start in (when there are more than run at once): the baseline, the library, torch.compile
    at the stage's policy (`matched`, the baseline of a speedup over compile), the compositions and rewrites, the
    other recipes in the order they were proposed, the slowest compile (max-autotune, often over a minute) last.
    (Started first, its autotuning took the host's cores from the others: on the H100 the slowest of
    t2_gemm_bn_relu's other checks took 28 s instead of 21 s. Checked among the other recipes, `compile-tf32` was
    not reached within a 60 s budget on three encoders: bench/models/results_h200_e.md.)"""
    order = [BASELINE, "library:", matched, "compose:", "rewrites:", "recipe:"]
    if record.name.startswith("recipe:compile-max-autotune"):
        return len(order)
    return next(
        (
            i
            for i, prefix in enumerate(order)
            if record.name == prefix or (prefix.endswith(":") and record.name.startswith(prefix))
        ),
        len(order) - 1,
    )


def check_side_by_side(
    records: list[CandidateRecord],
    check: Callable[[CandidateRecord], None],
    runs: dict[int, Verification],
    started: float,
    min_grace: float,
) -> dict[int, str]:
    """Run `check` on every record, parallel_checks() at a time, in the order given. Where checks run side by
    side, in a batch of at least STRAGGLER_BATCH, the last one still running once all others are done is cut
    after a grace of STRAGGLER_SHARE of the batch's time so far (at least `min_grace`), unless it is the
    baseline's: the batch, and the budget, would otherwise wait on it alone. Returns the cut ones' notes, by id."""
    cut: dict[int, str] = {}
    side_by_side = parallel_checks() > 1
    with concurrent.futures.ThreadPoolExecutor(parallel_checks()) as pool:
        futures = {pool.submit(check, record): record for record in records}
        pending, rest_done = set(futures), started
        while pending:
            last = (
                futures[next(iter(pending))]
                if side_by_side and len(pending) == 1 and len(futures) >= STRAGGLER_BATCH
                else None
            )
            timeout = None
            if last is not None and last.name != BASELINE:
                grace = max(min_grace, STRAGGLER_SHARE * (rest_done - started))
                timeout = max(0.0, rest_done + grace - time.monotonic())
            done, pending = concurrent.futures.wait(
                pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
            )
            if done:
                rest_done = time.monotonic()
                continue
            if id(last) in runs:  # (a check that never started removes its run)
                runs[id(last)].cut()
            cut[id(last)] = (
                f"still checking {time.monotonic() - rest_done:.0f} s after the rest of its batch "
                f"({rest_done - started:.0f} s): cut, not waited for"
            )
            concurrent.futures.wait(pending)
            pending = set()
    return cut


def expected_check_s(candidates: list[CandidateRecord], proposals: list[Proposal]) -> float:
    """How long the checks of round-2 compositions should take, judged by round 1 (`candidates`): the slowest
    finished check of a round-1 composition or of a recipe they use (inf when one of those was tried and never
    finished)."""
    recipes = {f"recipe:{spec['recipe']['name']}" for _, _, _, spec in proposals if spec and spec.get("recipe")}
    seconds = []
    for c in candidates:
        if c.round == 1 and (c.agent == "compose" or c.name in recipes):
            phases = c.verdict.phases_s if c.verdict is not None else {}
            finished = c.status != CandidateStatus.SKIPPED and "correctness" in phases
            seconds.append(phases.get("start", 0.0) + phases["correctness"] if finished else float("inf"))
    return max(seconds, default=0.0)
