"""Placement is exact on small instances (checked against brute force) and respects its limits."""

from __future__ import annotations

import random

import pytest

from hetforge.planners.placement import PlacementProblem, brute_force, place


def random_problem(
    rng: random.Random, n: int, k: int, memory_tight: bool = False, loop: bool = False
) -> PlacementProblem:
    """A random DAG pipeline on k device classes with random latencies, memory and transfer costs."""
    classes = ["cpu"] + [f"gpu{j}" for j in range(k - 1)]
    preds = [[]] + [sorted(rng.sample(range(i), rng.randint(1, min(2, i)))) for i in range(1, n)]
    succ_count = [0] * n
    for ps in preds:
        for q in ps:
            succ_count[q] += 1
    sinks = [i for i in range(n) if succ_count[i] == 0 and i != n - 1]
    preds[n - 1] = sorted(set(preds[n - 1]) | set(sinks)) if n > 1 else []
    options = [sorted(rng.sample(classes, rng.randint(1, k))) for _ in range(n)]
    latency = [{c: rng.uniform(0.5, 20.0) for c in opts} for opts in options]
    memory = [{c: rng.uniform(1, 10) for c in opts} for opts in options]
    cap = {c: (rng.uniform(8, 25) if memory_tight else 1e9) for c in classes}
    rate = {(a, b): (0.0 if a == b else rng.uniform(0.001, 0.05)) for a in classes for b in classes}
    loops = {}
    if loop and n >= 3:
        loops = {1: (3, [n - 2])} if n - 2 != 1 else {}
    return PlacementProblem(
        stages=[f"s{i}" for i in range(n)],
        preds=preds,
        entry=0,
        output=n - 1,
        options=options,
        latency=latency,
        memory=memory,
        out_bytes=[rng.uniform(10, 500) for _ in range(n)],
        capacity=cap,
        device_memory={c: 1e9 for c in classes},
        count={c: rng.randint(1, 4) for c in classes},
        transfer=lambda a, b, nbytes: rate[(a, b)] * nbytes,
        loops=loops,
    )


@pytest.mark.parametrize("seed", range(40))
def test_latency_placement_is_exact_on_small_instances(seed):
    rng = random.Random(seed)
    p = random_problem(rng, n=rng.randint(2, 7), k=rng.randint(2, 4), memory_tight=seed % 3 == 0, loop=seed % 4 == 0)
    expected = brute_force(p, "latency")
    if expected is None:
        with pytest.raises(ValueError, match="memory"):
            place(p, "latency")
        return
    got = place(p, "latency")
    assert got.exact
    assert got.latency_ms == pytest.approx(expected[1], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_throughput_placement_is_exact_on_small_instances(seed):
    rng = random.Random(1000 + seed)
    p = random_problem(rng, n=rng.randint(2, 6), k=rng.randint(2, 3))
    p.slo_ms = None if seed % 2 else 60.0
    expected = brute_force(p, "throughput")
    if expected is None:
        with pytest.raises(ValueError):
            place(p, "throughput")
        return
    got = place(p, "throughput")
    assert got.throughput_rps == pytest.approx(expected[2], rel=1e-9)
    if p.slo_ms is not None:
        assert got.latency_ms <= p.slo_ms + 1e-9


def test_memory_limits_are_respected():
    rng = random.Random(7)
    for _ in range(20):
        p = random_problem(rng, n=6, k=3, memory_tight=True)
        try:
            got = place(p)
        except ValueError:
            continue
        used: dict[str, float] = {}
        for i, cls in enumerate(got.assignment):
            assert cls in p.options[i]
            used[cls] = used.get(cls, 0) + p.memory[i][cls]
        assert all(used[c] <= p.capacity[c] + 1e-9 for c in used)


def test_large_pipeline_falls_back_to_a_marked_heuristic():
    rng = random.Random(3)
    p = random_problem(rng, n=50, k=5)
    got = place(p, node_budget=2000)
    assert len(got.assignment) == 50
    assert not got.exact
    assert all(cls in p.options[i] for i, cls in enumerate(got.assignment))


def test_transfer_cost_can_keep_a_stage_off_the_faster_device():
    # b is faster on the GPU by 1 ms, but its input and output would cross the link at 5 ms each.
    p = PlacementProblem(
        stages=["a", "b", "c"],
        preds=[[], [0], [1]],
        entry=0,
        output=2,
        options=[["cpu"], ["cpu", "gpu"], ["cpu"]],
        latency=[{"cpu": 1}, {"cpu": 3, "gpu": 2}, {"cpu": 1}],
        memory=[{"cpu": 1}, {"cpu": 1, "gpu": 1}, {"cpu": 1}],
        out_bytes=[1, 1, 1],
        capacity={"cpu": 100, "gpu": 100},
        device_memory={"cpu": 100, "gpu": 100},
        count={"cpu": 1, "gpu": 1},
        transfer=lambda a, b, n: 0 if a == b else 5.0,
    )
    assert place(p).assignment == ("cpu", "cpu", "cpu")
