"""CPU cores for vLLM's CPU engines: the plan, the slots replicas claim, and the pinned start of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from hetforge.serving import cpu_cores


def test_the_plan_gives_each_engine_its_own_cores_and_keeps_the_rest():
    assert cpu_cores.plan([0, 1], 1) == ([[0]], [1])
    assert cpu_cores.plan([1, 0, 3, 2], 1) == ([[0, 1, 2]], [3])
    assert cpu_cores.plan(list(range(16)), 2) == ([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]], [12, 13, 14, 15])
    assert cpu_cores.plan(list(range(8)), 3) == ([[0, 1], [2, 3], [4, 5]], [6, 7])
    assert cpu_cores.plan([0, 1], 2) is None  # no core would be left for Ray and the ingress
    assert cpu_cores.plan([0], 1) is None
    assert cpu_cores.plan([0, 1, 2], 0) is None


def _env(tmp_path, slots) -> dict:
    return {cpu_cores.SLOTS_ENV: json.dumps(slots), cpu_cores.LOCKS_ENV: str(tmp_path / "locks")}


def test_replicas_claim_free_slots_and_share_the_first_when_all_are_held(tmp_path):
    env = _env(tmp_path, [[0], [1]])
    holder = subprocess.Popen(  # another replica's process holds slot 0 while it lives
        [sys.executable, "-c", "import sys; from hetforge.serving import cpu_cores; c = cpu_cores.claim(); "
         "print(c.cores, flush=True); sys.stdin.readline()"],
        env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "[0]"
        mine = cpu_cores.claim(env)
        assert mine.cores == [1] and not mine.shared
        extra = cpu_cores.claim(env)  # a third engine (a canary's): shares the first slot
        assert extra.cores == [0] and extra.shared
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    again = cpu_cores.claim(env)  # the holder's process ended: its slot is free again
    assert again.cores == [0] and not again.shared
    mine.release()
    assert cpu_cores.claim(env).cores == [1]
    assert cpu_cores.claim({}) is None  # no plan: no claim


def _cores_of(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_processes_started_in_a_pinned_block_run_on_its_cores_and_the_thread_gets_its_own_back():
    everything = os.sched_getaffinity(0)
    first = min(everything)
    with cpu_cores.pinned([first]):
        assert os.sched_getaffinity(0) == {first}
        child = subprocess.Popen([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        started = threading.Event()
        thread = threading.Thread(target=lambda: (started.set(), threading.Event().wait(2)))
        thread.start()
        started.wait()
    assert child.communicate(timeout=30)[0].strip() == str([first])
    assert os.sched_getaffinity(0) == everything
    assert os.sched_getaffinity(thread.native_id) == everything  # a thread the block started is moved back too
    thread.join()


def test_deploy_plans_cores_only_for_vllm_cpu_engines_that_isolate(tmp_path, monkeypatch):
    from hetforge.serving import deploy as dep
    from hetforge.spec.models import Pipeline

    def pipeline(isolate: bool, replicas: int = 1) -> Pipeline:
        return Pipeline.model_validate(
            {
                "name": "p",
                "entry": "chat",
                "output": "chat",
                "stages": [
                    {
                        "name": "chat",
                        "kind": "llm",
                        "vllm": {"model": "m", "isolate_cores": isolate},
                        "replicas": replicas,
                    }
                ],
            }
        )

    monkeypatch.delenv(cpu_cores.OMP_BIND_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu = {"chat": {"device": "cpu"}}
    assert dep._engine_cores(pipeline(True), cpu) == ([[0, 1, 2]], [3])
    assert dep._engine_cores(pipeline(True, replicas=2), cpu) == ([[0], [1]], [2, 3])
    assert dep._engine_cores(pipeline(True, replicas=4), cpu) is None
    assert dep._engine_cores(pipeline(False), cpu) is None
    assert dep._engine_cores(pipeline(True), {"chat": {"device": "cuda"}}) is None
    monkeypatch.setenv(cpu_cores.OMP_BIND_ENV, "0-1")  # the user's own binding wins
    assert dep._engine_cores(pipeline(True), cpu) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_job_pinned_to_the_node_cores_gets_the_engine_slots_back():
    """A job's worker starts on the other cores alone; `node_cores` adds the engine slots of the plan it was given."""
    cores = sorted(os.sched_getaffinity(0))
    env = {cpu_cores.SLOTS_ENV: json.dumps([[cores[0]]])}
    script = (
        "import os, sys, json; from hetforge.serving import cpu_cores; "
        "cpu_cores.pin_process(cpu_cores.node_cores(json.loads(sys.argv[1]))); "
        "print(json.dumps(sorted(os.sched_getaffinity(0))))"
    )
    with cpu_cores.pinned(cores[1:]):  # as Ray's worker would be
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(env)], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    assert json.loads(out) == cores
    assert cpu_cores.node_cores({}) == sorted(os.sched_getaffinity(0))
