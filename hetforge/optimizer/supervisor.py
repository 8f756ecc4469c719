"""The supervisor: rounds of candidates from the agents, each verified on the target device.

Round 1 asks the fast agents for candidates: compiler recipes, graph rewrites, library kernels.
Round 2 composes the winners (rewrites, then library kernels, then the best compile recipe) into
one variant. Round 3 and on are the LLM swarm's turns: every agent answers in parallel, each answer
is verified (one at a time on the device), and the verdicts go back into each conversation; the
rounds stop when the budget is spent or a turn brings no gain. The best accepted candidate that
needs no review (or that a human approved) wins. A candidate that would start after the budget is
recorded as skipped, not silently dropped.

The budget is wall time for the whole search: each batch's correctness checks (where compiling
and autotuning happen) run side by side and must end within CHECK_SHARE of the budget left, the
timings follow one at a time, and every worker request is cut at the deadline. Only the eager
baseline is verified whatever the budget. One reference worker serves every verification of the
run (`verify.ReferenceSide`): a batch's candidates are checked on the same fresh seeds, each
reference output computed once.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from hetforge.optimizer import llm_agent
from hetforge.core.problem import Problem
from hetforge.optimizer.recipes import recipe_candidate_source, recipes_for
from hetforge.optimizer.rewrites import apply_rewrites, rewrite_candidate_source
from hetforge.optimizer.sandbox import close_all, spare_workers
from hetforge.optimizer.variants import VariantSpec, variant_candidate_source
from hetforge.optimizer.verify import ReferenceSide, Verification, VerifyOptions
from hetforge import config

AGENTS = ("recipes", "rewrites", "library", "llm")
TRUSTED_AGENTS = ("recipes", "rewrites", "library", "compose")  # hetforge's own code: may share the compile cache
ENDPOINT_ERROR = "\0"  # marks an answer that is the endpoint's failure, not the model's text
STALL_GAIN = 1.02  # an LLM turn that improves the best speedup by less than 2% ends the search
BASELINE = "recipe:eager"  # the reference as it is: always verified, whatever the budget, so there is always an answer
# Of the budget left when a batch starts: its correctness checks must end by then, timing gets the rest (on a GPU,
# about half a second a candidate with sampled outputs; CPU problems run longer calls on fewer cores).
CHECK_SHARE = {"cuda": 0.8, "cpu": 0.6}
# Where checks run side by side, a batch's last check, once all others are done (in a batch of at least
# STRAGGLER_BATCH), gets this share of the batch's time so far (and at least a tenth of the budget), then is cut.
# On the H100, torch.compile's max-autotune never finished within the 60 s budget on any GEMM or convolution
# problem of the suite (28 times cut by the budget, after 20-44 s of its own checks); where it did finish (23
# times), its checks took at most 3.1 s (1.19x) longer than the slowest other check of its batch
# (bench/suite/report_spread.py over sessions 7 and 8's H100 reports).
STRAGGLER_SHARE = 0.3
STRAGGLER_BATCH = 4
# Device memory of workers stopped during the checks (cut, timed out, crashed) is scrubbed by the driver in the
# background, slowing memory-bound kernels by ~17% meanwhile (about 0.45 TB/s on the H100; see
# worker.SCRUB_BYTES_PER_S): the timings start after this pause (enough for ~90 GB; not itself measured).
SETTLE_S = {"cuda": 0.2, "cpu": 0.0}
# The end of the budget left for what follows the last timing: stopping the workers (a CUDA context takes
# seconds to tear down; on the H100, report to process exit took up to 3.0 s), the report, the registry.
REPORT_RESERVE_S = {"cuda": 4.0, "cpu": 2.0}
FETCH_SAMPLE = 1 << 16  # timed outputs of hetforge's own candidates are checked at this many drawn positions


@dataclass(frozen=True)
class OptimizeTask:
    """What to optimize, where, under which numerics, within which budget."""

    problem_file: str
    device: str = "cpu"
    precision: str = "strict"
    budget_s: float = 60.0
    agents: tuple[str, ...] = AGENTS
    hint: str = ""  # goes into every LLM prompt, and the report
    trials: int = 3
    rounds: int = 3  # timing rounds per verification
    llm_agents: int = 3  # swarm size: one conversation per strategy
    llm_turns: int = 3  # answers per conversation (first try + repairs/improvements)
    recipes: tuple[str, ...] = ()  # restrict the compiler recipes to these names (empty: all that apply)
    compose: bool = True  # round 2: join the round-1 winners into one variant
    threads: int = 0  # CPU threads per verification worker (0: min(cores, 8)); background jobs keep it low


@dataclass
class CandidateRecord:
    name: str
    agent: str
    round: int
    source: str
    verdict: dict | None  # None when skipped or when no code came back
    status: str = ""  # winner | accepted | needs_review | rejected | skipped
    note: str = ""  # why it lost
    spec: dict | None = None  # transform variants: how to rebuild it from an instance

    @property
    def speedup(self) -> float:
        return float((self.verdict or {}).get("speedup") or 0.0)

    @property
    def usable(self) -> bool:
        return bool(self.verdict) and self.verdict["verdict"] == "accepted" and not self.verdict["needs_review"]


@dataclass
class OptimizeReport:
    task: dict
    candidates: list[CandidateRecord] = field(default_factory=list)
    winner: CandidateRecord | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None
    elapsed_s: float = 0.0
    notices: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        cands = [{k: v for k, v in asdict(c).items() if k != "source"} | {"speedup_vs_eager": c.speedup} for c in self.candidates]
        return {"task": self.task, "candidates": cands, "winner": self.winner.name if self.winner else None,
                "winner_agent": self.winner.agent if self.winner else None, "speedup_vs_eager": self.speedup_vs_eager,
                "speedup_vs_compile": self.speedup_vs_compile, "elapsed_s": round(self.elapsed_s, 2), "notices": self.notices}


def _has_conv(problem: Problem) -> bool:
    import torch.nn as nn

    model = problem.load().build()
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())


Proposal = tuple[str, str, str, dict | None]  # (name, agent, candidate source, variant spec)


def propose_round1(task: OptimizeTask, problem: Problem) -> list[Proposal]:
    """Every first-round candidate of the enabled fast agents."""
    reference = str(Path(task.problem_file).resolve())
    out: list[Proposal] = []
    # baselines first: eager and torch.compile are what every other candidate is measured against
    if "recipes" in task.agents:
        for recipe in recipes_for(task.device, task.precision, _has_conv(problem)):
            if task.recipes and recipe.name not in task.recipes and recipe.name != "eager":
                continue
            spec = VariantSpec(recipe=asdict(recipe), precision=task.precision)
            out.append((f"recipe:{recipe.name}", "recipes", recipe_candidate_source(reference, recipe), spec.to_json()))
    if "rewrites" in task.agents:
        result = apply_rewrites(problem.load().build())
        if result is not None and result[1]:
            names = list(result[1])
            spec = VariantSpec(rewrites=tuple(names), precision=task.precision)
            out.append(("rewrites:" + "+".join(names), "rewrites", rewrite_candidate_source(reference, names), spec.to_json()))
    if "library" in task.agents:
        spec = VariantSpec(library=True, precision=task.precision)
        out.append(("library:kernels", "library", variant_candidate_source(reference, spec), spec.to_json()))
    return out


def propose_compositions(task: OptimizeTask, round1: list[Proposal], report: OptimizeReport | None) -> list[Proposal]:
    """Variants joining rewrites, library kernels and a compile recipe.

    Without a report (round 1, checked beside the single agents' candidates `round1`): every join of
    the parts the agents produced, with the default torch.compile recipe. With one (round 2): joins of the
    round-1 candidates that beat eager, with the fastest recipe.
    """
    parts: dict[str, dict] = {}
    if report is None:
        found = next((spec for _, agent, _, spec in round1 if agent == "rewrites"), None)  # what round 1 proposes
        if found:
            parts["rewrites"] = found
        if "library" in task.agents:
            parts["library"] = {}
        if "recipes" in task.agents and (not task.recipes or "compile" in task.recipes):
            parts["recipes"] = {"recipe": asdict(next(r for r in recipes_for(task.device, task.precision, False) if r.name == "compile"))}
    else:
        faster = [c for c in report.candidates if c.usable and c.speedup > 1.0 and c.spec]
        for agent in ("rewrites", "library", "recipes"):
            found = [c for c in faster if c.agent == agent and c.name != "recipe:eager"]
            if found:
                parts[agent] = max(found, key=lambda c: c.speedup).spec
    reference = str(Path(task.problem_file).resolve())
    out: list[Proposal] = []
    for n in (2, 3):
        for combo in itertools.combinations(parts, n):
            spec = VariantSpec(rewrites=tuple(parts["rewrites"]["rewrites"]) if "rewrites" in combo else (),
                               library="library" in combo, recipe=parts["recipes"]["recipe"] if "recipes" in combo else None,
                               precision=task.precision)
            out.append((f"compose:{spec.label()}", "compose", variant_candidate_source(reference, spec), spec.to_json()))
    return out


def _parallel_checks() -> int:
    """Correctness checks run side by side: up to 8 (each is two worker processes; compiling uses a core
    or more); one on a small machine, where they would only contend."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def _check_priority(record: CandidateRecord) -> int:
    """The order checks start in (when there are more than run at once): the baseline and the candidates
    most likely to win first, the slowest compile (max-autotune, often over a minute) last. (Started first, its
    autotuning took the host's cores from the others: on the H100 the slowest of t2_gemm_bn_relu's other checks
    took 28 s instead of 21 s.)"""
    order = ["recipe:eager", "library:", "recipe:compile", "compose:", "rewrites:", "recipe:compile-max-autotune"]
    if record.name == "recipe:compile-max-autotune":
        return len(order)
    return next((i for i, prefix in enumerate(order) if record.name == prefix or (prefix.endswith(":") and record.name.startswith(prefix))),
                len(order) - 1)


def _check_side_by_side(records: list[CandidateRecord], check: Callable[[CandidateRecord], None], runs: dict[int, Verification],
                        started: float, min_grace: float) -> dict[int, str]:
    """Run `check` on every record, _parallel_checks() at a time, in the order given. Where checks run side by
    side, in a batch of at least STRAGGLER_BATCH, the last one still running once all others are done is cut
    after a grace of STRAGGLER_SHARE of the batch's time so far (at least `min_grace`), unless it is the
    baseline's: the batch, and the budget, would otherwise wait on it alone. Returns the cut ones' notes, by id."""
    cut: dict[int, str] = {}
    side_by_side = _parallel_checks() > 1
    with concurrent.futures.ThreadPoolExecutor(_parallel_checks()) as pool:
        futures = {pool.submit(check, record): record for record in records}
        pending, rest_done = set(futures), started
        while pending:
            last = futures[next(iter(pending))] if side_by_side and len(pending) == 1 and len(futures) >= STRAGGLER_BATCH else None
            timeout = None
            if last is not None and last.name != BASELINE:
                grace = max(min_grace, STRAGGLER_SHARE * (rest_done - started))
                timeout = max(0.0, rest_done + grace - time.monotonic())
            done, pending = concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
            if done:
                rest_done = time.monotonic()
                continue
            if id(last) in runs:  # (a check that never started removes its run)
                runs[id(last)].cut()
            cut[id(last)] = (f"still checking {time.monotonic() - rest_done:.0f} s after the rest of its batch "
                             f"({rest_done - started:.0f} s): cut, not waited for")
            concurrent.futures.wait(pending)
            pending = set()
    return cut


def _expected_check_s(report: OptimizeReport, proposals: list[Proposal]) -> float:
    """How long the checks of round-2 compositions should take, judged by round 1: the slowest finished check
    of a round-1 composition or of a recipe they use (inf when one of those was tried and never finished)."""
    recipes = {f"recipe:{spec['recipe']['name']}" for _, _, _, spec in proposals if spec and spec.get("recipe")}
    seconds = []
    for c in report.candidates:
        if c.round == 1 and (c.agent == "compose" or c.name in recipes):
            phases = (c.verdict or {}).get("phases_s", {})
            finished = c.status != "skipped" and "correctness" in phases
            seconds.append(phases.get("start", 0.0) + phases["correctness"] if finished else float("inf"))
    return max(seconds, default=0.0)


def optimize(task: OptimizeTask, scratch: Path, progress: Callable[[CandidateRecord], None] | None = None,
             approve: Callable[[CandidateRecord], bool] | None = None, notice: Callable[[str], None] | None = None,
             llm_client: Callable[[], object] | None = None, started: float | None = None) -> OptimizeReport:
    """Run the rounds; `approve` is asked about accepted candidates flagged for review (default: no).

    `llm_client` makes the LLM agents' client (default: the configured OpenAI-compatible endpoint).
    `started`: the time.monotonic() the budget counts from (default: now; the CLI passes its own start).
    Workers for the next verification start while the current one runs (`sandbox.spare_workers`).
    """
    unknown = [a for a in task.agents if a not in AGENTS]
    if unknown:
        raise ValueError(f'Got "{",".join(unknown)}" for agents: any of {", ".join(AGENTS)}.')
    start = started if started is not None else time.monotonic()
    problem = Problem(file=str(Path(task.problem_file).resolve()))
    options = VerifyOptions(device=task.device, precision=task.precision, trials=task.trials, rounds=task.rounds,
                            startup_timeout_s=600, timeout_s=600, threads=task.threads)
    memory = VerifyOptions.memory_mb if task.device == "cpu" else 0
    # a worker per check of the first batch and one for the reference start while the proposals are made
    with spare_workers(size=2, memory_mb=memory, device=task.device, initial=_parallel_checks() + 1) as spares:
        reference = ReferenceSide(problem, options)
        try:
            return _optimize(task, scratch, progress, approve, notice, llm_client, start, problem, options, reference)
        finally:
            close_all([reference, spares])  # side by side: a worker with a CUDA context takes seconds to exit


def _optimize(task: OptimizeTask, scratch: Path, progress, approve, notice, llm_client, start: float, problem: Problem,
              options: VerifyOptions, reference: ReferenceSide) -> OptimizeReport:
    scratch.mkdir(parents=True, exist_ok=True)
    report = OptimizeReport(task=asdict(task))
    deadline = start + task.budget_s - min(REPORT_RESERVE_S[task.device], task.budget_s / 10)  # teardown and report within the budget too

    def over_budget() -> bool:
        return time.monotonic() > deadline

    def record_verdict(record: CandidateRecord, verdict: dict, cut_off: bool) -> None:
        """`cut_off`: the verification ran into a budget deadline (a timeout then says nothing about the candidate)."""
        record.verdict = verdict
        if verdict["verdict"] == "rejected":
            reason = verdict["reasons"][0]
            if cut_off and (reason["kind"] == "timeout" or (reason["kind"] == "reference_failed" and "timeout:" in reason["message"])):
                record.status, record.note = "skipped", f"budget of {task.budget_s:.0f} s spent during its verification"
            else:
                record.status, record.note = "rejected", f"{reason['kind']}: {reason['message']}"[:300]
        elif verdict["needs_review"] and not (approve and approve(record)):
            record.status, record.note = "needs_review", "; ".join(verdict["flags"])[:300]
        else:
            if verdict["needs_review"]:
                verdict["needs_review"] = False  # a human approved it
                record.note = "approved by a human"
            record.status = "accepted"

    def judge_all(proposals: list[Proposal], round_: int, verify_options: VerifyOptions = options) -> list[CandidateRecord]:
        """Verify proposals: their correctness checks (where compiling and autotuning happen) side by side,
        within a share of the budget left, then their timings one at a time, with the device to themselves."""
        now = time.monotonic()
        checks_until = now + CHECK_SHARE[task.device] * max(0.0, deadline - now)
        records, runs, checked_at = [], {}, {}
        reference.new_batch()
        for name, agent, source, spec in proposals:
            record = CandidateRecord(name, agent, round_, source, None, spec=spec)
            records.append(record)
            if over_budget() and name != BASELINE:
                record.status, record.note = "skipped", f"budget of {task.budget_s:.0f} s spent"
                continue
            path = scratch / f"candidate_{len(report.candidates) + len(records) - 1:02d}.py"
            path.write_text(source)
            opts = replace(verify_options, deadline=checks_until if name != BASELINE else 0.0)
            if agent in TRUSTED_AGENTS:
                opts = replace(opts, trusted_candidate=True, fetch_sample=FETCH_SAMPLE)
            runs[id(record)] = Verification(problem, path, opts, shared=reference)

        def check(record: CandidateRecord) -> None:
            run = runs[id(record)]
            if time.monotonic() >= checks_until and record.name != BASELINE:
                run.close()
                record.status, record.note = "skipped", f"budget of {task.budget_s:.0f} s spent before its checks started"
                del runs[id(record)]
                return
            run.check()
            checked_at[id(record)] = time.monotonic()

        cut = _check_side_by_side(sorted((r for r in records if id(r) in runs), key=_check_priority), check, runs,
                                  now, min_grace=task.budget_s / 10)
        if cut or any(run.verdict.reasons for run in runs.values()):
            time.sleep(SETTLE_S[task.device])  # a worker may have been stopped: its memory is being scrubbed
        for record in records:  # timing, in proposal order: the baselines first
            run = runs.get(id(record))
            if run is not None:
                if id(record) in cut:
                    record.verdict, record.status, record.note = run.verdict.to_dict(), "skipped", cut[id(record)]
                elif over_budget() and run.verdict.verdict != "rejected" and record.name != BASELINE:
                    record.status, record.note = "skipped", f"budget of {task.budget_s:.0f} s spent before its timing"
                else:
                    verdict = run.finish(deadline=deadline if record.name != BASELINE else None, close=False).to_dict()
                    cut_off = checked_at.get(id(record), 0.0) >= checks_until - 1.0 or time.monotonic() >= deadline - 1.0
                    record_verdict(record, verdict, cut_off)
            report.candidates.append(record)
            if progress:
                progress(record)
        # Workers stop after every timing, all at once: a CUDA context takes seconds to tear down, and teardowns
        # beside a timing load the host the timed process launches from (suspected in a t1_gelu run where
        # torch.compile's candidate read 0.86x of eager and compile-freezing, the same kernel, 1.00x).
        close_all(list(runs.values()))
        return records

    def skip(proposals: list[Proposal], round_: int, why: str) -> None:
        """Record proposals as skipped, unverified: they could not finish within the budget left."""
        for name, agent, source, spec in proposals:
            record = CandidateRecord(name, agent, round_, source, None, status="skipped", note=why[:300], spec=spec)
            report.candidates.append(record)
            if progress:
                progress(record)

    def judge(proposal: Proposal, round_: int, verify_options: VerifyOptions = options, refused: str = "") -> CandidateRecord:
        """Verify one proposal and record it; `refused`: record it as rejected without running it."""
        if not refused:
            return judge_all([proposal], round_, verify_options)[0]
        name, agent, source, spec = proposal
        record = CandidateRecord(name, agent, round_, source, None, spec=spec)
        record.status, record.note = "rejected", refused[:300]
        report.candidates.append(record)
        if progress:
            progress(record)
        return record

    first = propose_round1(task, problem)
    judge_all(first + (propose_compositions(task, first, None) if task.compose else []), 1)
    if task.compose:
        tried = {c.name for c in report.candidates}
        second = [p for p in propose_compositions(task, first, report) if p[0] not in tried]
        window = CHECK_SHARE[task.device] * max(0.0, deadline - time.monotonic())
        need = _expected_check_s(report, second)
        if second and need > window:
            took = "did not finish" if need == float("inf") else f"took up to {need:.0f} s"
            skip(second, 2, f"{window:.0f} s of the budget left for checks; their parts' round-1 checks {took}")
        else:
            judge_all(second, 2)
    if "llm" in task.agents:
        reason = None if llm_client else llm_agent.unavailable_reason()
        if reason:
            report.notices.append(reason)
            if notice:
                notice(reason)
        else:
            _llm_rounds(task, problem, report, judge, replace(options, weights_from_reference=True), over_budget,
                        llm_client or _default_client)

    usable = [c for c in report.candidates if c.usable]
    if usable:
        winner = max(usable, key=lambda c: c.speedup)
        winner.status = "winner"
        report.winner = winner
        report.speedup_vs_eager = winner.speedup
        compile_default = next((c for c in report.candidates if c.name == "recipe:compile" and c.usable), None)
        if compile_default is not None and compile_default.speedup > 0:
            report.speedup_vs_compile = round(winner.speedup / compile_default.speedup, 4)
        for c in usable:
            if c is not winner:
                c.note = f"slower than {winner.name} ({c.speedup:.3f}x vs {winner.speedup:.3f}x over eager)"
    report.elapsed_s = time.monotonic() - start
    return report


def _default_client():
    return llm_agent.LLMClient(config.llm_endpoint(), config.llm_timeout_s())


def _llm_rounds(task: OptimizeTask, problem: Problem, report: OptimizeReport, judge, options: VerifyOptions,
                over_budget: Callable[[], bool], make_client: Callable[[], object]) -> None:
    """The swarm: `llm_agents` conversations, `llm_turns` answers each, all verified."""
    loaded = problem.load()
    model = loaded.build(device=task.device)
    inputs = loaded.main_inputs(0, task.device)
    facts = llm_agent.device_facts(task.device)
    try:
        profile = llm_agent.profile_reference(model, inputs, task.device)
    except Exception:  # noqa: BLE001 - the profile is advice for the prompt; a failure leaves it out
        profile = []
    del model
    history = [llm_agent.Attempt(c.agent, 0, c.status, c.note or f"{c.speedup:.3f}x", c.speedup or None) for c in report.candidates]
    strategies = list(llm_agent.STRATEGIES)[: max(1, task.llm_agents)]
    conversations = [llm_agent.Conversation(s, [{"role": "system", "content": llm_agent.system_prompt(s, task.precision)},
                                                {"role": "user", "content": llm_agent.first_prompt(
                                                    loaded.source, facts, profile, history, task.hint)}]) for s in strategies]
    client = make_client()
    best = max((c.speedup for c in report.candidates if c.usable), default=0.0)
    for turn in range(1, task.llm_turns + 1):
        if over_budget():
            report.notices.append(f"llm agents stopped before turn {turn}: budget of {task.budget_s:.0f} s spent")
            return
        with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:  # the model answers in parallel
            answers = list(pool.map(lambda conv: _ask(client, conv.messages), conversations))
        for conv, answer in zip(conversations, answers):  # verified one at a time: timings need the device alone
            conv.messages.append({"role": "assistant", "content": answer})
            failed = answer.startswith(ENDPOINT_ERROR)
            code = None if failed else llm_agent.extract_code(answer)
            name = f"llm:{conv.strategy}:turn{turn}"
            if code is None:
                why = answer[len(ENDPOINT_ERROR):] if failed else "no_code: the answer has no Python code block"
                judge((name, "llm", answer[:4000], None), 2 + turn, options, refused=why)
                attempt = llm_agent.Attempt(conv.strategy, turn, "endpoint_error" if failed else "no_code", why)
            else:
                record = judge((name, "llm", code, None), 2 + turn, options)
                if record.verdict is None:
                    attempt = llm_agent.Attempt(conv.strategy, turn, "skipped", record.note)
                else:
                    status, summary, speed = llm_agent.summarize_verdict(record.verdict)
                    attempt = llm_agent.Attempt(conv.strategy, turn, status, summary, speed)
            conv.messages.append({"role": "user", "content": llm_agent.feedback_prompt(attempt, task.hint)})
        turn_best = max((c.speedup for c in report.candidates if c.usable), default=0.0)
        if turn_best < best * STALL_GAIN and turn > 1:
            report.notices.append(f"llm agents stopped after turn {turn}: no gain over {best:.3f}x")
            return
        best = max(best, turn_best)


def _ask(client, messages: list[dict]) -> str:
    """The model's answer, or a marked error text (a failing endpoint is a rejected candidate, not a crash)."""
    try:
        return client.complete(messages)
    except Exception as err:  # noqa: BLE001 - network errors, bad responses: recorded, the search goes on
        return f"{ENDPOINT_ERROR}endpoint_error: {type(err).__name__}: {str(err)[:200]}"
