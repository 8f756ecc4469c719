"""The judge: decides whether a candidate computes the reference's function, and how fast it is.

Candidate code never runs here. Two workers run: one with the reference alone (trusted), one with
the candidate. This process draws the seeds both make their inputs from, compares every output
itself, and keeps the clock that bounds every timing claim, so nothing a candidate does inside its
own interpreter can change a verdict. A supervisor judging many candidates shares one reference
worker among them (`ReferenceSide`): each reference output is computed once per batch. See docs in
`hetforge.optimizer` and the README for the rules and their reasons.

This module is the public API and the orchestration (start-up, replies, the verdict's assembly);
the checks are in `correctness`, the timing rounds and their statistics in `timing`.

Over 450 lines (by a few): the orchestration of two workers per candidate and the verdict's
assembly; correctness and timing are `correctness.py` and `timing.py`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hetforge.core.devices import device_name
from hetforge.core.precision import PRECISIONS
from hetforge.core.problem import Problem
from hetforge.optimizer import verdict as V
from hetforge.optimizer.correctness import Correctness
from hetforge.optimizer.sandbox import WorkerFailure, WorkerProcess, start_worker
from hetforge.optimizer.static_checks import review_flags
from hetforge.optimizer.timing import Timing, call_bytes, clock


@dataclass(frozen=True)
class VerifyOptions:
    """How hard to look. Defaults suit a small problem (a few ms a call) in well under 20 s on a CPU."""

    device: str = "cpu"
    precision: str = "strict"
    trials: int = 3  # correctness trials, each on fresh inputs (every declared variant too)
    timeout_s: float = 60.0  # per request to a worker (one call, one timed round)
    startup_timeout_s: float = 120.0  # importing torch and building the modules
    baseline: str = "eager"  # eager | compile: how the reference is timed
    seed: int = 0  # the seed both modules are constructed under
    rounds: int = 5  # timing rounds, reference and candidate interleaved
    # more rounds, up to this many (0: twice `rounds`), while a faster-looking candidate's interval still holds 1
    max_rounds: int = 0
    calls_per_round: int = 10  # timed calls per round, each on new input values (fewer if they would pass timing_bytes)
    # What one worker's timed input sets and their outputs may take (0: 12 GiB on CUDA, 2 GiB on the CPU): a
    # round of 1.5 GB inputs is 4 calls, not 10 (30 GB on each side, beside the idle workers of a batch).
    timing_bytes: int = 0
    warmup: int = 3
    threads: int = 0  # CPU threads per worker; 0 means min(cpu count, 8)
    review_speedup: float = 10.0  # a larger speedup is accepted but needs review
    # False for hetforge's compiler recipes (the reference under torch.compile or a CUDA graph), never flagged for
    # being fast: on a LayerNorm over long rows torch.compile ran 25x faster than eager
    flag_speedup: bool = True
    min_speedup: float = 0.0  # below this the candidate is rejected as not faster (0: never)
    memory_mb: int = 8192  # address-space limit of CPU workers (a runaway allocation fails)
    time: bool = True  # measure speed (correctness only when False)
    weights_from_reference: bool = False  # load the reference's state_dict into ModelNew (module variants)
    trusted_candidate: bool = False  # hetforge's own recipe/rewrite/library code: may share the compile cache
    deadline: float = 0.0  # time.monotonic() by which every request must be answered (0: per-request timeouts only)
    # Timed calls' outputs are checked in full, or, for trusted candidates, at this many positions the judge
    # draws after the round (large outputs: copying 256 MB to the judge took most of a verification's timing).
    # Never for generated code, which could compute just the drawn positions when asked for them.
    fetch_sample: int = 0
    # With fetch_sample set (trusted candidates), correctness outputs above this many elements are compared at
    # fetch_sample positions too: whole 1.3 GB outputs shipped to the judge took 47 s of a 60 s budget.
    check_sample_above: int = 1 << 26

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f'Got "{self.device}" for device: cpu or cuda.')
        if self.precision not in PRECISIONS:
            raise ValueError(f'Got "{self.precision}" for precision: one of {", ".join(PRECISIONS)}.')
        if self.baseline not in ("eager", "compile"):
            raise ValueError(f'Got "{self.baseline}" for baseline: eager or compile.')
        if self.trials < 1 or self.rounds < 1 or self.calls_per_round < 2:
            raise ValueError("trials and rounds must be at least 1, calls_per_round at least 2")


def verify(reference: Problem, candidate_file: str | Path, options: VerifyOptions = VerifyOptions()) -> V.Verdict:
    """Judge `candidate_file` (defining ModelNew) against `reference`; always returns a Verdict."""
    return _Judge(reference, str(candidate_file), options).run()


class ReferenceSide:
    """The trusted reference worker of one or many verifications, and the outputs it computed.

    A supervisor checks a batch of candidates side by side against one reference: the batch shares
    its correctness seeds (`new_batch`), each reference output is computed once and kept here, and one
    worker starts instead of one per candidate (with 8 checks at once, 8 reference workers competed
    with the candidates for the cores and the GPU's memory). Requests run one at a time on the side's
    own thread; a caller that stops waiting (its deadline) leaves the request to finish for the others.
    Candidates are separate processes that never see each other, so sharing seeds among them is safe.
    """

    def __init__(self, problem: Problem, options: VerifyOptions):
        self.problem, self.opt = problem, options
        self.worker: WorkerProcess | None = None
        self.input_sets = 1
        self._queue = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hetforge-reference")
        self._lock = threading.Lock()
        self._started: concurrent.futures.Future | None = None
        self._outputs: dict[tuple, concurrent.futures.Future] = {}
        self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # seeds no candidate can predict
        self._seeds: list[int] = []
        # Bytes of one timed call, made on the meta device: the first use of meta kernels imports their Python
        # registrations (2.2 s on a 2-core host, 3-7 s on a GPU host busy compiling), so it starts now, beside
        # the checks, and is ready by the first timing.
        # Its thread is joined by close() (and at exit): a thread still inside torch when the interpreter exits aborts the
        # process ("terminate called without an active exception", seen when a run ended within a second).
        self._sizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hetforge-call-bytes")
        self.call_bytes = self._sizing.submit(call_bytes, json.dumps(problem.to_json(), sort_keys=True))

    def new_batch(self) -> None:
        """Fresh correctness seeds from here on; the outputs kept for the last batch's are dropped. A worker
        that died (a reference that ran out of memory, a timeout) is replaced at the next start()."""
        with self._lock:
            self._seeds, self._outputs = [], {}
            if self.worker is not None and not self.worker.alive():
                dead, self.worker, self._started = self.worker, None, None
                self._queue.submit(dead.close)

    def seeds(self, count: int) -> list[int]:
        """The batch's correctness seeds (the same for every candidate of the batch)."""
        with self._lock:
            while len(self._seeds) < count:
                self._seeds.append(self._rng.randrange(1, 2**31 - 1))
            return list(self._seeds[:count])

    def start(self, timeout_s: float) -> dict | WorkerFailure:
        """The worker's init reply (started by the first caller; later callers get the same reply)."""
        with self._lock:
            if self._started is None:
                self._started = self._queue.submit(self._start)
            future = self._started
        return _wait(future, timeout_s, "init")

    def _start(self) -> dict | WorkerFailure:
        memory = self.opt.memory_mb if self.opt.device == "cpu" else 0  # CUDA reserves huge address space
        self.worker = start_worker("reference", memory, self.opt.device, trusted=True)
        reply = self._request(
            {"cmd": "init", **_init_message(self.problem, self.opt), "role": "reference"}, self.opt.startup_timeout_s
        )
        if isinstance(reply, dict) and "input_sets" in reply:
            self.input_sets = int(reply["input_sets"])
        return reply

    def ask(self, message: dict, timeout_s: float, keep: bool = False) -> dict | WorkerFailure:
        """`message`'s reply, waited for at most `timeout_s`; `keep`: a `run` whose reply is kept for the batch."""
        if not keep:
            return _wait(
                self._queue.submit(self._request, message, self.opt.timeout_s), timeout_s, message.get("cmd", "?")
            )
        key = json.dumps(message, sort_keys=True)  # messages hold dicts (a sample's seed and count)
        with self._lock:
            future = self._outputs.get(key)
            if future is None:
                future = self._outputs[key] = self._queue.submit(self._request, message, self.opt.timeout_s)
        return _wait(future, timeout_s, message.get("cmd", "?"))

    def _request(self, message: dict, timeout_s: float) -> dict | WorkerFailure:
        if self.worker is None:
            return WorkerFailure("exited", "the reference worker did not start")
        if self.opt.deadline:
            timeout_s = max(0.1, min(timeout_s, self.opt.deadline - time.monotonic()))
        try:
            return self.worker.request(message, timeout_s)
        except WorkerFailure as failure:
            return failure

    def pause(self) -> None:
        if self.worker is not None:
            self.worker.pause()

    def resume(self) -> None:
        if self.worker is not None:
            self.worker.resume()

    def close(self) -> None:
        """Stop the worker; a request in flight ends with it (the kill first: its reader sees the pipe close)."""
        worker = self.worker
        if worker is not None:
            worker.kill()
        self._queue.shutdown(wait=True, cancel_futures=True)
        if worker is not None:
            worker.close()
        self._sizing.shutdown(wait=True)


def _wait(future: concurrent.futures.Future, timeout_s: float, command: str) -> dict | WorkerFailure:
    try:
        return future.result(timeout=max(0.1, timeout_s))
    except concurrent.futures.TimeoutError:
        return WorkerFailure("timeout", f"no answer to {command} within {timeout_s:.0f} s")
    except concurrent.futures.CancelledError:
        return WorkerFailure("exited", "the reference worker was stopped")


def _init_message(problem: Problem, opt: VerifyOptions) -> dict:
    return {
        "problem": problem.to_json(),
        "device": opt.device,
        "seed": opt.seed,
        "threads": opt.threads or min(os.cpu_count() or 1, 8),
        "precision": opt.precision,
        "baseline": opt.baseline,
        "weights_from_reference": opt.weights_from_reference,
    }


class Verification:
    """One verification in two steps, for a supervisor that checks many candidates at once and times them
    one by one: `check()` (workers up, correctness: compiling and autotuning happen here, and may run
    beside other checks) then `finish()` (timing, with the device to itself; always returns the Verdict
    and stops the workers). `close()` stops the workers of one that is never finished. `shared`: a
    ReferenceSide shared with other verifications (default: its own, stopped with it).
    """

    def __init__(
        self,
        reference: Problem,
        candidate_file: str | Path,
        options: VerifyOptions = VerifyOptions(),
        shared: ReferenceSide | None = None,
    ):
        self._judge = _Judge(reference, str(candidate_file), options, shared)
        self._checked: bool | None = None

    def check(self) -> bool:
        """True when the candidate passed correctness and is waiting to be timed."""
        self._checked = self._judge.check()
        return self._checked

    def finish(self, deadline: float | None = None, close: bool = True) -> V.Verdict:
        """Time the candidate (if it passed its checks) by `deadline` (time.monotonic(); default: the options').
        `close=False` leaves stopping the workers to a later `close()` (which may run on another thread)."""
        if self._checked is None:
            self.check()
        if deadline is not None:
            self._judge.opt = replace(self._judge.opt, deadline=deadline)
        return self._judge.finish(timed=bool(self._checked), close=close)

    def close(self) -> None:
        self._judge.close()

    def cut(self) -> None:
        """Stop a check in progress, from another thread: every later request times out at once and the
        candidate's worker is killed, so `check()` returns False soon (the shared reference is left running)."""
        self._judge.cut()

    @property
    def verdict(self) -> V.Verdict:
        return self._judge.verdict


class _Judge(Correctness, Timing):
    """One candidate judged against the reference: start-up, correctness (`Correctness`), timing (`Timing`)."""

    def __init__(
        self, reference: Problem, candidate_file: str, options: VerifyOptions, shared: ReferenceSide | None = None
    ):
        self.reference, self.candidate_file, self.opt = reference, candidate_file, options
        self.verdict = V.Verdict(
            verdict=V.Status.REJECTED,
            device=device_name(options.device),
            precision=options.precision,
            baseline=options.baseline,
            versions=_versions(),
        )
        self.rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # seeds no candidate can predict
        self.used_seeds: set[int] = set()
        self.side = shared or ReferenceSide(reference, options)
        self._owns_side = shared is None
        self.cand_worker: WorkerProcess | None = None
        self.model_seed = options.seed  # the seed the candidate's module is built under

    # -- orchestration ---------------------------------------------------------------------

    def run(self) -> V.Verdict:
        return self.finish(timed=self.check())

    def check(self) -> bool:
        """Start-up and correctness; True when the candidate may be timed."""
        self._started = clock()
        try:
            ok = self._run_checks()
        except BaseException:
            self.close()
            raise
        if not ok:
            self.verdict.verdict = V.Status.REJECTED
        else:  # it may wait for its timing while others are timed: holding only its module, not its check's inputs
            self._release_candidate()
        return bool(ok) and not self.verdict.reasons

    def _release_candidate(self) -> None:
        """Best effort: the candidate worker drops its inputs and outputs and returns the device's cached memory."""
        if self.cand_worker is not None and self.cand_worker.alive():
            try:
                # not cut to the check's deadline: a timeout kills the worker, and a candidate whose check just
                # made it would then fail its timing for the judge's haste
                self.cand_worker.request({"cmd": "release"}, max(2.0, self._timeout(10.0)))
            except WorkerFailure:
                pass  # a worker that cannot answer is stopped with the others

    def finish(self, timed: bool, close: bool = True) -> V.Verdict:
        """Timing (when `timed` and the options ask for it), the final verdict, workers stopped (if `close`)."""
        try:
            if timed:
                if self.opt.time:
                    mark = clock()
                    self._timing()
                    self.verdict.phases_s["timing"] = round(clock() - mark, 3)
                if not self.verdict.reasons:
                    self.verdict.verdict = V.Status.ACCEPTED
                self.verdict.needs_review = self.verdict.accepted and bool(self.verdict.flags)
        finally:
            if close:
                self.close()
            self.verdict.elapsed_s = round(clock() - getattr(self, "_started", clock()), 3)
        return self.verdict

    def close(self) -> None:
        if self.cand_worker is not None:
            self.cand_worker.close()
        if self._owns_side:
            self.side.close()

    def cut(self) -> None:
        self.opt = replace(self.opt, deadline=time.monotonic())
        worker = self.cand_worker
        if worker is not None:
            worker.kill()

    def _timeout(self, seconds: float) -> float:
        """`seconds`, cut to what is left before the deadline (if any)."""
        if not self.opt.deadline:
            return seconds
        return max(0.1, min(seconds, self.opt.deadline - time.monotonic()))

    def _reject(self, kind: V.RejectKind, message: str, cause: V.RejectKind | None = None) -> bool:
        self.verdict.verdict = V.Status.REJECTED
        self.verdict.reasons.append(V.Reason(kind, message, cause))
        return False

    def _run_checks(self) -> bool:
        try:
            source = Path(self.candidate_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            return self._reject(V.RejectKind.LOAD_ERROR, f"cannot read candidate {self.candidate_file}: {err}")
        if not self.opt.trusted_candidate:  # hetforge's own templates embed the problem's paths (often under /tmp)
            self.verdict.flags.extend(review_flags(source))
        try:
            self.problem = self.reference.load()
        except Exception as err:  # noqa: BLE001 - the user's reference: report, never crash the judge
            return self._reject(
                V.RejectKind.REFERENCE_FAILED, f"cannot load the reference: {type(err).__name__}: {err}"
            )

        memory = self.opt.memory_mb if self.opt.device == "cpu" else 0  # CUDA reserves huge address space
        self.cand_worker = start_worker("candidate", memory, self.opt.device, trusted=self.opt.trusted_candidate)
        init = {
            "cmd": "init",
            **_init_message(self.reference, self.opt),
            "role": "candidate",
            "candidate_file": str(Path(self.candidate_file).resolve()),
        }
        try:
            self.cand_worker.send(init)  # both start up at once: the reply is read after the reference's
            candidate: dict | WorkerFailure | None = None
        except WorkerFailure as failure:
            candidate = failure
        if not self._reply_ok(
            self.side.start(self._timeout(self.opt.startup_timeout_s)), reference=True, stage="start-up"
        ):
            return False
        if candidate is None:
            try:
                candidate = self.cand_worker.receive("init", self._timeout(self.opt.startup_timeout_s))
            except WorkerFailure as failure:
                candidate = failure
        if not self._reply_ok(candidate, reference=False, stage="start-up", load=True):
            return False
        mark = clock()
        self.verdict.phases_s["start"] = round(mark - self._started, 3)
        ok = self._correctness()
        self.verdict.phases_s["correctness"] = round(clock() - mark, 3)
        return ok

    def _reply_ok(self, reply: dict | WorkerFailure, reference: bool, stage: str, load: bool = False) -> bool:
        """True for a good reply; otherwise record why the reference or candidate failed."""
        if isinstance(reply, WorkerFailure):
            kind = {
                "timeout": V.RejectKind.TIMEOUT,
                "crashed": V.RejectKind.CRASHED,
                "exited": V.RejectKind.EXITED,
            }.get(reply.kind, V.RejectKind.PROTOCOL)
            if reference:
                self._reject(
                    V.RejectKind.REFERENCE_FAILED, f"reference worker failed during {stage}: {reply}", cause=kind
                )
            else:
                self._reject(kind, f"candidate worker {reply.kind} during {stage}: {reply.message}")
            return False
        if "error" in reply:
            message = f"{reply.get('message', '')}"
            kind = V.RejectKind.LOAD_ERROR if load else V.RejectKind.EXCEPTION
            kind = {"out_of_memory": V.RejectKind.OUT_OF_MEMORY, "confined": V.RejectKind.CONFINEMENT}.get(
                reply["error"], kind
            )
            if reference:
                self._reject(
                    V.RejectKind.REFERENCE_FAILED, f"the reference failed during {stage}: {message}", cause=kind
                )
            else:
                self._reject(kind, f"candidate failed during {stage}: {message}")
            return False
        if not reference and "confinement" in reply:
            self.verdict.confinement = reply["confinement"]
        return True

    def _fresh_seed(self) -> int:
        while True:  # never the same tensors twice
            seed = self.rng.randrange(1, 2**31 - 1)
            if seed not in self.used_seeds:
                self.used_seeds.add(seed)
                return seed

    def _ask(
        self, worker: WorkerProcess | ReferenceSide, message: dict, reference: bool, stage: str, keep: bool = False
    ) -> dict | None:
        """A worker's (or the reference side's) reply, or None with the failure recorded."""
        if isinstance(worker, ReferenceSide):
            reply = worker.ask(message, self._timeout(self.opt.timeout_s), keep=keep)
        else:
            try:
                reply = worker.request(message, self._timeout(self.opt.timeout_s))
            except WorkerFailure as failure:
                reply = failure
        return reply if self._reply_ok(reply, reference, stage) else None


def _versions() -> dict:
    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out
