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
run (`judge.ReferenceSide`): a batch's candidates are checked on the same fresh seeds, each
reference output computed once. When checks run, and which are cut, is `scheduling`'s; the records
and the report are `report`'s.

Over 450 lines: the round loop, candidate generation per agent and the budget bookkeeping share
one state (the task, the deadline, the records); scheduling of checks is `scheduling.py`, records `report.py`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch.nn as nn

from hetforge import config
from hetforge.core.problem import Problem
from hetforge.optimizer import llm_agent, scheduling
from hetforge.optimizer import verdict as V
from hetforge.optimizer.capture import CaptureError, capture
from hetforge.optimizer.judge import ReferenceSide, Verification, VerifyOptions
from hetforge.optimizer.library import fuse_graph
from hetforge.optimizer.recipes import matched_compile, recipe_candidate_source, recipes_for
from hetforge.optimizer.report import BASELINE, CandidateRecord, CandidateStatus, OptimizeReport
from hetforge.optimizer.rewrites import rewrite_graph
from hetforge.optimizer.sandbox import close_all, spare_workers
from hetforge.optimizer.scheduling import Proposal
from hetforge.optimizer.variants import VariantSpec, rewrite_candidate_source, variant_candidate_source

AGENTS = ("recipes", "rewrites", "library", "llm")
TRUSTED_AGENTS = ("recipes", "rewrites", "library", "compose")  # hetforge's own code: may share the compile cache
ENDPOINT_ERROR = "\0"  # starts the conversation's text of an endpoint failure: not the model's answer
STALL_GAIN = 1.02  # an LLM turn that improves the best speedup by less than 2% ends the search
# Of the budget left when a batch starts: its correctness checks must end by then, timing gets the rest (on a GPU,
# about half a second a candidate with sampled outputs; CPU problems run longer calls on fewer cores).
CHECK_SHARE = {"cuda": 0.8, "cpu": 0.6}
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
    """What to optimize, where, under which numerics, within which budget: `problem_file` (a problem file), or
    `problem` (any Problem's JSON: a module stage with its checkpoint, a HuggingFace stage, ...)."""

    problem_file: str | None = None
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
    review_speedup: float = 10.0  # an untrusted candidate this much faster than the best recipe needs a human
    problem: dict | None = None  # Problem.to_json(); takes the place of problem_file

    def reference(self) -> Problem:
        """The reference computation this task optimizes."""
        if self.problem is not None:
            return Problem.from_json(self.problem)
        if self.problem_file is None:
            raise ValueError("an OptimizeTask needs a problem_file or a problem")
        return Problem(file=str(Path(self.problem_file).resolve()))


def _has_conv(problem: Problem) -> bool:
    model = problem.load().build()
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())


def propose_round1(
    task: OptimizeTask, problem: Problem, refused: list[tuple[Proposal, V.Reason]] | None = None
) -> list[Proposal]:
    """Every first-round candidate of the enabled fast agents. A graph agent that cannot capture the stage goes
    into `refused` with the reason (the operation or exception that broke capture), to be recorded unrun."""
    reference = problem.to_json()
    out: list[Proposal] = []
    # baselines first: eager and torch.compile are what every other candidate is measured against
    if "recipes" in task.agents:
        for recipe in recipes_for(task.device, task.precision, _has_conv(problem)):
            if task.recipes and recipe.name not in task.recipes and recipe.name != "eager":
                continue
            spec = VariantSpec(recipe=asdict(recipe), precision=task.precision)
            out.append((f"recipe:{recipe.name}", "recipes", recipe_candidate_source(reference, recipe), spec.to_json()))
    graph_agents = [a for a in ("rewrites", "library") if a in task.agents]
    if not graph_agents:
        return out
    loaded = problem.load()
    inputs = loaded.main_inputs(0)
    for agent in graph_agents:
        try:  # a fresh capture each: the library matches the graph as it comes, not the rewritten one
            gm = capture(loaded.build(), inputs)
        except CaptureError as err:
            name = "rewrites" if agent == "rewrites" else "library:kernels"
            if refused is not None:
                refused.append(((name, agent, "", None), V.Reason(V.RejectKind.NO_GRAPH, str(err))))
            continue
        if agent == "rewrites":
            names = list(rewrite_graph(gm))
            if names:
                spec = VariantSpec(rewrites=tuple(names), precision=task.precision)
                source = rewrite_candidate_source(reference, names, task.precision)
                out.append(("rewrites:" + "+".join(names), "rewrites", source, spec.to_json()))
        elif fuse_graph(gm, inputs, task.precision):  # some pattern matched a library kernel
            spec = VariantSpec(library=True, precision=task.precision)
            out.append(("library:kernels", "library", variant_candidate_source(reference, spec), spec.to_json()))
    return out


def propose_compositions(
    task: OptimizeTask, round1: list[Proposal], report: OptimizeReport | None, problem: Problem | None = None
) -> list[Proposal]:
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
        if any(agent == "library" for _, agent, _, _ in round1):
            parts["library"] = {}
        if "recipes" in task.agents and (not task.recipes or "compile" in task.recipes):
            parts["recipes"] = {
                "recipe": asdict(
                    next(
                        r
                        for r in recipes_for(task.device, task.precision, False)
                        if r.name == matched_compile(task.device, task.precision)
                    )
                )
            }
    else:
        faster = [c for c in report.candidates if c.usable and c.speedup > 1.0 and c.spec]
        for agent in ("rewrites", "library", "recipes"):
            found = [c for c in faster if c.agent == agent and c.name != "recipe:eager"]
            if found:
                parts[agent] = max(found, key=lambda c: c.speedup).spec
    reference = (problem or task.reference()).to_json()
    out: list[Proposal] = []
    for n in (2, 3):
        for combo in itertools.combinations(parts, n):
            spec = VariantSpec(
                rewrites=tuple(parts["rewrites"]["rewrites"]) if "rewrites" in combo else (),
                library="library" in combo,
                recipe=parts["recipes"]["recipe"] if "recipes" in combo else None,
                precision=task.precision,
            )
            out.append(
                (f"compose:{spec.label()}", "compose", variant_candidate_source(reference, spec), spec.to_json())
            )
    return out


def optimize(
    task: OptimizeTask,
    scratch: Path,
    progress: Callable[[CandidateRecord], None] | None = None,
    approve: Callable[[CandidateRecord], bool] | None = None,
    notice: Callable[[str], None] | None = None,
    llm_client: Callable[[], object] | None = None,
    started: float | None = None,
) -> OptimizeReport:
    """Run the rounds; `approve` is asked about accepted candidates flagged for review (default: no).

    `llm_client` makes the LLM agents' client (default: the configured OpenAI-compatible endpoint).
    `started`: the time.monotonic() the budget counts from (default: now; the CLI passes its own start).
    Workers for the next verification start while the current one runs (`sandbox.spare_workers`).
    """
    unknown = [a for a in task.agents if a not in AGENTS]
    if unknown:
        raise ValueError(f'Got "{",".join(unknown)}" for agents: any of {", ".join(AGENTS)}.')
    start = started if started is not None else time.monotonic()
    problem = task.reference()
    options = VerifyOptions(
        device=task.device,
        precision=task.precision,
        trials=task.trials,
        rounds=task.rounds,
        startup_timeout_s=600,
        timeout_s=600,
        threads=task.threads,
        review_speedup=task.review_speedup,
    )
    memory = VerifyOptions.memory_mb if task.device == "cpu" else 0
    # a worker per check of the first batch and one for the reference start while the proposals are made
    with spare_workers(
        size=2, memory_mb=memory, device=task.device, initial=scheduling.parallel_checks() + 1
    ) as spares:
        reference = ReferenceSide(problem, options)
        try:
            return _optimize(task, scratch, progress, approve, notice, llm_client, start, problem, options, reference)
        finally:
            close_all([reference, spares])  # side by side: a worker with a CUDA context takes seconds to exit


def _optimize(
    task: OptimizeTask,
    scratch: Path,
    progress,
    approve,
    notice,
    llm_client,
    start: float,
    problem: Problem,
    options: VerifyOptions,
    reference: ReferenceSide,
) -> OptimizeReport:
    scratch.mkdir(parents=True, exist_ok=True)
    report = OptimizeReport(task=asdict(task))
    deadline = (
        start + task.budget_s - min(REPORT_RESERVE_S[task.device], task.budget_s / 10)
    )  # teardown and report within the budget too

    def over_budget() -> bool:
        return time.monotonic() > deadline

    def record_verdict(record: CandidateRecord, verdict: V.Verdict, cut_off: bool) -> None:
        """`cut_off`: the verification ran into a budget deadline (a timeout then says nothing about the candidate)."""
        record.verdict = verdict
        if verdict.verdict == V.Status.REJECTED:
            reason = verdict.reasons[0]
            timed_out = reason.kind == V.RejectKind.TIMEOUT or (
                reason.kind == V.RejectKind.REFERENCE_FAILED and reason.cause == V.RejectKind.TIMEOUT
            )
            if cut_off and timed_out:
                record.status, record.note = (
                    CandidateStatus.SKIPPED,
                    f"budget of {task.budget_s:.0f} s spent during its verification",
                )
            else:
                record.status, record.note = CandidateStatus.REJECTED, f"{reason.kind}: {reason.message}"[:300]
        elif verdict.needs_review and not (approve and approve(record)):
            record.status, record.note = CandidateStatus.NEEDS_REVIEW, "; ".join(verdict.flags)[:300]
        else:
            if verdict.needs_review:
                verdict.needs_review = False  # a human approved it
                record.note = "approved by a human"
            record.status = CandidateStatus.ACCEPTED

    def judge_all(
        proposals: list[Proposal], round_: int, verify_options: VerifyOptions = options
    ) -> list[CandidateRecord]:
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
                record.status, record.note = CandidateStatus.SKIPPED, f"budget of {task.budget_s:.0f} s spent"
                continue
            path = scratch / f"candidate_{len(report.candidates) + len(records) - 1:02d}.py"
            path.write_text(source)
            opts = replace(verify_options, deadline=checks_until if name != BASELINE else 0.0)
            if agent in TRUSTED_AGENTS:
                opts = replace(opts, trusted_candidate=True, fetch_sample=FETCH_SAMPLE)
            if agent == "recipes":  # the reference itself under torch.compile or a CUDA graph: fast is no exploit
                opts = replace(opts, flag_speedup=False)
            runs[id(record)] = Verification(problem, path, opts, shared=reference)

        def check(record: CandidateRecord) -> None:
            run = runs[id(record)]
            if time.monotonic() >= checks_until and record.name != BASELINE:
                run.close()
                record.status, record.note = (
                    CandidateStatus.SKIPPED,
                    f"budget of {task.budget_s:.0f} s spent before its checks started",
                )
                del runs[id(record)]
                return
            run.check()
            checked_at[id(record)] = time.monotonic()

        cut = scheduling.check_side_by_side(
            sorted(
                (r for r in records if id(r) in runs),
                key=lambda r: scheduling.check_priority(r, "recipe:" + matched_compile(task.device, task.precision)),
            ),
            check,
            runs,
            now,
            min_grace=task.budget_s / 10,
        )
        if cut or any(run.verdict.reasons for run in runs.values()):
            time.sleep(SETTLE_S[task.device])  # a worker may have been stopped: its memory is being scrubbed
        for record in records:  # timing, in proposal order: the baselines first
            run = runs.get(id(record))
            if run is not None:
                if id(record) in cut:
                    record.verdict, record.status, record.note = run.verdict, CandidateStatus.SKIPPED, cut[id(record)]
                elif over_budget() and run.verdict.verdict != V.Status.REJECTED and record.name != BASELINE:
                    record.status, record.note = (
                        CandidateStatus.SKIPPED,
                        f"budget of {task.budget_s:.0f} s spent before its timing",
                    )
                else:
                    verdict = run.finish(deadline=deadline if record.name != BASELINE else None, close=False)
                    cut_off = (
                        checked_at.get(id(record), 0.0) >= checks_until - 1.0 or time.monotonic() >= deadline - 1.0
                    )
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
            record = CandidateRecord(
                name, agent, round_, source, None, status=CandidateStatus.SKIPPED, note=why[:300], spec=spec
            )
            report.candidates.append(record)
            if progress:
                progress(record)

    def judge(
        proposal: Proposal, round_: int, verify_options: VerifyOptions = options, refused: V.Reason | None = None
    ) -> CandidateRecord:
        """Verify one proposal and record it; `refused`: record it as rejected, for that reason, without running it."""
        if refused is None:
            return judge_all([proposal], round_, verify_options)[0]
        name, agent, source, spec = proposal
        record = CandidateRecord(name, agent, round_, source, None, spec=spec, refusal=refused)
        record.status, record.note = CandidateStatus.REJECTED, f"{refused.kind}: {refused.message}"[:300]
        report.candidates.append(record)
        if progress:
            progress(record)
        return record

    refused: list[tuple[Proposal, V.Reason]] = []
    first = propose_round1(task, problem, refused)
    for proposal, reason in refused:
        judge(proposal, 1, refused=reason)
    judge_all(first + (propose_compositions(task, first, None, problem) if task.compose else []), 1)
    if task.compose:
        tried = {c.name for c in report.candidates}
        second = [p for p in propose_compositions(task, first, report, problem) if p[0] not in tried]
        window = CHECK_SHARE[task.device] * max(0.0, deadline - time.monotonic())
        need = scheduling.expected_check_s(report.candidates, second)
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
            _llm_rounds(
                task,
                problem,
                report,
                judge,
                replace(options, weights_from_reference=True),
                over_budget,
                llm_client or _default_client,
            )

    review_against_recipes(report, options.review_speedup)
    choose_winner(report, task.device, task.precision)
    report.elapsed_s = time.monotonic() - start
    return report


def review_against_recipes(report: OptimizeReport, review_speedup: float) -> None:
    """Lift the implausible-speedup flag from a candidate within `review_speedup` of the best trusted recipe.

    The judge flags an untrusted candidate more than `review_speedup` times faster than eager. Where
    torch.compile or a CUDA graph of the reference itself is, say, 25x faster than eager (a LayerNorm
    over long rows), a candidate near that is no exploit: the bar is the best recipe, never eager alone.
    A candidate whose only flags were such speedup flags becomes usable.
    """
    trusted = [c.speedup for c in report.candidates if c.usable and c.agent == "recipes"]
    bar = review_speedup * max([1.0, *trusted])
    for record in report.candidates:
        verdict = record.verdict
        if record.status != CandidateStatus.NEEDS_REVIEW or verdict is None or record.speedup > bar:
            continue
        kept = [f for f in verdict.flags if not f.startswith(str(V.Flag.SPEEDUP))]
        if len(kept) == len(verdict.flags):
            continue
        verdict.notes.append(
            f"{record.speedup:.1f}x over eager is within {review_speedup:g}x of the best compiler recipe "
            f"({max(trusted, default=1.0):.1f}x): not flagged"
        )
        verdict.flags = kept
        if not kept:
            verdict.needs_review = False
            record.status, record.note = CandidateStatus.ACCEPTED, ""


def choose_winner(report: OptimizeReport, device: str, precision: str) -> None:
    """The winner, and its speedups over eager and over torch.compile at the same precision policy.

    Candidates whose speedup holds with confidence (`Verdict.claim` 'faster') rank before those within
    noise of the reference, then by speedup. The compile baseline is `recipes.matched_compile(device,
    precision)`: dividing a TF32 winner by IEEE-fp32 torch.compile would claim what TF32 alone gives.
    """
    usable = [c for c in report.candidates if c.usable]
    if not usable:
        return
    winner = max(usable, key=lambda c: (c.verdict.claim == "faster", c.speedup))
    winner.status = CandidateStatus.WINNER
    report.winner = winner
    report.speedup_vs_eager = winner.speedup
    report.claim = winner.verdict.claim
    report.compile_baseline = "recipe:" + matched_compile(device, precision)
    compiled = next((c for c in report.candidates if c.name == report.compile_baseline), None)
    if compiled is not None and compiled.usable and compiled.speedup > 0:
        report.speedup_vs_compile = round(winner.speedup / compiled.speedup, 4)
    else:
        why = "not verified" if compiled is None else (compiled.status or "not finished")
        report.notices.append(f"no speedup over torch.compile: its matched recipe {report.compile_baseline} was {why}")
    for c in usable:
        if c is not winner:
            c.note = f"slower than {winner.name} ({c.speedup:.3f}x vs {winner.speedup:.3f}x over eager)"


def _default_client():
    return llm_agent.LLMClient(config.llm_endpoint(), config.llm_timeout_s())


def _llm_rounds(
    task: OptimizeTask,
    problem: Problem,
    report: OptimizeReport,
    judge,
    options: VerifyOptions,
    over_budget: Callable[[], bool],
    make_client: Callable[[], object],
) -> None:
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
    history = [
        llm_agent.Attempt(c.agent, 0, c.status, c.note or f"{c.speedup:.3f}x", c.speedup or None)
        for c in report.candidates
    ]
    strategies = list(llm_agent.STRATEGIES)[: max(1, task.llm_agents)]
    conversations = [
        llm_agent.Conversation(
            s,
            [
                {"role": "system", "content": llm_agent.system_prompt(s, task.precision)},
                {"role": "user", "content": llm_agent.first_prompt(loaded.source, facts, profile, history, task.hint)},
            ],
        )
        for s in strategies
    ]
    client = make_client()
    best = max((c.speedup for c in report.candidates if c.usable), default=0.0)
    for turn in range(1, task.llm_turns + 1):
        if over_budget():
            report.notices.append(f"llm agents stopped before turn {turn}: budget of {task.budget_s:.0f} s spent")
            return
        with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:  # the model answers in parallel
            answers = list(pool.map(lambda conv: _ask(client, conv.messages), conversations))
        for conv, answer in zip(
            conversations, answers, strict=True
        ):  # verified one at a time: timings need the device alone
            if isinstance(answer, V.Reason):  # the endpoint failed
                refusal, code, text = answer, None, f"{ENDPOINT_ERROR}{answer.kind}: {answer.message}"
            else:
                code, text = llm_agent.extract_code(answer), answer
                refusal = (
                    V.Reason(V.RejectKind.NO_CODE, "the answer has no Python code block") if code is None else None
                )
            conv.messages.append({"role": "assistant", "content": text})
            name = f"llm:{conv.strategy}:turn{turn}"
            if refusal is not None:
                judge((name, "llm", text[:4000], None), 2 + turn, options, refused=refusal)
                attempt = llm_agent.Attempt(conv.strategy, turn, refusal.kind, f"{refusal.kind}: {refusal.message}")
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


def _ask(client, messages: list[dict]) -> str | V.Reason:
    """The model's answer, or the endpoint's failure (a failing endpoint is a rejected candidate, not a crash)."""
    try:
        return client.complete(messages)
    except Exception as err:  # noqa: BLE001 - network errors, bad responses: recorded, the search goes on
        return V.Reason(V.RejectKind.ENDPOINT_ERROR, f"{type(err).__name__}: {str(err)[:200]}")
