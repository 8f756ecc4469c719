"""The judge: decides whether a candidate computes the reference's function, and how fast it is.

Candidate code never runs here. Two workers run: one with the reference alone (trusted), one with
the candidate. This process draws the seeds both make their inputs from, compares every output
itself, and keeps the clock that bounds every timing claim, so nothing a candidate does inside its
own interpreter can change a verdict. A supervisor judging many candidates shares one reference
worker among them (`ReferenceSide`): each reference output is computed once per batch. See docs in `hetforge.optimizer` and the README for the rules and their reasons.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetforge.optimizer import verdict as V
from hetforge.core.problem import Problem
from hetforge.optimizer.sandbox import WorkerFailure, WorkerProcess, spares_paused, start_worker
from hetforge.optimizer.static_checks import review_flags
from hetforge.core.devices import device_name
from hetforge.core.precision import PRECISIONS
from hetforge.core.tolerance import compare

_clock = time.perf_counter  # the judge's own clock; candidates never run in this process


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
    calls_per_round: int = 10  # timed calls per round, each on new input values (fewer if they would pass timing_bytes)
    # What one worker's timed input sets and their outputs may take (0: 12 GiB on CUDA, 2 GiB on the CPU): a
    # round of 1.5 GB inputs is 4 calls, not 10 (30 GB on each side, beside the idle workers of a batch).
    timing_bytes: int = 0
    warmup: int = 3
    threads: int = 0  # CPU threads per worker; 0 means min(cpu count, 8)
    review_speedup: float = 10.0  # a larger speedup is accepted but needs review
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


def verify(reference: Problem, candidate_file: str | Path, options: VerifyOptions = VerifyOptions()) -> Verdict:
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
        self.call_bytes = self._sizing.submit(_call_bytes, json.dumps(problem.to_json(), sort_keys=True))

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
        reply = self._request({"cmd": "init", **_init_message(self.problem, self.opt), "role": "reference"}, self.opt.startup_timeout_s)
        if isinstance(reply, dict) and "input_sets" in reply:
            self.input_sets = int(reply["input_sets"])
        return reply

    def ask(self, message: dict, timeout_s: float, keep: bool = False) -> dict | WorkerFailure:
        """`message`'s reply, waited for at most `timeout_s`; `keep`: a `run` whose reply is kept for the batch."""
        if not keep:
            return _wait(self._queue.submit(self._request, message, self.opt.timeout_s), timeout_s, message.get("cmd", "?"))
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
    return {"problem": problem.to_json(), "device": opt.device, "seed": opt.seed, "threads": opt.threads or min(os.cpu_count() or 1, 8),
            "precision": opt.precision, "baseline": opt.baseline, "weights_from_reference": opt.weights_from_reference}


class Verification:
    """One verification in two steps, for a supervisor that checks many candidates at once and times them
    one by one: `check()` (workers up, correctness: compiling and autotuning happen here, and may run
    beside other checks) then `finish()` (timing, with the device to itself; always returns the Verdict
    and stops the workers). `close()` stops the workers of one that is never finished. `shared`: a
    ReferenceSide shared with other verifications (default: its own, stopped with it).
    """

    def __init__(self, reference: Problem, candidate_file: str | Path, options: VerifyOptions = VerifyOptions(),
                 shared: ReferenceSide | None = None):
        self._judge = _Judge(reference, str(candidate_file), options, shared)
        self._checked: bool | None = None

    def check(self) -> bool:
        """True when the candidate passed correctness and is waiting to be timed."""
        self._checked = self._judge.check()
        return self._checked

    def finish(self, deadline: float | None = None, close: bool = True) -> Verdict:
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
    def verdict(self) -> Verdict:
        return self._judge.verdict


Verdict = V.Verdict


@dataclass
class _Side:
    """Timing samples of one worker across rounds."""

    per_call_ms: list[float] = field(default_factory=list)
    window_ms: list[float] = field(default_factory=list)  # judge's clock around each timed round
    overhead_ms: list[float] = field(default_factory=list)  # window minus the worker's own per-call sum
    fetch_ms: list[float] = field(default_factory=list)


class _Judge:
    def __init__(self, reference: Problem, candidate_file: str, options: VerifyOptions, shared: ReferenceSide | None = None):
        self.reference, self.candidate_file, self.opt = reference, candidate_file, options
        self.verdict = V.Verdict(verdict=V.Status.REJECTED, device=device_name(options.device), precision=options.precision,
                                 baseline=options.baseline, versions=_versions())
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
        self._started = _clock()
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
                    mark = _clock()
                    self._timing()
                    self.verdict.phases_s["timing"] = round(_clock() - mark, 3)
                if not self.verdict.reasons:
                    self.verdict.verdict = V.Status.ACCEPTED
                self.verdict.needs_review = self.verdict.accepted and bool(self.verdict.flags)
        finally:
            if close:
                self.close()
            self.verdict.elapsed_s = round(_clock() - getattr(self, "_started", _clock()), 3)
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

    def _reject(self, kind: str, message: str) -> bool:
        self.verdict.verdict = V.Status.REJECTED
        self.verdict.reasons.append(V.Reason(kind, message))
        return False

    def _run_checks(self) -> bool:
        try:
            source = Path(self.candidate_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            return self._reject(V.RejectKind.LOAD_ERROR, f"cannot read candidate {self.candidate_file}: {err}")
        self.verdict.flags.extend(review_flags(source))
        try:
            self.problem = self.reference.load()
        except Exception as err:  # noqa: BLE001 - the user's reference: report, never crash the judge
            return self._reject(V.RejectKind.REFERENCE_FAILED, f"cannot load the reference: {type(err).__name__}: {err}")

        memory = self.opt.memory_mb if self.opt.device == "cpu" else 0  # CUDA reserves huge address space
        self.cand_worker = start_worker("candidate", memory, self.opt.device, trusted=self.opt.trusted_candidate)
        init = {"cmd": "init", **_init_message(self.reference, self.opt), "role": "candidate",
                "candidate_file": str(Path(self.candidate_file).resolve())}
        try:
            self.cand_worker.send(init)  # both start up at once: the reply is read after the reference's
            candidate: dict | WorkerFailure | None = None
        except WorkerFailure as failure:
            candidate = failure
        if not self._reply_ok(self.side.start(self._timeout(self.opt.startup_timeout_s)), reference=True, stage="start-up"):
            return False
        if candidate is None:
            try:
                candidate = self.cand_worker.receive("init", self._timeout(self.opt.startup_timeout_s))
            except WorkerFailure as failure:
                candidate = failure
        if not self._reply_ok(candidate, reference=False, stage="start-up", load=True):
            return False
        mark = _clock()
        self.verdict.phases_s["start"] = round(mark - self._started, 3)
        ok = self._correctness()
        self.verdict.phases_s["correctness"] = round(_clock() - mark, 3)
        return ok

    def _reply_ok(self, reply: dict | WorkerFailure, reference: bool, stage: str, load: bool = False) -> bool:
        """True for a good reply; otherwise record why the reference or candidate failed."""
        if isinstance(reply, WorkerFailure):
            kind = {"timeout": V.RejectKind.TIMEOUT, "crashed": V.RejectKind.CRASHED, "exited": V.RejectKind.EXITED}.get(reply.kind, V.RejectKind.PROTOCOL)
            if reference:
                self._reject(V.RejectKind.REFERENCE_FAILED, f"reference worker failed during {stage}: {reply}")
            else:
                self._reject(kind, f"candidate worker {reply.kind} during {stage}: {reply.message}")
            return False
        if "error" in reply:
            message = f"{reply.get('message', '')}"
            if reference:
                self._reject(V.RejectKind.REFERENCE_FAILED, f"the reference failed during {stage}: {message}")
            else:
                kind = V.RejectKind.LOAD_ERROR if load else V.RejectKind.EXCEPTION
                kind = {"out_of_memory": V.RejectKind.OUT_OF_MEMORY, "confined": V.RejectKind.CONFINEMENT}.get(reply["error"], kind)
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

    def _ask(self, worker: WorkerProcess | ReferenceSide, message: dict, reference: bool, stage: str, keep: bool = False) -> dict | None:
        """A worker's (or the reference side's) reply, or None with the failure recorded."""
        if isinstance(worker, ReferenceSide):
            reply = worker.ask(message, self._timeout(self.opt.timeout_s), keep=keep)
        else:
            try:
                reply = worker.request(message, self._timeout(self.opt.timeout_s))
            except WorkerFailure as failure:
                reply = failure
        return reply if self._reply_ok(reply, reference, stage) else None

    # -- correctness -----------------------------------------------------------------------

    def _correctness(self) -> bool:
        first_outputs: list[tuple[Any, Any]] = []
        seeds = self.side.seeds(self.opt.trials + 1)  # the batch's: each reference output is computed once
        self.used_seeds.update(seeds)
        for trial, seed in enumerate(seeds[:-1]):
            worst_abs = worst_rel = 0.0
            for k in range(self.side.input_sets):
                label = f"trial {trial + 1} (seed {seed}), input set {k}"
                result = self._compare_call(self.opt.seed, seed, k, label)
                if result is None:
                    self.verdict.trials.append(V.TrialResult(seed, float("inf"), float("inf"), False))
                    return False
                ref_out, cand_out, max_abs, max_rel = result
                worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
                if k == 0:
                    first_outputs.append((ref_out, cand_out))
            self.verdict.trials.append(V.TrialResult(seed, worst_abs, worst_rel, True))
        self._check_sensitivity(first_outputs)
        # Rebuild the candidate under another seed (the reference keeps a module under each): a candidate that
        # hard-codes the first seed's weights fails here.
        other = self.opt.seed + 1
        if self._ask(self.cand_worker, {"cmd": "build", "seed": other}, False, f"rebuild under seed {other}") is None:
            return False
        self.model_seed = other  # timed as rebuilt, against the reference's module under the same seed
        if self._compare_call(other, seeds[-1], 0, f"model re-initialized under seed {other}") is None:
            return False
        return True

    def _compare_call(self, model_seed: int, seed: int, k: int, label: str) -> tuple[Any, Any, float, float] | None:
        """Input set `k` made under `seed` through both modules (the reference's built under `model_seed`)."""
        call = {"cmd": "run", "seed": seed, "set": k}
        if self.opt.fetch_sample:  # trusted candidates: positions fixed per seed, so the batch shares the reference's reply
            call["sample"] = {"seed": seed, "count": self.opt.fetch_sample, "above": self.opt.check_sample_above}
        ref = self._ask(self.side, {**call, "model_seed": model_seed}, True, label, keep=True)
        if ref is None:
            return None
        cand = self._ask(self.cand_worker, call, False, label)
        if cand is None:
            return None
        if cand.get("inputs_modified"):
            # Stages share tensors inside a pipeline: writing into an input corrupts another stage's data.
            self._reject(V.RejectKind.MODIFIES_INPUTS, f"{label}: the candidate modified input(s) {cand['inputs_modified']}")
            return None
        outcome = self._compare_outputs(cand.get("outputs"), cand.get("info", []), ref["outputs"], label)
        if outcome is None:
            outcome = self._against_float64({**call, "model_seed": model_seed, "float64": True}, cand.get("outputs"), cand.get("info", []), label)
        if outcome is None:
            return None
        return ref["outputs"], cand["outputs"], outcome[0], outcome[1]

    def _against_float64(self, request: dict, cand: Any, info: list, label: str) -> tuple[float, float] | None:
        """After a value mismatch with the float32 reference: the same inputs through the reference in float64.
        A candidate within tolerance of that is right where the reference's own rounding was not (a re-expressed
        sum, a more exact product: outputs of magnitude 30 from K = 1024 products differ from the exact result by
        ~1e-4 in cuBLAS fp32 itself). The candidate cannot touch this run: it is the trusted reference worker's."""
        if not self.verdict.reasons or self.verdict.reasons[-1].kind != V.RejectKind.MISMATCH:
            return None
        mismatch = self.verdict.reasons.pop()
        exact = self.side.ask(request, self._timeout(self.opt.timeout_s), keep=request["cmd"] == "run")
        if isinstance(exact, dict) and "error" not in exact:
            truth = _cast_like(exact["outputs"], cand)
            outcome = self._compare_outputs(cand, info, truth, f"{label} (against the reference in float64)")
            if outcome is not None:
                self.verdict.notes.append(f"more exact than the float32 reference: {label}: {mismatch.message[:200]}")
                return outcome
            self.verdict.reasons.pop()
        self.verdict.reasons.append(mismatch)
        return None

    def _compare_outputs(self, cand: Any, info: list, ref: Any, label: str) -> tuple[float, float] | None:
        ref_flat, cand_flat = _flatten(ref), _flatten(cand)
        if len(ref_flat) != len(cand_flat):
            self._reject(V.RejectKind.SHAPE, f"{label}: {len(cand_flat)} outputs, the reference has {len(ref_flat)}")
            return None
        for i, item in enumerate(info if isinstance(info, list) else []):
            # Only plain, materialized tensors on the right device: subclasses and lazy objects can defer or fake work.
            if isinstance(item, dict) and not (item.get("plain") and item.get("layout") == "torch.strided" and not item.get("meta")
                                               and item.get("device") == self.opt.device):
                self._reject(V.RejectKind.NOT_PLAIN, f"{label}: output {i} is {item.get('type')} on {item.get('device')}, not a plain strided tensor on {self.opt.device}")
                return None
        worst_abs = worst_rel = 0.0
        for i, (c, r) in enumerate(zip(cand_flat, ref_flat)):
            if isinstance(r, dict) and "sampled" in r:  # a timed output checked at drawn positions (fetch_sample)
                if not (isinstance(c, dict) and isinstance(c.get("sampled"), torch.Tensor)):
                    self._reject(V.RejectKind.NOT_PLAIN, f"{label}: output {i} did not come back as the sample asked for")
                    return None
                if list(c.get("shape", [])) != list(r["shape"]):
                    self._reject(V.RejectKind.SHAPE, f"{label}: output {i}: shape {tuple(c.get('shape', []))} != {tuple(r['shape'])}")
                    return None
                c, r = c["sampled"], r["sampled"]
            if not isinstance(r, torch.Tensor):
                if c != r:
                    self._reject(V.RejectKind.MISMATCH, f"{label}: output {i} is {c!r}, the reference gives {r!r}")
                    return None
                continue
            if not isinstance(c, torch.Tensor):
                self._reject(V.RejectKind.NOT_PLAIN, f"{label}: output {i} is not a tensor ({str(c)[:80]})")
                return None
            result = compare(c, r, self.opt.precision)
            if not result.ok:
                kind = {"shape": V.RejectKind.SHAPE, "dtype": V.RejectKind.DTYPE, "nan:": V.RejectKind.NAN_INF, "inf:": V.RejectKind.NAN_INF}.get(result.reason.split(" ")[0], V.RejectKind.MISMATCH)
                self._reject(kind, f"{label}: output {i}: {result.reason}")
                return None
            worst_abs, worst_rel = max(worst_abs, result.max_abs), max(worst_rel, result.max_rel)
        return worst_abs, worst_rel

    def _check_sensitivity(self, outputs: list[tuple[Any, Any]]) -> None:
        """Flag a candidate whose output did not change although its inputs did."""
        if len(outputs) < 2:
            return
        (ref_a, cand_a), (ref_b, cand_b) = outputs[0], outputs[1]
        same = lambda x, y: all(isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor) and p.shape == q.shape and torch.equal(p, q)
                                for p, q in zip(_flatten(x), _flatten(y)))  # noqa: E731
        if same(cand_a, cand_b):
            # An output that ignores its inputs passes a judge that checks one input; the reference decides whether that is legitimate.
            self.verdict.flags.append(V.Flag.INSENSITIVE + (": the reference's output did not change either" if same(ref_a, ref_b) else ""))

    # -- timing ----------------------------------------------------------------------------

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
        flush_bytes = _l2_flush_bytes() if self.opt.device == "cuda" else 0
        sides = {"reference": _Side(), "candidate": _Side()}
        workers = {"reference": self.side, "candidate": self.cand_worker}
        calls = self._calls = self._calls_per_round()
        for round_ in range(self.opt.rounds):
            seeds = [self._fresh_seed() for _ in range(calls)]
            check = self.rng.randrange(calls)  # chosen after the run: every call must be right
            # positions drawn after the run too, the same for both sides (trusted candidates only: see VerifyOptions)
            sample = {"sample": {"seed": self._fresh_seed(), "count": self.opt.fetch_sample}} if self.opt.fetch_sample else {}
            order = ("reference", "candidate") if round_ % 2 == 0 else ("candidate", "reference")
            fetched: dict[str, Any] = {}
            for name in order:
                worker, other = workers[name], workers["candidate" if name == "reference" else "reference"]
                is_ref = name == "reference"
                stage = f"timing round {round_ + 1}"
                if self._ask(worker, {"cmd": "prepare_timing", "seeds": seeds, "warmup": self.opt.warmup, "flush_bytes": flush_bytes,
                                      "model_seed": self.model_seed}, is_ref, stage) is None:
                    return
                other.pause()  # nothing of the other process runs while this one is timed
                try:
                    with spares_paused():  # nor spare workers still starting up
                        t0 = _clock()
                        reply = self._ask(worker, {"cmd": "time"}, is_ref, stage)
                        window = (_clock() - t0) * 1e3
                        if reply is None:
                            return
                        t1 = _clock()
                        got = self._ask(worker, {"cmd": "fetch", "indices": [check], **sample}, is_ref, stage)
                        fetch = (_clock() - t1) * 1e3
                        if got is None:
                            return
                finally:
                    other.resume()
                times = [float(t) for t in reply.get("times_ms", [])][:calls]
                if len(times) != calls or not all(np.isfinite(times)) or min(times) < 0:
                    return self._reject(V.RejectKind.PROTOCOL, f"{stage}: the worker reported {len(times)} malformed timings")
                side = sides[name]
                side.per_call_ms.extend(times)
                side.window_ms.append(window)
                side.overhead_ms.append(window - sum(times))
                side.fetch_ms.append(fetch)
                fetched[name] = (got["outputs"][0], got["info"][0])
            # Timed calls are checked too: answering from a cache or skipping work cannot pass for speed.
            ref_out, cand_out = fetched["reference"][0], fetched["candidate"]
            if self.opt.precision == "bf16":  # the reference was timed under bf16 autocast: compare in the strict dtype
                ref_out = _cast_like(ref_out, cand_out[0])
            label = f"timed call {check} of round {round_ + 1}"
            if self._compare_outputs(cand_out[0], cand_out[1], ref_out, label) is None and self._against_float64(
                    {"cmd": "fetch", "indices": [check], "float64": True, **sample}, cand_out[0], cand_out[1], label) is None:
                return
        self._summarize(sides["reference"], sides["candidate"])

    def _summarize(self, ref: _Side, cand: _Side) -> None:
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
        extra_fetch = min(max(0.0, c - 1.25 * r - 1.0) for c, r in zip(cand.fetch_ms, ref.fetch_ms))
        hidden_per_call = max(0.0, min(cand.overhead_ms) - honest_overhead + extra_fetch) / n
        if hidden_per_call > 0.15 * cand_ms + 0.05:
            shown = cand_ms + hidden_per_call
            self.verdict.flags.append(f"{V.Flag.HIDDEN_WORK}: per-call times say {cand_ms:.3f} ms, the judge's clock {shown:.3f} ms; using the latter")
            cand_ms = shown
        host_per_call = [(w + max(0.0, c - r)) / n for w, c, r in zip(cand.window_ms, cand.fetch_ms, ref.fetch_ms)]
        self.verdict.reference_ms = round(ref_ms, 6)
        self.verdict.candidate_ms = round(cand_ms, 6)
        self.verdict.speedup = round(ref_ms / cand_ms, 4) if cand_ms > 0 else float("inf")
        self.verdict.spread = {
            "reference": _spread(ref.per_call_ms, [w / n for w in ref.window_ms]),
            "candidate": _spread(cand.per_call_ms, host_per_call),
            "rounds": self.opt.rounds,
            "calls_per_round": n,
        }
        if self.verdict.speedup > self.opt.review_speedup:
            # Published kernel agents' largest "speedups" were mostly exploits: a human looks first.
            self.verdict.flags.append(f"{V.Flag.SPEEDUP}: {self.verdict.speedup:.1f}x exceeds {self.opt.review_speedup:g}x")
        if self.opt.min_speedup and self.verdict.speedup < self.opt.min_speedup:
            self._reject(V.RejectKind.NOT_FASTER, f"speedup {self.verdict.speedup:.3f}x is below the required {self.opt.min_speedup:g}x")


def _spread(per_call: list[float], host: list[float]) -> dict:
    q = np.percentile(per_call, [10, 50, 90])
    return {"p10_ms": round(float(q[0]), 6), "median_ms": round(float(q[1]), 6), "p90_ms": round(float(q[2]), 6),
            "host_median_ms": round(float(np.median(host)), 6)}


def _cast_like(ref: Any, cand: Any) -> Any:
    if isinstance(ref, list) and isinstance(cand, list):
        return [_cast_like(r, c) for r, c in zip(ref, cand)]
    if isinstance(ref, dict) and isinstance(cand, dict) and "sampled" in ref and "sampled" in cand:
        return {**ref, "sampled": _cast_like(ref["sampled"], cand["sampled"])}
    if isinstance(ref, torch.Tensor) and isinstance(cand, torch.Tensor) and ref.is_floating_point() and cand.is_floating_point():
        return ref.to(cand.dtype)
    return ref


def _flatten(value: Any) -> list[Any]:
    return [y for x in value for y in _flatten(x)] if isinstance(value, (list, tuple)) else [value]


@functools.lru_cache(maxsize=64)
def _call_bytes(problem_json: str) -> int:
    """Bytes of one main input set of the problem (`Problem.to_json()`, as JSON text: once per problem) and of
    the reference's output for it, both made on the meta device (nothing allocated or computed); the output
    taken as large as the inputs where the reference cannot run there; 0 if the inputs cannot be made there."""
    def nbytes(value) -> int:
        return sum(x.numel() * x.element_size() for x in _flatten([value]) if isinstance(x, torch.Tensor))

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


def _l2_flush_bytes() -> int:
    try:
        return 2 * int(torch.cuda.get_device_properties(0).L2_cache_size)
    except (RuntimeError, AttributeError, AssertionError):
        return 256 << 20


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out
