"""Placement: a device class for every stage, minimizing end-to-end latency or maximizing throughput.

The instance is plain data (`PlacementProblem`), so the search is tested and benchmarked without
models or devices. Latency is the critical path from entry to output: stage latencies on their
classes plus transfer time on every data edge whose ends sit on different classes; an agent loop
costs `rounds` LLM calls and `rounds - 1` rounds of its slowest tool, with the round trips to it.

Search: branch and bound over stages in topological order. The bound is the critical path with the
stages not yet placed at their fastest allowed class and their edges free, which never exceeds any
completion, so the result is exact when the search finishes within its node budget. Beyond the
budget (large pipelines; 0.5 s by default), the result is the best of the search so far and of a greedy start
improved by local search (move one stage at a time while that helps), and is marked not exact.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SMALL_MESSAGE_BYTES = 4096  # JSON between tools and LLMs: what a non-model stage hands on


@dataclass
class PlacementProblem:
    """A placement instance. Stage i may go to any class in options[i]."""

    stages: list[str]
    preds: list[list[int]]  # data-flow predecessors of each stage
    entry: int
    output: int
    options: list[list[str]]
    latency: list[dict[str, float]]  # ms per request, per allowed class
    memory: list[dict[str, float]]  # bytes, per allowed class
    out_bytes: list[float]  # bytes each stage hands downstream
    capacity: dict[str, float]  # bytes of all devices of a class together
    device_memory: dict[str, float]  # bytes of one device of a class
    count: dict[str, int]  # devices per class
    transfer: Callable[[str, str, float], float]  # ms to move bytes from class a to class b
    loops: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # llm -> (rounds, tools)
    prefer: list[str | None] = field(default_factory=list)
    slo_ms: float | None = None

    def __post_init__(self):
        n = len(self.stages)
        self.prefer = self.prefer or [None] * n
        indegree = [len(p) for p in self.preds]
        succs: list[list[int]] = [[] for _ in range(n)]
        for i, ps in enumerate(self.preds):
            for p in ps:
                succs[p].append(i)
        queue = [i for i in range(n) if indegree[i] == 0]
        self.order: list[int] = []
        while queue:
            i = queue.pop(0)
            self.order.append(i)
            for s in succs[i]:
                indegree[s] -= 1
                if indegree[s] == 0:
                    queue.append(s)
        if len(self.order) != n:
            raise ValueError("data flow has a cycle: placement needs a DAG (agent loops go in `loops`)")
        reach, stack = {self.entry}, [self.entry]
        while stack:
            i = stack.pop()
            for s in succs[i]:
                if s not in reach:
                    reach.add(s)
                    stack.append(s)
        self.on_paths = reach
        self.min_latency = [min(self.latency[i][c] for c in self.options[i]) for i in range(n)]


@dataclass(frozen=True)
class Placement:
    assignment: tuple[str, ...]
    latency_ms: float
    throughput_rps: float
    critical_path: tuple[int, ...]
    exact: bool
    nodes_searched: int


def stage_time(p: PlacementProblem, i: int, assign: list[str | None]) -> float:
    """Latency of stage i as placed (an unplaced stage counts its fastest option)."""
    cls = assign[i]
    own = p.latency[i][cls] if cls is not None else p.min_latency[i]
    if i not in p.loops:
        return own
    rounds, tools = p.loops[i]
    slowest = 0.0
    for t in tools:
        tc = assign[t]
        tool = p.latency[t][tc] if tc is not None else p.min_latency[t]
        trip = 2 * p.transfer(cls, tc, SMALL_MESSAGE_BYTES) if cls is not None and tc is not None else 0.0
        slowest = max(slowest, tool + trip)
    return rounds * own + (rounds - 1) * slowest


def evaluate(p: PlacementProblem, assign: list[str | None]) -> tuple[float, tuple[int, ...]]:
    """Critical-path length and the path; a lower bound when some stages are unplaced."""
    finish = [-math.inf] * len(p.stages)
    parent = [-1] * len(p.stages)
    for i in p.order:
        if i not in p.on_paths:  # tools reached only through an agent loop count inside their LLM
            continue
        start = 0.0
        for q in p.preds[i]:
            if finish[q] == -math.inf:
                continue
            placed = assign[q] is not None and assign[i] is not None
            arrival = finish[q] + (p.transfer(assign[q], assign[i], p.out_bytes[q]) if placed else 0.0)
            if arrival >= start:
                start, parent[i] = arrival, q
        finish[i] = start + stage_time(p, i, assign)
    path, node = [], p.output
    while node >= 0:
        path.append(node)
        node = parent[node]
    return finish[p.output], tuple(reversed(path))


def throughput(p: PlacementProblem, assign: list[str | None]) -> float:
    """Requests per second the busiest device class allows (its devices shared by its stages)."""
    load: dict[str, float] = {}
    for i, cls in enumerate(assign):
        if cls is None:
            continue
        rounds = p.loops[i][0] if i in p.loops else 1
        load[cls] = load.get(cls, 0.0) + p.latency[i][cls] * rounds
    return min((p.count[c] * 1000.0 / ms for c, ms in load.items() if ms > 0), default=math.inf)


def _fits(p: PlacementProblem, i: int, cls: str, used: dict[str, float]) -> bool:
    need = p.memory[i][cls]
    return need <= p.device_memory[cls] and used.get(cls, 0.0) + need <= p.capacity[cls]


def _better(objective: str, a: tuple[float, float], b: tuple[float, float] | None) -> bool:
    """Compare (latency, throughput) pairs under the objective."""
    if b is None:
        return True
    if objective == "latency":
        return a[0] < b[0] - 1e-9 or (abs(a[0] - b[0]) <= 1e-9 and a[1] > b[1] + 1e-9)
    return a[1] > b[1] + 1e-9 or (abs(a[1] - b[1]) <= 1e-9 and a[0] < b[0] - 1e-9)


def _score(p: PlacementProblem, assign: list[str | None]) -> tuple[float, float]:
    return evaluate(p, assign)[0], throughput(p, assign)


def _feasible_slo(p: PlacementProblem, score: tuple[float, float], objective: str) -> bool:
    return objective == "latency" or p.slo_ms is None or score[0] <= p.slo_ms


def place(
    p: PlacementProblem, objective: str = "latency", node_budget: int = 200_000, time_budget_s: float = 0.5
) -> Placement:
    """The best placement found; exact unless the node or time budget ran out (see the module docstring)."""
    if objective not in ("latency", "throughput"):
        raise ValueError(f'Got "{objective}" for objective: latency or throughput.')
    n = len(p.stages)
    seq = p.order
    best_assign: list[str] | None = None
    best: tuple[float, float] | None = None

    start = local_search(p, greedy(p), objective)
    if start is not None:
        best_assign, best = list(start), _score(p, start)
        if not _feasible_slo(p, best, objective):
            best_assign, best = None, None

    assign: list[str | None] = [None] * n
    used: dict[str, float] = {}
    nodes = 0
    exhausted = False
    deadline = time.monotonic() + time_budget_s

    def dfs(k: int) -> None:
        nonlocal nodes, best, best_assign, exhausted
        if exhausted:
            return
        nodes += 1
        if nodes > node_budget or (nodes % 256 == 0 and time.monotonic() > deadline):
            exhausted = True
            return
        if k == n:
            score = _score(p, assign)
            if _feasible_slo(p, score, objective) and _better(objective, score, best):
                best, best_assign = score, list(assign)  # type: ignore[arg-type]
            return
        i = seq[k]
        for cls in sorted(p.options[i], key=lambda c: (p.latency[i][c], c != p.prefer[i])):
            if not _fits(p, i, cls, used):
                continue
            assign[i] = cls
            used[cls] = used.get(cls, 0.0) + p.memory[i][cls]
            if _promising(p, assign, best, objective):
                dfs(k + 1)
            used[cls] -= p.memory[i][cls]
            assign[i] = None

    dfs(0)
    if best_assign is None:
        raise ValueError(
            "no placement satisfies the memory limits"
            + (f" and the {p.slo_ms} ms latency target" if p.slo_ms and objective == "throughput" else "")
        )
    latency, path = evaluate(p, best_assign)
    return Placement(tuple(best_assign), latency, throughput(p, best_assign), path, not exhausted, nodes)


def _promising(p: PlacementProblem, assign: list[str | None], best: tuple[float, float] | None, objective: str) -> bool:
    if best is None:
        return True
    bound = evaluate(p, assign)[0]
    if objective == "latency":
        return bound <= best[0] + 1e-9  # equal: may still win on throughput
    # Throughput only falls as stages are added to classes; the SLO bound prunes too.
    if p.slo_ms is not None and bound > p.slo_ms + 1e-9:
        return False
    return throughput(p, assign) >= best[1] - 1e-9


def greedy(p: PlacementProblem) -> list[str] | None:
    """Each stage, in topological order, on its fastest class that still has memory (None if stuck)."""
    assign: list[str | None] = [None] * len(p.stages)
    used: dict[str, float] = {}
    for i in p.order:
        for cls in sorted(p.options[i], key=lambda c: p.latency[i][c]):
            if _fits(p, i, cls, used):
                assign[i] = cls
                used[cls] = used.get(cls, 0.0) + p.memory[i][cls]
                break
        else:
            return None
    return assign  # type: ignore[return-value]


def local_search(
    p: PlacementProblem, assign: list[str] | None, objective: str, max_rounds: int = 50
) -> list[str] | None:
    """Move one stage to another class while that improves the objective and memory allows."""
    if assign is None:
        return None
    assign = list(assign)
    score = _score(p, assign)
    for _ in range(max_rounds):
        improved = False
        for i in range(len(p.stages)):
            current = assign[i]
            used: dict[str, float] = {}
            for j, c in enumerate(assign):
                if j != i:
                    used[c] = used.get(c, 0.0) + p.memory[j][c]
            for cls in p.options[i]:
                if cls == current or not _fits(p, i, cls, used):
                    continue
                assign[i] = cls
                trial = _score(p, assign)
                if _feasible_slo(p, trial, objective) and _better(objective, trial, score):
                    score, current, improved = trial, cls, True
                else:
                    assign[i] = current
            assign[i] = current
        if not improved:
            break
    return assign


def brute_force(p: PlacementProblem, objective: str = "latency") -> tuple[tuple[str, ...], float, float] | None:
    """Every feasible assignment tried: the exact optimum, for checking `place` on small instances."""
    best: tuple[float, float] | None = None
    best_assign = None
    for combo in itertools.product(*p.options):
        used: dict[str, float] = {}
        ok = True
        for i, cls in enumerate(combo):
            if not _fits(p, i, cls, used):
                ok = False
                break
            used[cls] = used.get(cls, 0.0) + p.memory[i][cls]
        if not ok:
            continue
        score = _score(p, list(combo))
        if _feasible_slo(p, score, objective) and _better(objective, score, best):
            best, best_assign = score, combo
    return (best_assign, best[0], best[1]) if best_assign is not None else None
