"""Timing: interleaved rounds of timed calls, every timed call's output checked, and the statistics.

`Timing` is the judge's timing step (`judge._Judge` mixes it in, beside `correctness.Correctness`,
whose output checks it reuses): it uses the judge's options (`opt`), reference side (`side`),
candidate worker (`cand_worker`), verdict, seeds (`rng`, `_fresh_seed`, `model_seed`) and its
`_ask`, `_reject` and `_release_candidate`. The size of one timed call (`call_bytes`) and the L2
flush size are plain functions.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hetforge.core.problem import Problem
from hetforge.optimizer import stats
from hetforge.optimizer import verdict as V
from hetforge.optimizer.correctness import cast_like, flatten
from hetforge.optimizer.sandbox import spares_paused

clock = time.perf_counter  # the judge's own clock; candidates never run in this process


@dataclass
class Side:
    """Timing samples of one worker across rounds."""

    per_call_ms: list[float] = field(default_factory=list)
    rounds_ms: list[list[float]] = field(default_factory=list)  # per_call_ms by round, for the interval
    window_ms: list[float] = field(default_factory=list)  # judge's clock around each timed round
    overhead_ms: list[float] = field(default_factory=list)  # window minus the worker's own per-call sum
    fetch_ms: list[float] = field(default_factory=list)


class Timing:
    """Rounds of timed calls, reference and candidate interleaved, and the summary into the verdict."""

    def _calls_per_round(self) -> int:
        """calls_per_round, or fewer when that many input sets and their outputs would pass timing_bytes on
        one worker; at least 2."""
        budget = self.opt.timing_bytes or (12 << 30 if self.opt.device == "cuda" else 2 << 30)
        per_call = self.side.call_bytes.result()
        return max(2, min(self.opt.calls_per_round, budget // per_call)) if per_call else self.opt.calls_per_round

    def _timing(self) -> None:
        try:
            self._timed_rounds()
        finally:  # the candidate's timed inputs and outputs go before the next candidate's timing (its worker may wait idle)
            self._release_candidate()

    def _timed_rounds(self) -> None:
        flush_bytes = l2_flush_bytes() if self.opt.device == "cuda" else 0
        sides = {"reference": Side(), "candidate": Side()}
        workers = {"reference": self.side, "candidate": self.cand_worker}
        calls = self._calls = self._calls_per_round()
        round_ = 0
        while self._another_round(round_, sides):
            seeds = [self._fresh_seed() for _ in range(calls)]
            check = self.rng.randrange(calls)  # chosen after the run: every call must be right
            # positions drawn after the run too, the same for both sides (trusted candidates only: see VerifyOptions)
            sample = (
                {"sample": {"seed": self._fresh_seed(), "count": self.opt.fetch_sample}}
                if self.opt.fetch_sample
                else {}
            )
            order = ("reference", "candidate") if round_ % 2 == 0 else ("candidate", "reference")
            fetched: dict[str, Any] = {}
            for name in order:
                worker, other = workers[name], workers["candidate" if name == "reference" else "reference"]
                is_ref = name == "reference"
                stage = f"timing round {round_ + 1}"
                if (
                    self._ask(
                        worker,
                        {
                            "cmd": "prepare_timing",
                            "seeds": seeds,
                            "warmup": self.opt.warmup,
                            "flush_bytes": flush_bytes,
                            "model_seed": self.model_seed,
                        },
                        is_ref,
                        stage,
                    )
                    is None
                ):
                    return
                other.pause()  # nothing of the other process runs while this one is timed
                try:
                    with spares_paused():  # nor spare workers still starting up
                        t0 = clock()
                        reply = self._ask(worker, {"cmd": "time"}, is_ref, stage)
                        window = (clock() - t0) * 1e3
                        if reply is None:
                            return
                        t1 = clock()
                        got = self._ask(worker, {"cmd": "fetch", "indices": [check], **sample}, is_ref, stage)
                        fetch = (clock() - t1) * 1e3
                        if got is None:
                            return
                finally:
                    other.resume()
                times = [float(t) for t in reply.get("times_ms", [])][:calls]
                if len(times) != calls or not all(np.isfinite(times)) or min(times) < 0:
                    return self._reject(
                        V.RejectKind.PROTOCOL, f"{stage}: the worker reported {len(times)} malformed timings"
                    )
                side = sides[name]
                side.per_call_ms.extend(times)
                side.rounds_ms.append(times)
                side.window_ms.append(window)
                side.overhead_ms.append(window - sum(times))
                side.fetch_ms.append(fetch)
                fetched[name] = (got["outputs"][0], got["info"][0])
            # Timed calls are checked too: answering from a cache or skipping work cannot pass for speed.
            ref_out, cand_out = fetched["reference"][0], fetched["candidate"]
            if self.opt.precision == "bf16":  # the reference was timed under bf16 autocast: compare in the strict dtype
                ref_out = cast_like(ref_out, cand_out[0])
            label = f"timed call {check} of round {round_ + 1}"
            if (
                self._check_outputs(cand_out[0], cand_out[1], ref_out, label) is None
                and self._against_float64(
                    {"cmd": "fetch", "indices": [check], "float64": True, **sample}, cand_out[0], cand_out[1], label
                )
                is None
            ):
                return
            round_ += 1
        self._summarize(sides["reference"], sides["candidate"])

    def _another_round(self, done: int, sides: dict[str, Side]) -> bool:
        """`opt.rounds` rounds; then more, up to `opt.max_rounds`, while the candidate looks faster but its interval
        still holds 1 and the deadline leaves room for twice the last round."""
        if done < self.opt.rounds:
            return True
        if done >= (self.opt.max_rounds or 2 * self.opt.rounds):
            return False
        ref, cand = sides["reference"], sides["candidate"]
        if statistics.median(ref.per_call_ms) <= statistics.median(cand.per_call_ms):
            return False  # not faster by its median: more rounds would only settle how much slower
        if stats.speedup_interval(ref.rounds_ms, cand.rounds_ms).claim != stats.Claim.WITHIN_NOISE:
            return False
        if self.opt.deadline:
            last_round_s = (ref.window_ms[-1] + cand.window_ms[-1] + ref.fetch_ms[-1] + cand.fetch_ms[-1]) / 1e3
            return time.monotonic() + 2 * last_round_s < self.opt.deadline
        return True

    def _summarize(self, ref: Side, cand: Side) -> None:
        n = self._calls
        ref_ms = statistics.median(ref.per_call_ms)
        cand_ms = statistics.median(cand.per_call_ms)
        # The worker's own per-call times are claims. The judge's clock around each round bounds them:
        # beyond the reference's (honest) overhead, anything a candidate's round took that its per-call
        # times do not show (work on another stream, a thread, work deferred to the fetch) is charged to it.
        # Minimum over rounds on both sides: a hider pays its hidden work in every round, while load
        # spikes on a busy machine hit single rounds; so noise does not read as hidden work.
        honest_overhead = min(ref.overhead_ms)
        # Fetching copies the timed output to the judge: its time grows with the output (256 MB: tens of
        # ms, jittery), so only what exceeds the reference's fetch by a margin counts as deferred work.
        extra_fetch = min(max(0.0, c - 1.25 * r - 1.0) for c, r in zip(cand.fetch_ms, ref.fetch_ms, strict=True))
        hidden_per_call = max(0.0, min(cand.overhead_ms) - honest_overhead + extra_fetch) / n
        if hidden_per_call > 0.15 * cand_ms + 0.05:
            shown = cand_ms + hidden_per_call
            self.verdict.flags.append(
                f"{V.Flag.HIDDEN_WORK}: per-call times say {cand_ms:.3f} ms, the judge's clock {shown:.3f} ms; using the latter"
            )
            cand_ms = shown
            cand.rounds_ms = [[t + hidden_per_call for t in r] for r in cand.rounds_ms]
        host_per_call = [
            (w + max(0.0, c - r)) / n for w, c, r in zip(cand.window_ms, cand.fetch_ms, ref.fetch_ms, strict=True)
        ]
        self.verdict.reference_ms = round(ref_ms, 6)
        self.verdict.candidate_ms = round(cand_ms, 6)
        self.verdict.speedup = round(ref_ms / cand_ms, 4) if cand_ms > 0 else float("inf")
        interval = stats.speedup_interval(ref.rounds_ms, cand.rounds_ms)
        self.verdict.interval = interval.to_dict()
        self.verdict.spread = {
            "reference": spread(ref.per_call_ms, [w / n for w in ref.window_ms]),
            "candidate": spread(cand.per_call_ms, host_per_call),
            "rounds": len(ref.rounds_ms),
            "calls_per_round": n,
        }
        if self.opt.flag_speedup and self.verdict.speedup > self.opt.review_speedup:
            # Published kernel agents' largest "speedups" were mostly exploits: a human looks first. hetforge's own
            # recipes (torch.compile, CUDA graphs) are never flagged for being fast; the supervisor lifts the flag
            # from a candidate within review_speedup of the best of them (`supervisor.review_against_recipes`).
            self.verdict.flags.append(
                f"{V.Flag.SPEEDUP}: {self.verdict.speedup:.1f}x exceeds {self.opt.review_speedup:g}x"
            )
        if self.opt.min_speedup and self.verdict.speedup < self.opt.min_speedup:
            self._reject(
                V.RejectKind.NOT_FASTER,
                f"speedup {self.verdict.speedup:.3f}x is below the required {self.opt.min_speedup:g}x",
            )


def spread(per_call: list[float], host: list[float]) -> dict:
    """p10, median and p90 of the per-call times, and the median of the host clock's per-call times."""
    q = np.percentile(per_call, [10, 50, 90])
    return {
        "p10_ms": round(float(q[0]), 6),
        "median_ms": round(float(q[1]), 6),
        "p90_ms": round(float(q[2]), 6),
        "host_median_ms": round(float(np.median(host)), 6),
    }


@functools.lru_cache(maxsize=64)
def call_bytes(problem_json: str) -> int:
    """Bytes of one main input set of the problem (`Problem.to_json()`, as JSON text: once per problem) and of
    the reference's output for it, both made on the meta device (nothing allocated or computed); the output
    taken as large as the inputs where the reference cannot run there; 0 if the inputs cannot be made there."""

    def nbytes(value) -> int:
        return sum(x.numel() * x.element_size() for x in flatten([value]) if isinstance(x, torch.Tensor))

    loaded = Problem.from_json(json.loads(problem_json)).load()
    try:
        with torch.device("meta"):
            inputs = loaded.get_inputs()
    except Exception:  # noqa: BLE001 - inputs made off torch's factories (numpy, a file): no estimate, no cap
        return 0
    try:
        with torch.device("meta"), torch.no_grad():
            out = loaded.model_class(*loaded.init_args, **loaded.init_kwargs)(*inputs)
        return nbytes(list(inputs)) + nbytes(out)
    except Exception:  # noqa: BLE001 - an op without a meta kernel, data-dependent shapes
        return 2 * nbytes(list(inputs))


def l2_flush_bytes() -> int:
    """Bytes a timed call writes before each call to flush the L2 cache: twice its size."""
    try:
        return 2 * int(torch.cuda.get_device_properties(0).L2_cache_size)
    except (RuntimeError, AttributeError, AssertionError):
        return 256 << 20
